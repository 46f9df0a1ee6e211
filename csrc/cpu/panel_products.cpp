// The input projection of a layer and its input gradient on the CPU, on the step kernels' tile
// product (step_kernels.h, PanelProductArgs) instead of ATen's GEMM (see own_gemm_by_default in
// isa.h for where; elsewhere input_projection runs ATen's GEMM, into a pooled output):
//   input_projection:           xproj = x @ W_ih^T + b_ih + b_hh   (W_ih in forward panels)
//   input_projection_backward:  dx = dxproj @ W_ih                 (W_ih in backward-column panels)
//                               dW_ih = dxproj^T @ x, and db = dxproj summed over its rows
//                               (weight_grads.cpp: our tiles, db summed while dxproj is packed)
// Why: ATen's float32 GEMM is MKL's, which on AMD CPUs runs well below the FMA peak (about 60%
// measured on a Zen 4 EPYC); the register tile reaches about 90% in its inner loop there. And
// ATen's 16-bit GEMM is emulated on CPUs without 16-bit dot-product instructions (6-9x slower
// than its float32 GEMM on a Zen 3 EPYC). The weight gradient, a reduction over the T*B rows, has
// its own blocking (weight_grads.cpp). W_ih's panels are packed once, in its own dtype, and cached
// like W_hh's (packed_weights.h). Which inputs take this path: functional._own_gemm_min_features.
// bfloat16 and float16: the rows of A (x, dxproj) are widened to float32 first (a pass over
// them, small beside the product), the sums are float32 and rounded once into the 16-bit output,
// and dW_ih is ATen's float32 GEMM of the widened operands, rounded once.
//
// Work split: (block, row panel) pairs in block-major order, a contiguous range per thread, so
// each thread reads mostly its own blocks' panels; a thread runs its items row panel by row
// panel, so the rows of A are read from memory about once.

#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"
#include "cpu/packed_weights.h"
#include "cpu/recurrence.h"
#include "cpu/step_kernels.h"

namespace lstm_fused::cpu {
namespace {

// Rows of A per work item: the rows one thread keeps in L2 while its blocks pass over them.
constexpr int64_t kPanelRows = 96;

// Runs kernels.panel_product over rows [0, rows) and every block, on ATen's threads.
void run_panel_product(const StepKernels& kernels, const PanelProductArgs& a, int64_t blocks, int64_t rows) {
  const int V = kernels.vector_width;
  const int64_t row_panels = (rows + kPanelRows - 1) / kPanelRows;
  // Split only what pays for a parallel region: at least ~256k multiply-adds per thread.
  const int64_t item_macs = std::min(rows, kPanelRows) * a.K * 4 * V;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, item_macs));
  at::parallel_for(0, blocks * row_panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = 0; p < row_panels; ++p)
      for (int64_t u = begin / row_panels; u <= (end - 1) / row_panels; ++u) {
        const int64_t item = u * row_panels + p, m0 = p * kPanelRows;
        if (item >= begin && item < end) kernels.panel_product(a, u, m0, std::min(rows, m0 + kPanelRows));
      }
  });
}

Storage checked_storage(const at::Tensor& t, const char* op) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf),
              "lstm_fused: ", op, " runs on float32, bfloat16 or float16 CPU tensors, got ", dtype,
              " on ", t.device());
  return storage_of(dtype);
}

// t as contiguous float32 (no copy when it already is).
at::Tensor contiguous_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// out (M, 4H) = x (M, I) @ w_ih^T + b_ih + b_hh by ATen's GEMM, written into out. Why not
// F.linear: its output is fresh memory on every call, and at T*B*4H*4 bytes above glibc's largest
// mmap threshold (32 MB) that means newly mapped pages the kernel zeroes on first touch. On the
// Intel Xeon at T = 100, B = 64, I = H = 512 (52 MB) F.linear took 44-46 ms, the same GEMM into
// a reused output 34-35 ms. out comes from the output pool (output_pool.h), whose blocks stay
// mapped. The bias is summed in the input dtype first, as F.linear(x, w_ih, b_ih + b_hh) does.
void aten_projection(const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& b_ih,
                     const std::optional<at::Tensor>& b_hh, at::Tensor& out) {
  const int64_t I = w_ih.size(1), H4 = w_ih.size(0);
  at::Tensor out_rows = out.view({-1, H4});
  const at::Tensor x_rows = x.reshape({-1, I});
  if (b_ih.has_value()) {
    at::addmm_out(out_rows, at::add(*b_ih, *b_hh), x_rows, w_ih.t());
  } else {
    at::mm_out(out_rows, x_rows, w_ih.t());
  }
}

at::Tensor input_projection(const at::Tensor& x_in, const at::Tensor& w_ih,
                            const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                            bool own_product) {
  TORCH_CHECK(x_in.dim() >= 1 && w_ih.dim() == 2 && w_ih.size(0) % 4 == 0,
              "lstm_fused: input_projection takes x (..., I) and w_ih (4H, I)");
  const int64_t I = w_ih.size(1), H = w_ih.size(0) / 4;
  TORCH_CHECK(x_in.size(-1) == I, "lstm_fused: input_projection: x has ", x_in.size(-1),
              " features, w_ih expects ", I);
  check_same_device_dtype(x_in, w_ih, "w_ih");
  const Storage storage = checked_storage(x_in, "input_projection");
  check_biases(x_in, b_ih, b_hh, H);
  const int64_t M = I == 0 ? 0 : x_in.numel() / I;
  std::vector<int64_t> out_sizes = x_in.sizes().vec();
  out_sizes.back() = 4 * H;
  at::Tensor out = pooled_empty(out_sizes, x_in.scalar_type());
  if (M == 0 || H == 0) return out;
  if (I == 0) return b_ih.has_value() ? out.copy_(at::add(*b_ih, *b_hh)) : out.zero_();
  if (!own_product) {
    aten_projection(x_in, w_ih, b_ih, b_hh, out);
    return out;
  }
  const at::Tensor x = contiguous_float(x_in);

  const StepKernels& kernels = step_kernels(selected_isa());
  const int V = kernels.vector_width;
  const int64_t blocks = (H + V - 1) / V;
  const at::Tensor panels = packed_panels(w_ih, PanelLayout::kForwardGates, V);
  const at::Tensor bias = b_ih.has_value() ? gate_bias_panel(*b_ih, *b_hh, V) : at::Tensor();
  PanelProductArgs a;
  a.K = I, a.storage = storage;
  a.a = x.data_ptr<float>(), a.lda = I;
  a.panels = panels.data_ptr(), a.panel_stride = I * 4 * V;
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.out = out.data_ptr(), a.ldo = 4 * H;
  a.columns = H, a.gate_layout = true;
  run_panel_product(kernels, a, blocks, M);
  return out;
}

// dx (..., I) = dxproj (..., 4H) @ W_ih, in w_ih's dtype; dxproj in float32.
at::Tensor input_grad(const at::Tensor& dxproj, const at::Tensor& w_ih, Storage storage) {
  const int64_t I = w_ih.size(1), H4 = w_ih.size(0);
  const int64_t M = H4 == 0 ? 0 : dxproj.numel() / H4;
  std::vector<int64_t> out_sizes = dxproj.sizes().vec();
  out_sizes.back() = I;
  at::Tensor dx = pooled_empty(out_sizes, w_ih.scalar_type());
  if (M == 0 || I == 0) return dx;
  if (H4 == 0) return dx.zero_();
  const StepKernels& kernels = step_kernels(selected_isa());
  const int V = kernels.vector_width;
  const at::Tensor panels = packed_panels(w_ih, PanelLayout::kBackwardColumns, V);
  PanelProductArgs a;
  a.K = H4, a.storage = storage;
  a.a = dxproj.data_ptr<float>(), a.lda = H4;
  a.panels = panels.data_ptr(), a.panel_stride = H4 * 4 * V;
  a.bias = nullptr;
  a.out = dx.data_ptr(), a.ldo = I;
  a.columns = I, a.gate_layout = false;
  run_panel_product(kernels, a, (I + 4 * V - 1) / (4 * V), M);
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> input_projection_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_ih, bool input_grad_wanted,
    bool weight_grad_wanted, bool bias_grad_wanted) {
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0 && grad_in.size(-1) == w_ih.size(0) &&
                  x_in.size(-1) == w_ih.size(1) &&
                  grad_in.numel() / std::max<int64_t>(1, w_ih.size(0)) ==
                      x_in.numel() / std::max<int64_t>(1, w_ih.size(1)),
              "lstm_fused: input_projection_backward takes grad (..., 4H), x (..., I), w_ih (4H, I)");
  const Storage storage = checked_storage(w_ih, "input_projection_backward");
  TORCH_CHECK(grad_in.scalar_type() == w_ih.scalar_type() && x_in.scalar_type() == w_ih.scalar_type() &&
                  grad_in.device() == w_ih.device() && x_in.device() == w_ih.device(),
              "lstm_fused: input_projection_backward: grad, x and w_ih must share dtype and device, got ",
              grad_in.scalar_type(), ", ", x_in.scalar_type(), " and ", w_ih.scalar_type());
  const at::Tensor grad = contiguous_float(grad_in);
  at::Tensor dx = input_grad_wanted ? input_grad(grad, w_ih, storage) : at::empty({0}, w_ih.options());
  at::Tensor dw = at::empty({0}, w_ih.options()), db = at::empty({0}, w_ih.options());
  const at::Tensor g_rows = grad.reshape({-1, w_ih.size(0)});
  if (weight_grad_wanted) {
    const at::Tensor x_rows = contiguous_float(x_in).reshape({-1, w_ih.size(1)});
    at::Tensor db_f;
    dw = weight_grad(g_rows, x_rows, bias_grad_wanted ? &db_f : nullptr).to(w_ih.scalar_type());
    if (bias_grad_wanted) db = db_f.to(w_ih.scalar_type());
  } else if (bias_grad_wanted) {
    db = g_rows.sum(0).to(w_ih.scalar_type());
  }
  return {dx, dw, db};
}

}  // namespace

at::Tensor gate_bias_panel(const at::Tensor& b_ih, const at::Tensor& b_hh, int V) {
  const int64_t H = b_ih.size(0) / 4, blocks = (H + V - 1) / V;
  at::Tensor bias = at::empty({blocks * 4 * V}, b_ih.options().dtype(at::kFloat));
  const at::Tensor bi = contiguous_float(b_ih), bh = contiguous_float(b_hh);
  const float *pi = bi.data_ptr<float>(), *ph = bh.data_ptr<float>();
  float* pb = bias.data_ptr<float>();
  for (int64_t u = 0; u < blocks; ++u)
    for (int64_t q = 0; q < 4; ++q)
      for (int64_t v = 0; v < V; ++v) {
        const int64_t j = u * V + v;
        *pb++ = j < H ? pi[q * H + j] + ph[q * H + j] : 0.0f;
      }
  return bias;
}

}  // namespace lstm_fused::cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("input_projection", &lstm_fused::cpu::input_projection);
  m.impl("input_projection_backward", &lstm_fused::cpu::input_projection_backward);
}
