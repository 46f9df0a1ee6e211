// Persistent worker threads for the recurrence's thread team, joined without waiting for
// latecomers.
//
// An OpenMP parallel region ends only when every thread of its team has arrived. Beside another
// busy process a worker can arrive a scheduler time slice (milliseconds) late, even when the
// others already did its share (step_team.h steals it): every call then costs a time slice. Here
// the caller opens a job, runs its own part (which, with stealing, can be all of it), closes the
// job and waits only for the workers that checked in while it was open; a worker that wakes
// after the close does nothing. A worker checks in by counting itself active and then re-reading
// the job's generation; the caller closes by bumping the generation and then reading the active
// count. With sequentially consistent order on both, either the worker sees the close and leaves,
// or the caller sees the worker and waits for it.
//
// Also safe after fork() (a DataLoader worker): the child has no worker threads, so nobody checks
// in and the caller runs every block itself. Calls from several threads at once: one job at a
// time; a caller that finds the pool busy runs alone.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>

namespace lstm_fused::cpu {

class WorkerPool {
 public:
  // Runs body(k) for k in [0, threads) with the caller as k = 0 and pool workers for the rest as
  // they come; body(k) must be correct for any subset of k having run (the step team is).
  // Returns when body(0) has returned and no worker is inside body.
  static void run(int threads, const std::function<void(int)>& body);

 private:
  explicit WorkerPool(int workers);
  void worker_loop();
  void run_job(int threads, const std::function<void(int)>& body);

  std::mutex job_mutex_;                    // one job at a time
  std::atomic<uint32_t> generation_{0};     // odd: a job is open
  std::atomic<int32_t> sleepers_{0};
  std::atomic<int32_t> active_{0};          // workers inside a job
  std::atomic<int32_t> next_slot_{1};       // thread index handed to the next worker
  int threads_ = 1;
  const std::function<void(int)>* body_ = nullptr;
  int workers_;
};

}  // namespace lstm_fused::cpu
