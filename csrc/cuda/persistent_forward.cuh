// Persistent LSTM forward: all T steps in one cooperative launch. Torch-free.
//
// The grid is (hidden-unit slices) x (batch groups). Block (ub, group) owns hidden units
// j0 = ub * UNITS .. j0 + UNITS - 1, i.e. 4 * UNITS rows of W_hh (gate-major: row g * UNITS + u
// is W_hh row g * H + j0 + u), resident in shared memory for the whole launch, and the batch
// rows of its group. Batch groups never exchange anything, so each has its own barrier counter;
// splitting the batch fills more SMs at small H and shrinks the state each block reads per step.
// Per step a block
//   1. prefetches its slice of xproj[t] (independent of h, so it overlaps the barrier wait:
//      into registers when each thread owns at most one (row, unit) item, else into shared
//      memory),
//   2. waits until every block of its group published its slice of h_{t-1},
//   3. multiplies its W slice by h_{t-1} (block_matmul: tensor cores, or exact fp32 FMAs),
//   4. applies the gates in fp32 (cell state stays in shared memory) and publishes its units of
//      h_t to the exchange buffer,
//   5. arrives at its group's barrier and writes y, the saved gates and c (before the arrive
//      when a thread owns several items).
// One barrier per step: the exchange buffer is double-buffered, and a block reads the buffer
// of step t-1 only before it arrives at step t's barrier, which every writer of step t+1 waits
// for.
#pragma once

#include "cuda/persistent_common.cuh"
#include "cuda/recurrence_args.h"

namespace lstm_fused {
namespace cuda {
namespace persistent {

template <typename Scalar>
struct ForwardParams : ForwardCall<Scalar> {
  // Batch groups (grid = unit slices x groups) and rows per group (the last may have fewer).
  int groups, Bg;
  int Kpad, KC, Bpad;  // H rounded up to 16; state columns staged at once; Bg rounded up to 16
  Scalar* hbuf;        // workspace: (2, B, H) exchange buffer
  unsigned* counter;   // workspace: a zeroed barrier counter per group, kCounterStride apart
};

// Kernel parameters of one call; the launcher and the CPU emulation test both build them here.
template <typename Scalar>
__host__ ForwardParams<Scalar> make_forward_params(const ForwardArgs& a, const LaunchShape& shape,
                                                   void* workspace) {
  ForwardParams<Scalar> p;
  fill_forward_call(a, &p);
  p.groups = shape.groups;
  p.Bg = shape.rows_per_group;
  p.Kpad = static_cast<int>(round_up(a.H, 16));
  p.KC = shape.k_chunk;
  p.Bpad = static_cast<int>(round_up(p.Bg, 16));
  p.counter = static_cast<unsigned*>(workspace);
  p.hbuf = reinterpret_cast<Scalar*>(static_cast<char*>(workspace) + counter_bytes(p.groups));
  return p;
}

// Workspace of a forward call: the barrier counters, then the (2, B, H) exchange buffer.
__host__ inline size_t forward_workspace_bytes(int64_t B, int64_t H, int elem, int groups) {
  return counter_bytes(groups) + 2 * static_cast<size_t>(B) * H * elem;
}

// Shared-memory layout; the planner sizes the launch with the same function.
struct ForwardLayout {
  size_t w, hs, acc, xs, cs, hown, len, total;
  __host__ __device__ ForwardLayout(int units, int Bg, int Bpad, int Kpad, int KC, int elem) {
    const int rows = 4 * units;
    const TileSplit split(rows, Bpad);
    SmemCursor c;
    w = c.take(static_cast<size_t>(rows) * (Kpad + kSkew) * elem);
    hs = c.take(static_cast<size_t>(Bpad) * (KC + kSkew) * elem);
    acc = c.take(static_cast<size_t>(split.ksplit) * Bpad * rows * sizeof(float));
    xs = c.take(static_cast<size_t>(Bg) * rows * elem);
    cs = c.take(static_cast<size_t>(Bg) * units * sizeof(float));
    hown = c.take(static_cast<size_t>(Bg) * units * elem);
    len = c.take(static_cast<size_t>(Bg) * sizeof(int));
    total = c.offset;
  }
};

template <typename Scalar, int UNITS, bool kExactFp32 = false>
__global__ void __launch_bounds__(kThreads, 1) lstm_forward_persistent(ForwardParams<Scalar> p) {
#if defined(LSTM_FUSED_SIMT_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  constexpr int rows = 4 * UNITS;
  LSTM_FUSED_DYNAMIC_SMEM(smem);
  const ForwardLayout L(UNITS, p.Bg, p.Bpad, p.Kpad, p.KC, sizeof(Scalar));
  Scalar* Wsm = reinterpret_cast<Scalar*>(smem + L.w);
  Scalar* Hs = reinterpret_cast<Scalar*>(smem + L.hs);
  float* Acc = reinterpret_cast<float*>(smem + L.acc);
  Scalar* Xs = reinterpret_cast<Scalar*>(smem + L.xs);
  float* Cs = reinterpret_cast<float*>(smem + L.cs);
  Scalar* Hown = reinterpret_cast<Scalar*>(smem + L.hown);
  int* Len = reinterpret_cast<int*>(smem + L.len);

  const int B = p.B, H = p.H, tid = threadIdx.x;
  const int64_t H4 = 4 * static_cast<int64_t>(H);
  const BlockPlace place(UNITS, p.groups, p.Bg, B);
  const int j0 = place.j0, b0 = place.b0, nb = place.nb, unit_blocks = place.unit_blocks;
  unsigned* counter = p.counter + place.group * kCounterStride;
  const int ldw = p.Kpad + kSkew;
  const int ksplit = TileSplit(rows, p.Bpad).ksplit;
  const Scalar zero = from_float<Scalar>(0.0f);

  load_forward_w_slice(p.w_hh, H, p.Kpad, j0, UNITS, Wsm, ldw);
  // Staging rows past nb stay zero for the whole launch.
  for (int idx = tid; idx < p.Bpad * (p.KC + kSkew); idx += kThreads) Hs[idx] = zero;
  // Per-row state is indexed by the local row bl = b - b0.
  for (int idx = tid; idx < nb * UNITS; idx += kThreads) {
    const int b = b0 + idx / UNITS, j = j0 + idx % UNITS;
    Cs[idx] = j < H ? to_float(p.c0[static_cast<int64_t>(b) * H + j]) : 0.0f;
    Hown[idx] = j < H ? p.h0[static_cast<int64_t>(b) * H + j] : zero;
  }
  load_lengths(p.lengths, p.steps, b0, nb, Len);
  __syncthreads();

  // Small batches (the latency-bound case): when every thread owns at most one (row, unit) item
  // of the pointwise pass, its four xproj values are loaded into registers before the barrier
  // wait, so their latency hides behind the wait instead of following it, and its y / gates / c
  // stores are issued after the arrive, so the arrive's release waits for h_t alone. Larger
  // batches stage xproj through shared memory and store everything before the arrive.
  const bool one_item = nb * UNITS <= kThreads;
  const int my_bl = tid / UNITS, my_u = tid - my_bl * UNITS;
  const bool mine = one_item && my_bl < nb && j0 + my_u < H;

  // Item idx = (bl, u) at step t: the pointwise pass, then h_t published to h_out.
  auto update = [&](int idx, int bl, int u, int t, const float x[4], Scalar* h_out) {
    const GateItem it =
        forward_item(Acc, ksplit, p.Bpad, rows, UNITS, bl, u, x, t < Len[bl], &Cs[idx], &Hown[idx]);
    h_out[static_cast<int64_t>(b0 + bl) * H + j0 + u] = Hown[idx];
    return it;
  };
  auto store_outputs = [&](int idx, int bl, int u, int t, const GateItem& it) {
    store_forward_outputs(p, static_cast<int64_t>(t) * B + b0 + bl, j0 + u, it, Hown[idx], Cs[idx]);
  };

  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? p.steps - 1 - s : s;
    const Scalar* xt = p.xproj + (static_cast<int64_t>(t) * B + b0) * H4;
    Scalar xr[4];  // one_item: this thread's xproj values, in flight during the wait
    if (one_item) {
      if (mine) {
#pragma unroll
        for (int g = 0; g < 4; ++g)
          xr[g] = xt[my_bl * H4 + g * static_cast<int64_t>(H) + j0 + my_u];
      }
    } else {
      for (int idx = tid; idx < nb * rows; idx += kThreads) {
        const int bl = idx / rows, r = idx - bl * rows;
        const int g = r / UNITS, j = j0 + r % UNITS;
        Xs[idx] = j < H ? xt[bl * H4 + g * static_cast<int64_t>(H) + j] : zero;
      }
    }
    if (s > 0) {
      grid_wait(counter, static_cast<unsigned>(s) * unit_blocks);
    } else {
      __syncthreads();
    }

    const Scalar* h_prev = s == 0 ? p.h0 : p.hbuf + static_cast<int64_t>((s - 1) & 1) * B * H;
    block_matmul<Scalar, kExactFp32>(Wsm, ldw, rows, h_prev + static_cast<int64_t>(b0) * H, nb, H,
                                     p.Kpad, p.KC, p.Bpad, Hs, Acc);

    Scalar* h_out = p.hbuf + static_cast<int64_t>(s & 1) * B * H;
    const bool arrive = s + 1 < p.steps;
    if (one_item) {
      GateItem it{};
      if (mine) {
        const float x[4] = {to_float(xr[0]), to_float(xr[1]), to_float(xr[2]), to_float(xr[3])};
        it = update(tid, my_bl, my_u, t, x, h_out);
      }
      if (arrive) grid_arrive(counter);
      if (mine) store_outputs(tid, my_bl, my_u, t, it);
    } else {
      for (int idx = tid; idx < nb * UNITS; idx += kThreads) {
        const int bl = idx / UNITS, u = idx - bl * UNITS;
        if (j0 + u >= H) continue;
        float x[4];
#pragma unroll
        for (int g = 0; g < 4; ++g) x[g] = to_float(Xs[bl * rows + g * UNITS + u]);
        store_outputs(idx, bl, u, t, update(idx, bl, u, t, x, h_out));
      }
      if (arrive) grid_arrive(counter);
    }
  }

  // Same thread <-> (b, u) mapping as the steps, so no barrier is needed before the final state.
  for (int idx = tid; idx < nb * UNITS; idx += kThreads) {
    const int b = b0 + idx / UNITS, j = j0 + idx % UNITS;
    if (j >= H) continue;
    p.h_n[static_cast<int64_t>(b) * H + j] = Hown[idx];
    p.c_n[static_cast<int64_t>(b) * H + j] = from_float<Scalar>(Cs[idx]);
  }
#elif defined(__CUDA_ARCH__)
  trap_unsupported_build();
#endif
}

}  // namespace persistent
}  // namespace cuda
}  // namespace lstm_fused
