// CPU feature detection for the step kernels (see isa.h).
#include "cpu/isa.h"
#include "cpu/step_kernels.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace lstm_fused::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

bool isa_supported(Isa isa) {
  if (isa == Isa::kGeneric) return true;
#if defined(__x86_64__) && defined(__GNUC__)
  // libgcc's checks include the OS's XSAVE support for the ymm/zmm state, not only CPUID bits.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == Isa::kAvx2) return avx2;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == Isa::kAvx512) return avx512;
  return avx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

namespace {

Isa widest_supported() {
  static const Isa widest = [] {
    Isa widest = Isa::kGeneric;
    for (Isa isa : kAllIsas)
      if (isa_supported(isa)) widest = isa;
    return widest;
  }();
  return widest;
}

}  // namespace

std::string isa_names() {
  std::string names;
  for (Isa isa : kAllIsas) names += (names.empty() ? "" : ", ") + std::string(isa_name(isa));
  return names;
}

bool isa_from_name(const char* name, Isa* isa) {
  for (Isa candidate : kAllIsas) {
    if (std::strcmp(name, isa_name(candidate)) != 0) continue;
    *isa = candidate;
    return true;
  }
  return false;
}

Isa selected_isa() {
  const char* forced = std::getenv("LSTM_FUSED_CPU_ISA");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0) return widest_supported();
  Isa isa;
  TORCH_CHECK(isa_from_name(forced, &isa), "lstm_fused: LSTM_FUSED_CPU_ISA=", forced,
              " is not one of auto, ", isa_names());
  TORCH_CHECK(isa_supported(isa), "lstm_fused: LSTM_FUSED_CPU_ISA=", forced,
              " but this CPU cannot run that variant (widest here: ", isa_name(widest_supported()), ")");
  return isa;
}

bool has_16bit_dot(GemmDtype dtype) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (dtype == GemmDtype::kBFloat16)
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  if (dtype == GemmDtype::kFloat16) return __builtin_cpu_supports("avx512fp16");
#endif
  (void)dtype;
  return false;
}

std::optional<bool> forced_switch(const char* var, const char* yes, const char* no) {
  const char* forced = std::getenv(var);
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0) return std::nullopt;
  TORCH_CHECK(std::strcmp(forced, yes) == 0 || std::strcmp(forced, no) == 0, "lstm_fused: ", var, "=",
              forced, " is not one of auto, ", yes, ", ", no);
  return std::strcmp(forced, yes) == 0;
}

namespace {

// An x86 CPU not made by Intel (CPUID's vendor).
bool x86_not_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return !__builtin_cpu_is("intel");
#else
  return false;
#endif
}

}  // namespace

bool own_gemm_by_default(GemmDtype dtype) {
  if (const auto forced = forced_switch("LSTM_FUSED_CPU_GEMM", "own", "aten")) return *forced;
  // The machine's capability, not selected_isa(): a bad LSTM_FUSED_CPU_ISA must fail the call
  // that uses it, not the import that reads this default.
  if (!isa_supported(Isa::kAvx2)) return false;
  return dtype == GemmDtype::kFloat32 ? x86_not_intel() : !has_16bit_dot(dtype);
}

namespace {
// Per GemmDtype: -1 until set_own_gemm, then 0 or 1.
std::atomic<int> own_gemm_choice[3] = {-1, -1, -1};
}  // namespace

bool own_gemm(GemmDtype dtype) {
  const int choice = own_gemm_choice[static_cast<int>(dtype)].load(std::memory_order_relaxed);
  return choice < 0 ? own_gemm_by_default(dtype) : choice == 1;
}

void set_own_gemm(GemmDtype dtype, bool own) {
  own_gemm_choice[static_cast<int>(dtype)].store(own ? 1 : 0, std::memory_order_relaxed);
}

}  // namespace lstm_fused::cpu

namespace lstm_fused::cpu {

bool bf16_dot_all_rows() {
  if (const auto forced = forced_switch("LSTM_FUSED_CPU_BF16_DOT", "rows", "one")) return *forced;
  return x86_not_intel();
}

const StepKernels& step_kernels(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512Bf16) return bf16_dot_all_rows() ? step_kernels_avx512bf16_rows() : step_kernels_avx512bf16();
  if (isa == Isa::kAvx512) return step_kernels_avx512();
  if (isa == Isa::kAvx2) return step_kernels_avx2();
#endif
  (void)isa;
  return step_kernels_generic();
}

}  // namespace lstm_fused::cpu
