// CPU kernels of the bidirectional ops (schemas in csrc/ops.cpp): both directions of a layer
// without projection in one call, so that they can run side by side instead of one after the
// other (panel_forward_pair, panel_recurrence.cpp), and write their halves of the layer's
// (T, B, 2H) output in place (no concatenation after, no split of its gradient before).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/recurrence.h"

namespace lstm_fused::cpu {
namespace {

void check_states(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == 2, "lstm_fused: ", op, " takes ", name,
              " (2, B, H), one per direction; got ", t.sizes());
}

void check_panel_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(panel_kernels_apply(t.scalar_type(), /*has_proj=*/false), "lstm_fused: ", op,
              " supports float32, bfloat16 and float16, not ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bidirectional_forward(
    const at::Tensor& xproj_f, const at::Tensor& xproj_r, const at::Tensor& w_hh_f,
    const at::Tensor& w_hh_r, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, bool save) {
  constexpr const char* op = "bidirectional_forward";
  check_states(h0, op, "h0");
  check_states(c0, op, "c0");
  check_forward_args(xproj_f, w_hh_f, std::nullopt, h0[0], c0[0], lengths);
  check_same_device_dtype(xproj_f, xproj_r, "xproj_r");
  check_shape(xproj_r, xproj_f.sizes(), "xproj_r");
  check_forward_args(xproj_r, w_hh_r, std::nullopt, h0[1], c0[1], lengths);
  check_panel_dtype(xproj_f, op);
  return panel_forward_pair(xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0, lengths, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bidirectional_backward(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n,
                       const at::Tensor& w_hh_f, const at::Tensor& w_hh_r, const at::Tensor& h0,
                       const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                       const at::Tensor& y, const at::Tensor& gates, const at::Tensor& c_all,
                       bool weight_grads) {
  constexpr const char* op = "bidirectional_backward";
  TORCH_CHECK(gates.dim() == 4 && gates.size(0) == 2 && gates.size(3) % 4 == 0 && gates.size(3) > 0,
              "lstm_fused: ", op, " needs the saved gates (2, T, B, 4H); got ", gates.sizes(),
              " (was the forward run with save=False?)");
  TORCH_CHECK(c_all.dim() == 4 && c_all.size(0) == 2, "lstm_fused: ", op,
              " needs the saved cell states (2, T, B, H); got ", c_all.sizes());
  for (const auto& [t, name] :
       {std::pair{&dh_n, "dh_n"}, {&dc_n, "dc_n"}, {&h0, "h0"}, {&c0, "c0"}})
    check_states(*t, op, name);
  const int64_t T = gates.size(1), B = gates.size(2), H = gates.size(3) / 4;
  check_shape(y, {T, B, 2 * H}, "y");
  check_shape(dy, {T, B, 2 * H}, "dy");
  const at::Tensor* w_hh[2] = {&w_hh_f, &w_hh_r};
  for (int d = 0; d < 2; ++d) {
    check_backward_args(dy.narrow(2, d * H, H), dh_n[d], dc_n[d], *w_hh[d], std::nullopt, h0[d],
                        c0[d], lengths, y.narrow(2, d * H, H), gates[d], c_all[d]);
  }
  check_panel_dtype(gates, op);
  auto [dxproj_f, dxproj_r, dh0, dc0] =
      panel_backward_pair(dy, dh_n, dc_n, w_hh_f, w_hh_r, c0, lengths, gates, c_all);
  at::Tensor dw_f = at::empty({0}, gates.options()), dw_r = at::empty({0}, gates.options());
  if (weight_grads) {
    dw_f = recurrent_weight_grad(dxproj_f, y.narrow(2, 0, H), h0[0], lengths, /*reverse=*/false);
    dw_r = recurrent_weight_grad(dxproj_r, y.narrow(2, H, H), h0[1], lengths, /*reverse=*/true);
  }
  return {dxproj_f, dxproj_r, dw_f, dw_r, dh0, dc0};
}

}  // namespace
}  // namespace lstm_fused::cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("bidirectional_forward", &lstm_fused::cpu::bidirectional_forward);
  m.impl("bidirectional_backward", &lstm_fused::cpu::bidirectional_backward);
}
