// A thread team that runs a sequence of steps, each split into independent blocks, with one
// synchronization between consecutive steps.
//
// Thread k owns a contiguous slice of the blocks (its weight panels stay in its own caches) and
// claims them one by one from its slice's counter. A thread done with its slice waits for the
// step to finish; if the step is still not done after about as long as its own slice took, it
// claims the rest of the other slices too. So a thread the OS has descheduled (another process
// on its core) costs the step only what it was in the middle of, not a scheduler time slice per
// step. The waiting spins briefly, then sleeps on a futex so a core we share goes to whoever
// holds the work.
//
// Counters only grow: slice k's counter runs over [s * size_k, (s + 1) * size_k) during step s
// and step s + 1 cannot begin before every block of step s is claimed and finished.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#include "cpu/spin_wait.h"

namespace lstm_fused::cpu {

class StepTeam {
 public:
  // Before a waiting thread sleeps: it has spun at least this long and at least twice as long
  // as its own share of the step took.
  static constexpr std::chrono::nanoseconds kMinSpin{50000};
  // Before it takes another thread's blocks: at least this long and as long as its own share.
  static constexpr std::chrono::nanoseconds kMinStealDelay{2000};

  StepTeam(int threads, int64_t blocks) : threads_(threads), blocks_(blocks), slices_(new Slice[threads]) {
    const int64_t even = blocks / threads, extra = blocks % threads;
    int64_t begin = 0;
    for (int k = 0; k < threads; ++k) {
      slices_[k].begin = begin;
      slices_[k].size = even + (k < extra ? 1 : 0);
      begin += slices_[k].size;
    }
  }

  // Thread k's part of step s: fn(block) for the blocks it claims; returns when every block of
  // step s is finished (by whoever claimed it). Every thread calls it for s = 0, 1, ... in order.
  template <typename Fn>
  void run_step(int k, int64_t s, Fn&& fn) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    finish(run_slice(k, s, fn), s);
    const auto own = clock::now() - start;
    const auto steal_after = std::max<clock::duration>(own, kMinStealDelay);
    const auto sleep_after = std::max<clock::duration>(2 * own, kMinSpin);
    bool stolen = false;
    for (uint32_t spins = 0; !step_done(s); ++spins) {
      cpu_relax();
      if (spins % 64 != 0) continue;
      const auto waited = clock::now() - start - own;
      if (!stolen && waited >= steal_after) {
        stolen = true;
        for (int other = 1; other < threads_; ++other) finish(run_slice((k + other) % threads_, s, fn), s);
      } else if (stolen && waited >= sleep_after) {
        sleep_until_done(s);
      }
    }
  }

 private:
  struct alignas(64) Slice {
    std::atomic<int64_t> next{0};
    int64_t begin = 0, size = 0;
  };

  // Claims and runs blocks of slice k at step s until none is left; returns how many it ran.
  template <typename Fn>
  int64_t run_slice(int k, int64_t s, Fn& fn) {
    Slice& slice = slices_[k];
    const int64_t end = (s + 1) * slice.size;
    int64_t ran = 0;
    int64_t ticket = slice.next.load(std::memory_order_relaxed);
    while (ticket < end) {
      if (!slice.next.compare_exchange_weak(ticket, ticket + 1, std::memory_order_relaxed)) continue;
      // Odd steps run the slice backwards: the blocks a step ran last, whose panels are the
      // likeliest still in this core's L2 when the slice's panels fill it, come first in the
      // next. Intel Xeon, float32, H = 512 (2 MB of panels a thread, its whole L2): B = 1
      // 21-22.5 against 30-33 us a step, B = 64 416-434 against 437-446 us.
      const int64_t i = ticket - s * slice.size;
      fn(slice.begin + (s % 2 == 0 ? i : slice.size - 1 - i));
      ++ran;
      ticket = slice.next.load(std::memory_order_relaxed);
    }
    return ran;
  }

  // Counts finished blocks; whoever finishes the step's last one publishes the step.
  void finish(int64_t ran, int64_t s) {
    if (ran == 0) return;
    if (done_.fetch_add(ran, std::memory_order_acq_rel) + ran != (s + 1) * blocks_) return;
    epoch_.store(static_cast<uint32_t>(s + 1), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&epoch_);
  }

  // epoch_ holds the low 32 bits of the number of steps published. A thread can be any number
  // of steps behind (the others ran its blocks for it), so compare by the signed distance.
  bool step_done(int64_t s) const { return published_since(epoch_.load(std::memory_order_acquire), s); }
  static bool published_since(uint32_t epoch, int64_t s) {
    return static_cast<int32_t>(epoch - static_cast<uint32_t>(s + 1)) >= 0;
  }

  void sleep_until_done(int64_t s) {
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    for (uint32_t epoch = epoch_.load(std::memory_order_seq_cst); !published_since(epoch, s);
         epoch = epoch_.load(std::memory_order_seq_cst)) {
      futex_wait(&epoch_, epoch);  // only while epoch_ still holds the value just read
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }

  const int threads_;
  const int64_t blocks_;
  std::unique_ptr<Slice[]> slices_;
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint32_t> epoch_{0};
  std::atomic<int32_t> sleepers_{0};
};

}  // namespace lstm_fused::cpu
