// Which SIMD variant of the CPU step kernels runs: chosen once per process from CPUID, or forced
// with LSTM_FUSED_CPU_ISA=generic|avx2|avx512 (tests and benchmarks run every variant the machine
// supports). The build itself targets baseline x86-64 (or the platform default elsewhere); only
// the step-kernel translation units are compiled for wider vectors, and only the variant this CPU
// supports is ever called, so one build runs on every x86-64 machine.
#pragma once

#include <string>

namespace lstm_fused::cpu {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// Can this CPU (and OS: the wide registers must be saved on context switches) run the variant?
bool isa_supported(Isa isa);
// The widest supported variant, or the one LSTM_FUSED_CPU_ISA names (an error if this CPU
// cannot run it, or the name is unknown). Read on every call: tests switch it per process.
Isa selected_isa();
// Whether the input projection of a float32 layer and its input gradient (T*B-row products) run
// on the step kernels' tile product (panel_products.cpp) instead of ATen's GEMM.
// Default: on x86-64 CPUs with AVX2 or wider not made by Intel, where ATen's float32 GEMM (MKL)
// runs well below the FMA peak (about 60% measured on a Zen 4 EPYC, 40% reported on Zen 3); on
// Intel CPUs MKL is the vendor's own tuned code. LSTM_FUSED_CPU_GEMM=own|aten|auto sets the default (read once);
// set_own_gemm changes it for the process (the benchmark times both).
bool own_gemm();
void set_own_gemm(bool own);

}  // namespace lstm_fused::cpu
