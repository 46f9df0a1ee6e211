"""A small forward + backward through every CUDA kernel of both paths, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/cuda_sanitize_case.py

General path: fp32 with lengths and reverse, bf16 with a projection and lengths, fp16.
Persistent path: bf16/fp16 with lengths, reverse and several batch groups, fp32 both exact (TF32
off) and TF32. With torch's caching allocator off, out-of-bounds accesses hit real allocation
boundaries. Exits non-zero if any output or gradient is non-finite. `--device cpu` runs the same
calls on the CPU kernels (the path variable is then ignored): a check of the script itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
import lstm_fused  # noqa: E402,F401  (loads the extension: registers the ops)

FWD = torch.ops.lstm_fused.recurrence_forward
BWD = torch.ops.lstm_fused.recurrence_backward


def run(device, path, dtype, T, B, H, P=None, lengths=None, reverse=False) -> bool:
    os.environ["LSTM_FUSED_CUDA_PATH"] = path
    width = P or H
    xproj = torch.randn(T, B, 4 * H, device=device, dtype=dtype)
    w_hh = (torch.randn(4 * H, width, device=device) / width**0.5).to(dtype)
    w_hr = (torch.randn(width, H, device=device) / H**0.5).to(dtype) if P else None
    h0 = torch.randn(B, width, device=device, dtype=dtype)
    c0 = torch.randn(B, H, device=device, dtype=dtype)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    y, h_n, c_n, gates, c_all = FWD(xproj, w_hh, w_hr, h0, c0, lens, reverse, True)
    grads = BWD(torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), w_hh, w_hr,
                h0, c0, lens, reverse, y, gates, c_all, True)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(t).all()) for t in (y, h_n, c_n, *grads) if t.numel())
    print(f"{path:10s} {str(dtype):15s} T={T} B={B} H={H} P={P} lengths={lengths} reverse={reverse}:",
          "ok" if finite else "NON-FINITE", flush=True)
    return finite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    torch.manual_seed(0)
    ok = [
        run(device, "general", torch.float32, 5, 3, 33, lengths=[5, 0, 2], reverse=True),
        run(device, "general", torch.bfloat16, 4, 5, 24, P=9, lengths=[4, 1, 3, 0, 2]),
        run(device, "general", torch.float16, 3, 2, 16),
        run(device, "persistent", torch.bfloat16, 5, 3, 33, lengths=[5, 0, 2], reverse=True),
        run(device, "persistent", torch.float16, 4, 20, 64),
        run(device, "persistent", torch.bfloat16, 3, 17, 40, lengths=[3] * 10 + [1] * 7),
    ]
    torch.backends.cudnn.allow_tf32 = False  # fp32 persistent: exact FMAs
    ok.append(run(device, "persistent", torch.float32, 4, 5, 48, lengths=[4, 2, 0, 1, 3], reverse=True))
    torch.backends.cudnn.allow_tf32 = True  # fp32 persistent: TF32 tensor cores
    ok.append(run(device, "persistent", torch.float32, 4, 5, 48, lengths=[4, 2, 0, 1, 3], reverse=True))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
