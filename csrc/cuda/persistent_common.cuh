// Building blocks shared by the persistent forward and backward kernels. Torch-free.
//
// Both kernels have the same shape of work per time step: every block owns a few hidden units,
// keeps the matching slice of W_hh in shared memory for the whole launch, and multiplies it by
// a state that all blocks wrote together in the previous step (h_{t-1} forward, the gate
// gradients dz_{t+1} backward):
//
//     out^T[rows x B] = W_slice[rows x K] @ state^T[K x B]
//
// The state travels through a small double-buffered exchange area in global memory, read with
// L1-bypassing loads (other SMs wrote it during this launch, so an L1 copy could be stale), and
// a counter in global memory per batch group acts as the per-step barrier of that group's
// blocks. All blocks are co-resident because the launcher uses a cooperative launch, which
// refuses to start otherwise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cuda/recurrence_args.h"

#ifdef LSTM_FUSED_SIMT_EMULATION
// tests/cuda_emulation/simt_emulator.h runs these kernels on CPU threads (CI has no GPU); it
// provides the CUDA types, intrinsics and wmma used below.
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define LSTM_FUSED_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace lstm_fused {
namespace cuda {
namespace persistent {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Barrier counters of different batch groups sit on separate 128-byte lines.
constexpr int kCounterStride = 32;
// Accumulator tiles one warp may hold; the planner rejects shapes that need more.
constexpr int kMaxTilesPerWarp = 4;
// Extra elements per shared-memory row: spreads consecutive rows over the banks. Keeps the row
// stride a multiple of 16 bytes, as wmma loads and the 16-byte staging stores need.
constexpr int kSkew = 8;

__host__ __device__ inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Grid barrier on a monotonically increasing arrival counter (zeroed by the launcher).
// arrive() publishes this block's writes of the step; wait() returns once `target` arrivals
// happened. They are split so a block can prefetch the next step's inputs in between.
//
// The pattern of CUTLASS's generic barrier: __syncthreads orders every thread's writes before
// thread 0's release add (release is cumulative over what the block barrier ordered), and the
// waiter's acquire load followed by __syncthreads orders the block's later reads after every
// arrival it saw. No separate fences: a fence before the add and one after the spin would each
// cost a full memory barrier per step on the critical path.

#ifndef LSTM_FUSED_SIMT_EMULATION
__device__ inline unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ inline void add_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
#endif

__device__ inline void grid_arrive(unsigned* counter) {
  __syncthreads();  // every thread of the block has written its part of the step
  if (threadIdx.x == 0) add_release(counter, 1u);
}

__device__ inline void grid_wait(const unsigned* counter, unsigned target) {
  if (threadIdx.x == 0) {
    while (load_acquire(counter) < target) {
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Storage types <-> fp32.

template <typename Scalar>
__device__ inline float to_float(Scalar v);
template <>
__device__ inline float to_float<float>(float v) {
  return v;
}
template <>
__device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ inline float to_float<__half>(__half v) {
  return __half2float(v);
}

template <typename Scalar>
__device__ inline Scalar from_float(float v);
template <>
__device__ inline float from_float<float>(float v) {
  return v;
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ inline __half from_float<__half>(float v) {
  return __float2half(v);
}

// Accurate activations (the build must not use --use_fast_math for fp32 parity).
__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// ---------------------------------------------------------------------------------------------
// Stage columns [c0, c0 + kc) of a (B x K) row-major state into shared memory as Hs[b][ldh],
// zero-filling columns past K (W is zero there too, but uninitialised smem could hold NaNs).
// Rows b >= B of Hs are zeroed once by the kernel and never written here.

template <typename Scalar>
__device__ inline void stage_state(const Scalar* __restrict__ src, int B, int K, int c0, int kc,
                                   Scalar* __restrict__ Hs, int ldh) {
  static_assert(sizeof(Scalar) == 2 || sizeof(Scalar) == 4, "16- or 32-bit storage");
  constexpr int kVec = 16 / sizeof(Scalar);  // elements per 16-byte load
  const bool vector = (K % kVec == 0) && ((reinterpret_cast<uintptr_t>(src) & 15) == 0);
  if (vector) {
    const int per_row = kc / kVec;  // kc is a multiple of 16
    for (int idx = threadIdx.x; idx < B * per_row; idx += kThreads) {
      const int b = idx / per_row;
      const int k = c0 + (idx - b * per_row) * kVec;
      int4 v = make_int4(0, 0, 0, 0);
      if (k < K) v = __ldcg(reinterpret_cast<const int4*>(src + static_cast<int64_t>(b) * K + k));
      *reinterpret_cast<int4*>(Hs + b * ldh + (k - c0)) = v;
    }
  } else {
    using Bits = typename std::conditional<sizeof(Scalar) == 2, unsigned short, unsigned>::type;
    const Bits* s = reinterpret_cast<const Bits*>(src);
    Bits* d = reinterpret_cast<Bits*>(Hs);
    for (int idx = threadIdx.x; idx < B * kc; idx += kThreads) {
      const int b = idx / kc;
      const int kk = idx - b * kc;
      const int k = c0 + kk;
      d[b * ldh + kk] = k < K ? __ldcg(s + static_cast<int64_t>(b) * K + k) : Bits(0);
    }
  }
}

// How the warps of a block share the (rows/16) x (Bpad/16) output tiles: with at least one
// tile per warp each warp owns whole tiles; with fewer tiles than warps, the warps split the K
// loop of each tile (ksplit partial sums, added up in the pointwise pass). Small batches
// therefore still keep all eight warps' tensor cores busy.
struct TileSplit {
  int tiles, ksplit;
  __host__ __device__ TileSplit(int rows, int bpad) {
    tiles = (rows / 16) * (bpad / 16);
    ksplit = tiles >= kWarps ? 1 : kWarps / tiles;
  }
  __host__ __device__ int tiles_per_warp() const {
    return ksplit == 1 ? (tiles + kWarps - 1) / kWarps : 1;
  }
};

// The multiply engines need sm_80's wmma shapes (TF32); for older targets they are left out
// whole (the kernels' bodies are too), so the extension still builds for such GPUs.
#if defined(LSTM_FUSED_SIMT_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

// The per-warp multiply engines. Each owns up to kMaxTilesPerWarp 16x16 output tiles of
// out^T = W_slice @ state^T, accumulates kK columns at a time from shared memory, and stores its
// tiles to Acc[ks][b][row] (column-major, so the pointwise pass reads consecutive units of one
// batch row from consecutive words).
//
// TensorCoreTiles: wmma m16n16k16 on 16-bit storage; m16n16k8 TF32 on fp32 storage (operands
// rounded to TF32 after loading; used only where the user allows TF32, as nn.LSTM's cuDNN path).
template <typename Scalar>
struct TensorCoreTiles {
  static constexpr bool kTf32 = sizeof(Scalar) == 4;
  static constexpr int kK = kTf32 ? 8 : 16;
  using Operand = typename std::conditional<kTf32, nvcuda::wmma::precision::tf32, Scalar>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> acc[kMaxTilesPerWarp];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kMaxTilesPerWarp; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.0f);
  }
  // acc[i] += W[m0.., k0..k0+kK) @ Hs[n0.., kk..kk+kK)^T
  __device__ void step(int i, const Scalar* w, int ldw, const Scalar* h, int ldh) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, kK, Operand, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, kK, Operand, wmma::col_major> b;
    wmma::load_matrix_sync(a, w, ldw);
    wmma::load_matrix_sync(b, h, ldh);
    if constexpr (kTf32) {
#pragma unroll
      for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
#pragma unroll
      for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
    }
    wmma::mma_sync(acc[i], a, b, acc[i]);
  }
  __device__ void store(int i, float* dst, int ld) const {
    nvcuda::wmma::store_matrix_sync(dst, acc[i], ld, nvcuda::wmma::mem_col_major);
  }
};

// SimtTiles: exact fp32 with CUDA-core FMAs, for fp32 storage when TF32 is not allowed. Same
// tiles and split as the tensor-core engine; lane l owns rows 2*(l%8)+{0,1} and batch columns
// 4*(l/8)+{0..3} of each tile.
struct SimtTiles {
  static constexpr int kK = 8;
  float acc[kMaxTilesPerWarp][2][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kMaxTilesPerWarp; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][r][c] = 0.0f;
  }
  __device__ void step(int i, const float* w, int ldw, const float* h, int ldh) {
    const int lane = threadIdx.x % 32, r0 = 2 * (lane % 8), c0 = 4 * (lane / 8);
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      const float w0 = w[r0 * ldw + k], w1 = w[(r0 + 1) * ldw + k];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float hv = h[(c0 + c) * ldh + k];
        acc[i][0][c] = fmaf(w0, hv, acc[i][0][c]);
        acc[i][1][c] = fmaf(w1, hv, acc[i][1][c]);
      }
    }
  }
  __device__ void store(int i, float* dst, int ld) const {
    const int lane = threadIdx.x % 32, r0 = 2 * (lane % 8), c0 = 4 * (lane / 8);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) dst[(c0 + c) * ld + r0 + r] = acc[i][r][c];
  }
};

// The engine for a storage type: tensor cores, except exact fp32 (kExactFp32).
template <typename Scalar, bool kExactFp32>
using TilesFor = typename std::conditional<kExactFp32, SimtTiles, TensorCoreTiles<Scalar>>::type;

// One warp's share of out^T = W_slice @ state^T (see TileSplit): its tiles, its slice of the
// K loop, and its accumulators.
template <typename Scalar, bool kExactFp32>
struct WarpTileSet {
  using Tiles = TilesFor<Scalar, kExactFp32>;
  Tiles tiles;
  int ks, ksplit, n_mine, m_tiles, warp, tiles_total;
  bool busy;

  __device__ WarpTileSet(int rows, int Bpad) {
    const TileSplit split(rows, Bpad);
    warp = threadIdx.x / 32;
    ksplit = split.ksplit;
    tiles_total = split.tiles;
    ks = ksplit == 1 ? 0 : warp / tiles_total;
    busy = ks < ksplit;
    n_mine = ksplit == 1 ? (tiles_total - warp + kWarps - 1) / kWarps : (busy ? 1 : 0);
    m_tiles = rows / 16;
    tiles.zero();
  }
  __device__ int tile_of(int i) const {
    return ksplit == 1 ? warp + i * kWarps : warp % tiles_total;
  }

  // Accumulates state columns [c0, c0 + kc), held in Hs (row b at Hs + b * ldh, column c0 first).
  __device__ void accumulate(const Scalar* __restrict__ Wsm, int ldw, int c0, int kc,
                             const Scalar* __restrict__ Hs, int ldh) {
    if (!busy) return;
    for (int kk = ks * Tiles::kK; kk < kc; kk += Tiles::kK * ksplit) {
#pragma unroll
      for (int i = 0; i < kMaxTilesPerWarp; ++i) {
        if (i < n_mine) {
          const int m0 = (tile_of(i) % m_tiles) * 16, n0 = (tile_of(i) / m_tiles) * 16;
          tiles.step(i, Wsm + m0 * ldw + c0 + kk, ldw, Hs + n0 * ldh + kk, ldh);
        }
      }
    }
  }

  // Acc[ks][b][row] (column-major tiles), then a block barrier.
  __device__ void store(float* __restrict__ Acc, int Bpad, int rows) const {
    if (busy) {
#pragma unroll
      for (int i = 0; i < kMaxTilesPerWarp; ++i) {
        if (i < n_mine) {
          const int m0 = (tile_of(i) % m_tiles) * 16, n0 = (tile_of(i) / m_tiles) * 16;
          tiles.store(i, Acc + static_cast<int64_t>(ks) * Bpad * rows + n0 * rows + m0, rows);
        }
      }
    }
    __syncthreads();
  }
};

// out^T = W_slice @ state^T for one step, accumulated in fp32 and left in shared memory as
// Acc[ks][b][rows]. `state` is the (B x K) row-major exchange buffer in global memory, staged
// through Hs in chunks of KC columns.
template <typename Scalar, bool kExactFp32>
__device__ inline void block_matmul(const Scalar* __restrict__ Wsm, int ldw, int rows,
                                    const Scalar* __restrict__ state, int B, int K, int Kpad,
                                    int KC, int Bpad, Scalar* __restrict__ Hs,
                                    float* __restrict__ Acc) {
  static_assert(!kExactFp32 || sizeof(Scalar) == 4, "the exact engine is for fp32 storage");
  const int ldh = KC + kSkew;
  WarpTileSet<Scalar, kExactFp32> set(rows, Bpad);
  for (int c0 = 0; c0 < Kpad; c0 += KC) {
    const int kc = min(KC, Kpad - c0);
    stage_state(state, B, K, c0, kc, Hs, ldh);
    __syncthreads();
    set.accumulate(Wsm, ldw, c0, kc, Hs, ldh);
    __syncthreads();  // Hs is restaged by the next chunk
  }
  set.store(Acc, Bpad, rows);
}

// The same product with the whole state already resident in shared memory (Hs: Bpad rows of
// Kpad columns, zero past the valid rows and columns), as in the cluster kernels.
template <typename Scalar, bool kExactFp32>
__device__ inline void block_matmul_resident(const Scalar* __restrict__ Wsm, int ldw, int rows,
                                             const Scalar* __restrict__ Hs, int ldh, int Kpad,
                                             int Bpad, float* __restrict__ Acc) {
  static_assert(!kExactFp32 || sizeof(Scalar) == 4, "the exact engine is for fp32 storage");
  WarpTileSet<Scalar, kExactFp32> set(rows, Bpad);
  set.accumulate(Wsm, ldw, 0, Kpad, Hs, ldh);
  set.store(Acc, Bpad, rows);
}

#endif  // the multiply engines

// Sum of the ksplit partial products for output row r, batch b.
__device__ inline float acc_sum(const float* __restrict__ Acc, int ksplit, int Bpad, int rows,
                                int b, int r) {
  float s = 0.0f;
  for (int ks = 0; ks < ksplit; ++ks) s += Acc[(static_cast<int64_t>(ks) * Bpad + b) * rows + r];
  return s;
}

// The typed tensors and sizes of a forward call, which both forward kernels' parameters extend.
template <typename Scalar>
struct ForwardCall {
  int steps, B, H;
  bool reverse;
  const Scalar* xproj;     // (T, B, 4H)
  const Scalar* w_hh;      // (4H, H)
  const Scalar* h0;        // (B, H)
  const Scalar* c0;        // (B, H)
  const int64_t* lengths;  // (B,) or nullptr
  Scalar* y;               // (T, B, H)
  Scalar* h_n;             // (B, H)
  Scalar* c_n;             // (B, H)
  Scalar* gates;           // (T, B, 4H) or nullptr
  float* c_all;            // (T, B, H) or nullptr
};

template <typename Scalar>
__host__ void fill_forward_call(const ForwardArgs& a, ForwardCall<Scalar>* p) {
  p->steps = static_cast<int>(a.T);
  p->B = static_cast<int>(a.B);
  p->H = static_cast<int>(a.H);
  p->reverse = a.reverse;
  p->xproj = static_cast<const Scalar*>(a.xproj);
  p->w_hh = static_cast<const Scalar*>(a.w_hh);
  p->h0 = static_cast<const Scalar*>(a.h0);
  p->c0 = static_cast<const Scalar*>(a.c0);
  p->lengths = a.lengths;
  p->y = static_cast<Scalar*>(a.y);
  p->h_n = static_cast<Scalar*>(a.h_n);
  p->c_n = static_cast<Scalar*>(a.c_n);
  p->gates = static_cast<Scalar*>(a.gates);
  p->c_all = a.c_all;
}

// One (row, unit) item of a forward step's pointwise pass: the activated gates, and whether the
// step is active for that row.
struct GateItem {
  float ig, fg, gg, og;
  bool active;
};

// The pointwise pass of item (bl, u), shared by both forward kernels: z = the product's sums +
// the item's four xproj values, the gates in fp32, and where the step is active the cell update
// of *c and the new hidden value *h (left as they are where it is not).
template <typename Scalar>
__device__ inline GateItem forward_item(const float* __restrict__ Acc, int ksplit, int Bpad,
                                        int rows, int units, int bl, int u, const float x[4],
                                        bool active, float* c, Scalar* h) {
  float z[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) z[g] = acc_sum(Acc, ksplit, Bpad, rows, bl, g * units + u) + x[g];
  const GateItem it{sigmoid(z[0]), sigmoid(z[1]), tanhf(z[2]), sigmoid(z[3]), active};
  if (active) {
    *c = it.fg * *c + it.ig * it.gg;
    *h = from_float<Scalar>(it.og * tanhf(*c));
  }
  return it;
}

// y, the saved gates and c of one item (row = t * B + b, hidden unit j): outputs nothing reads
// during the launch. Inactive steps store zeros (c_all keeps the carried cell state).
template <typename Scalar>
__device__ inline void store_forward_outputs(const ForwardCall<Scalar>& p, int64_t row, int j,
                                             const GateItem& it, Scalar h, float c) {
  const Scalar zero = from_float<Scalar>(0.0f);
  const int64_t H = p.H;
  p.y[row * H + j] = it.active ? h : zero;
  if (p.gates) {
    Scalar* gt = p.gates + row * 4 * H + j;
    gt[0] = it.active ? from_float<Scalar>(it.ig) : zero;
    gt[H] = it.active ? from_float<Scalar>(it.fg) : zero;
    gt[2 * H] = it.active ? from_float<Scalar>(it.gg) : zero;
    gt[3 * H] = it.active ? from_float<Scalar>(it.og) : zero;
  }
  if (p.c_all) p.c_all[row * H + j] = c;
}

// LSTM_FUSED_CUDA_UNITS: hidden units per block forced for tuning (0: the planner chooses).
__host__ inline int forced_units() {
  const char* v = std::getenv("LSTM_FUSED_CUDA_UNITS");
  return v ? std::atoi(v) : 0;
}

// The body of a kernel compiled for an older GPU than it needs, should it ever be launched (the
// planners check the device, not the build: e.g. a TORCH_CUDA_ARCH_LIST without the device's
// architecture, running through PTX JIT): fail the launch loudly rather than return outputs
// nobody wrote.
__device__ inline void trap_unsupported_build() {
#ifndef LSTM_FUSED_SIMT_EMULATION
  __trap();
#endif
}

// The tiling a launch was planned with (the planner's choice, see persistent.cu).
struct LaunchShape {
  int groups;          // batch groups
  int rows_per_group;  // batch rows per group (the last group may have fewer)
  int k_chunk;         // state columns staged in shared memory at once
};

// Workspace bytes holding the groups' barrier counters; what follows stays 256-byte aligned.
__host__ inline size_t counter_bytes(int groups) {
  return static_cast<size_t>(
      round_up(static_cast<int64_t>(groups) * kCounterStride * sizeof(unsigned), 256));
}

// Where a block sits in the (hidden-unit slices) x (batch groups) grid.
struct BlockPlace {
  int unit_blocks;  // blocks per batch group
  int group;        // this block's batch group
  int j0;           // its first hidden unit
  int b0, nb;       // its batch rows: b0 .. b0 + nb - 1
  __device__ BlockPlace(int units, int groups, int rows_per_group, int B) {
    unit_blocks = gridDim.x / groups;
    group = blockIdx.x / unit_blocks;
    j0 = (blockIdx.x - group * unit_blocks) * units;
    b0 = group * rows_per_group;
    nb = min(rows_per_group, B - b0);
  }
};

// The forward kernels' W slice: units j0 .. j0 + units - 1 of all four gates, 4 * units rows
// (gate-major: row g * units + u is W_hh row g * H + j0 + u), zero past H (units of a ragged
// last block, and the K padding up to Kpad).
template <typename Scalar>
__device__ inline void load_forward_w_slice(const Scalar* __restrict__ w_hh, int H, int Kpad,
                                            int j0, int units, Scalar* __restrict__ Wsm, int ldw) {
  const Scalar zero = from_float<Scalar>(0.0f);
  for (int idx = threadIdx.x; idx < 4 * units * Kpad; idx += kThreads) {
    const int r = idx / Kpad, k = idx - r * Kpad;
    const int g = r / units, j = j0 + r % units;
    Wsm[r * ldw + k] = (j < H && k < H) ? w_hh[(g * static_cast<int64_t>(H) + j) * H + k] : zero;
  }
}

// Len[bl] = the length of sequence b0 + bl, clamped to [0, steps] (all steps without lengths).
__device__ inline void load_lengths(const int64_t* lengths, int steps, int b0, int nb, int* Len) {
  for (int bl = threadIdx.x; bl < nb; bl += kThreads) {
    const int64_t len = lengths ? lengths[b0 + bl] : steps;
    Len[bl] = static_cast<int>(len < 0 ? 0 : (len > steps ? steps : len));
  }
}

// Shared-memory carving with 128-byte aligned segments.
struct SmemCursor {
  size_t offset = 0;
  __host__ __device__ size_t take(size_t bytes) {
    const size_t at = offset;
    offset = static_cast<size_t>(round_up(static_cast<int64_t>(offset + bytes), 128));
    return at;
  }
};

}  // namespace persistent
}  // namespace cuda
}  // namespace lstm_fused
