"""Per-step time of the recurrence on a GPU: lstm_fused (cuda backend, each path) vs nn.LSTM.

    python scripts/cuda_step_times.py [--dtype bfloat16] [--t1 128] [--t2 512]

For each headline shape (B, H) this times whole-sequence calls at two lengths, T1 and T2, and
reports the slope (time(T2) - time(T1)) / (T2 - T1): the cost of one more time step, with the
fixed per-call costs (launches, allocation, planning) cancelled out. Both sides run the full
module (input projection included, which also grows with T), forward under no_grad and forward
+ backward. Times are medians of CUDA-event measurements after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
import lstm_fused  # noqa: E402
from benchmarks.shapes import SUITES  # noqa: E402


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def call(module, x, mode):
    if mode == "fwd":
        with torch.no_grad():
            module(x)
    else:
        y, _ = module(x)
        y.float().sum().backward()


def step_us(module, B, I, T1, T2, dtype, mode) -> float:
    xs = {T: torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
          for T in (T1, T2)}
    t1 = median_ms(lambda: call(module, xs[T1], mode))
    t2 = median_ms(lambda: call(module, xs[T2], mode))
    return (t2 - t1) / (T2 - T1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--t1", type=int, default=128)
    parser.add_argument("--t2", type=int, default=512)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# per-step time (us), {torch.cuda.get_device_name()}, {args.dtype}, "
          f"slope between T={args.t1} and T={args.t2}")
    print("| B | I | H | mode | nn.LSTM (cuDNN) | lstm_fused persistent | lstm_fused general "
          "| lstm_fused cluster (forward; backward as auto) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SUITES["headline"].shapes:
        for mode in shape.modes or ("fwd", "fwdbwd"):
            native = nn.LSTM(shape.I, shape.H).to("cuda", dtype)
            fused = lstm_fused.LSTM(shape.I, shape.H, backend="cuda").to("cuda", dtype)
            fused.load_state_dict(native.state_dict())
            row = [f"{step_us(native, shape.B, shape.I, args.t1, args.t2, dtype, mode):.2f}"]
            for path in ("persistent", "general", "cluster"):
                os.environ["LSTM_FUSED_CUDA_PATH"] = path
                try:
                    row.append(f"{step_us(fused, shape.B, shape.I, args.t1, args.t2, dtype, mode):.2f}")
                except RuntimeError as exc:  # the persistent or cluster planner declined this shape
                    row.append("n/a: " + str(exc).split("cannot run this call: ")[-1].splitlines()[0])
            os.environ.pop("LSTM_FUSED_CUDA_PATH", None)
            print(f"| {shape.B} | {shape.I} | {shape.H} | {mode} | " + " | ".join(row) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
