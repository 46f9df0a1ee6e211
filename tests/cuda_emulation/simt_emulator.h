// A tiny SIMT emulator: runs the persistent CUDA kernels (csrc/cuda/persistent_*.cuh) unchanged
// on CPU threads, so CI (no GPU) exercises their real index math, tiling, shared-memory layout,
// double buffering and grid barrier. One std::thread per CUDA thread, a std::barrier per block
// for __syncthreads, std::atomic for the grid counter.
//
// wmma is emulated per thread: every lane of a warp holds the whole tile and does the whole
// product (the lanes agree, since they see the same shared memory); lane 0 alone stores.
// 16-bit and TF32 products are exact in fp32 and accumulation is fp32, as on the tensor cores,
// though the order of additions differs. What this cannot show: timing, memory-model subtleties of
// the real hardware beyond what the C++ model enforces, and register/shared-memory limits; those
// need a GPU.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)

// ---- storage types ---------------------------------------------------------------------------

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  _Float16 value;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half v) { return static_cast<float>(v.value); }
inline __half __float2half(float f) { return {static_cast<_Float16>(f)}; }

struct int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
using std::min;

template <typename V>
inline V __ldcg(const V* p) {
  return *p;
}

// ---- thread and block state --------------------------------------------------------------------

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx;
inline thread_local EmuDim3 blockIdx;
inline EmuDim3 gridDim;

namespace emu {
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local unsigned char* block_smem = nullptr;
// Thread-block clusters (launch_clusters): this block's rank, its cluster's blocks' shared
// memory, the cluster-wide barrier and this thread's pending arrival on it.
inline thread_local int cluster_rank = 0;
inline thread_local unsigned char* const* cluster_smem = nullptr;
inline thread_local std::barrier<>* cluster_barrier = nullptr;
inline thread_local std::optional<std::barrier<>::arrival_token> cluster_token;
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

#define LSTM_FUSED_DYNAMIC_SMEM(name) unsigned char* name = emu::block_smem

namespace lstm_fused {
namespace cuda {
namespace persistent {
// The spin of the grid barrier; yields, since the emulated grid far outnumbers the cores.
inline unsigned load_acquire(const unsigned* p) {
  std::this_thread::yield();
  return std::atomic_ref<unsigned>(*const_cast<unsigned*>(p)).load(std::memory_order_acquire);
}
inline void add_release(unsigned* p, unsigned v) {
  std::atomic_ref<unsigned>(*p).fetch_add(v, std::memory_order_release);
}
// The cluster primitives of cluster_forward.cuh: barrier.cluster.arrive.release / wait.acquire
// map onto a std::barrier of every thread in the cluster (arrive happens-before the matching
// wait's return), map_shared_rank onto the same offset in the peer block's shared memory.
inline int cluster_rank() { return emu::cluster_rank; }
template <typename T>
inline T* peer_shared(T* p, int rank) {
  const auto offset = reinterpret_cast<unsigned char*>(p) - emu::block_smem;
  return reinterpret_cast<T*>(emu::cluster_smem[rank] + offset);
}
inline void cluster_arrive() { emu::cluster_token.emplace(emu::cluster_barrier->arrive()); }
inline void cluster_wait() {
  emu::cluster_barrier->wait(std::move(*emu::cluster_token));
  emu::cluster_token.reset();
}
}  // namespace persistent
}  // namespace cuda
}  // namespace lstm_fused

// ---- wmma
// ----------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};  // operands stored as float, rounded by __float_to_tf32
}  // namespace precision

// m16n16k16 (16-bit operands) and m16n16k8 (TF32). A is M x K, B is K x N, C is M x N; each is
// kept row-major in x[] with a row stride of 16.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "m16n16k16 and m16n16k8 only");
  static constexpr int num_elements = 16 * 16;
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : 16;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : 16;
  float x[16 * 16] = {};
};

template <typename Use, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, K, T, L>& f, float v) {
  std::fill(f.x, f.x + 256, v);
}

inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(float v) { return v; }

// Round to nearest, ties away from zero, keeping 10 mantissa bits (cvt.rna.tf32.f32).
inline float __float_to_tf32(float f) {
  if (!std::isfinite(f)) return f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename Use, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, 16, 16, K, T, L>& f, const P* p, unsigned ld) {
  using F = fragment<Use, 16, 16, K, T, L>;
  const bool row = std::is_same<L, row_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * 16 + c] = to_f(row ? p[r * ld + c] : p[c * ld + r]);
}

template <int K, typename TA, typename TB>
inline void mma_sync(fragment<accumulator, 16, 16, K, float>& d,
                     const fragment<matrix_a, 16, 16, K, TA, row_major>& a,
                     const fragment<matrix_b, 16, 16, K, TB, col_major>& b,
                     const fragment<accumulator, 16, 16, K, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < K; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f,
                              unsigned ld, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r * 16 + c];
}
}  // namespace wmma
}  // namespace nvcuda

// ---- launch
// --------------------------------------------------------------------------------------

namespace emu {
// Runs kernel() on blocks x threads CPU threads grouped into clusters of `cluster` consecutive
// blocks (blocks must be a multiple of it), all co-resident.
inline void launch_clusters(int blocks, int cluster, int threads, size_t smem_bytes,
                            const std::function<void()>& kernel) {
  gridDim.x = blocks;
  const int clusters = blocks / cluster;
  std::vector<std::unique_ptr<std::barrier<>>> barriers, cluster_barriers;
  std::vector<std::vector<unsigned char>> smem(blocks);
  std::vector<unsigned char*> bases(blocks);
  for (int b = 0; b < blocks; ++b) {
    barriers.emplace_back(std::make_unique<std::barrier<>>(threads));
    // Garbage, not zeros: the kernels must not rely on fresh shared memory.
    smem[b].assign(smem_bytes + 128, 0xff);
    auto base = reinterpret_cast<uintptr_t>(smem[b].data());
    bases[b] = reinterpret_cast<unsigned char*>((base + 127) & ~uintptr_t(127));
  }
  for (int c = 0; c < clusters; ++c)
    cluster_barriers.emplace_back(std::make_unique<std::barrier<>>(cluster * threads));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(blocks) * threads);
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        block_barrier = barriers[b].get();
        block_smem = bases[b];
        cluster_rank = b % cluster;
        cluster_smem = bases.data() + (b / cluster) * cluster;
        cluster_barrier = cluster_barriers[b / cluster].get();
        kernel();
      });
    }
  }
  for (auto& th : pool) th.join();
}

// Runs kernel() on blocks x threads CPU threads, all co-resident (like a cooperative launch).
inline void launch(int blocks, int threads, size_t smem_bytes,
                   const std::function<void()>& kernel) {
  launch_clusters(blocks, 1, threads, smem_bytes, kernel);
}
}  // namespace emu
