"""Timing: interleaved repetitions and their median.

Every provider of a case is timed in the same loop, round-robin per repetition (the start of the
round rotates too), so slow drift (thermal, a neighbour's load on a shared CPU) hits all providers
alike instead of whichever happened to run last. The median of the repetitions is reported.

GPU: each call is bracketed by CUDA events after a device synchronize, so the time is the device
time of that one call including any launch gaps it causes, and no earlier queued work leaks in.
CPU: ``time.perf_counter`` around each call.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

# A call receives an index to pick its input from a pool with. ``measure`` passes a count of all
# calls it made so far, so consecutive calls (of any provider) read different inputs: the second
# provider of a round never finds its input in cache from the first.
Call = Callable[[int], object]


@dataclass
class Timing:
    ms: float          # median
    ms_min: float
    reps: int
    samples: List[float]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def time_once(fn: Call, i: int, device) -> float:
    """Milliseconds of one call ``fn(i)`` on ``device``."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()  # the host clock is never read before the device is done
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(i)
    return (time.perf_counter() - t0) * 1e3


def warm_up(fn: Call, device, min_calls: int = 2, min_s: float = 0.0) -> float:
    """Call ``fn`` until both ``min_calls`` calls and ``min_s`` seconds are done (lazy init,
    allocator growth, cuDNN plan choice, caches); return the fastest call's ms as an estimate
    (one call slowed by a neighbour must not shrink the repetition count)."""
    best, spent, n = float("inf"), 0.0, 0
    while n < max(1, min_calls) or spent < min_s:
        ms = time_once(fn, n, device)
        best = min(best, ms)
        spent += ms / 1e3
        n += 1
    return best


def choose_reps(estimate_ms: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    """As many repetitions as fit ``budget_s`` per provider, within [min_reps, max_reps]."""
    if not estimate_ms or math.isnan(estimate_ms) or estimate_ms <= 0:
        return max_reps
    return int(min(max_reps, max(min_reps, budget_s * 1e3 // estimate_ms)))


def measure(
    fns: Dict[str, Call],
    device,
    reps: Optional[int] = None,
    *,
    budget_s: float = 1.0,
    min_reps: int = 10,
    max_reps: int = 200,
    warmup_calls: int = 2,
    warmup_s: float = 0.0,
    on_error: Optional[Callable[[str, Exception], None]] = None,
) -> Dict[str, Timing]:
    """Time every function in ``fns`` interleaved; ``reps`` fixed, or chosen from ``budget_s``
    and the slowest function's warm-up time. With ``on_error``, a function that raises is
    reported there and dropped (the others go on); without, the exception propagates."""
    names, failed = list(fns), set()
    counter = itertools.count()
    fns = {name: (lambda _i, fn=fn: fn(next(counter))) for name, fn in fns.items()}

    def timed(name: str, run: Callable[[], float]) -> Optional[float]:
        try:
            return run()
        except Exception as exc:
            if on_error is None:
                raise
            failed.add(name)
            on_error(name, exc)
            return None

    estimates = {}
    for name in names:
        est = timed(name, lambda: warm_up(fns[name], device, warmup_calls, warmup_s))
        if est is not None:
            estimates[name] = est
    if reps is None:
        reps = choose_reps(max(estimates.values(), default=0.0), budget_s, min_reps, max_reps)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name not in failed:
                ms = timed(name, lambda: time_once(fns[name], r, device))
                if ms is not None:
                    samples[name].append(ms)
    return {
        name: Timing(statistics.median(s), min(s), len(s), s)
        for name, s in samples.items() if name not in failed and s
    }
