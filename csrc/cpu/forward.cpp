// CPU forward recurrence with per-thread GEMMs: layers with projection and float64. The other
// layers take the SIMD step kernels (panel_recurrence.cpp); recurrence_forward below routes.
// One persistent parallel region for the whole sequence.
//
// Work split: thread k owns a block of hidden units [j0, j1) (and, with proj_size, a block of
// projected units [p0, p1)). Before the loop its gate rows of W_hh (i, f, g, o for its units)
// are gathered into one contiguous (4*hb, P) block, so each step it runs a single-threaded
// GEMM  gates_k = h_{t-1} @ W_k^T  (B x 4hb) on weights that stay in its own cache, then the
// fused pointwise pass for its units: input projection + gates + c + h, writing y_t and, when
// training, the activated gates and c_t. Then one barrier: h_t is complete, step t+1 may read
// it. h is double-buffered so nobody overwrites the h another thread is still multiplying.
// With proj_size each thread also projects its block of output units (m @ W_hr^T), which needs
// every thread's m: two barriers per step.
//
// Why not a threaded GEMM plus a parallel_for per step: at small batch a step is a few
// microseconds of arithmetic and a fork/join per call costs about as much. One parallel region
// and one barrier per step removes that, and keeps each thread's weights hot in its own cache.
//
// h and c live in fp32 (fp64 for fp64 input); bf16/fp16 weights are widened once up front.
// Rows past a sequence's end keep their state and output zeros (lengths).

#include "checks.h"
#include "cpu/activations.h"
#include "cpu/gemm.h"
#include "cpu/output_pool.h"
#include "cpu/recurrence.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <omp.h>

namespace lstm_fused::cpu {
namespace {

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T, B, H, P;
  bool reverse, save, has_proj;
  WorkSplit units, proj_units;  // hidden units per thread; projected units per thread
  const scalar_t* xproj;        // (T, B, 4H)
  const acc_t* w_blocks;        // per thread k: (4 * units.size(k), P) gate rows, gate-major
  const acc_t* w_hr;            // (P, H) or null
  const int64_t* lengths;       // (B,) or null
  acc_t* h[2];                  // (B, P) double-buffered hidden state
  acc_t* c;                     // (B, H) cell state
  acc_t* gates_mm;              // per thread k: (B, 4 * units.size(k)) scratch
  acc_t* m;                     // (B, H) o * tanh(c) before projection [proj]
  acc_t* h_proj;                // (B, P) projected h [proj]
  scalar_t* y;                  // (T, B, P)
  scalar_t* gates_out;          // (T, B, 4H) or null
  acc_t* c_all;                 // (T, B, H) or null

  bool active(int64_t b, int64_t t) const { return lengths == nullptr || t < lengths[b]; }
};

// The pointwise pass of one row for units [j0, j0 + n). kWriteY: no projection, so the new h
// is the output; kSave: training. Compile-time flags only, so the loop vectorizes.
template <typename scalar_t, bool kWriteY, bool kSave>
inline void gate_row(int64_t n, int64_t H, const scalar_t* __restrict__ xp,
                     const at::opmath_type<scalar_t>* __restrict__ mm,
                     at::opmath_type<scalar_t>* __restrict__ c,
                     at::opmath_type<scalar_t>* __restrict__ h_out, scalar_t* __restrict__ y,
                     scalar_t* __restrict__ gates_out, at::opmath_type<scalar_t>* __restrict__ c_all) {
  using acc_t = at::opmath_type<scalar_t>;
  // xp, gates_out: gate g of unit j at g * H + j. mm: gate g at g * n + j (the thread's block).
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t i = sigmoid(static_cast<acc_t>(xp[j]) + mm[j]);
    const acc_t f = sigmoid(static_cast<acc_t>(xp[H + j]) + mm[n + j]);
    const acc_t g = tanh_act(static_cast<acc_t>(xp[2 * H + j]) + mm[2 * n + j]);
    const acc_t o = sigmoid(static_cast<acc_t>(xp[3 * H + j]) + mm[3 * n + j]);
    const acc_t c_new = f * c[j] + i * g;
    const acc_t h_new = o * tanh_act(c_new);
    c[j] = c_new;
    h_out[j] = h_new;
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

// Gates, c and h of units [j0, j0 + n) for every batch row at time t.
template <typename scalar_t>
void gate_pass(const ForwardArgs<scalar_t>& a, int64_t t, int64_t j0, int64_t n,
               const at::opmath_type<scalar_t>* mm_block, const at::opmath_type<scalar_t>* h_cur,
               at::opmath_type<scalar_t>* h_next) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, H4 = 4 * a.H;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t row = t * a.B + b;  // (t, b) row of the (T, B, *) tensors
    acc_t* c = a.c + b * H + j0;
    scalar_t* gates_out = a.save ? a.gates_out + row * H4 + j0 : nullptr;
    acc_t* c_all = a.save ? a.c_all + row * H + j0 : nullptr;
    scalar_t* y = a.y + row * a.P + j0;
    if (!a.active(b, t)) {
      if (!a.has_proj) {
        std::fill_n(y, n, scalar_t(0));
        std::copy_n(h_cur + b * a.P + j0, n, h_next + b * a.P + j0);
      }
      if (a.save) {
        for (int g = 0; g < 4; ++g) std::fill_n(gates_out + g * H, n, scalar_t(0));
        std::copy_n(c, n, c_all);
      }
      continue;
    }
    const scalar_t* xp = a.xproj + row * H4 + j0;
    const acc_t* mm = mm_block + b * 4 * n;
    acc_t* h_out = a.has_proj ? a.m + b * H + j0 : h_next + b * a.P + j0;
    if (a.has_proj) {
      if (a.save) gate_row<scalar_t, false, true>(n, H, xp, mm, c, h_out, y, gates_out, c_all);
      else gate_row<scalar_t, false, false>(n, H, xp, mm, c, h_out, y, gates_out, c_all);
    } else {
      if (a.save) gate_row<scalar_t, true, true>(n, H, xp, mm, c, h_out, y, gates_out, c_all);
      else gate_row<scalar_t, true, false>(n, H, xp, mm, c, h_out, y, gates_out, c_all);
    }
  }
}

// With proj_size: project m onto output units [p0, p0 + n) and publish them as h_t and y_t.
template <typename scalar_t>
void projection_pass(const ForwardArgs<scalar_t>& a, int64_t t, int64_t p0, int64_t n,
                     const PackedRhs<at::opmath_type<scalar_t>>& w_proj,
                     const at::opmath_type<scalar_t>* h_cur, at::opmath_type<scalar_t>* h_next) {
  w_proj.multiply(a.m, a.H, a.h_proj + p0, a.P);
  for (int64_t b = 0; b < a.B; ++b) {
    scalar_t* y = a.y + (t * a.B + b) * a.P + p0;
    const auto* src = a.active(b, t) ? a.h_proj + b * a.P + p0 : h_cur + b * a.P + p0;
    std::copy_n(src, n, h_next + b * a.P + p0);
    if (a.active(b, t)) {
      for (int64_t j = 0; j < n; ++j) y[j] = static_cast<scalar_t>(src[j]);
    } else {
      std::fill_n(y, n, scalar_t(0));
    }
  }
}

template <typename scalar_t>
void run_forward(const ForwardArgs<scalar_t>& a) {
  const int threads = a.units.threads;
#pragma omp parallel num_threads(threads)
  {
    const SingleThreadedBlas single_threaded;  // we are the parallelism now
    const int k = omp_get_thread_num();
    const int64_t j0 = a.units.begin(k), n = a.units.size(k);
    const int64_t p0 = a.proj_units.begin(k), np = a.proj_units.size(k);
    using acc_t = at::opmath_type<scalar_t>;
    // This thread's weights, packed once for the T products they take part in.
    const PackedRhs<acc_t> w_block(/*slot=*/0, /*transpose_b=*/true, a.B, 4 * n, a.P, a.w_blocks + 4 * j0 * a.P, a.P);
    const PackedRhs<acc_t> w_proj(/*slot=*/1, /*transpose_b=*/true, a.B, np, a.H, a.w_hr ? a.w_hr + p0 * a.H : nullptr, a.H);
    auto* mm_block = a.gates_mm + 4 * j0 * a.B;
    for (int64_t s = 0; s < a.T; ++s) {
      const int64_t t = time_at(s, a.T, a.reverse);
      const auto* h_cur = a.h[s % 2];
      auto* h_next = a.h[(s + 1) % 2];
      if (n > 0) {
        w_block.multiply(h_cur, a.P, mm_block, 4 * n);
        gate_pass(a, t, j0, n, mm_block, h_cur, h_next);
      }
      if (a.has_proj) {
#pragma omp barrier
        if (np > 0) projection_pass(a, t, p0, np, w_proj, h_cur, h_next);
      }
#pragma omp barrier
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
  if (panel_kernels_apply(dtype, s.has_proj)) {
    return panel_forward(xproj_in, w_hh_in, h0, c0, lengths_in, reverse, save);
  }
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = xproj_in.options();
  const auto acc_opts = opts.dtype(acc);

  const WorkSplit units = WorkSplit::make(s.H, recurrence_threads(s.B, s.H, s.P));
  const WorkSplit proj_units = WorkSplit::make_like(units, s.has_proj ? s.P : 0);

  const at::Tensor xproj = xproj_in.contiguous();
  // Each thread's gate rows, contiguous: block k holds rows g*H + j for g in i,f,g,o, j in its units.
  const at::Tensor w_blocks = units.gather_gate_rows(w_hh_in.to(acc));
  const at::Tensor w_hr = s.has_proj ? w_hr_in->to(acc).contiguous() : at::Tensor();
  const at::Tensor lengths = lengths_in.has_value() ? lengths_in->contiguous() : at::Tensor();

  at::Tensor h = at::empty({2, s.B, s.P}, acc_opts);
  h[0].copy_(h0);
  at::Tensor c = c0.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor gates_mm = at::empty({s.B, 4 * s.H}, acc_opts);
  at::Tensor m = s.has_proj ? at::empty({s.B, s.H}, acc_opts) : at::Tensor();
  at::Tensor h_proj = s.has_proj ? at::empty({s.B, s.P}, acc_opts) : at::Tensor();
  at::Tensor y = pooled_empty({s.T, s.B, s.P}, dtype);
  at::Tensor gates = save ? pooled_empty({s.T, s.B, 4 * s.H}, dtype) : at::empty({0}, opts);
  at::Tensor c_all = save ? pooled_empty({s.T, s.B, s.H}, acc) : at::empty({0}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lstm_fused_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t> a;
    a.T = s.T, a.B = s.B, a.H = s.H, a.P = s.P;
    a.reverse = reverse, a.save = save, a.has_proj = s.has_proj;
    a.units = units, a.proj_units = proj_units;
    a.xproj = xproj.data_ptr<scalar_t>();
    a.w_blocks = w_blocks.data_ptr<acc_t>();
    a.w_hr = s.has_proj ? w_hr.data_ptr<acc_t>() : nullptr;
    a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    a.h[0] = h.data_ptr<acc_t>();
    a.h[1] = a.h[0] + s.B * s.P;
    a.c = c.data_ptr<acc_t>();
    a.gates_mm = gates_mm.data_ptr<acc_t>();
    a.m = s.has_proj ? m.data_ptr<acc_t>() : nullptr;
    a.h_proj = s.has_proj ? h_proj.data_ptr<acc_t>() : nullptr;
    a.y = y.data_ptr<scalar_t>();
    a.gates_out = save ? gates.data_ptr<scalar_t>() : nullptr;
    a.c_all = save ? c_all.data_ptr<acc_t>() : nullptr;
    run_forward(a);
  });
  return {y, h[s.T % 2].to(dtype, false, /*copy=*/true), c.to(dtype), gates, c_all};
}

}  // namespace lstm_fused::cpu
