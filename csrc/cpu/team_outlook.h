// Whether the next call should open a thread team, learned from how the last ones went.
//
// A team is an OpenMP region: its threads are the ones ATen's own ops use (libgomp keeps them
// spinning a while after each op), so on a quiet machine they join within a microsecond, and no
// second set of threads competes with them for the cores. But a region ends only when every
// thread has arrived: with another process busy on a helper's core, or with the helper asleep
// (a gap between calls longer than libgomp's spin), the helper arrives a wake-up or a scheduler
// time slice late, after the caller has stolen and finished all the work (step_team.h), and the
// call then waits for it. So a call whose helpers did not arrive before the caller finished makes
// the next calls run on the caller alone, a run of calls that doubles with each such team (up to
// kMaxCallsAlone) and resets when a team is joined in time.
#pragma once

#include <cstdint>

namespace lstm_fused::cpu {

// Most calls run alone between two tries of a team while teams keep failing.
constexpr int64_t kMaxCallsAlone = 1024;

// True: open a team for this call. False: run on the caller alone (a backoff is in progress).
bool team_worth_trying();

// What the team of a call showed: whether every helper arrived before the caller was done.
void record_team(bool helpers_arrived_in_time);

struct TeamCounts {
  int64_t teams = 0;         // calls that opened a team
  int64_t teams_joined = 0;  // ... whose helpers arrived in time
  int64_t calls_alone = 0;   // calls that wanted a team and ran alone instead
};
TeamCounts team_counts();

}  // namespace lstm_fused::cpu
