// The input projection of a layer on the CPU, x @ W_ih^T + b_ih + b_hh over all T*B rows, with
// the step kernels' tile product (step_kernels.h, ProjectionArgs) instead of ATen's GEMM.
//
// Why: ATen's float32 GEMM is MKL's, which on AMD CPUs runs well below the FMA peak (about 60%
// measured on a Zen 4 EPYC, where oneDNN, which nn.LSTM uses, does much better); the forward's
// register tile reaches near peak in its inner loop on every x86 variant we dispatch to.
// W_ih is packed once into the forward panel layout and cached like W_hh (packed_weights.h).
//
// Work split: (unit block, row panel) pairs in block-major order, a contiguous range per thread,
// so each thread reads mostly its own blocks' panels; a thread runs its items row panel by row
// panel, so x is read from memory about once.

#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/packed_weights.h"
#include "cpu/step_kernels.h"

namespace lstm_fused::cpu {
namespace {

// Rows per work item: the rows of x one thread keeps in L2 while its blocks pass over them.
constexpr int64_t kPanelRows = 96;

at::Tensor input_projection(const at::Tensor& x_in, const at::Tensor& w_ih,
                            const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(x_in.dim() >= 1 && w_ih.dim() == 2 && w_ih.size(0) % 4 == 0,
              "lstm_fused: input_projection takes x (..., I) and w_ih (4H, I)");
  const int64_t I = w_ih.size(1), H = w_ih.size(0) / 4;
  TORCH_CHECK(x_in.size(-1) == I, "lstm_fused: input_projection: x has ", x_in.size(-1),
              " features, w_ih expects ", I);
  check_same_device_dtype(x_in, w_ih, "w_ih");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "lstm_fused: input_projection runs on float32 CPU tensors, got ", x_in.scalar_type(),
              " on ", x_in.device());
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "lstm_fused: give both biases or neither");
  if (b_ih.has_value()) {
    check_same_device_dtype(x_in, *b_ih, "b_ih");
    check_same_device_dtype(x_in, *b_hh, "b_hh");
    check_shape(*b_ih, {4 * H}, "b_ih");
    check_shape(*b_hh, {4 * H}, "b_hh");
  }
  const at::Tensor x = x_in.contiguous();
  const int64_t M = I == 0 ? 0 : x.numel() / I;
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = 4 * H;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (M == 0 || H == 0) return out;
  if (I == 0) return b_ih.has_value() ? out.copy_(at::add(*b_ih, *b_hh)) : out.zero_();

  const StepKernels& kernels = step_kernels(selected_isa());
  const int V = kernels.vector_width;
  const int64_t blocks = (H + V - 1) / V;
  const at::Tensor panels = packed_panels(w_ih, PanelLayout::kForwardGates, V);
  // Both biases summed into the panels' (block, gate, lane) order, zero past H.
  at::Tensor bias;
  if (b_ih.has_value()) {
    bias = at::empty({blocks * 4 * V}, x.options());
    const at::Tensor bi = b_ih->contiguous(), bh = b_hh->contiguous();
    const float *pi = bi.data_ptr<float>(), *ph = bh.data_ptr<float>();
    float* pb = bias.data_ptr<float>();
    for (int64_t u = 0; u < blocks; ++u)
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t v = 0; v < V; ++v) {
          const int64_t j = u * V + v;
          *pb++ = j < H ? pi[q * H + j] + ph[q * H + j] : 0.0f;
        }
  }

  ProjectionArgs a;
  a.M = M, a.K = I, a.H = H;
  a.x = x.data_ptr<float>();
  a.ldx = I;
  a.panels = panels.data_ptr<float>();
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.out = out.data_ptr<float>();
  const int64_t row_panels = (M + kPanelRows - 1) / kPanelRows;
  // Split only what pays for a parallel region: at least ~256k multiply-adds per thread.
  const int64_t item_macs = std::min(M, kPanelRows) * I * 4 * V;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / item_macs);
  at::parallel_for(0, blocks * row_panels, grain, [&](int64_t begin, int64_t end) {
    // This thread's items, row panel by row panel: the rows of x stay in L2 while the thread's
    // blocks run over them (each block's panel is read from L2 or L3 once per row panel).
    for (int64_t p = 0; p < row_panels; ++p)
      for (int64_t u = begin / row_panels; u <= (end - 1) / row_panels; ++u) {
        const int64_t item = u * row_panels + p, m0 = p * kPanelRows;
        if (item >= begin && item < end) kernels.projection_block(a, u, m0, std::min(M, m0 + kPanelRows));
      }
  });
  return out;
}

}  // namespace
}  // namespace lstm_fused::cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("input_projection", &lstm_fused::cpu::input_projection);
}
