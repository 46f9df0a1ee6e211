// CPU kernels of the recurrence ops (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include "checks.h"
#include "cpu/recurrence.h"

namespace lstm_fused::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> cell_forward(const at::Tensor& x, const at::Tensor& h0,
                                                const at::Tensor& c0, const at::Tensor& w_ih,
                                                const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& b_ih,
                                                const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2,
              "lstm_fused: cell_forward takes x (B, I), w_ih (4H, I), w_hh (4H, H)");
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1);
  check_shape(w_ih, {4 * H, I}, "w_ih");
  check_shape(w_hh, {4 * H, H}, "w_hh");
  check_shape(h0, {B, H}, "h0");
  check_shape(c0, {B, H}, "c0");
  for (const auto& [t, name] : {std::pair{&w_ih, "w_ih"}, {&w_hh, "w_hh"}, {&h0, "h0"}, {&c0, "c0"}})
    check_same_device_dtype(x, *t, name);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "lstm_fused: give both biases or neither");
  if (b_ih.has_value()) {
    check_same_device_dtype(x, *b_ih, "b_ih");
    check_same_device_dtype(x, *b_hh, "b_hh");
    check_shape(*b_ih, {4 * H}, "b_ih");
    check_shape(*b_hh, {4 * H}, "b_hh");
  }
  TORCH_CHECK(panel_kernels_apply(x.scalar_type(), /*has_proj=*/false),
              "lstm_fused: cell_forward supports float32, bfloat16 and float16, not ", x.scalar_type());
  return panel_cell_forward(x.contiguous(), h0, c0, w_ih, w_hh, b_ih, b_hh);
}

}  // namespace
}  // namespace lstm_fused::cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("recurrence_forward", &lstm_fused::cpu::recurrence_forward);
  m.impl("recurrence_backward", &lstm_fused::cpu::recurrence_backward);
  m.impl("cell_forward", &lstm_fused::cpu::cell_forward);
}
