"""What a run was measured on (the ``machine`` block of results.json) and the device slug that
names the committed results folder, ``benchmarks/results/<slug>/``."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpuinfo_fields() -> dict:
    """The first processor's "key: value" lines of /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return _cpuinfo_fields().get("model name") or platform.processor() or platform.machine() or "unknown cpu"


# AMD's x86 family and model numbers of each Zen generation (family 25 holds Zen 3 and Zen 4).
_ZEN3_MODELS = (range(0x00, 0x10), range(0x20, 0x30), range(0x40, 0x60))
_ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))


def cpu_generation(fields: Optional[dict] = None) -> Optional[str]:
    """The Zen generation of an AMD CPU ("zen3", "zen4", "zen5"; "family26-model2" style where
    the numbers are not in the table), None for other vendors. A VM's model name ("AMD EPYC")
    does not say it, and the generations differ in cores, caches and vector units."""
    fields = _cpuinfo_fields() if fields is None else fields
    if fields.get("vendor_id") != "AuthenticAMD":
        return None
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return None
    if family == 25 and any(model in r for r in _ZEN3_MODELS):
        return "zen3"
    if family == 25 and any(model in r for r in _ZEN4_MODELS):
        return "zen4"
    if family == 26 and model < 0x80:
        return "zen5"
    return f"family{family}-model{model}"


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")


def cpu_flags() -> dict:
    """Which of ``ISA_FLAGS`` /proc/cpuinfo lists for this CPU ({} where there is no such file)."""
    flags = _cpuinfo_fields().get("flags")
    if flags is None:
        return {}
    have = set(flags.split())
    return {flag: flag in have for flag in ISA_FLAGS}


def cpu_isa_selected() -> Optional[str]:
    """The SIMD variant lstm_fused's CPU kernels run here (honours LSTM_FUSED_CPU_ISA)."""
    try:
        import lstm_fused  # noqa: F401

        return str(torch.ops.lstm_fused.cpu_isa_selected())
    except Exception:
        return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(name: str, device_type: str = "cuda") -> str:
    """A folder name for a device: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3",
    "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz" -> "cpu-intel-xeon-platinum-8480"."""
    s = name.lower()
    s = re.sub(r"\((r|tm|c)\)", " ", s)
    if device_type == "cpu":
        s = re.sub(r"@.*$", " ", s)  # the clock
        s = re.sub(r"\b(cpu|processor|\d+-core)\b", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    if device_type == "cpu":
        s = "cpu-" + s if s else "cpu"
    return s or "unknown"


def _version(dist: str) -> Optional[str]:
    # From the installed metadata: importing triton or flashrnn just to read a version is slow.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return head + ("-dirty" if dirty.strip() else "")


def tf32_flags() -> dict:
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def tf32_enabled(device) -> bool:
    """Whether fp32 GEMMs on ``device`` may run in TF32 (either torch switch; CUDA only)."""
    return torch.device(device).type == "cuda" and any(tf32_flags().values())


def results_slug(device) -> str:
    """The results folder of this machine: the device slug; on CPUs followed by the generation of
    an AMD CPU and the SIMD variant our kernels run ("cpu-amd-epyc-zen3-avx2"), since one model
    name (a VM's "AMD EPYC") covers machines of several generations, with and without AVX-512,
    and their numbers differ."""
    device = torch.device(device)
    slug = device_slug(device_name(device), device.type)
    if device.type != "cpu":
        return slug
    parts = [slug, cpu_generation(), cpu_isa_selected()]
    return "-".join(p for p in parts if p)


def machine_info(device) -> dict:
    device = torch.device(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "slug": results_slug(device),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_isa_selected": cpu_isa_selected(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": _version("triton") or _version("pytorch-triton"),
        "lstm_fused": _version("lstm_fused"),
        "flashrnn": _version("flashrnn"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tf32": tf32_enabled(device),
        "tf32_flags": tf32_flags(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other processes on the machine skew CPU timings badly (OpenMP threads wait on cores
        # someone else holds): keep the evidence with the numbers.
        "load_avg": load_avg(),
    }


def load_avg() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class OtherLoad:
    """How much of the machine's CPU time other processes took between ``start()`` and
    ``stop()`` (Linux; None elsewhere). On a shared box this, not the load average (a lagging
    1-minute mean), says whether a run's CPU timings can be trusted."""

    def _sample(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        mine = sum(os.times()[:2]) * os.sysconf("SC_CLK_TCK")   # this process, all threads
        return sum(fields), sum(fields) - idle, mine

    def start(self) -> "OtherLoad":
        self.begin = self._sample()
        return self

    def stop(self) -> Optional[float]:
        """Fraction of all CPU time (0..1) that went to other processes."""
        end = self._sample()
        if self.begin is None or end is None or end[0] <= self.begin[0]:
            return None
        total, busy, mine = (e - b for e, b in zip(end, self.begin))
        return round(max(0.0, busy - mine) / total, 3)
