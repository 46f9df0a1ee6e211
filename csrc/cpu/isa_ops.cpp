// Ops that report the CPU step kernels' instruction-set choice, weight cache, output pool and
// thread teams (tests and benchmarks read them).
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/output_pool.h"
#include "cpu/packed_weights.h"
#include "cpu/recurrence.h"
#include "cpu/step_kernels.h"
#include "cpu/team_outlook.h"

#include <string>
#include <tuple>

namespace {

bool cpu_isa_supported(const std::string& name) {
  lstm_fused::cpu::Isa isa;
  TORCH_CHECK(lstm_fused::cpu::isa_from_name(name.c_str(), &isa),
              "lstm_fused: unknown CPU instruction set variant '", name, "' (expected ",
              lstm_fused::cpu::isa_names(), ")");
  return lstm_fused::cpu::isa_supported(isa);
}

std::string cpu_isa_selected() { return lstm_fused::cpu::isa_name(lstm_fused::cpu::selected_isa()); }

lstm_fused::cpu::GemmDtype gemm_dtype_of(at::ScalarType dtype) {
  using lstm_fused::cpu::GemmDtype;
  switch (dtype) {
    case at::kFloat: return GemmDtype::kFloat32;
    case at::kBFloat16: return GemmDtype::kBFloat16;
    case at::kHalf: return GemmDtype::kFloat16;
    default: TORCH_CHECK(false, "lstm_fused: our own products run float32, bfloat16 and float16, not ", dtype);
  }
}

// Whether avx512bf16's tiles of several rows use the bf16 dot product (bf16_dot_all_rows, isa.h).
bool cpu_bf16_dot_all_rows() { return lstm_fused::cpu::bf16_dot_all_rows(); }

// The default of lstm_fused.ops.OWN_GEMM for a dtype (see own_gemm_by_default in isa.h).
bool cpu_own_gemm_default(at::ScalarType dtype) {
  return lstm_fused::cpu::own_gemm_by_default(gemm_dtype_of(dtype));
}

// lstm_fused.ops.set_own_gemm's choice, for the products that run inside ops (own_gemm in isa.h).
void cpu_set_own_gemm(at::ScalarType dtype, bool own) { lstm_fused::cpu::set_own_gemm(gemm_dtype_of(dtype), own); }
bool cpu_own_gemm(at::ScalarType dtype) { return lstm_fused::cpu::own_gemm(gemm_dtype_of(dtype)); }

// (batch slices, threads) the step kernels' recurrence would use for a layer of this size on
// this CPU and thread count (lstm_fused::cpu::plan_recurrence).
std::tuple<int64_t, int64_t> cpu_recurrence_plan(bool backward, int64_t T, int64_t B, int64_t H,
                                                 at::ScalarType dtype) {
  namespace cpu = lstm_fused::cpu;
  TORCH_CHECK(T >= 1 && B >= 1 && H >= 1, "lstm_fused: cpu_recurrence_plan takes sizes of at least 1");
  const int V = cpu::step_kernels(cpu::selected_isa()).vector_width;
  const auto plan = cpu::plan_recurrence(backward, T, B, H, V, dtype);
  return {plan.batch_slices, plan.threads};
}

// Batch slices per direction of a bidirectional layer of this size run side by side, or 0: one
// direction after the other (lstm_fused::cpu::paired_direction_slices).
int64_t cpu_paired_direction_slices(int64_t T, int64_t B, int64_t H, at::ScalarType dtype) {
  TORCH_CHECK(T >= 1 && B >= 1 && H >= 1,
              "lstm_fused: cpu_paired_direction_slices takes sizes of at least 1");
  return lstm_fused::cpu::paired_direction_slices(T, B, H, dtype);
}

// The L2 bytes per core that plan uses (sysconf, or 512 KB where it does not say).
int64_t cpu_core_l2_bytes() { return lstm_fused::cpu::core_l2_bytes(); }

int64_t cpu_packed_cache_size() { return lstm_fused::cpu::packed_cache_size(); }

void cpu_packed_cache_clear() { lstm_fused::cpu::packed_cache_clear(); }

// (idle bytes, idle blocks, blocks reused, blocks newly allocated) of the output pool.
std::tuple<int64_t, int64_t, int64_t, int64_t> cpu_output_pool_stats() {
  const auto s = lstm_fused::cpu::output_pool_stats();
  return {s.idle_bytes, s.idle_blocks, s.reused, s.mapped};
}

void cpu_output_pool_clear() { lstm_fused::cpu::output_pool_clear(); }

// (teams opened, teams whose helpers arrived in time, calls that ran alone instead of a team).
std::tuple<int64_t, int64_t, int64_t> cpu_team_counts() {
  const auto c = lstm_fused::cpu::team_counts();
  return {c.teams, c.teams_joined, c.calls_alone};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("cpu_isa_supported(str name) -> bool", &cpu_isa_supported);
  m.def("cpu_isa_selected() -> str", &cpu_isa_selected);
  m.def("cpu_bf16_dot_all_rows() -> bool", &cpu_bf16_dot_all_rows);
  m.def("cpu_own_gemm_default(ScalarType dtype) -> bool", &cpu_own_gemm_default);
  m.def("cpu_own_gemm(ScalarType dtype) -> bool", &cpu_own_gemm);
  m.def("cpu_set_own_gemm(ScalarType dtype, bool own) -> ()", &cpu_set_own_gemm);
  m.def("cpu_packed_cache_size() -> int", &cpu_packed_cache_size);
  m.def("cpu_packed_cache_clear() -> ()", &cpu_packed_cache_clear);
  m.def("cpu_recurrence_plan(bool backward, int T, int B, int H, ScalarType dtype) -> (int, int)",
        &cpu_recurrence_plan);
  m.def("cpu_paired_direction_slices(int T, int B, int H, ScalarType dtype) -> int",
        &cpu_paired_direction_slices);
  m.def("cpu_core_l2_bytes() -> int", &cpu_core_l2_bytes);
  m.def("cpu_output_pool_stats() -> (int, int, int, int)", &cpu_output_pool_stats);
  m.def("cpu_output_pool_clear() -> ()", &cpu_output_pool_clear);
  m.def("cpu_team_counts() -> (int, int, int)", &cpu_team_counts);
}
