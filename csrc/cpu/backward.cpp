// CPU backward recurrence with per-thread GEMMs (projection, float64; the other layers take
// panel_recurrence.cpp): the forward's mirror, walking the steps in reverse inside one
// persistent parallel region (same thread/unit split as forward.cpp).
//
// Carried across steps (fp32, fp64 for fp64 input): dh (B, P) and dc (B, H), seeded with
// dh_n/dc_n. Thread k owns hidden units [j0, j1) and output columns [p0, p1) of dh (for no
// projection the same range). Per step:
//   dh_tot = dh + dy_t                              its columns
//   dm     = dh_tot @ W_hr        [proj]            its units; needs all of dh_tot: barrier before
//   fused pointwise pass: gate derivatives from the saved activated gates, c_t and c_{t-1};
//     writes d(xproj)_t, the (B, 4H) dz scratch and dc for its units
//   barrier: dz complete
//   dh     = dz @ W_hh[:, p0:p1]                    its columns, which are exactly what its
//                                                   next pointwise pass reads (no barrier)
// dz is double-buffered without projection, so a fast thread writing step s-1's dz never
// overwrites the dz a slow thread is still multiplying for step s.
// Rows past a sequence's end get d(xproj) = 0 and carry dh/dc through untouched.
// After the loop the weight gradients are one threaded GEMM each over all T*B rows:
//   dW_hh = d(xproj)^T @ h_prev,   dW_hr = dh_tot_all^T @ m_all,  m = o * tanh(c).

#include "checks.h"
#include "cpu/activations.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"
#include "cpu/recurrence.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/where.h>

#include <omp.h>

namespace lstm_fused::cpu {
namespace {

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T, B, H, P;
  bool reverse, has_proj;
  WorkSplit units, cols;    // hidden units / dh columns per thread
  const scalar_t* dy;       // (T, B, P)
  const acc_t* w_hh;        // (4H, P)
  const acc_t* w_hr;        // (P, H) or null
  const int64_t* lengths;   // (B,) or null
  const scalar_t* gates;    // (T, B, 4H) activated i, f, g, o
  const acc_t* c_all;       // (T, B, H)
  const acc_t* c0;          // (B, H)
  acc_t* dh;                // (B, P) carried
  acc_t* dc;                // (B, H) carried
  acc_t* dh_tot;            // (B, P) scratch [proj]
  acc_t* dm;                // (B, H) scratch [proj]
  acc_t* dz[2];             // (B, 4H) scratch: pre-activation gate grads for the GEMM
  acc_t* dh_new;            // (B, P) scratch [lengths]
  acc_t* dh_proj_all;       // (T, B, P) [proj, weight grads]: dh_tot of every step, for dW_hr
  scalar_t* dxproj;         // (T, B, 4H)

  bool active(int64_t b, int64_t t) const { return lengths == nullptr || t < lengths[b]; }
};

// Gate derivatives of one row for units [j0, j0 + n); pointers already offset to j0.
template <typename scalar_t, bool kAddDy>
inline void gate_grad_row(int64_t n, int64_t H, const scalar_t* __restrict__ gt,
                          const at::opmath_type<scalar_t>* __restrict__ c,
                          const at::opmath_type<scalar_t>* __restrict__ c_prev,
                          const at::opmath_type<scalar_t>* __restrict__ dm_in,
                          const scalar_t* __restrict__ dy, at::opmath_type<scalar_t>* __restrict__ dc,
                          at::opmath_type<scalar_t>* __restrict__ dz, scalar_t* __restrict__ dx) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc_t dm = dm_in[j];
    if constexpr (kAddDy) dm += static_cast<acc_t>(dy[j]);  // no projection: dm is dh_tot
    const acc_t i = static_cast<acc_t>(gt[j]);
    const acc_t f = static_cast<acc_t>(gt[H + j]);
    const acc_t g = static_cast<acc_t>(gt[2 * H + j]);
    const acc_t o = static_cast<acc_t>(gt[3 * H + j]);
    const acc_t tc = tanh_act(c[j]);
    const acc_t d_o = dm * tc;
    const acc_t dc_tot = dc[j] + dm * o * (acc_t(1) - tc * tc);
    const acc_t dzi = dc_tot * g * i * (acc_t(1) - i);
    const acc_t dzf = dc_tot * c_prev[j] * f * (acc_t(1) - f);
    const acc_t dzg = dc_tot * i * (acc_t(1) - g * g);
    const acc_t dzo = d_o * o * (acc_t(1) - o);
    dc[j] = dc_tot * f;
    dz[j] = dzi;
    dz[H + j] = dzf;
    dz[2 * H + j] = dzg;
    dz[3 * H + j] = dzo;
    dx[j] = static_cast<scalar_t>(dzi);
    dx[H + j] = static_cast<scalar_t>(dzf);
    dx[2 * H + j] = static_cast<scalar_t>(dzg);
    dx[3 * H + j] = static_cast<scalar_t>(dzo);
  }
}

// Gate derivatives of units [j0, j0 + n), every row, processing step s.
template <typename scalar_t>
void gate_grad_pass(const BackwardArgs<scalar_t>& a, int64_t s, int64_t j0, int64_t n,
                    at::opmath_type<scalar_t>* dz_buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, H4 = 4 * a.H;
  const int64_t t = time_at(s, a.T, a.reverse);
  const int64_t t_prev = s > 0 ? time_at(s - 1, a.T, a.reverse) : -1;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t row = t * a.B + b;
    scalar_t* dx = a.dxproj + row * H4 + j0;
    acc_t* dz = dz_buf + b * H4 + j0;
    if (!a.active(b, t)) {
      for (int g = 0; g < 4; ++g) {
        std::fill_n(dx + g * H, n, scalar_t(0));
        std::fill_n(dz + g * H, n, acc_t(0));
      }
      continue;
    }
    const scalar_t* gt = a.gates + row * H4 + j0;
    const acc_t* c = a.c_all + row * H + j0;
    const acc_t* c_prev = (t_prev >= 0 ? a.c_all + (t_prev * a.B + b) * H : a.c0 + b * H) + j0;
    acc_t* dc = a.dc + b * H + j0;
    if (a.has_proj) {
      gate_grad_row<scalar_t, false>(n, H, gt, c, c_prev, a.dm + b * H + j0, nullptr, dc, dz, dx);
    } else {
      gate_grad_row<scalar_t, true>(n, H, gt, c, c_prev, a.dh + b * a.P + j0,
                                    a.dy + row * a.P + j0, dc, dz, dx);
    }
  }
}

// [proj] dh_tot = dh + dy_t on columns [p0, p0 + n); kept per step for dW_hr.
template <typename scalar_t>
void output_grad_pass(const BackwardArgs<scalar_t>& a, int64_t t, int64_t p0, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t row = t * a.B + b;
    const bool on = a.active(b, t);
    const scalar_t* dy = a.dy + row * a.P + p0;
    const acc_t* dh = a.dh + b * a.P + p0;
    acc_t* out = a.dh_tot + b * a.P + p0;
    for (int64_t j = 0; j < n; ++j) out[j] = on ? dh[j] + static_cast<acc_t>(dy[j]) : acc_t(0);
    if (a.dh_proj_all) std::copy_n(out, n, a.dh_proj_all + row * a.P + p0);
  }
}

// dh[:, p0:p0+n] = dz @ W_hh[:, p0:p0+n], leaving rows past their sequence's end untouched.
template <typename scalar_t>
void hidden_grad_pass(const BackwardArgs<scalar_t>& a, int64_t t, int64_t p0, int64_t n,
                      const PackedRhs<at::opmath_type<scalar_t>>& w_cols,
                      const at::opmath_type<scalar_t>* dz) {
  const int64_t H4 = 4 * a.H;
  if (a.lengths == nullptr) {
    w_cols.multiply(dz, H4, a.dh + p0, a.P);
    return;
  }
  w_cols.multiply(dz, H4, a.dh_new + p0, a.P);
  for (int64_t b = 0; b < a.B; ++b)
    if (a.active(b, t)) std::copy_n(a.dh_new + b * a.P + p0, n, a.dh + b * a.P + p0);
}

// From this batch size up the backward multiplies its weight columns unpacked (see below).
constexpr int64_t kBackwardPackedMaxBatch = 64;

template <typename scalar_t>
void run_backward(const BackwardArgs<scalar_t>& a) {
#pragma omp parallel num_threads(a.units.threads)
  {
    const SingleThreadedBlas single_threaded;  // we are the parallelism now
    const int k = omp_get_thread_num();
    const int64_t j0 = a.units.begin(k), n = a.units.size(k);
    const int64_t p0 = a.cols.begin(k), np = a.cols.size(k);
    using acc_t = at::opmath_type<scalar_t>;
    // This thread's weight columns, packed once for the T products they take part in. Measured
    // on a 2-core AVX-512 Xeon: packing these (untransposed) columns pays at small batch but is
    // slower from batch 64 up (B=64, H=512: 61 ms against 54 ms per backward), unlike the forward.
    const PackedRhs<acc_t> w_cols(/*slot=*/0, /*transpose_b=*/false, a.B, np, 4 * a.H, a.w_hh + p0,
                                  a.P, /*allow_packing=*/a.B < kBackwardPackedMaxBatch);
    const PackedRhs<acc_t> w_proj(/*slot=*/1, /*transpose_b=*/false, a.B, a.has_proj ? n : 0, a.P, a.w_hr ? a.w_hr + j0 : nullptr, a.H);
    for (int64_t s = a.T - 1; s >= 0; --s) {
      const int64_t t = time_at(s, a.T, a.reverse);
      auto* dz = a.dz[s % 2];
      if (a.has_proj) {
        if (np > 0) output_grad_pass(a, t, p0, np);
#pragma omp barrier
        if (n > 0) w_proj.multiply(a.dh_tot, a.P, a.dm + j0, a.H);
      }
      if (n > 0) gate_grad_pass(a, s, j0, n, dz);
#pragma omp barrier
      if (np > 0) hidden_grad_pass(a, t, p0, np, w_cols, dz);
    }
  }
}

}  // namespace

// dW_hh = sum over steps of dz_t^T h_{t-1}, as GEMMs over all T*B rows.
// h_{t-1} is y at the previous step (see reference.previous_hidden): forward direction y[t-1]
// (h0 at t = 0), reverse y[t+1] (h0 at t = T-1), so the sum is one GEMM over the shifted outputs
// plus one over h0, with no copy of y. Reverse with lengths also restarts from h0 at each
// sequence's own last element; there we build h_prev explicitly.
// 16-bit operands on a CPU without dot-product instructions for them are widened to float32
// first: ATen's 16-bit GEMM is emulated there (6-9x slower than its float32 GEMM on Zen 3), and
// the sum is then rounded once instead of after each of the two GEMMs.
at::Tensor recurrent_weight_grad(const at::Tensor& dxproj_in, const at::Tensor& y_in, const at::Tensor& h0_in,
                                 const std::optional<at::Tensor>& lengths, bool reverse) {
  const auto dtype = dxproj_in.scalar_type();
  const bool widen = (dtype == at::kBFloat16 && !has_16bit_dot(GemmDtype::kBFloat16)) ||
                     (dtype == at::kHalf && !has_16bit_dot(GemmDtype::kFloat16));
  if (widen) {
    return recurrent_weight_grad(dxproj_in.to(at::kFloat), y_in.to(at::kFloat), h0_in.to(at::kFloat),
                                 lengths, reverse)
        .to(dtype);
  }
  // y may be one direction's half of a bidirectional layer's output: its rows need only be
  // contiguous each, the products take them strided.
  const at::Tensor dxproj = dxproj_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor y = y_in.stride(2) == 1 ? y_in : y_in.contiguous();
  const int64_t T = y.size(0), B = y.size(1), P = y.size(2), H4 = dxproj.size(2);
  const auto rows = [&](const at::Tensor& t, int64_t from, int64_t n, int64_t width) {
    return t.narrow(0, from, n).reshape({n * B, width});
  };
  if (reverse && lengths.has_value()) {
    at::Tensor h_prev = at::cat({y.narrow(0, 1, T - 1), h0.unsqueeze(0)}, 0);
    at::Tensor t_next = at::arange(1, T + 1, lengths->options()).view({T, 1, 1});
    at::Tensor starts_here = at::ge(t_next, lengths->view({1, -1, 1}));
    h_prev = at::where(starts_here, h0.unsqueeze(0), h_prev).reshape({T * B, P});
    return weight_grad(dxproj.view({T * B, H4}), h_prev);
  }
  const int64_t first = reverse ? T - 1 : 0;  // the step that starts from h0
  at::Tensor dw = pooled_empty({H4, P}, dxproj.scalar_type());
  weight_grad_into(dxproj[first], h0, dw, /*accumulate=*/false);
  if (T > 1) {
    weight_grad_into(rows(dxproj, reverse ? 0 : 1, T - 1, H4), rows(y, reverse ? 1 : 0, T - 1, P), dw,
                     /*accumulate=*/true);
  }
  return dw;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_backward(
    const at::Tensor& dy_in, const at::Tensor& dh_n, const at::Tensor& dc_n,
    const at::Tensor& w_hh_in, const std::optional<at::Tensor>& w_hr_in, const at::Tensor& h0,
    const at::Tensor& c0, const std::optional<at::Tensor>& lengths_in, bool reverse,
    const at::Tensor& y, const at::Tensor& gates_in, const at::Tensor& c_all_in,
    bool weight_grads) {
  const RecurrenceSizes s = check_backward_args(dy_in, dh_n, dc_n, w_hh_in, w_hr_in, h0, c0,
                                                lengths_in, y, gates_in, c_all_in);
  const auto dtype = gates_in.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = gates_in.options();
  const auto acc_opts = opts.dtype(acc);
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  if (panel_kernels_apply(dtype, s.has_proj)) {
    auto [dxproj, dh0, dc0] =
        panel_backward(dy_in, dh_n, dc_n, w_hh_in, c0, lengths_in, reverse, gates_in, c_all_in);
    at::Tensor dw_hh = weight_grads ? recurrent_weight_grad(dxproj, y, h0, lengths_in, reverse)
                                    : at::empty({0}, opts);
    return {dxproj, dw_hh, at::empty({0}, opts), dh0, dc0};
  }

  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor gates = gates_in.contiguous();
  const at::Tensor c_all = c_all_in.contiguous();
  const at::Tensor w_hh = w_hh_in.to(acc).contiguous();
  const at::Tensor w_hr = s.has_proj ? w_hr_in->to(acc).contiguous() : at::Tensor();
  const at::Tensor lengths = lengths_in.has_value() ? lengths_in->contiguous() : at::Tensor();
  const at::Tensor c0_acc = c0.to(acc).contiguous();

  at::Tensor dh = dh_n.to(acc, false, /*copy=*/true).contiguous();
  at::Tensor dc = dc_n.to(acc, false, /*copy=*/true).contiguous();
  at::Tensor dh_tot = at::empty({B, P}, acc_opts);
  at::Tensor dm = s.has_proj ? at::empty({B, H}, acc_opts) : at::Tensor();
  at::Tensor dz = at::empty({2, B, 4 * H}, acc_opts);
  const WorkSplit units = WorkSplit::make(H, recurrence_threads(B, H, P));
  const WorkSplit cols = s.has_proj ? WorkSplit::make_like(units, P) : units;
  at::Tensor dh_new = lengths.defined() ? at::empty({B, P}, acc_opts) : at::Tensor();
  const bool keep_dh_proj = s.has_proj && weight_grads;
  at::Tensor dh_proj_all = keep_dh_proj ? at::empty({T, B, P}, acc_opts) : at::Tensor();
  at::Tensor dxproj = pooled_empty({T, B, 4 * H}, dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lstm_fused_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a;
    a.T = T, a.B = B, a.H = H, a.P = P;
    a.reverse = reverse, a.has_proj = s.has_proj;
    a.units = units, a.cols = cols;
    a.dy = dy.data_ptr<scalar_t>();
    a.w_hh = w_hh.data_ptr<acc_t>();
    a.w_hr = s.has_proj ? w_hr.data_ptr<acc_t>() : nullptr;
    a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    a.gates = gates.data_ptr<scalar_t>();
    a.c_all = c_all.data_ptr<acc_t>();
    a.c0 = c0_acc.data_ptr<acc_t>();
    a.dh = dh.data_ptr<acc_t>();
    a.dc = dc.data_ptr<acc_t>();
    a.dh_tot = dh_tot.data_ptr<acc_t>();
    a.dm = s.has_proj ? dm.data_ptr<acc_t>() : nullptr;
    a.dz[0] = dz.data_ptr<acc_t>();
    a.dz[1] = a.dz[0] + B * 4 * H;
    a.dh_new = lengths.defined() ? dh_new.data_ptr<acc_t>() : nullptr;
    a.dh_proj_all = keep_dh_proj ? dh_proj_all.data_ptr<acc_t>() : nullptr;
    a.dxproj = dxproj.data_ptr<scalar_t>();
    run_backward(a);
  });

  at::Tensor dw_hh = at::empty({0}, opts), dw_hr = at::empty({0}, opts);
  if (weight_grads) {
    dw_hh = recurrent_weight_grad(dxproj, y, h0, lengths_in, reverse);
    if (s.has_proj) {
      const at::Tensor m_all = at::mul(gates.narrow(2, 3 * H, H).to(acc), at::tanh(c_all));
      dw_hr = at::mm(dh_proj_all.view({T * B, P}).t(), m_all.view({T * B, H})).to(dtype);
    }
  }
  return {dxproj, dw_hh, dw_hr, dh.to(dtype), dc.to(dtype)};
}

}  // namespace lstm_fused::cpu
