// Sequence-sized CPU outputs (the input projection, y, the saved gates and cell states, dxproj,
// dx) in memory that is reused across calls instead of being returned to the OS.
//
// A 50 MB output (the saved gates at T = 100, B = 64, H = 512) is above glibc's largest mmap
// threshold (32 MB), so at::empty maps fresh pages for it on every call and unmaps them when it
// is freed; the kernel then zeroes every page on first touch. On the 2-core Zen 3 VM this cost
// as much as 40 ms of thread time for the 65 MB a training forward saves (52 ms of a 170 ms
// forward went to saving), even with transparent huge pages. Blocks freed by their tensors
// (when autograd drops the saved activations, or the user drops y) wait in this pool, and the
// next call of that size takes one already backed by memory.
//
// Only outputs of at least kMinPooledBytes are pooled (smaller ones come from glibc's heap,
// which keeps them itself). Blocks are 2 MB-aligned with transparent huge pages asked for, and
// the idle blocks are capped: LSTM_FUSED_CPU_POOL_MB (read on every allocation; default 256, 0:
// no pool, every block goes back to the OS when freed) bounds what waits unused, the oldest
// freed first. Tensors from the pool are ordinary resizable CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lstm_fused::cpu {

constexpr int64_t kMinPooledBytes = int64_t(4) << 20;

// at::empty(sizes, dtype) on the CPU, contiguous; from the pool when large enough, and resizes
// of it go through the pool too.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

struct OutputPoolStats {
  int64_t idle_bytes, idle_blocks, reused, mapped;  // reused / mapped: blocks handed out so far
};
OutputPoolStats output_pool_stats();
void output_pool_clear();  // frees every idle block

}  // namespace lstm_fused::cpu
