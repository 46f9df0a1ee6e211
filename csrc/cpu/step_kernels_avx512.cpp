// Step kernels for AVX-512 CPUs (x86-64-v4: Skylake-SP and later, AMD Zen 4+): 16-float
// vectors, 32 registers: tiles of 6 rows (24 accumulators, 6 broadcasts, 1 weight vector).
#include "cpu/step_kernels_prelude.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace lstm_fused::cpu::isa_avx512 {

struct Vec {
  using reg = __m512;
  static constexpr int kWidth = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg broadcast(float x) { return _mm512_set1_ps(x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
};
constexpr int kMaxRows = 6;

#include "cpu/step_kernels_impl.h"

}  // namespace lstm_fused::cpu::isa_avx512

#pragma GCC pop_options

namespace lstm_fused::cpu {

const StepKernels& step_kernels_avx512() {
  static const StepKernels kernels{Isa::kAvx512, isa_avx512::V, &isa_avx512::forward_block,
                                   &isa_avx512::backward_block};
  return kernels;
}

}  // namespace lstm_fused::cpu
#endif  // __x86_64__
