// Step kernels for AVX-512 CPUs with AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and later;
// AMD Zen 4+): avx512's kernels, except that one-row tiles over bfloat16 panels use the pair dot
// product vdpbf16ps (each float32 lane adds the products of one pair of bf16 values) instead of
// widening the panel to float32 first: half the vector instructions per weight, and no port
// spent on widening. Compiled twice: tiles of several rows widen (isa_avx512bf16: faster on the
// Intel Xeon measured) or use the dots too (isa_avx512bf16_rows: faster on Zen 5); see
// dot_row_product in step_kernels_impl.h and bf16_dot_all_rows in isa.h. The float32 and
// float16 paths compile to the same code as avx512's.
#include "cpu/step_kernels_prelude.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")

namespace lstm_fused::cpu::isa_avx512bf16 {

#include "cpu/step_kernels_avx512_vec.h"

struct Vec : Avx512Vec {
  static constexpr bool kBf16Dot = true;
  static constexpr bool kBf16DotRows = false;  // tiles of several rows widen (Intel: faster)
  // 16 lanes of 32 bits, each a pair of bf16: (k, k + 1) of one column in the panel's pairing
  // (step_kernels.h), or of one row of A.
  using pairs = __m512i;
  static pairs load_pairs(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }
  // The pair at p (two consecutive bf16 of a row of A) in every lane.
  static pairs broadcast_pair(const c10::BFloat16* p) {
    int32_t word;
    __builtin_memcpy(&word, p, sizeof word);
    return _mm512_set1_epi32(word);
  }
  // acc[e] += a.lo[e] * w.lo[e] + a.hi[e] * w.hi[e] (float32 sums; bf16 denormals count as zero).
  static reg dot_pairs(pairs a, pairs w, reg acc) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(w));
  }
  // dst[0, n) = src[0, n) rounded to bf16 (to nearest even), n a multiple of 2. Consecutive
  // elements land in one 32-bit word, low half first: the pairs broadcast_pair reads.
  static void round_to_bf16(const float* src, int64_t n, c10::BFloat16* dst) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16), _mm512_loadu_ps(src + j));
      _mm512_storeu_si512(dst + j, reinterpret_cast<const __m512i&>(v));
    }
    if (j == n) return;
    const int64_t left = n - j;
    const __mmask16 lo = _cvtu32_mask16(left >= 16 ? 0xFFFFu : (1u << left) - 1);
    const __mmask16 hi = _cvtu32_mask16(left > 16 ? (1u << (left - 16)) - 1 : 0u);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + j + 16),
                                           _mm512_maskz_loadu_ps(lo, src + j));
    _mm512_mask_storeu_epi16(dst + j, _cvtu32_mask32((1u << left) - 1),
                             reinterpret_cast<const __m512i&>(v));
  }
};

#include "cpu/step_kernels_impl.h"

}  // namespace lstm_fused::cpu::isa_avx512bf16

// The same kernels with the dot product in tiles of every height (AMD: faster; see
// bf16_dot_all_rows in isa.h).
namespace lstm_fused::cpu::isa_avx512bf16_rows {

#include "cpu/step_kernels_avx512_vec.h"

struct Vec : isa_avx512bf16::Vec {
  static constexpr bool kBf16DotRows = true;
};

#include "cpu/step_kernels_impl.h"

}  // namespace lstm_fused::cpu::isa_avx512bf16_rows

#pragma GCC pop_options

namespace lstm_fused::cpu {

const StepKernels& step_kernels_avx512bf16() {
  static const StepKernels kernels{Isa::kAvx512Bf16, isa_avx512bf16::V, isa_avx512bf16::kMaxRows,
                                   &isa_avx512bf16::forward_block,
                                   &isa_avx512bf16::backward_block,
                                   &isa_avx512bf16::panel_product,
                                   &isa_avx512bf16::weight_grad_rows};
  return kernels;
}

const StepKernels& step_kernels_avx512bf16_rows() {
  static const StepKernels kernels{Isa::kAvx512Bf16, isa_avx512bf16_rows::V, isa_avx512bf16_rows::kMaxRows,
                                   &isa_avx512bf16_rows::forward_block,
                                   &isa_avx512bf16_rows::backward_block,
                                   &isa_avx512bf16_rows::panel_product,
                                   &isa_avx512bf16_rows::weight_grad_rows};
  return kernels;
}

}  // namespace lstm_fused::cpu
#endif  // __x86_64__
