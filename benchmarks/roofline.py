"""A simple roofline floor: the least time any implementation could need for a case.

    floor = max(flop_time, byte_time, latency_time)

flop_time = FLOPs / peak rate of the dtype. Per layer and direction an LSTM does, per token, the
    four gate GEMVs over input and recurrent state: 2 * 4H * (I_l + R) FLOPs, where I_l is the
    layer's input width (I for layer 0, dirs * out after it) and R = proj_size or H; a projection
    adds 2 * H * proj_size. For one layer without projection that is the familiar
    8 * T * B * H * (I + H) * dirs. fwdbwd counts 3x the forward (backward is two GEMMs per
    forward GEMM: one for the data gradient, one for the weight gradient); so does train, whose
    every term here is fwdbwd's (its input gradient is not asked for, a sliver of the work).
    fp32 uses the TF32 rate when TF32 is enabled (cuDNN's default), since nn.LSTM then uses it.
byte_time = every weight read once + the input read once + the output written once (summed over
    layers and directions), the activations at memory bandwidth and the weights at the rate of
    the nearest level that holds them all: memory on a GPU; on a CPU the cache they fit, split
    over the threads as for stream_time (a benchmark calls the same weights over and over, and a
    cell step of H = 256 reads its 2 MB from the L2s and L3, several times faster than from DRAM:
    priced at DRAM, such rows measured above 100% of their floor). fwdbwd counts 3x that (the
    weights are read again and their gradients written; activations and their gradients go
    through memory again). Pointwise gate traffic is not counted: a fused kernel keeps it on chip.
stream_time (CPUs) = what re-reading the recurrent weights at every step costs: each step of a
    layer and direction needs all of W_hh (and W_hr), and a CPU core cannot hold them in
    registers or L1 (a GPU's persistent kernel keeps them on chip, so GPUs have no such term).
    They are read from the nearest cache that holds them, split over the run's threads: L2 when
    each thread's share fits one core's L2, else L3 when the whole fits the L3, else DRAM, at
    that level's measured read bandwidth. T steps per layer and direction; fwdbwd reads them
    again in the backward. This is the floor that matters at small batch on a CPU.
latency_time = sequential steps * a per-step cost. Step t needs h_{t-1}, so a direction is T
    dependent steps, and stacked layers can at best run as a wavefront: T + layers - 1 steps
    (twice that for fwdbwd, whose backward is sequential too). The per-step cost is the least a
    step can take with the weights resident on chip: one cross-core exchange of h and a barrier,
    about a microsecond on a GPU; we use the same on CPU. This is the floor that matters at small
    batch, where FLOPs and bytes are tiny.

``roofline_frac`` in the results is floor / measured: 1.0 would be at the floor.

Peak rates: GPUs from a table of vendor datasheet numbers (dense, no sparsity). CPUs measured at
start-up with lstm_fused's own loops (csrc/cpu/machine_peak.cpp), independent of MKL/oneDNN (whose
GEMM is far below the hardware on AMD CPUs):
  * FLOP/s: ``torch.ops.lstm_fused.cpu_fma_peak_gflops(threads, isa)``, fp32 FMA throughput of the
    instruction set the step kernels use (``cpu_isa_selected``: avx512bf16, avx512, avx2 or
    generic) on the run's thread count. The same rate is used for bfloat16/float16: the kernels
    compute in fp32 (half precision halves the bytes, not the FLOP time), except avx512bf16's bf16
    dot product (two multiply-adds a lane per instruction), whose own rate is not measured: there
    a bf16 row's floor% may read up to 2x too high.
  * bytes/s: ``cpu_read_bandwidth_gbs`` over 64 MB in all (beyond most last-level caches: DRAM or
    a large L3) for byte_time and for weights beyond the L3; 256 KB per thread (L2) and a buffer
    of about a quarter of the L3 in all (L3, when the L3 is known and larger than the L2s) for
    stream_time.
  The older figures, a 1024^3 ``torch.mm`` (MKL) and a 128 MB ``copy_``, are kept in the results for
comparison (``mkl_gemm_gflops``, ``copy_gb_s``), and are the fallback when the ops are missing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

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
    cpu: Optional[dict] = None       # CPU only: what was measured, for the machine block
    # CPU only: the caches the recurrent weights may be read from each step, nearest first, as
    # (bytes one thread's share may have to fit, read bytes/s of all threads); past the last one
    # they come from memory at ``bandwidth``. Empty: no stream_time term (GPUs).
    weight_caches: List[Tuple[float, float]] = field(default_factory=list)
    threads: int = 1

    def rate(self, dtype: str, tf32: bool) -> float:
        key = "tf32" if dtype == "float32" and tf32 and "tf32" in self.flops else dtype
        if key not in self.flops and self.measure_flops is not None:
            self.flops[key] = self.measure_flops(key)
        return self.flops[key]

    def as_dict(self) -> dict:
        d = {"name": self.name, "source": self.source,
             "tflops": {k: v / T_FLOPS for k, v in self.flops.items()},
             "bandwidth_tb_s": self.bandwidth / TB_S, "step_latency_us": self.step_s * 1e6}
        if self.cpu is not None:
            d["cpu"] = dict(self.cpu)
        if self.weight_caches:
            d["weight_caches"] = [{"bytes_per_thread": c, "gb_s": bw / 1e9} for c, bw in self.weight_caches]
        return d

    def weight_read_rate(self, nbytes: float) -> float:
        """Bytes/s at which ``nbytes`` of weights, split over the threads, can be re-read."""
        for capacity, rate in self.weight_caches:
            if nbytes / self.threads <= capacity:
                return rate
        return self.bandwidth


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


def weight_bytes(shape: Shape, elsize: int) -> float:
    """Every layer's and direction's weights and biases, once."""
    total = 0
    for in_w, rec_w in _layers(shape):
        total += shape.dirs * (4 * shape.H * (in_w + rec_w + 2) + shape.H * shape.proj_size)
    return total * elsize


def activation_bytes(shape: Shape, elsize: int) -> float:
    """Every layer's input read once and output written once."""
    total = 0
    for in_w, rec_w in _layers(shape):
        total += shape.T * shape.B * (in_w + shape.dirs * rec_w)
    return total * elsize


def byte_seconds(shape: Shape, mode: str, elsize: int, peaks: Peaks) -> float:
    """byte_time: the weights from the nearest level that holds them, the activations from memory."""
    weights = weight_bytes(shape, elsize)
    fwd = weights / peaks.weight_read_rate(weights) + activation_bytes(shape, elsize) / peaks.bandwidth
    return fwd if mode == "fwd" else 3 * fwd


def stream_seconds(shape: Shape, mode: str, elsize: int, peaks: Peaks) -> float:
    """stream_time: every layer's and direction's recurrent weights read once per step."""
    if not peaks.weight_caches:
        return 0.0
    out = shape.proj_size or shape.H
    per_step = (4 * shape.H * out + shape.H * shape.proj_size) * elsize  # W_hh, W_hr
    one_pass = shape.layers * shape.dirs * shape.T * per_step / peaks.weight_read_rate(per_step)
    return one_pass if mode == "fwd" else 2 * one_pass


def steps(shape: Shape, mode: str) -> int:
    fwd = shape.T + shape.layers - 1
    return fwd if mode == "fwd" else 2 * fwd


def floor_ms(shape: Shape, mode: str, dtype: str, peaks: Peaks, tf32: bool) -> Tuple[float, str]:
    """(floor in ms, which bound set it: "flops", "bytes", "stream" or "latency")."""
    elsize = torch.finfo(getattr(torch, dtype)).bits // 8
    times = {
        "flops": flops(shape, mode) / peaks.rate(dtype, tf32),
        "bytes": byte_seconds(shape, mode, elsize, peaks),
        "stream": stream_seconds(shape, mode, elsize, peaks),
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


L2_BYTES_PER_THREAD = 256 * 2**10
BIG_READ_BYTES = 64 * 2**20


def cache_bytes(level: int) -> int:
    """Size of one cache of ``level`` (2: a core's L2, 3: the L3 this core shares), 0 if unknown."""
    try:
        size = os.sysconf(f"SC_LEVEL{level}_CACHE_SIZE")
        if size > 0:
            return int(size)
    except (ValueError, OSError):
        pass
    # sysfs: index<n> of cpu0 whose level is `level` (data or unified), size like "1024K".
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(root)):
            base = os.path.join(root, entry)
            with open(os.path.join(base, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(base, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(base, "size")) as f:
                text = f.read().strip()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return 0


def l3_read_bytes_per_thread(threads: int, l2: int, l3: int) -> int:
    """A buffer per thread that misses every L2 but stays well inside the L3 (a quarter of it
    in all, at least twice a thread's L2 share); 0 when the L3 is unknown or not that large."""
    per_thread = l3 // (4 * threads)
    return per_thread if l3 > 0 and per_thread >= 2 * max(l2, L2_BYTES_PER_THREAD) else 0


def peak_ops_available() -> bool:
    try:
        import lstm_fused  # noqa: F401  (loads the extension, which registers the ops)

        return hasattr(torch.ops.lstm_fused, "cpu_fma_peak_gflops") and \
            hasattr(torch.ops.lstm_fused, "cpu_read_bandwidth_gbs")
    except Exception:
        return False


def selected_isa() -> Optional[str]:
    """The instruction set lstm_fused's CPU step kernels use here (None: extension missing)."""
    try:
        import lstm_fused  # noqa: F401

        return str(torch.ops.lstm_fused.cpu_isa_selected())
    except Exception:
        return None


def measure_cpu_fma(threads: int, isa: str = "auto") -> float:
    """FLOP/s of fp32 FMAs of ``isa`` on ``threads`` threads (our loop, not MKL)."""
    return torch.ops.lstm_fused.cpu_fma_peak_gflops(int(threads), isa) * 1e9


def measure_cpu_read(bytes_per_thread: int, threads: int) -> float:
    """Bytes/s of reading a buffer of ``bytes_per_thread`` on each of ``threads`` threads."""
    return torch.ops.lstm_fused.cpu_read_bandwidth_gbs(int(bytes_per_thread), int(threads)) * 1e9


def cpu_peaks(device_name: str, threads: Optional[int] = None) -> Peaks:
    """The CPU's peaks for the roofline: our FMA loop of the selected ISA on ``threads`` (default:
    torch's thread count) and our read loop; MKL GEMM and copy kept beside them."""
    threads = threads or torch.get_num_threads()
    gemm, copy = measure_cpu_gemm("float32"), measure_cpu_copy()
    info = {"mkl_gemm_gflops": gemm / 1e9, "copy_gb_s": copy / 1e9, "peak_threads": threads}
    isa = selected_isa()
    if isa is None or not peak_ops_available():
        info["peak_source"] = "torch.mm (MKL) and copy_: lstm_fused's peak ops are unavailable"
        return Peaks(device_name, "measured (MKL GEMM)", {"float32": gemm}, copy,
                     STEP_LATENCY_S["cpu"], measure_flops=measure_cpu_gemm, cpu=info)
    fma = measure_cpu_fma(threads, isa)
    l2 = measure_cpu_read(L2_BYTES_PER_THREAD, threads)
    big = measure_cpu_read(max(4096, BIG_READ_BYTES // threads), threads)
    info.update(peak_source="lstm_fused FMA and read loops (csrc/cpu/machine_peak.cpp)",
                fma_isa=isa, fma_peak_gflops=fma / 1e9, l2_read_gb_s=l2 / 1e9,
                l2_bytes_per_thread=L2_BYTES_PER_THREAD, big_read_gb_s=big / 1e9,
                big_read_bytes=BIG_READ_BYTES)
    l2_size, l3_size = cache_bytes(2), cache_bytes(3)
    # A thread's share fits its L2 with room for the state and outputs: half of it (a quarter
    # of 256 KB when the size is unknown, as in the read loop).
    caches = [(max(l2_size, L2_BYTES_PER_THREAD) / 2, l2)]
    l3_share = l3_read_bytes_per_thread(threads, l2_size, l3_size)
    if l3_share:
        l3 = measure_cpu_read(l3_share, threads)
        info.update(l3_read_gb_s=l3 / 1e9, l3_bytes_per_thread=l3_share)
        caches.append((l3_size / 2 / threads, l3))
    info.update(l2_bytes=l2_size, l3_bytes=l3_size)
    # The kernels compute in fp32 whatever the storage dtype: one FMA rate for all of them.
    rates = {dt: fma for dt in ("float32", "bfloat16", "float16")}
    return Peaks(device_name, f"measured (FMA {isa})", rates, big, STEP_LATENCY_S["cpu"], cpu=info,
                 weight_caches=caches, threads=threads)


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
        return cpu_peaks(device_name)
    return None
