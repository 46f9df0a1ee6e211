// CPU kernels of the recurrence ops (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>

#include <optional>
#include <vector>

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
  check_biases(x, b_ih, b_hh, H);
  TORCH_CHECK(panel_kernels_apply(x.scalar_type(), /*has_proj=*/false),
              "lstm_fused: cell_forward supports float32, bfloat16 and float16, not ", x.scalar_type());
  return panel_cell_forward(x.contiguous(), h0, c0, w_ih, w_hh, b_ih, b_hh);
}

// One time step of a stacked, possibly bidirectional LSTM without autograd (a streaming step of
// nn.LSTM with T = 1): every layer and direction is a cell step on the output of the layer below.
// One op call for the whole stack instead of Python per layer, where each small ATen call costs
// about as much as a layer's kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> stacked_cell_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
    int64_t num_layers, bool bidirectional, bool has_biases) {
  const int64_t D = bidirectional ? 2 : 1, per_dir = has_biases ? 4 : 2;
  TORCH_CHECK(x.dim() == 2 && h0.dim() == 3 && c0.dim() == 3,
              "lstm_fused: stacked_cell_forward takes x (B, I), h0 and c0 (L*D, B, H)");
  TORCH_CHECK(num_layers >= 1 && h0.size(0) == num_layers * D && c0.size(0) == num_layers * D,
              "lstm_fused: stacked_cell_forward: h0 and c0 need num_layers * directions = ",
              num_layers * D, " states, got ", h0.size(0), " and ", c0.size(0));
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * D * per_dir,
              "lstm_fused: stacked_cell_forward: expected ", num_layers * D * per_dir,
              " weights (w_ih, w_hh", has_biases ? ", b_ih, b_hh" : "", " per layer and direction), got ",
              weights.size());
  std::vector<at::Tensor> h_n, c_n;
  h_n.reserve(num_layers * D);
  c_n.reserve(num_layers * D);
  at::Tensor layer_input = x;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::vector<at::Tensor> outputs;
    for (int64_t dir = 0; dir < D; ++dir) {
      const int64_t k = layer * D + dir;
      const at::Tensor* w = weights.data() + k * per_dir;
      const std::optional<at::Tensor> b_ih = has_biases ? std::optional<at::Tensor>(w[2]) : std::nullopt;
      const std::optional<at::Tensor> b_hh = has_biases ? std::optional<at::Tensor>(w[3]) : std::nullopt;
      auto [h, c] = cell_forward(layer_input, h0[k], c0[k], w[0], w[1], b_ih, b_hh);
      outputs.push_back(h);
      h_n.push_back(std::move(h));
      c_n.push_back(std::move(c));
    }
    layer_input = D == 1 ? outputs[0] : at::cat(outputs, 1);
  }
  return {layer_input, at::stack(h_n), at::stack(c_n)};
}

}  // namespace
}  // namespace lstm_fused::cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("recurrence_forward", &lstm_fused::cpu::recurrence_forward);
  m.impl("recurrence_backward", &lstm_fused::cpu::recurrence_backward);
  m.impl("cell_forward", &lstm_fused::cpu::cell_forward);
  m.impl("stacked_cell_forward", &lstm_fused::cpu::stacked_cell_forward);
}
