"""One command for a GPU machine: Triton parity tests, then timings against cuDNN.

    python -m lstm_fused.triton.gpu_check            # tests + benchmarks
    python -m lstm_fused.triton.gpu_check --no-tests # benchmarks only
    python -m lstm_fused.triton.gpu_check --quick    # fewer/shorter benchmark shapes

Step 1 runs tests/test_triton.py (fp32/bf16/fp16, small awkward shapes and GPU-sized ones, every
work split including the grid-barrier hidden_split path, opcheck, torch.compile), with
autotuning off (LSTM_FUSED_TRITON_AUTOTUNE=0) unless the environment says otherwise.
Step 2 times one LSTM layer (input projection GEMM + recurrence) in bf16 with
``triton.testing.do_bench`` (median): torch.nn.LSTM (cuDNN) against the Triton op on the path
the heuristic picks and on each forced path, forward alone and forward + backward.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# (T, B, H, with backward)
SHAPES = [
    (1024, 16, 768, True),
    (100, 64, 512, True),
    (256, 256, 1024, True),
    (1000, 1, 256, False),
]
QUICK_SHAPES = [(128, 16, 768, True), (100, 64, 512, True), (200, 1, 256, False)]
PATHS = ("auto", "batch_tile", "hidden_split", "per_step")


def run_tests() -> int:
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(repo / "tests" / "test_triton.py")]
    print("$", " ".join(cmd), flush=True)
    # One config per kernel instead of autotuning each of the tests' many (batch, hidden) keys.
    env = dict(os.environ)
    env.setdefault("LSTM_FUSED_TRITON_AUTOTUNE", "0")
    return subprocess.run(cmd, cwd=repo, env=env).returncode


def _layer(T, B, H, dtype=torch.bfloat16):
    """An nn.LSTM (cuDNN) and the same weights as tensors for the Triton op."""
    lstm = torch.nn.LSTM(H, H, device="cuda", dtype=dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    h0 = torch.randn(1, B, H, device="cuda", dtype=dtype)
    c0 = torch.randn(1, B, H, device="cuda", dtype=dtype)
    return lstm, x, h0, c0


def _triton_layer(lstm, x, h0, c0, save):
    xproj = F.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
    y, h_n, c_n, _, _ = torch.ops.lstm_fused.triton_forward(
        xproj, lstm.weight_hh_l0, None, h0[0], c0[0], None, False, save
    )
    return y


def bench_shape(T, B, H, with_backward, do_bench):
    from lstm_fused.triton import recurrence

    lstm, x, h0, c0 = _layer(T, B, H)
    dy = torch.randn(T, B, H, device="cuda", dtype=x.dtype)
    results = {}

    def cudnn_fwd():
        with torch.no_grad():
            lstm(x, (h0, c0))

    def cudnn_fwd_bwd():
        xg = x.detach().requires_grad_()
        y, _ = lstm(xg, (h0, c0))
        y.backward(dy)

    results[("cudnn", "fwd")] = do_bench(cudnn_fwd, return_mode="median")
    if with_backward:
        results[("cudnn", "fwd+bwd")] = do_bench(cudnn_fwd_bwd, return_mode="median")

    for path in PATHS:
        if path == "auto":
            os.environ.pop(recurrence.PATH_ENV, None)
            chosen = recurrence.plan(B, H, H, x.device)
            label = f"auto={chosen.path}(b{chosen.block_b},h{chosen.block_h},g{chosen.hidden_programs})"
        else:
            os.environ[recurrence.PATH_ENV] = path
            label = path

        def fwd():
            with torch.no_grad():
                _triton_layer(lstm, x, h0, c0, save=False)

        def fwd_bwd():
            xg = x.detach().requires_grad_()
            _triton_layer(lstm, xg, h0, c0, save=True).backward(dy)

        try:
            results[(label, "fwd")] = do_bench(fwd, return_mode="median")
            if with_backward:
                results[(label, "fwd+bwd")] = do_bench(fwd_bwd, return_mode="median")
        except Exception as exc:  # keep going: one failing path should not hide the others
            print(f"  {label}: failed: {type(exc).__name__}: {exc}", flush=True)
    os.environ.pop(recurrence.PATH_ENV, None)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    status = 0
    if not args.no_tests:
        status = run_tests()
        print(f"tests: {'passed' if status == 0 else 'FAILED'}", flush=True)
    if not args.no_bench:
        import triton
        from triton.testing import do_bench

        import lstm_fused.triton  # noqa: F401  (registers the ops)

        print(f"triton {triton.__version__}; bf16, times in ms (median), speedup = cuDNN / Triton", flush=True)
        for T, B, H, with_backward in QUICK_SHAPES if args.quick else SHAPES:
            print(f"\nT={T} B={B} H={H}", flush=True)
            results = bench_shape(T, B, H, with_backward, do_bench)
            for phase in ("fwd", "fwd+bwd"):
                base = results.get(("cudnn", phase))
                if base is None:
                    continue
                for (label, ph), ms in results.items():
                    if ph == phase:
                        print(f"  {phase:8s} {label:44s} {ms:9.3f} ms   x{base / ms:5.2f}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
