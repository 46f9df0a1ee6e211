// The CPU ops' outputs (the input projection, y, the saved gates and cell states, dxproj, dx,
// the weight gradients) in memory that is reused across calls instead of being returned to the
// OS.
//
// A 50 MB output (the saved gates at T = 100, B = 64, H = 512) is above glibc's largest mmap
// threshold (32 MB), so at::empty maps fresh pages for it on every call and unmaps them when it
// is freed; the kernel then zeroes every page on first touch. On the 2-core Zen 3 VM this cost
// as much as 40 ms of thread time for the 65 MB a training forward saves (52 ms of a 170 ms
// forward went to saving), even with transparent huge pages. Smaller outputs fare no better in a
// training loop, whose allocations of many sizes come and go: glibc maps anything from its
// initial threshold (128 KB) afresh or trims its heap under it, depending on what else is live.
// On a Zen 5 EPYC an LSTMCell training step at B = 1 took 115-150 (H = 256, 1 MB weight
// gradients) and 580-670 (H = 512, 4 MB) page faults a step, and ran at 0.57-0.89x of
// nn.LSTMCell's speed; with its weight gradients pooled, no faults and 0.92-1.41x. Blocks freed
// by their tensors (when autograd drops the saved activations or has added a weight gradient
// into .grad, or the user drops y) wait in this pool, and the next call of that size takes one
// already backed by memory.
//
// Only outputs of at least kMinPooledBytes (glibc's initial mmap threshold) are pooled; smaller
// ones come from glibc's heap. Blocks of 2 MB or more are whole huge pages with transparent huge
// pages asked for, smaller ones 64 KB multiples. The idle blocks are capped:
// LSTM_FUSED_CPU_POOL_MB (read on every allocation; default 256, 0: no pool, every block goes
// back to the OS when freed) bounds what waits unused, the oldest freed first. Tensors from the
// pool are ordinary resizable CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lstm_fused::cpu {

constexpr int64_t kMinPooledBytes = int64_t(128) << 10;

// at::empty(sizes, dtype) on the CPU, contiguous; from the pool when large enough, and resizes
// of it go through the pool too.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

struct OutputPoolStats {
  int64_t idle_bytes, idle_blocks, reused, mapped;  // reused / mapped: blocks handed out so far
};
OutputPoolStats output_pool_stats();
void output_pool_clear();  // frees every idle block

}  // namespace lstm_fused::cpu
