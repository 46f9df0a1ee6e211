// Thread count and unit split of the CPU recurrence (see forward.cpp for the scheme).
#include "cpu/recurrence.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace lstm_fused::cpu {

// Below this many multiply-adds per step a barrier (~0.3 us) costs more than sharing saves.
constexpr int64_t kMinStepMacsPerThread = 16384;
// Fewer units than this per thread would leave the pointwise loop without whole vectors.
constexpr int64_t kMinUnitsPerThread = 16;

int recurrence_threads(int64_t B, int64_t H, int64_t P) {
  int64_t threads = at::get_num_threads();
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, H / kMinUnitsPerThread));
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, B * 4 * H * P / kMinStepMacsPerThread));
  return static_cast<int>(std::max<int64_t>(1, threads));
}

at::Tensor WorkSplit::gate_row_order(int64_t H) const {
  at::Tensor order = at::empty({4 * H}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = order.data_ptr<int64_t>();
  for (int k = 0; k < threads; ++k)
    for (int64_t g = 0; g < 4; ++g)
      for (int64_t j = begin(k); j < begin(k) + size(k); ++j) *out++ = g * H + j;
  return order;
}

}  // namespace lstm_fused::cpu
