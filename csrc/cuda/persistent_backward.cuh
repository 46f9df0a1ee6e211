// Persistent LSTM backward: the reverse-time loop in one cooperative launch. Torch-free.
//
// The mirror image of persistent_forward.cuh, on the same (unit slices) x (batch groups) grid.
// Block (ub, group) owns hidden units j0 = ub * kBackwardUnits .. + kBackwardUnits - 1 and the
// batch rows of its group, and keeps the matching *columns* of W_hh, transposed
// (Wt[u][r] = W_hh[r][j0 + u], r over all 4H gate rows), in shared memory. Phase s
// (s = T-1 .. 0 in processing order, then a final phase -1):
//   1. waits until every block of its group published its dz of the phase before,
//   2. dh_rec[b, u] = sum_r dz[b, r] * W_hh[r, j0 + u] (block_matmul); dh for its units is
//      that where the step before was active and carried unchanged through padding,
//   3. from dh + dy[t], dc, the saved gates and cell states (loaded before step 1 when each
//      thread owns at most one (row, unit) item): dz for its units, published to the exchange
//      buffer,
//   4. arrives at its group's barrier and writes dz to dxproj (before the arrive when a thread
//      owns several items).
// The final phase only does 1-2 and writes dh0/dc0. dW_hh is not computed here: the binding
// does it afterwards as one GEMM over all T*B rows of dxproj.
#pragma once

#include "cuda/persistent_common.cuh"
#include "cuda/recurrence_args.h"

namespace lstm_fused {
namespace cuda {
namespace persistent {

// Hidden units per backward block: one 16-row wmma tile of the transposed W slice.
constexpr int kBackwardUnits = 16;

template <typename Scalar>
struct BackwardParams {
  int steps, B, H;
  // Batch groups (grid = unit slices x groups) and rows per group (the last may have fewer).
  int groups, Bg;
  int Kpad, KC, Bpad;  // 4H rounded up to 16; columns staged at once; Bg rounded up to 16
  bool reverse;
  const Scalar* dy;        // (T, B, H)
  const Scalar* dh_n;      // (B, H)
  const Scalar* dc_n;      // (B, H)
  const Scalar* w_hh;      // (4H, H)
  const Scalar* c0;        // (B, H)
  const int64_t* lengths;  // (B,) or nullptr
  const Scalar* gates;     // (T, B, 4H) activated gates saved by the forward
  const float* c_all;      // (T, B, H)
  Scalar* dxproj;          // (T, B, 4H)
  Scalar* dh0;             // (B, H)
  Scalar* dc0;             // (B, H)
  Scalar* zbuf;            // workspace: (2, B, 4H) exchange buffer of dz
  unsigned* counter;       // workspace: a zeroed barrier counter per group, kCounterStride apart
};

// Kernel parameters of one call; the launcher and the CPU emulation test both build them here.
template <typename Scalar>
__host__ BackwardParams<Scalar> make_backward_params(const BackwardArgs& a,
                                                     const LaunchShape& shape, void* workspace) {
  BackwardParams<Scalar> p;
  p.steps = static_cast<int>(a.T);
  p.B = static_cast<int>(a.B);
  p.H = static_cast<int>(a.H);
  p.groups = shape.groups;
  p.Bg = shape.rows_per_group;
  p.Kpad = static_cast<int>(round_up(4 * a.H, 16));
  p.KC = shape.k_chunk;
  p.Bpad = static_cast<int>(round_up(p.Bg, 16));
  p.reverse = a.reverse;
  p.dy = static_cast<const Scalar*>(a.dy);
  p.dh_n = static_cast<const Scalar*>(a.dh_n);
  p.dc_n = static_cast<const Scalar*>(a.dc_n);
  p.w_hh = static_cast<const Scalar*>(a.w_hh);
  p.c0 = static_cast<const Scalar*>(a.c0);
  p.lengths = a.lengths;
  p.gates = static_cast<const Scalar*>(a.gates);
  p.c_all = a.c_all;
  p.dxproj = static_cast<Scalar*>(a.dxproj);
  p.dh0 = static_cast<Scalar*>(a.dh0);
  p.dc0 = static_cast<Scalar*>(a.dc0);
  p.counter = static_cast<unsigned*>(workspace);
  p.zbuf = reinterpret_cast<Scalar*>(static_cast<char*>(workspace) + counter_bytes(p.groups));
  return p;
}

// Workspace of a backward call: the barrier counters, then the (2, B, 4H) exchange buffer.
__host__ inline size_t backward_workspace_bytes(int64_t B, int64_t H, int elem, int groups) {
  return counter_bytes(groups) + 2 * static_cast<size_t>(B) * 4 * H * elem;
}

struct BackwardLayout {
  size_t w, hs, acc, dh, dc, len, total;
  __host__ __device__ BackwardLayout(int Bg, int Bpad, int Kpad, int KC, int elem) {
    const int rows = kBackwardUnits;
    const TileSplit split(rows, Bpad);
    SmemCursor c;
    w = c.take(static_cast<size_t>(rows) * (Kpad + kSkew) * elem);
    hs = c.take(static_cast<size_t>(Bpad) * (KC + kSkew) * elem);
    acc = c.take(static_cast<size_t>(split.ksplit) * Bpad * rows * sizeof(float));
    dh = c.take(static_cast<size_t>(Bg) * rows * sizeof(float));
    dc = c.take(static_cast<size_t>(Bg) * rows * sizeof(float));
    len = c.take(static_cast<size_t>(Bg) * sizeof(int));
    total = c.offset;
  }
};

template <typename Scalar, bool kExactFp32 = false>
__global__ void __launch_bounds__(kThreads, 1) lstm_backward_persistent(BackwardParams<Scalar> p) {
#if defined(LSTM_FUSED_SIMT_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  constexpr int U = kBackwardUnits;
  LSTM_FUSED_DYNAMIC_SMEM(smem);
  const BackwardLayout L(p.Bg, p.Bpad, p.Kpad, p.KC, sizeof(Scalar));
  Scalar* Wt = reinterpret_cast<Scalar*>(smem + L.w);
  Scalar* Hs = reinterpret_cast<Scalar*>(smem + L.hs);
  float* Acc = reinterpret_cast<float*>(smem + L.acc);
  float* DH = reinterpret_cast<float*>(smem + L.dh);
  float* DC = reinterpret_cast<float*>(smem + L.dc);
  int* Len = reinterpret_cast<int*>(smem + L.len);

  const int B = p.B, H = p.H, tid = threadIdx.x;
  const int64_t H4 = 4 * static_cast<int64_t>(H);
  const BlockPlace place(U, p.groups, p.Bg, B);
  const int j0 = place.j0, b0 = place.b0, nb = place.nb, unit_blocks = place.unit_blocks;
  unsigned* counter = p.counter + place.group * kCounterStride;
  const int ldw = p.Kpad + kSkew;
  const int ksplit = TileSplit(U, p.Bpad).ksplit;
  const Scalar zero = from_float<Scalar>(0.0f);
  auto step_at = [&](int s) { return p.reverse ? p.steps - 1 - s : s; };

  // Transposed W columns: consecutive threads read consecutive units of one gate row.
  for (int idx = tid; idx < p.Kpad * U; idx += kThreads) {
    const int r = idx / U, u = idx - r * U, j = j0 + u;
    Wt[u * ldw + r] = (j < H && r < H4) ? p.w_hh[static_cast<int64_t>(r) * H + j] : zero;
  }
  for (int idx = tid; idx < p.Bpad * (p.KC + kSkew); idx += kThreads) Hs[idx] = zero;
  // Per-row state is indexed by the local row bl = b - b0.
  for (int idx = tid; idx < nb * U; idx += kThreads) {
    const int b = b0 + idx / U, j = j0 + idx % U;
    DH[idx] = j < H ? to_float(p.dh_n[static_cast<int64_t>(b) * H + j]) : 0.0f;
    DC[idx] = j < H ? to_float(p.dc_n[static_cast<int64_t>(b) * H + j]) : 0.0f;
  }
  load_lengths(p.lengths, p.steps, b0, nb, Len);
  __syncthreads();

  // As in the forward: when every thread owns at most one (row, unit) item, the forward's saved
  // values of step t (gates, c, c_{t-1}) and dy[t] are loaded into registers before the barrier
  // wait, and d(xproj) is stored after the arrive; with several items per thread both happen in
  // the pointwise pass.
  const bool one_item = nb * U <= kThreads;
  const int my_bl = tid / U, my_u = tid - my_bl * U;
  const bool mine = one_item && my_bl < nb && j0 + my_u < H;

  // What the gate gradients of one item at step t need from the forward and from dy.
  struct Saved {
    float ig, fg, gg, og, c, c_prev, dy;
  };
  auto load_saved = [&](int bl, int u, int s) {
    const int t = step_at(s), b = b0 + bl, j = j0 + u;
    const int64_t row = static_cast<int64_t>(t) * B + b;
    const Scalar* gt = p.gates + row * H4 + j;
    Saved v;
    v.ig = to_float(gt[0]);
    v.fg = to_float(gt[H]);
    v.gg = to_float(gt[2 * static_cast<int64_t>(H)]);
    v.og = to_float(gt[3 * static_cast<int64_t>(H)]);
    v.c = p.c_all[row * H + j];
    v.c_prev = s > 0 ? p.c_all[(static_cast<int64_t>(step_at(s - 1)) * B + b) * H + j]
                     : to_float(p.c0[static_cast<int64_t>(b) * H + j]);
    v.dy = to_float(p.dy[row * H + j]);
    return v;
  };
  // dz of item idx from the carried dh/dc (zero at inactive steps, which pass dh and dc
  // through and ignore dy); updates the carried dc.
  auto gate_grads = [&](int idx, bool active, const Saved& v, float dz[4]) {
    dz[0] = dz[1] = dz[2] = dz[3] = 0.0f;
    if (!active) return;
    const float dh = DH[idx] + v.dy;
    const float tc = tanhf(v.c);
    const float dc = DC[idx] + dh * v.og * (1.0f - tc * tc);
    dz[0] = dc * v.gg * v.ig * (1.0f - v.ig);
    dz[1] = dc * v.c_prev * v.fg * (1.0f - v.fg);
    dz[2] = dc * v.ig * (1.0f - v.gg * v.gg);
    dz[3] = dh * tc * v.og * (1.0f - v.og);
    DC[idx] = dc * v.fg;
  };

  for (int s = p.steps - 1; s >= -1; --s) {
    const int t = s >= 0 ? step_at(s) : 0;
    Saved mine_saved{};  // one_item: in flight during the wait
    const bool mine_active = mine && s >= 0 && t < Len[my_bl];
    if (mine_active) mine_saved = load_saved(my_bl, my_u, s);

    if (s < p.steps - 1) {
      grid_wait(counter, static_cast<unsigned>(p.steps - 1 - s) * unit_blocks);
      const Scalar* dz_prev = p.zbuf + (static_cast<int64_t>((s + 1) & 1) * B + b0) * H4;
      block_matmul<Scalar, kExactFp32>(Wt, ldw, U, dz_prev, nb, static_cast<int>(H4), p.Kpad, p.KC,
                                       p.Bpad, Hs, Acc);
      const int t_prev = step_at(s + 1);
      for (int idx = tid; idx < nb * U; idx += kThreads) {
        const int bl = idx / U;
        if (t_prev < Len[bl]) DH[idx] = acc_sum(Acc, ksplit, p.Bpad, U, bl, idx - bl * U);
      }
    }
    if (s < 0) break;

    Scalar* dz_out = p.zbuf + static_cast<int64_t>(s & 1) * B * H4;
    // dz of item (bl, u) to the exchange buffer and, if `also_dxproj`, to d(xproj).
    auto store_dz = [&](int bl, int u, const float dz[4], bool exchange, bool also_dxproj) {
      const int64_t b = b0 + bl, j = j0 + u, row = static_cast<int64_t>(t) * B + b;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const Scalar v = from_float<Scalar>(dz[g]);
        if (exchange) dz_out[b * H4 + g * static_cast<int64_t>(H) + j] = v;
        if (also_dxproj) p.dxproj[row * H4 + g * static_cast<int64_t>(H) + j] = v;
      }
    };
    if (one_item) {
      float dz[4];
      if (mine) {
        gate_grads(tid, mine_active, mine_saved, dz);
        store_dz(my_bl, my_u, dz, true, false);
      }
      grid_arrive(counter);  // the next phase (the final one included) reads dz_out
      if (mine) store_dz(my_bl, my_u, dz, false, true);
    } else {
      for (int idx = tid; idx < nb * U; idx += kThreads) {
        const int bl = idx / U, u = idx - bl * U;
        if (j0 + u >= H) continue;
        const bool active = t < Len[bl];
        float dz[4];
        gate_grads(idx, active, active ? load_saved(bl, u, s) : Saved{}, dz);
        store_dz(bl, u, dz, true, true);
      }
      grid_arrive(counter);
    }
  }

  for (int idx = tid; idx < nb * U; idx += kThreads) {
    const int b = b0 + idx / U, j = j0 + idx % U;
    if (j >= H) continue;
    p.dh0[static_cast<int64_t>(b) * H + j] = from_float<Scalar>(DH[idx]);
    p.dc0[static_cast<int64_t>(b) * H + j] = from_float<Scalar>(DC[idx]);
  }
#elif defined(__CUDA_ARCH__)
  trap_unsupported_build();
#endif
}

}  // namespace persistent
}  // namespace cuda
}  // namespace lstm_fused
