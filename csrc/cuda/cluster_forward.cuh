// Cluster-resident LSTM forward (sm_90): all T steps in one launch, h exchanged through
// distributed shared memory instead of global memory. Torch-free.
//
// For small H the persistent grid kernel's step is latency-bound: its h_t travels through L2
// and a global arrival counter (a few L2 round trips per step). Here one thread-block cluster
// (up to 16 blocks on one GPC) holds all of W_hh for one batch group:
//   * block r of a cluster owns hidden units j0 = r * UNITS .. j0 + UNITS - 1, i.e. 4 * UNITS
//     rows of W_hh (gate-major, as in persistent_forward.cuh), in shared memory for all steps;
//   * every block keeps a full copy of the group's h_{t-1} (Bpad x Kpad, zero-padded) in shared
//     memory, double-buffered by step parity, so the per-step product reads only local memory;
//   * after the gates, each block writes its units of h_t straight into every block's copy
//     (stores to the peers' shared memory through map_shared_rank), then one cluster barrier
//     (arrive.release / wait.acquire) publishes them. The wait of step t+1 comes after this block's
//     next xproj loads are in flight and its y / gates / c stores are issued.
// One barrier per step is enough: a block writes buffer t&1 of its peers only after the
// barrier of step t-1, which every peer reaches only after its product of step t-1, the last
// read of that buffer (it held h_{t-2}).
// Clusters are batch groups of at most kThreads / UNITS rows (one pointwise item per thread)
// and never exchange data, so they need not be co-resident: no cooperative launch, no grid
// barrier. Without projection (proj_size runs the general path). The multiply engines are the
// persistent kernels' (tensor cores; exact fp32 FMAs where TF32 is not allowed).
#pragma once

#include "cuda/persistent_common.cuh"
#include "cuda/recurrence_args.h"

#ifndef LSTM_FUSED_SIMT_EMULATION
#include <cooperative_groups.h>
#endif

namespace lstm_fused {
namespace cuda {
namespace persistent {

// Largest cluster the kernels use (16 needs the non-portable cluster size opt-in).
constexpr int kMaxClusterBlocks = 16;

// Cluster primitives; tests/cuda_emulation/simt_emulator.h provides the same four on CPU threads.
#if !defined(LSTM_FUSED_SIMT_EMULATION) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900)
__device__ inline int cluster_rank() {
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
}
// The address of `p` (this block's shared memory) in the shared memory of block `rank`.
template <typename T>
__device__ inline T* peer_shared(T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
__device__ inline void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ inline void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
#endif

template <typename Scalar>
struct ClusterForwardParams : ForwardCall<Scalar> {
  int cluster;  // blocks per cluster (grid = cluster x groups)
  int Bg;       // batch rows per group (the last group may have fewer)
  int Kpad, Bpad;
};

template <typename Scalar>
__host__ ClusterForwardParams<Scalar> make_cluster_forward_params(const ForwardArgs& a, int cluster,
                                                                  int Bg) {
  ClusterForwardParams<Scalar> p;
  fill_forward_call(a, &p);
  p.cluster = cluster;
  p.Bg = Bg;
  p.Kpad = static_cast<int>(round_up(a.H, 16));
  p.Bpad = static_cast<int>(round_up(Bg, 16));
  return p;
}

// Shared-memory layout (identical in every block: peers address each other's copies of h by
// the same offsets); the planner sizes the launch with it.
struct ClusterForwardLayout {
  size_t w, hs, acc, cs, hown, len, total;
  __host__ __device__ ClusterForwardLayout(int units, int Bpad, int Kpad, int elem) {
    const int rows = 4 * units;
    const TileSplit split(rows, Bpad);
    SmemCursor c;
    w = c.take(static_cast<size_t>(rows) * (Kpad + kSkew) * elem);
    hs = c.take(2 * static_cast<size_t>(Bpad) * (Kpad + kSkew) * elem);
    acc = c.take(static_cast<size_t>(split.ksplit) * Bpad * rows * sizeof(float));
    cs = c.take(static_cast<size_t>(Bpad) * units * sizeof(float));
    hown = c.take(static_cast<size_t>(Bpad) * units * elem);
    len = c.take(static_cast<size_t>(Bpad) * sizeof(int));
    total = c.offset;
  }
};

template <typename Scalar, int UNITS, bool kExactFp32 = false>
__global__ void __launch_bounds__(kThreads, 1)
    lstm_forward_cluster(ClusterForwardParams<Scalar> p) {
#if defined(LSTM_FUSED_SIMT_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  constexpr int rows = 4 * UNITS;
  LSTM_FUSED_DYNAMIC_SMEM(smem);
  const ClusterForwardLayout L(UNITS, p.Bpad, p.Kpad, sizeof(Scalar));
  Scalar* Wsm = reinterpret_cast<Scalar*>(smem + L.w);
  Scalar* Hs = reinterpret_cast<Scalar*>(smem + L.hs);  // [2][Bpad][Kpad + kSkew]
  float* Acc = reinterpret_cast<float*>(smem + L.acc);
  float* Cs = reinterpret_cast<float*>(smem + L.cs);
  Scalar* Hown = reinterpret_cast<Scalar*>(smem + L.hown);
  int* Len = reinterpret_cast<int*>(smem + L.len);

  const int B = p.B, H = p.H, tid = threadIdx.x;
  const int64_t H4 = 4 * static_cast<int64_t>(H);
  const int rank = cluster_rank();
  const int group = blockIdx.x / p.cluster;
  const int j0 = rank * UNITS, b0 = group * p.Bg, nb = min(p.Bg, B - b0);
  const int ldw = p.Kpad + kSkew, ldh = p.Kpad + kSkew;
  const int64_t buffer = static_cast<int64_t>(p.Bpad) * ldh;  // elements per copy of h
  const int ksplit = TileSplit(rows, p.Bpad).ksplit;
  const Scalar zero = from_float<Scalar>(0.0f);

  load_forward_w_slice(p.w_hh, H, p.Kpad, j0, UNITS, Wsm, ldw);
  // Both copies zero (padding rows and columns stay zero for the whole launch); the copy step 0
  // reads, buffer 1, holds h0.
  for (int64_t idx = tid; idx < 2 * buffer; idx += kThreads) {
    const int64_t b = (idx % buffer) / ldh, k = (idx % buffer) % ldh;
    Hs[idx] = (idx >= buffer && b < nb && k < H) ? p.h0[(b0 + b) * H + k] : zero;
  }
  // This thread's pointwise item: (row my_bl, unit my_u); the planner guarantees nb * UNITS <=
  // kThreads, so every item has a thread.
  const int my_bl = tid / UNITS, my_u = tid - my_bl * UNITS, my_j = j0 + my_u;
  const bool mine = my_bl < nb && my_j < H;
  if (mine) {
    Cs[tid] = to_float(p.c0[static_cast<int64_t>(b0 + my_bl) * H + my_j]);
    Hown[tid] = p.h0[static_cast<int64_t>(b0 + my_bl) * H + my_j];
  }
  load_lengths(p.lengths, p.steps, b0, nb, Len);
  __syncthreads();
  // No block may write into a peer's copies before that peer has zeroed them.
  cluster_arrive();
  cluster_wait();

  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? p.steps - 1 - s : s;
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (mine) {
      const Scalar* xt = p.xproj + (static_cast<int64_t>(t) * B + b0 + my_bl) * H4 + my_j;
#pragma unroll
      for (int g = 0; g < 4; ++g) x[g] = to_float(xt[g * static_cast<int64_t>(H)]);
    }
    if (s > 0) cluster_wait();  // h_{t-1} complete in every copy (arrived at the end of s-1)

    const Scalar* h_prev = Hs + ((s + 1) & 1) * buffer;  // buffer (s-1)&1; h0 in 1 at s = 0
    block_matmul_resident<Scalar, kExactFp32>(Wsm, ldw, rows, h_prev, ldh, p.Kpad, p.Bpad, Acc);

    GateItem it{};
    if (mine) {
      it = forward_item(Acc, ksplit, p.Bpad, rows, UNITS, my_bl, my_u, x, t < Len[my_bl], &Cs[tid],
                        &Hown[tid]);
    }
    if (s + 1 < p.steps) {
      if (mine) {
        Scalar* slot = Hs + (s & 1) * buffer + my_bl * ldh + my_j;
        for (int peer = 0; peer < p.cluster; ++peer) *peer_shared(slot, peer) = Hown[tid];
      }
      cluster_arrive();  // release: this thread's h_t writes, for every peer's next product
    }
    if (mine) {  // outputs nobody reads during the launch, after the arrive
      store_forward_outputs(p, static_cast<int64_t>(t) * B + b0 + my_bl, my_j, it, Hown[tid],
                            Cs[tid]);
    }
  }

  if (mine) {
    p.h_n[static_cast<int64_t>(b0 + my_bl) * H + my_j] = Hown[tid];
    p.c_n[static_cast<int64_t>(b0 + my_bl) * H + my_j] = from_float<Scalar>(Cs[tid]);
  }
#elif defined(__CUDA_ARCH__)
  trap_unsupported_build();
#endif
}

}  // namespace persistent
}  // namespace cuda
}  // namespace lstm_fused
