// Machine peaks for the benchmark's CPU roofline, measured with our own loops (no MKL/oneDNN):
//
//   cpu_fma_peak_gflops(threads, isa)            fp32 FMA throughput, GFLOP/s (2 flops per lane)
//   cpu_read_bandwidth_gbs(bytes_per_thread, threads)   streaming read bandwidth, GB/s
//
// FMA: each of `threads` OpenMP threads runs kChains independent vector FMA chains
// (acc = acc * m + c) for a fixed number of iterations: enough chains to cover the FMA latency
// times the number of FMA ports (4 cycles x 2 ports = 8 on current x86 cores), and few enough
// that the chains and the two constants stay in registers: a spilled chain waits on a store and
// a reload every iteration (16 chains of __m256 in AVX2's 16 registers: 58 GFLOP/s on one Zen 3
// core, against 102 with 12 chains). The chains converge to a fixed point near 1, so no
// inf/denormal slows them. One variant per instruction set, each compiled for its ISA inside its
// own namespace with #pragma GCC target (the build itself targets baseline x86-64; a variant is
// only called when CPUID says it can run):
//   avx512: 16 x __m512 (32 registers), avx2: 12 x __m256 (AVX2 + FMA, 16 registers), generic:
//   6 x 8-float GCC vectors (whatever the baseline makes of them: SSE mul + add on x86-64, two
//   of its 16 registers per vector).
// Read bandwidth: each thread first-touches its own buffer of `bytes_per_thread`, then sums it
// with vector loads into 8 independent accumulators, several passes per timed repetition. 256 KB
// per thread measures L2; a total larger than the last-level cache measures DRAM. The loads use
// the ISA the step kernels use (cpu_isa_selected, which honours LSTM_FUSED_CPU_ISA).
// Timing: steady_clock on thread 0 between two barriers, so the team is already running; the best
// of several repetitions is returned (a peak is the best case on a shared machine).
#include <torch/library.h>

#include "cpu/isa.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lstm_fused::cpu::peak {

constexpr int kReps = 5;

using Clock = std::chrono::steady_clock;

// Keeps results observable so the loops are not optimized away.
volatile float g_sink = 0.0f;

// ----------------------------------------------------------------------------- generic

namespace isa_generic {

typedef float vec8 __attribute__((vector_size(32)));

constexpr int kChains = 6;

// One thread's FMA loop; returns a value depending on every chain.
inline float fma_loop(int64_t iters, float m, float c) {
  vec8 acc[kChains];
  const vec8 vm = {m, m, m, m, m, m, m, m};
  const vec8 vc = {c, c, c, c, c, c, c, c};
  for (int k = 0; k < kChains; ++k) acc[k] = vc * (float)(k + 1);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int k = 0; k < kChains; ++k) acc[k] = acc[k] * vm + vc;
  }
  vec8 s = acc[0];
  for (int k = 1; k < kChains; ++k) s += acc[k];
  float r = 0.0f;
  for (int l = 0; l < 8; ++l) r += s[l];
  return r;
}

inline float read_loop(const float* p, int64_t n) {
  vec8 acc[8] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      vec8 v;
      std::memcpy(&v, p + i + 8 * k, sizeof(v));
      acc[k] += v;
    }
  }
  float r = 0.0f;
  for (; i < n; ++i) r += p[i];
  for (int k = 0; k < 8; ++k)
    for (int l = 0; l < 8; ++l) r += acc[k][l];
  return r;
}

constexpr int kLanes = 8;

}  // namespace isa_generic

}  // namespace lstm_fused::cpu::peak

#if defined(__x86_64__)

// ----------------------------------------------------------------------------- avx2

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace lstm_fused::cpu::peak::isa_avx2 {

constexpr int kLanes = 8;
constexpr int kChains = 12;

__attribute__((noinline)) float fma_loop(int64_t iters, float m, float c) {
  __m256 acc[kChains];
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 vc = _mm256_set1_ps(c);
  for (int k = 0; k < kChains; ++k) acc[k] = _mm256_set1_ps(c * (float)(k + 1));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int k = 0; k < kChains; ++k) acc[k] = _mm256_fmadd_ps(acc[k], vm, vc);
  }
  __m256 s = acc[0];
  for (int k = 1; k < kChains; ++k) s = _mm256_add_ps(s, acc[k]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  float r = 0.0f;
  for (float v : out) r += v;
  return r;
}

__attribute__((noinline)) float read_loop(const float* p, int64_t n) {
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_loadu_ps(p + i + 8 * k));
  }
  float r = 0.0f;
  for (; i < n; ++i) r += p[i];
  __m256 s = acc[0];
  for (int k = 1; k < 8; ++k) s = _mm256_add_ps(s, acc[k]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  for (float v : out) r += v;
  return r;
}

}  // namespace lstm_fused::cpu::peak::isa_avx2

#pragma GCC pop_options

// ----------------------------------------------------------------------------- avx512

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")

namespace lstm_fused::cpu::peak::isa_avx512 {

constexpr int kLanes = 16;
constexpr int kChains = 16;

__attribute__((noinline)) float fma_loop(int64_t iters, float m, float c) {
  __m512 acc[kChains];
  const __m512 vm = _mm512_set1_ps(m);
  const __m512 vc = _mm512_set1_ps(c);
  for (int k = 0; k < kChains; ++k) acc[k] = _mm512_set1_ps(c * (float)(k + 1));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int k = 0; k < kChains; ++k) acc[k] = _mm512_fmadd_ps(acc[k], vm, vc);
  }
  __m512 s = acc[0];
  for (int k = 1; k < kChains; ++k) s = _mm512_add_ps(s, acc[k]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((noinline)) float read_loop(const float* p, int64_t n) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(p + i + 16 * k));
  }
  float r = 0.0f;
  for (; i < n; ++i) r += p[i];
  __m512 s = acc[0];
  for (int k = 1; k < 8; ++k) s = _mm512_add_ps(s, acc[k]);
  return r + _mm512_reduce_add_ps(s);
}

}  // namespace lstm_fused::cpu::peak::isa_avx512

#pragma GCC pop_options

#endif  // __x86_64__

namespace lstm_fused::cpu::peak {

namespace {

using FmaLoop = float (*)(int64_t, float, float);
using ReadLoop = float (*)(const float*, int64_t);

struct Variant {
  FmaLoop fma;
  ReadLoop read;
  int lanes;
  int chains;
};

Variant variant(Isa isa) {
#if defined(__x86_64__)
  // avx512bf16's float32 FMAs are avx512's.
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16)
    return {&isa_avx512::fma_loop, &isa_avx512::read_loop, isa_avx512::kLanes, isa_avx512::kChains};
  if (isa == Isa::kAvx2)
    return {&isa_avx2::fma_loop, &isa_avx2::read_loop, isa_avx2::kLanes, isa_avx2::kChains};
#endif
  (void)isa;
  return {&isa_generic::fma_loop, &isa_generic::read_loop, isa_generic::kLanes,
          isa_generic::kChains};
}

Isa parse_isa(const std::string& name) {
  if (name.empty() || name == "auto" || name == "selected") return selected_isa();
  Isa isa;
  TORCH_CHECK(isa_from_name(name.c_str(), &isa), "lstm_fused: unknown CPU instruction set variant '",
              name, "' (expected ", isa_names(), " or auto)");
  TORCH_CHECK(isa_supported(isa), "lstm_fused: this CPU cannot run the '", name,
              "' instruction set variant");
  return isa;
}

void check_threads(int64_t threads) {
  TORCH_CHECK(threads >= 1 && threads <= 4096, "lstm_fused: threads must be in [1, 4096], got ",
              threads);
}

// Runs body(tid) on `threads` threads kReps + 1 times (the first is a warm-up); returns the
// fastest repetition's seconds, timed by thread 0 between barriers.
template <typename Body>
double best_seconds(int threads, Body body) {
  double best = std::numeric_limits<double>::infinity();
  float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    const int tid = omp_get_thread_num();
    Clock::time_point t0;
    for (int rep = 0; rep <= kReps; ++rep) {
#pragma omp barrier
      if (tid == 0) t0 = Clock::now();
      sink += body(tid);
#pragma omp barrier
      if (tid == 0 && rep > 0)
        best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    }
  }
  g_sink = g_sink + sink;
  return best;
}

double fma_peak_gflops(int64_t threads, const std::string& isa_arg) {
  check_threads(threads);
  const Isa isa = parse_isa(isa_arg);
  const Variant v = variant(isa);
  // About 2^22 iterations x 16 chains: a few ms per repetition for AVX-512 on a 3 GHz core.
  const int64_t iters = int64_t{1} << 22;
  const int nthreads = static_cast<int>(threads);
  const float m = 0.9999f + 1e-5f * static_cast<float>(std::rand() % 2);  // not a constant
  const double s = best_seconds(nthreads, [&](int) { return v.fma(iters, m, 1e-4f); });
  const double flops = 2.0 * v.lanes * v.chains * static_cast<double>(iters) * nthreads;
  return flops / s / 1e9;
}

double read_bandwidth_gbs(int64_t bytes_per_thread, int64_t threads) {
  check_threads(threads);
  TORCH_CHECK(bytes_per_thread >= 4096 && bytes_per_thread <= (int64_t{1} << 32),
              "lstm_fused: bytes_per_thread must be in [4096, 4 GiB], got ", bytes_per_thread);
  const Variant v = variant(selected_isa());
  const int nthreads = static_cast<int>(threads);
  const int64_t n = bytes_per_thread / static_cast<int64_t>(sizeof(float));
  // Each timed repetition reads at least 64 MB per thread, so it lasts long enough to time.
  const int64_t passes = std::max<int64_t>(1, (int64_t{64} << 20) / (n * 4));
  std::vector<float*> buffers(nthreads, nullptr);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    void* p = nullptr;
    if (posix_memalign(&p, 64, static_cast<size_t>(n) * sizeof(float)) == 0) {
      float* f = static_cast<float*>(p);
      for (int64_t i = 0; i < n; ++i) f[i] = 1e-6f * static_cast<float>(i & 1023);  // first touch
      buffers[tid] = f;
    }
  }
  bool ok = true;
  for (float* b : buffers) ok = ok && b != nullptr;
  double s = 0.0;
  if (ok) {
    s = best_seconds(nthreads, [&](int tid) {
      float r = 0.0f;
      for (int64_t k = 0; k < passes; ++k) r += v.read(buffers[tid], n);
      return r;
    });
  }
  for (float* b : buffers) std::free(b);
  TORCH_CHECK(ok, "lstm_fused: could not allocate ", bytes_per_thread, " bytes per thread");
  const double bytes = static_cast<double>(n) * sizeof(float) * passes * nthreads;
  return bytes / s / 1e9;
}

}  // namespace

}  // namespace lstm_fused::cpu::peak

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("cpu_fma_peak_gflops(int threads, str isa) -> float",
        &lstm_fused::cpu::peak::fma_peak_gflops);
  m.def("cpu_read_bandwidth_gbs(int bytes_per_thread, int threads) -> float",
        &lstm_fused::cpu::peak::read_bandwidth_gbs);
}
