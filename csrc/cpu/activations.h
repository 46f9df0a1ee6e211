// Gate nonlinearities for the CPU pointwise passes, written so GCC vectorizes the loops that
// call them: no branches, no libm calls. The float exp is a Cody-Waite range reduction plus the
// degree-6 Cephes polynomial (about 1 ulp on the reduced range); sigmoid and tanh are built on it.
// NaN propagates (every clamp keeps a NaN), +-Inf saturate to the right limits. Double precision
// (used for gradcheck) simply calls libm.
#pragma once

#include <cmath>
#include <cstdint>

namespace lstm_fused::cpu {

inline float exp_approx(float x) {
  // Clamp so 2^n stays a normal float; written so a NaN x falls through unchanged.
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365478515625f ? -87.3365478515625f : x;
  // n = round(x / ln 2) via the 1.5 * 2^23 trick, which also leaves n in the low mantissa bits.
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t n_int = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, shifter);
  // r = x - n ln2, with ln2 split in two so the subtraction is exact.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (n_int + 127) << 23);
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline float tanh_act(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_act(double x) { return std::tanh(x); }

}  // namespace lstm_fused::cpu
