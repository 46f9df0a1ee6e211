// Transparent huge pages for the large fresh outputs of the CPU recurrence and products.
//
// A 50 MB output (the saved gates at T=100, B=64, H=512) is fresh memory from the allocator:
// touching it costs one page fault per 4 KB, about 13k faults, which measured as much as the
// writes themselves. Where the kernel runs THP in "madvise" mode, asking for huge pages before
// the first touch turns that into a few dozen faults. It changes nothing but the page size of
// memory we just allocated (and are about to fill); elsewhere it is a no-op. The first few
// calls of a process can be slower while the kernel compacts memory to find huge pages
// (measured: a B=64, H=512 backward took ~120 ms for 7 calls, then ~57 ms; 70 ms without).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lstm_fused::cpu {

inline void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(fresh.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);  // whole huge pages only
  const uintptr_t last = end & ~(kHuge - 1);
  if (last >= first + 2 * kHuge) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: ignore errors
  }
#else
  (void)fresh;
#endif
}

}  // namespace lstm_fused::cpu
