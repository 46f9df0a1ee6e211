"""Compile FlashRNN's kernels for a suite before it is timed.

FlashRNN JIT-compiles CUDA kernels per configuration (batch, hidden size, dtype) on first use,
which takes minutes; the compiled extensions are cached on disk (torch_extensions), so doing it
here keeps that out of the benchmark run (whose untimed first call would otherwise do it) and
says up front which configurations compile at all.

    python -m benchmarks.warmup_flashrnn --suite sweep-batch --dtypes bfloat16

Exit status 0 when at least one configuration ran, 1 when none did (flashrnn unusable here).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import providers, workload
from .shapes import MODES, SUITES, normalize_dtype


def warm(suite_name: str, dtypes, device="cuda") -> int:
    suite = SUITES[suite_name]
    ok = 0
    for shape in suite.shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for mode in [m for m in MODES if shape.applies_to(m)]:
                t0 = time.perf_counter()
                try:
                    reason = providers.skip_reason(providers.FLASHRNN, device, shape)
                    if reason:
                        raise RuntimeError(reason)
                    native = providers.make_native(shape, device, dtype)
                    built = providers.build(providers.FLASHRNN, native, shape)
                    inputs = workload.make_inputs(shape, dtype, device, mode)[:1]
                    workload.make_call(built.forward, built.params, mode, inputs)(0)
                    torch.cuda.synchronize()
                    status, ok = "ok" + (f" ({'; '.join(built.notes)})" if built.notes else ""), ok + 1
                except Exception as exc:
                    status = f"FAILED {type(exc).__name__}: {str(exc).strip()[:200]}"
                print(f"flashrnn {shape.name} {dtype_name} {mode}: {status} "
                      f"[{time.perf_counter() - t0:.1f} s]", flush=True)
                torch.cuda.empty_cache()
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True, choices=sorted(SUITES))
    p.add_argument("--dtypes", default="bfloat16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to warm up")
        return 1
    dtypes = [normalize_dtype(d) for d in args.dtypes.split(",") if d.strip()]
    return 0 if warm(args.suite, dtypes) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
