// The backoff of team_outlook.h: process-wide, since what it tracks (a core taken by another
// process, sleeping helpers) belongs to the machine, not to a layer.
#include "cpu/team_outlook.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string_view>

namespace lstm_fused::cpu {
namespace {

std::atomic<int64_t> calls_alone_left{0};
std::atomic<int64_t> backoff{0};  // length of the current run of calls alone; 0: teams work
std::atomic<int64_t> teams{0}, teams_joined{0}, calls_alone{0};

// LSTM_FUSED_CPU_TEAM_BACKOFF=0 opens a team for every call however the last ones went (tests
// use it to exercise stealing in every call of a run where helpers never come).
bool backoff_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("LSTM_FUSED_CPU_TEAM_BACKOFF");
    return v == nullptr || std::string_view(v) != "0";
  }();
  return enabled;
}

}  // namespace

bool team_worth_trying() {
  // Several callers (threads of the application) may race here; an extra or a missing call alone
  // is harmless, so plain atomic steps suffice.
  int64_t left = calls_alone_left.load(std::memory_order_relaxed);
  while (left > 0) {
    if (calls_alone_left.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
      calls_alone.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
  }
  return true;
}

void record_team(bool helpers_arrived_in_time) {
  teams.fetch_add(1, std::memory_order_relaxed);
  if (helpers_arrived_in_time) {
    teams_joined.fetch_add(1, std::memory_order_relaxed);
    backoff.store(0, std::memory_order_relaxed);
    return;
  }
  if (!backoff_enabled()) return;
  const int64_t doubled = 2 * backoff.load(std::memory_order_relaxed);
  const int64_t next = std::min(kMaxCallsAlone, std::max<int64_t>(1, doubled));
  backoff.store(next, std::memory_order_relaxed);
  calls_alone_left.store(next, std::memory_order_relaxed);
}

TeamCounts team_counts() {
  TeamCounts c;
  c.teams = teams.load(std::memory_order_relaxed);
  c.teams_joined = teams_joined.load(std::memory_order_relaxed);
  c.calls_alone = calls_alone.load(std::memory_order_relaxed);
  return c;
}

}  // namespace lstm_fused::cpu
