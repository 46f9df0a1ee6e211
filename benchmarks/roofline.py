"""A simple roofline floor: the least time any implementation could need for a case.

    floor = max(flop_time, byte_time, latency_time)

flop_time = FLOPs / peak rate of the dtype. Per layer and direction an LSTM does, per token, the
    four gate GEMVs over input and recurrent state: 2 * 4H * (I_l + R) FLOPs, where I_l is the
    layer's input width (I for layer 0, dirs * out after it) and R = proj_size or H; a projection
    adds 2 * H * proj_size. For one layer without projection that is the familiar
    8 * T * B * H * (I + H) * dirs. fwdbwd counts 3x the forward (backward is two GEMMs per
    forward GEMM: one for the data gradient, one for the weight gradient).
    fp32 uses the TF32 rate when TF32 is enabled (cuDNN's default), since nn.LSTM then uses it.
byte_time = bytes / memory bandwidth, with bytes = every weight read once + the input read once +
    the output written once (summed over layers and directions); fwdbwd counts 3x that (the
    weights are read again and their gradients written; activations and their gradients go
    through memory again). Pointwise gate traffic is not counted: a fused kernel keeps it on chip.
latency_time = sequential steps * a per-step cost. Step t needs h_{t-1}, so a direction is T
    dependent steps, and stacked layers can at best run as a wavefront: T + layers - 1 steps
    (twice that for fwdbwd, whose backward is sequential too). The per-step cost is the least a
    step can take with the weights resident on chip: one cross-core exchange of h and a barrier,
    about a microsecond on a GPU; we use the same on CPU. This is the floor that matters at small
    batch, where FLOPs and bytes are tiny.

``roofline_frac`` in the results is floor / measured: 1.0 would be at the floor.

Peak rates: GPUs from a table of vendor datasheet numbers (dense, no sparsity); CPUs measured once,
lazily, with a large ``torch.mm`` (per dtype) and a large tensor copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from .shapes import Shape

T_FLOPS = 1e12
TB_S = 1e12

# Substring of torch.cuda.get_device_name -> datasheet peaks. First match wins: specific first.
GPU_PEAKS = [
    ("H200", dict(bfloat16=989, float16=989, tf32=495, float32=67, bw=4.8)),
    ("H100 PCIe", dict(bfloat16=756, float16=756, tf32=378, float32=51, bw=2.0)),
    ("H100 NVL", dict(bfloat16=835, float16=835, tf32=418, float32=60, bw=3.9)),
    ("H100", dict(bfloat16=989, float16=989, tf32=495, float32=67, bw=3.35)),  # SXM, HBM3
    ("A100", dict(bfloat16=312, float16=312, tf32=156, float32=19.5, bw=2.0)),
]
STEP_LATENCY_S = {"cuda": 1e-6, "cpu": 1e-6}


@dataclass
class Peaks:
    """Peak rates of one device: FLOP/s per dtype (tf32 as its own entry) and bytes/s."""

    name: str
    source: str                      # "datasheet" or "measured"
    flops: Dict[str, float]
    bandwidth: float
    step_s: float
    measure_flops: Optional[Callable[[str], float]] = field(default=None, repr=False)

    def rate(self, dtype: str, tf32: bool) -> float:
        key = "tf32" if dtype == "float32" and tf32 and "tf32" in self.flops else dtype
        if key not in self.flops and self.measure_flops is not None:
            self.flops[key] = self.measure_flops(key)
        return self.flops[key]

    def as_dict(self) -> dict:
        return {"name": self.name, "source": self.source,
                "tflops": {k: v / T_FLOPS for k, v in self.flops.items()},
                "bandwidth_tb_s": self.bandwidth / TB_S, "step_latency_us": self.step_s * 1e6}


# ----------------------------------------------------------------------------- the model

def _layers(shape: Shape):
    """(input width, recurrent width) of each layer."""
    out = shape.proj_size or shape.H
    for layer in range(shape.layers):
        yield (shape.I if layer == 0 else out * shape.dirs), out


def flops(shape: Shape, mode: str) -> float:
    per_token = 0.0
    for in_w, rec_w in _layers(shape):
        per_token += shape.dirs * (8 * shape.H * (in_w + rec_w) + 2 * shape.H * shape.proj_size)
    fwd = per_token * shape.T * shape.B
    return fwd if mode == "fwd" else 3 * fwd


def min_bytes(shape: Shape, mode: str, elsize: int) -> float:
    total = 0
    for in_w, rec_w in _layers(shape):
        weights = 4 * shape.H * (in_w + rec_w + 2) + shape.H * shape.proj_size
        activations = shape.T * shape.B * (in_w + shape.dirs * rec_w)  # read x, write y
        total += shape.dirs * weights + activations
    fwd = total * elsize
    return fwd if mode == "fwd" else 3 * fwd


def steps(shape: Shape, mode: str) -> int:
    fwd = shape.T + shape.layers - 1
    return fwd if mode == "fwd" else 2 * fwd


def floor_ms(shape: Shape, mode: str, dtype: str, peaks: Peaks, tf32: bool) -> Tuple[float, str]:
    """(floor in ms, which bound set it: "flops", "bytes" or "latency")."""
    elsize = torch.finfo(getattr(torch, dtype)).bits // 8
    times = {
        "flops": flops(shape, mode) / peaks.rate(dtype, tf32),
        "bytes": min_bytes(shape, mode, elsize) / peaks.bandwidth,
        "latency": steps(shape, mode) * peaks.step_s,
    }
    bound = max(times, key=times.get)
    return times[bound] * 1e3, bound


# ----------------------------------------------------------------------------- peak rates

def _best_seconds(fn: Callable[[], object], window_s: float, min_reps: int = 3) -> float:
    """Fastest call of ``fn`` over ``window_s`` seconds (after a warm-up call). A peak is the
    best case: a long window rides out a neighbour's burst or a slow thread-pool start."""
    fn()
    best, t_end, n = float("inf"), time.perf_counter() + window_s, 0
    while n < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def measure_cpu_gemm(dtype: str = "float32", n: int = 1024, window_s: float = 0.5) -> float:
    """FLOP/s of an n x n x n torch.mm on the CPU (fastest over ``window_s``)."""
    dt = getattr(torch, "float32" if dtype == "tf32" else dtype)
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), window_s)


def measure_cpu_copy(mbytes: int = 128, window_s: float = 0.3) -> float:
    """Bytes/s of copying a buffer larger than the caches (read + write counted)."""
    src = torch.randn(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), window_s)


def device_peaks(device, device_name: str) -> Optional[Peaks]:
    """Peaks for ``device``; None for a GPU not in the table (the floor columns stay null)."""
    dev = torch.device(device).type
    if dev == "cuda":
        for key, p in GPU_PEAKS:
            if key.lower() in device_name.lower():
                rates = {k: v * T_FLOPS for k, v in p.items() if k != "bw"}
                return Peaks(key, "datasheet", rates, p["bw"] * TB_S, STEP_LATENCY_S["cuda"])
        return None
    if dev == "cpu":
        # float32 is measured now; other dtypes the first time a case asks for them.
        return Peaks(device_name, "measured", {"float32": measure_cpu_gemm("float32")},
                     measure_cpu_copy(), STEP_LATENCY_S["cpu"], measure_flops=measure_cpu_gemm)
    return None
