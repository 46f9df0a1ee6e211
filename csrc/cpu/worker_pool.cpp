// The recurrence's worker threads (see worker_pool.h).
#include "cpu/worker_pool.h"

#include "cpu/spin_wait.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>

namespace lstm_fused::cpu {
namespace {

// How long an idle worker spins for the next job before it sleeps: calls that follow each other
// closely (the layers of a model, streaming steps) find it awake.
constexpr std::chrono::microseconds kIdleSpin{200};

int workers_from_env(int fallback) {
  const char* v = std::getenv("LSTM_FUSED_CPU_WORKERS");
  if (v == nullptr || *v == '\0') return std::max(1, fallback);
  return std::max(0, std::atoi(v));
}

}  // namespace

WorkerPool::WorkerPool(int workers) : workers_(workers) {
  for (int i = 0; i < workers; ++i) std::thread([this] { worker_loop(); }).detach();
}

void WorkerPool::run(int threads, const std::function<void(int)>& body) {
  // Created once, never destroyed: its threads sleep through process exit. Sized for the thread
  // count of the first call that wants more than one (later calls use up to that many), or by
  // LSTM_FUSED_CPU_WORKERS (0: the caller runs every block; tests use it to exercise stealing).
  static WorkerPool* pool = new WorkerPool(workers_from_env(threads - 1));
  if (threads <= 1 || !pool->job_mutex_.try_lock()) {
    body(0);  // alone (the steps do not need the others; see step_team.h)
    return;
  }
  std::lock_guard<std::mutex> lock(pool->job_mutex_, std::adopt_lock);
  pool->run_job(std::min(threads, pool->workers_ + 1), body);
}

void WorkerPool::run_job(int threads, const std::function<void(int)>& body) {
  threads_ = threads;
  body_ = &body;
  next_slot_.store(1, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_seq_cst);  // open (odd)
  if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&generation_);
  body(0);
  generation_.fetch_add(1, std::memory_order_seq_cst);  // closed (even)
  while (active_.load(std::memory_order_seq_cst) != 0) cpu_relax();
}

void WorkerPool::worker_loop() {
  uint32_t seen = generation_.load(std::memory_order_seq_cst);
  for (;;) {
    // Wait for a generation other than the one last seen.
    const auto idle_since = std::chrono::steady_clock::now();
    uint32_t g = generation_.load(std::memory_order_seq_cst);
    for (uint32_t spins = 0; g == seen; g = generation_.load(std::memory_order_seq_cst)) {
      cpu_relax();
      if (++spins % 256 != 0 || std::chrono::steady_clock::now() - idle_since < kIdleSpin) continue;
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      if (generation_.load(std::memory_order_seq_cst) == seen) futex_wait(&generation_, seen);
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    }
    seen = g;
    if (g % 2 == 0) continue;  // a job that closed before this worker got to it
    active_.fetch_add(1, std::memory_order_seq_cst);
    if (generation_.load(std::memory_order_seq_cst) == g) {  // still open: checked in
      const int k = next_slot_.fetch_add(1, std::memory_order_relaxed);
      if (k < threads_) (*body_)(k);
    }
    active_.fetch_sub(1, std::memory_order_seq_cst);
  }
}

}  // namespace lstm_fused::cpu
