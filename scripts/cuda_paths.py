"""Print which CUDA path (persistent or general) each shape of a benchmark suite takes, and why.

    python scripts/cuda_paths.py [suite]      (GPU machine; default suite: headline)

Runs a 4-step forward and backward per shape and dtype with LSTM_FUSED_CUDA_PATH=persistent:
the persistent planner either accepts the shape or refuses with its reason (the plan does not
depend on T); then the forward with LSTM_FUSED_CUDA_PATH=cluster (sm_90), likewise. The fp32
rows follow torch.backends.cudnn.allow_tf32, as the kernels do.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/
import lstm_fused  # noqa: E402,F401  (registers the ops)
from benchmarks.shapes import SUITES  # noqa: E402

FWD = torch.ops.lstm_fused.recurrence_forward
BWD = torch.ops.lstm_fused.recurrence_backward


def verdict(fn, accepted="persistent", refused="general"):
    """(what ran, fn's result): `accepted` when the forced planner took the call, else `refused`
    with the planner's reason (and no result)."""
    try:
        return accepted, fn()
    except RuntimeError as exc:
        return refused + " (" + str(exc).split("cannot run this call: ")[-1].splitlines()[0] + ")", None


def main(suite: str) -> None:
    os.environ["LSTM_FUSED_CUDA_PATH"] = "persistent"
    print(f"# {suite} on {torch.cuda.get_device_name()}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    for shape in SUITES[suite].shapes:
        B, H = shape.B, shape.H
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            opts = dict(device="cuda", dtype=dtype)
            x = torch.randn(4, B, 4 * H, **opts)
            w = torch.randn(4 * H, H, **opts) / H**0.5
            h, c = torch.randn(B, H, **opts), torch.randn(B, H, **opts)
            fwd, out = verdict(lambda: FWD(x, w, None, h, c, None, False, True))
            if out is None:
                os.environ["LSTM_FUSED_CUDA_PATH"] = "general"
                out = FWD(x, w, None, h, c, None, False, True)
                os.environ["LSTM_FUSED_CUDA_PATH"] = "persistent"
            y, h_n, c_n, gates, c_all = out
            bwd, _ = verdict(lambda: BWD(torch.randn_like(y), h_n, c_n, w, None, h, c, None, False,
                                         y, gates, c_all, True))
            os.environ["LSTM_FUSED_CUDA_PATH"] = "cluster"
            cluster, _ = verdict(lambda: FWD(x, w, None, h, c, None, False, True), "accepted", "refused")
            os.environ["LSTM_FUSED_CUDA_PATH"] = "persistent"
            print(f"{shape.name:24s} {str(dtype)[6:]:9s} fwd: {fwd:40s} bwd: {bwd:40s} cluster fwd: {cluster}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "headline")
