// Which SIMD variant of the CPU step kernels runs: chosen once per process from CPUID, or forced
// with LSTM_FUSED_CPU_ISA=generic|avx2|avx512|avx512bf16 (tests and benchmarks run every variant
// the machine supports). The build itself targets baseline x86-64 (or the platform default
// elsewhere); only the step-kernel translation units are compiled for wider vectors, and only the
// variant this CPU supports is ever called, so one build runs on every x86-64 machine.
#pragma once

#include <optional>
#include <string>

namespace lstm_fused::cpu {

// Narrowest first. avx512bf16 is avx512 with the AVX512-BF16 dot product (vdpbf16ps) for
// one-row tiles over bfloat16 weights; everything else in it is avx512's.
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
inline constexpr Isa kAllIsas[] = {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16};
const char* isa_name(Isa isa);
// Every variant's name, comma-separated, for error messages.
std::string isa_names();
// The variant of that name; false for an unknown name.
bool isa_from_name(const char* name, Isa* isa);
// Can this CPU (and OS: the wide registers must be saved on context switches) run the variant?
bool isa_supported(Isa isa);
// The widest supported variant, or the one LSTM_FUSED_CPU_ISA names (an error if this CPU
// cannot run it, or the name is unknown). Read on every call: tests switch it per process.
Isa selected_isa();
// Whether the avx512bf16 variant uses the bf16 dot product in register tiles of several rows
// too, not only in one-row tiles (dot_rows_product, step_kernels_impl.h). On the Intel Xeon
// measured (Sapphire Rapids or later) several rows were faster widened to float32 FMAs; on a
// Zen 5 EPYC the dots were 1.4-1.7x faster there. So: on x86 CPUs not made by Intel.
// LSTM_FUSED_CPU_BF16_DOT=rows|one|auto forces it (read on every call, as LSTM_FUSED_CPU_ISA).
bool bf16_dot_all_rows();

// A two-way switch forced by the environment variable `var` (read on every call): true for
// `yes`, false for `no`; nullopt where it is unset, empty or "auto" (any other value is an error
// naming the three).
std::optional<bool> forced_switch(const char* var, const char* yes, const char* no);

// The dtypes of a layer's T*B-row products (the input projection and its input gradient).
enum class GemmDtype { kFloat32, kBFloat16, kFloat16 };

// Whether this CPU has dot-product instructions for the 16-bit type: AVX512-BF16 or AMX-BF16;
// AVX512-FP16. ATen's 16-bit GEMM (oneDNN) is fast with them; without them it is emulated, and on
// a Zen 3 EPYC (AVX2) it measured 13-20 GFLOP/s, against 100-120 for its float32 GEMM.
bool has_16bit_dot(GemmDtype dtype);

// Whether a layer's T*B-row products in this dtype run, by default, on the step kernels' tile
// product (panel_products.cpp) instead of ATen's GEMM. The Python side (lstm_fused.ops.OWN_GEMM)
// starts from this and may change it per process; the choice is made there, per call.
//   float32: on x86-64 CPUs with AVX2 or wider not made by Intel, where ATen's float32 GEMM (MKL)
//     ran at about 60% of the FMA peak on a Zen 4 EPYC; on Intel CPUs MKL is the vendor's own
//     tuned code.
//   bfloat16, float16: on x86-64 CPUs with AVX2 or wider without the type's dot-product
//     instructions (has_16bit_dot), where ATen's GEMM is emulated; ours computes in float32 from
//     16-bit panels.
// LSTM_FUSED_CPU_GEMM=own|aten|auto forces every dtype (an unknown value is an error).
bool own_gemm_by_default(GemmDtype dtype);
// The process's current choice: own_gemm_by_default until set_own_gemm changes it (as
// lstm_fused.ops.set_own_gemm does, beside its OWN_GEMM). Read where the product runs inside an
// op: the weight gradients follow the float32 choice (weight_grads.cpp).
bool own_gemm(GemmDtype dtype);
void set_own_gemm(GemmDtype dtype, bool own);

}  // namespace lstm_fused::cpu
