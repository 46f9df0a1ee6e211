// Thread count and unit split of the CPU recurrence (see forward.cpp for the scheme).
#include "cpu/recurrence.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cstring>

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

at::Tensor WorkSplit::gather_gate_rows(const at::Tensor& w_hh) const {
  if (threads == 1) return w_hh.contiguous();  // one block: already in gate-major order
  const at::Tensor w = w_hh.contiguous();
  const int64_t H = w.size(0) / 4, P = w.size(1);
  const int64_t row_bytes = P * static_cast<int64_t>(w.element_size());
  at::Tensor out = at::empty_like(w);
  const char* src = static_cast<const char*>(w.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int k = 0; k < threads; ++k)
    for (int64_t g = 0; g < 4; ++g) {
      // Rows g*H + [begin, begin + size) are contiguous in W_hh: one copy per gate per block.
      const int64_t bytes = size(k) * row_bytes;
      std::memcpy(dst, src + (g * H + begin(k)) * row_bytes, bytes);
      dst += bytes;
    }
  return out;
}

}  // namespace lstm_fused::cpu
