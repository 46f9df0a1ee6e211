// Argument checks shared by every device binding of the recurrence ops. The module layer
// (lstm_fused/modules.py) already gives nn.LSTM's messages for user input; these guard direct
// op calls, so a bad call fails with a sentence instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace lstm_fused {

struct RecurrenceSizes {
  int64_t T, B, H, P;
  bool has_proj;
};

inline void check_same_device_dtype(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "lstm_fused: ", name, " is on ", t.device(),
              " but xproj is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "lstm_fused: ", name, " has dtype ",
              t.scalar_type(), " but xproj has dtype ", ref.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "lstm_fused: ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

// Both input-projection biases or neither; each (4H) with ref's device and dtype.
inline void check_biases(const at::Tensor& ref, const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh, int64_t H) {
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "lstm_fused: give both biases or neither");
  if (!b_ih.has_value()) return;
  check_same_device_dtype(ref, *b_ih, "b_ih");
  check_same_device_dtype(ref, *b_hh, "b_hh");
  check_shape(*b_ih, {4 * H}, "b_ih");
  check_shape(*b_hh, {4 * H}, "b_hh");
}

inline RecurrenceSizes check_forward_args(const at::Tensor& xproj, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& w_hr,
                                          const at::Tensor& h0, const at::Tensor& c0,
                                          const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(xproj.dim() == 3, "lstm_fused: xproj must be (T, B, 4H), got ", xproj.sizes());
  RecurrenceSizes s;
  s.T = xproj.size(0);
  s.B = xproj.size(1);
  TORCH_CHECK(xproj.size(2) % 4 == 0 && xproj.size(2) > 0,
              "lstm_fused: xproj's last dim must be 4*hidden_size, got ", xproj.size(2));
  s.H = xproj.size(2) / 4;
  s.has_proj = w_hr.has_value();
  s.P = s.has_proj ? w_hr->size(0) : s.H;
  TORCH_CHECK(s.T > 0, "lstm_fused: the sequence must have at least one step");
  check_same_device_dtype(xproj, w_hh, "w_hh");
  check_same_device_dtype(xproj, h0, "h0");
  check_same_device_dtype(xproj, c0, "c0");
  check_shape(w_hh, {4 * s.H, s.P}, "w_hh");
  if (s.has_proj) {
    check_same_device_dtype(xproj, *w_hr, "w_hr");
    check_shape(*w_hr, {s.P, s.H}, "w_hr");
  }
  check_shape(h0, {s.B, s.P}, "h0");
  check_shape(c0, {s.B, s.H}, "c0");
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong, "lstm_fused: lengths must be int64");
    TORCH_CHECK(lengths->device() == xproj.device(), "lstm_fused: lengths is on ",
                lengths->device(), " but xproj is on ", xproj.device());
    check_shape(*lengths, {s.B}, "lengths");
  }
  return s;
}

inline RecurrenceSizes check_backward_args(const at::Tensor& dy, const at::Tensor& dh_n,
                                           const at::Tensor& dc_n, const at::Tensor& w_hh,
                                           const std::optional<at::Tensor>& w_hr,
                                           const at::Tensor& h0, const at::Tensor& c0,
                                           const std::optional<at::Tensor>& lengths,
                                           const at::Tensor& y, const at::Tensor& gates,
                                           const at::Tensor& c_all) {
  TORCH_CHECK(gates.dim() == 3, "lstm_fused: backward needs the saved gates (T, B, 4H); got ",
              gates.sizes(), " (was the forward run with save=False?)");
  RecurrenceSizes s = check_forward_args(gates, w_hh, w_hr, h0, c0, lengths);
  check_same_device_dtype(gates, y, "y");
  check_same_device_dtype(gates, dy, "dy");
  check_same_device_dtype(gates, dh_n, "dh_n");
  check_same_device_dtype(gates, dc_n, "dc_n");
  check_shape(y, {s.T, s.B, s.P}, "y");
  check_shape(dy, {s.T, s.B, s.P}, "dy");
  check_shape(dh_n, {s.B, s.P}, "dh_n");
  check_shape(dc_n, {s.B, s.H}, "dc_n");
  check_shape(c_all, {s.T, s.B, s.H}, "c_all");
  const auto acc = gates.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(c_all.scalar_type() == acc, "lstm_fused: c_all must be ", acc, ", got ",
              c_all.scalar_type());
  return s;
}

}  // namespace lstm_fused
