// Step kernels for AVX2 + FMA CPUs (x86-64-v3: Haswell and later, AMD Zen 1-3): 8-float
// vectors, 16 registers: tiles of 3 rows (12 accumulators, 3 broadcasts, 1 weight vector).
#include "cpu/step_kernels_prelude.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace lstm_fused::cpu::isa_avx2 {

struct Vec {
  using reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr bool kBf16Dot = false;
  static constexpr bool kBf16DotRows = false;
  static constexpr bool kVectorGates = true;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  // bf16 is the high half of a float: widen each 16-bit lane and shift it up.
  static reg load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  // Paired bf16 rows (step_kernels.h): row k is the words' low halves shifted up, row k + 1
  // their high halves with the low ones cleared.
  static reg load_even(const c10::BFloat16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
  }
  static reg load_odd(const c10::BFloat16* p) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  static reg load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg broadcast(float x) { return _mm256_set1_ps(x); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }

  // The gate math on whole registers (vector_gates in step_kernels_impl.h).
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  // The ISA's parts of vector_exp, as activations.h's exp_approx does them: the same clamps (a
  // NaN x passes them, being the second operand of max and min), n rounded with the shifter,
  // 2^n built in integer lanes.
  static reg exp_clamp(reg x) {
    x = _mm256_max_ps(_mm256_set1_ps(exp_consts::kMin), x);
    return _mm256_min_ps(_mm256_set1_ps(exp_consts::kMax), x);
  }
  static reg exp_round(reg x) {  // round(x log2 e)
    const reg shifter = _mm256_set1_ps(exp_consts::kShifter);
    const reg t = _mm256_fmadd_ps(x, _mm256_set1_ps(exp_consts::kLog2e), shifter);
    return _mm256_sub_ps(t, shifter);
  }
  static reg exp_scale(reg p, reg n) {  // p 2^n, n an integer in the normal exponents' range
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  }
};
constexpr int kMaxRows = 3;

#include "cpu/step_kernels_impl.h"

}  // namespace lstm_fused::cpu::isa_avx2

#pragma GCC pop_options

namespace lstm_fused::cpu {

const StepKernels& step_kernels_avx2() {
  static const StepKernels kernels{Isa::kAvx2, isa_avx2::V, isa_avx2::kMaxRows,
                                   &isa_avx2::forward_block,
                                   &isa_avx2::backward_block,
                                   &isa_avx2::panel_product,
                                   &isa_avx2::weight_grad_rows};
  return kernels;
}

}  // namespace lstm_fused::cpu
#endif  // __x86_64__
