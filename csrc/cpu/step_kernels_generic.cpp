// Step kernels for any CPU: 8-float vectors in GCC's vector extension, which the compiler
// lowers to whatever the baseline target has (two SSE2 registers on x86-64, NEON on aarch64).
#include "cpu/step_kernels_prelude.h"

#include <cstring>

namespace lstm_fused::cpu::isa_generic {

struct Vec {
  typedef float reg __attribute__((vector_size(32)));
  static constexpr int kWidth = 8;
  static constexpr bool kBf16Dot = false;
  static constexpr bool kBf16DotRows = false;
  static constexpr bool kVectorGates = false;  // the gate math in plain loops (forward_gates)
  static reg zero() { return reg{}; }
  static reg load(const float* p) {
    reg v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static reg load(const c10::BFloat16* p) {
    reg v;
    for (int i = 0; i < kWidth; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
  // Paired bf16 rows (step_kernels.h): element 2i is row k's lane i, 2i + 1 row k + 1's.
  static reg load_even(const c10::BFloat16* p) {
    reg v;
    for (int i = 0; i < kWidth; ++i) v[i] = static_cast<float>(p[2 * i]);
    return v;
  }
  static reg load_odd(const c10::BFloat16* p) {
    reg v;
    for (int i = 0; i < kWidth; ++i) v[i] = static_cast<float>(p[2 * i + 1]);
    return v;
  }
  static reg load(const c10::Half* p) {
    reg v;
    for (int i = 0; i < kWidth; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
  static void store(float* p, reg v) { std::memcpy(p, &v, sizeof v); }
  static reg broadcast(float x) { return reg{} + x; }
  static reg add(reg a, reg b) { return a + b; }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
};
constexpr int kMaxRows = 2;

#include "cpu/step_kernels_impl.h"

}  // namespace lstm_fused::cpu::isa_generic

namespace lstm_fused::cpu {

const StepKernels& step_kernels_generic() {
  static const StepKernels kernels{Isa::kGeneric, isa_generic::V, isa_generic::kMaxRows,
                                   &isa_generic::forward_block,
                                   &isa_generic::backward_block,
                                   &isa_generic::panel_product,
                                   &isa_generic::weight_grad_rows};
  return kernels;
}

}  // namespace lstm_fused::cpu
