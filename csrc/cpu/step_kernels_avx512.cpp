// Step kernels for AVX-512 CPUs (x86-64-v4: Skylake-SP and later, AMD Zen 4+): 16-float
// vectors, 32 registers: tiles of 6 rows (24 accumulators, 6 broadcasts, 1 weight vector).
#include "cpu/step_kernels_prelude.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace lstm_fused::cpu::isa_avx512 {

#include "cpu/step_kernels_avx512_vec.h"
using Vec = Avx512Vec;

#include "cpu/step_kernels_impl.h"

}  // namespace lstm_fused::cpu::isa_avx512

#pragma GCC pop_options

namespace lstm_fused::cpu {

const StepKernels& step_kernels_avx512() {
  static const StepKernels kernels{Isa::kAvx512, isa_avx512::V, isa_avx512::kMaxRows,
                                   &isa_avx512::forward_block,
                                   &isa_avx512::backward_block,
                                   &isa_avx512::panel_product,
                                   &isa_avx512::weight_grad_rows};
  return kernels;
}

}  // namespace lstm_fused::cpu
#endif  // __x86_64__
