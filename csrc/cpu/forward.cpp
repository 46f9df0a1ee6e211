// CPU forward recurrence.
//
// Per step: one GEMM  gates_mm = h_{t-1} @ W_hh^T  (B x 4H, fp32/fp64 accumulation), then one
// fused pointwise pass over (batch row, hidden unit) that adds the precomputed input projection,
// applies the gates, updates c and h, writes y_t and, when training, saves the activated gates
// and c_t. With proj_size a second small GEMM projects h and a short pass publishes it.
// Rows past a sequence's end keep their state and output zeros (lengths).
//
// h and c live in fp32 (fp64 for fp64 input) for the whole sequence; bf16/fp16 weights are
// widened once up front so every per-step GEMM is an fp32 sgemm.

#include "checks.h"
#include "cpu/activations.h"
#include "cpu/gemm.h"
#include "cpu/recurrence.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

namespace lstm_fused::cpu {
namespace {

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T, B, H, P;
  bool reverse, save, has_proj;
  const scalar_t* xproj;    // (T, B, 4H)
  const acc_t* w_hh;        // (4H, P)
  const acc_t* w_hr;        // (P, H) or null
  const int64_t* lengths;   // (B,) or null
  acc_t* h;                 // (B, P) running hidden state
  acc_t* c;                 // (B, H) running cell state
  acc_t* gates_mm;          // (B, 4H) scratch: h @ W_hh^T
  acc_t* m;                 // (B, H) scratch: o * tanh(c) before projection
  acc_t* h_proj;            // (B, P) scratch: projected h
  scalar_t* y;              // (T, B, P)
  scalar_t* gates_out;      // (T, B, 4H) or null
  acc_t* c_all;             // (T, B, H) or null

  bool active(int64_t b, int64_t t) const { return lengths == nullptr || t < lengths[b]; }
};

// One batch row of the gate pass. kWriteY: no projection, so m is the output; kSave: training.
// Branch-free so the loop vectorizes (compile-time flags only).
template <typename scalar_t, bool kWriteY, bool kSave>
inline void gate_row(int64_t H, const scalar_t* __restrict__ xp, const at::opmath_type<scalar_t>* __restrict__ mm,
                     at::opmath_type<scalar_t>* __restrict__ c, at::opmath_type<scalar_t>* __restrict__ m_out,
                     scalar_t* __restrict__ y, scalar_t* __restrict__ gates_out,
                     at::opmath_type<scalar_t>* __restrict__ c_all) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const acc_t i = sigmoid(static_cast<acc_t>(xp[j]) + mm[j]);
    const acc_t f = sigmoid(static_cast<acc_t>(xp[H + j]) + mm[H + j]);
    const acc_t g = tanh_act(static_cast<acc_t>(xp[2 * H + j]) + mm[2 * H + j]);
    const acc_t o = sigmoid(static_cast<acc_t>(xp[3 * H + j]) + mm[3 * H + j]);
    const acc_t c_new = f * c[j] + i * g;
    const acc_t h_new = o * tanh_act(c_new);
    c[j] = c_new;
    m_out[j] = h_new;
    if constexpr (kWriteY) y[j] = static_cast<scalar_t>(h_new);
    if constexpr (kSave) {
      gates_out[j] = static_cast<scalar_t>(i);
      gates_out[H + j] = static_cast<scalar_t>(f);
      gates_out[2 * H + j] = static_cast<scalar_t>(g);
      gates_out[3 * H + j] = static_cast<scalar_t>(o);
      c_all[j] = c_new;
    }
  }
}

// Gates, c and h for batch rows [b0, b1) at time t.
template <typename scalar_t>
void gate_pass(const ForwardArgs<scalar_t>& a, int64_t t, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, H4 = 4 * a.H;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = t * a.B + b;  // (t, b) row of the (T, B, *) tensors
    acc_t* c = a.c + b * H;
    scalar_t* gates_out = a.save ? a.gates_out + row * H4 : nullptr;
    acc_t* c_all = a.save ? a.c_all + row * H : nullptr;
    if (!a.active(b, t)) {
      if (!a.has_proj) std::fill_n(a.y + row * a.P, a.P, scalar_t(0));
      if (a.save) {
        std::fill_n(gates_out, H4, scalar_t(0));
        std::copy_n(c, H, c_all);
      }
      continue;
    }
    const scalar_t* xp = a.xproj + row * H4;
    const acc_t* mm = a.gates_mm + b * H4;
    acc_t* m_out = a.has_proj ? a.m + b * H : a.h + b * H;
    scalar_t* y = a.y + row * a.P;
    if (a.has_proj) {
      if (a.save) gate_row<scalar_t, false, true>(H, xp, mm, c, m_out, y, gates_out, c_all);
      else gate_row<scalar_t, false, false>(H, xp, mm, c, m_out, y, gates_out, c_all);
    } else {
      if (a.save) gate_row<scalar_t, true, true>(H, xp, mm, c, m_out, y, gates_out, c_all);
      else gate_row<scalar_t, true, false>(H, xp, mm, c, m_out, y, gates_out, c_all);
    }
  }
}

// With proj_size: publish the projected h of rows [b0, b1) as the new state and output.
template <typename scalar_t>
void projection_pass(const ForwardArgs<scalar_t>& a, int64_t t, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    scalar_t* y = a.y + (t * a.B + b) * a.P;
    if (!a.active(b, t)) {
      std::fill_n(y, a.P, scalar_t(0));
      continue;
    }
    const auto* hp = a.h_proj + b * a.P;
    auto* h = a.h + b * a.P;
    for (int64_t j = 0; j < a.P; ++j) {
      h[j] = hp[j];
      y[j] = static_cast<scalar_t>(hp[j]);
    }
  }
}

template <typename scalar_t>
void run_forward(const ForwardArgs<scalar_t>& a) {
  const int64_t grain = batch_grain(4 * a.H);
  for (int64_t s = 0; s < a.T; ++s) {
    const int64_t t = time_at(s, a.T, a.reverse);
    gemm(/*transpose_b=*/true, a.B, 4 * a.H, a.P, a.h, a.P, a.w_hh, a.P, a.gates_mm, 4 * a.H);
    at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) { gate_pass(a, t, b0, b1); });
    if (a.has_proj) {
      gemm(/*transpose_b=*/true, a.B, a.P, a.H, a.m, a.H, a.w_hr, a.H, a.h_proj, a.P);
      projection_pass(a, t, 0, a.B);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_forward(
    const at::Tensor& xproj_in, const at::Tensor& w_hh_in, const std::optional<at::Tensor>& w_hr_in,
    const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& lengths_in,
    bool reverse, bool save) {
  const RecurrenceSizes s = check_forward_args(xproj_in, w_hh_in, w_hr_in, h0, c0, lengths_in);
  const auto dtype = xproj_in.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = xproj_in.options();
  const auto acc_opts = opts.dtype(acc);

  const at::Tensor xproj = xproj_in.contiguous();
  const at::Tensor w_hh = w_hh_in.to(acc).contiguous();
  const at::Tensor w_hr = s.has_proj ? w_hr_in->to(acc).contiguous() : at::Tensor();
  const at::Tensor lengths = lengths_in.has_value() ? lengths_in->contiguous() : at::Tensor();

  at::Tensor h = h0.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor c = c0.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor gates_mm = at::empty({s.B, 4 * s.H}, acc_opts);
  at::Tensor m = s.has_proj ? at::empty({s.B, s.H}, acc_opts) : at::Tensor();
  at::Tensor h_proj = s.has_proj ? at::empty({s.B, s.P}, acc_opts) : at::Tensor();
  at::Tensor y = at::empty({s.T, s.B, s.P}, opts);
  at::Tensor gates = save ? at::empty({s.T, s.B, 4 * s.H}, opts) : at::empty({0}, opts);
  at::Tensor c_all = save ? at::empty({s.T, s.B, s.H}, acc_opts) : at::empty({0}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lstm_fused_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t> a;
    a.T = s.T, a.B = s.B, a.H = s.H, a.P = s.P;
    a.reverse = reverse, a.save = save, a.has_proj = s.has_proj;
    a.xproj = xproj.data_ptr<scalar_t>();
    a.w_hh = w_hh.data_ptr<acc_t>();
    a.w_hr = s.has_proj ? w_hr.data_ptr<acc_t>() : nullptr;
    a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    a.h = h.data_ptr<acc_t>();
    a.c = c.data_ptr<acc_t>();
    a.gates_mm = gates_mm.data_ptr<acc_t>();
    a.m = s.has_proj ? m.data_ptr<acc_t>() : nullptr;
    a.h_proj = s.has_proj ? h_proj.data_ptr<acc_t>() : nullptr;
    a.y = y.data_ptr<scalar_t>();
    a.gates_out = save ? gates.data_ptr<scalar_t>() : nullptr;
    a.c_all = save ? c_all.data_ptr<acc_t>() : nullptr;
    run_forward(a);
  });
  return {y, h.to(dtype), c.to(dtype), gates, c_all};
}

}  // namespace lstm_fused::cpu
