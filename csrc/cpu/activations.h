// Gate nonlinearities for the CPU pointwise passes, written so GCC vectorizes the loops that
// call them: no branches, no libm calls. The float exp is a Cody-Waite range reduction plus the
// degree-6 Cephes polynomial (about 1 ulp on the reduced range); sigmoid and tanh are built on it.
// NaN propagates (every clamp keeps a NaN), +-Inf saturate to the right limits. Double precision
// (used for gradcheck) simply calls libm.
#pragma once

#include <cmath>
#include <cstdint>

namespace lstm_fused::cpu {

// The constants of exp_approx, shared with the step kernels' vector exp (vector_exp in
// step_kernels_impl.h).
namespace exp_consts {
constexpr float kMax = 88.3762626647949f;   // the largest x whose e^x is a float
constexpr float kMin = -87.3365478515625f;  // the least x whose e^x is a normal float
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: x + kShifter rounds x to an integer
// ln 2 = kLn2Hi - kLn2Lo, kLn2Hi with few enough bits that n * kLn2Hi is exact.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = 2.12194440e-4f;
// e^r ~ 1 + r + r^2 (kPoly[5] + r (kPoly[4] + ... + r kPoly[0])) on |r| <= ln 2 / 2 (Cephes).
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_consts

inline float exp_approx(float x) {
  using namespace exp_consts;
  // Clamp so 2^n stays a normal float; written so a NaN x falls through unchanged.
  x = x > kMax ? kMax : x;
  x = x < kMin ? kMin : x;
  // n = round(x / ln 2) via the shifter, which also leaves n in the low mantissa bits.
  const float t = x * kLog2e + kShifter;
  const float n = t - kShifter;
  const int32_t n_int = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, kShifter);
  // r = x - n ln2, with ln2 split in two so the subtraction is exact.
  float r = x - n * kLn2Hi;
  r = r + n * kLn2Lo;
  const float r2 = r * r;
  float p = kPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kPoly[i];
  p = p * r2 + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (n_int + 127) << 23);
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline float tanh_act(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_act(double x) { return std::tanh(x); }

}  // namespace lstm_fused::cpu
