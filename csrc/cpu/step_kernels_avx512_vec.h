// The AVX-512 vector of the step kernels (16 floats) and its tile height, shared by
// step_kernels_avx512.cpp and step_kernels_avx512bf16.cpp. Included inside each file's own
// namespace, after its target pragma (see step_kernels_impl.h), so each copy is compiled for its
// file's target only.
struct Avx512Vec {
  using reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr bool kBf16Dot = false;
  static constexpr bool kBf16DotRows = false;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  // bf16 is the high half of a float: widen each 16-bit lane and shift it up.
  static reg load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  // Paired bf16 rows (step_kernels.h): row k is the words' low halves shifted up, row k + 1
  // their high halves with the low ones cleared.
  static reg load_even(const c10::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
  }
  static reg load_odd(const c10::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  static reg load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg broadcast(float x) { return _mm512_set1_ps(x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }

  // The gate math on whole registers (vector_gates in step_kernels_impl.h).
  static constexpr bool kVectorGates = true;
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  // The ISA's parts of vector_exp. 2^n is applied by vscalefps, which overflows to +Inf and
  // underflows through the denormals by itself, so x is clamped only far outside the finite range,
  // to keep +-Inf out of the reduction (Inf - Inf is NaN); activations.h clamps to that range
  // and builds 2^n in integer lanes. A NaN x passes: max and min return their second operand
  // when either is NaN.
  static reg exp_clamp(reg x) {
    return _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  }
  static reg exp_round(reg x) {  // round(x log2 e)
    return _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(exp_consts::kLog2e)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static reg exp_scale(reg p, reg n) { return _mm512_scalef_ps(p, n); }  // p 2^n
};
// 32 registers: tiles of 6 rows (24 accumulators, 6 broadcasts, 1 weight vector).
constexpr int kMaxRows = 6;
