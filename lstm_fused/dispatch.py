"""Backend choice: which recurrence op runs for a given backend name, device and dtype.

Explicit names either run or raise an error saying why; only ``"auto"`` chooses, and the
``LSTM_FUSED_BACKEND`` environment variable (read when ``auto`` is resolved) overrides it.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from . import ops

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
ENV_VAR = "LSTM_FUSED_BACKEND"

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# dtypes each backend implements; the device is checked separately.
_DTYPES = {
    "cpu": _FLOATS,
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "reference": _FLOATS,
}
_DEVICES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "reference": None}
# Preference order of "auto" per device type: first available wins. On CUDA devices the CUDA C++
# kernels come before Triton without a measurement behind it yet (no GPU run of both so far):
# to be revisited, possibly per shape, when GPU benchmark results exist.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"lstm_fused: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def _triton_reason() -> Optional[str]:
    try:
        from . import triton as triton_backend
    except ImportError as exc:
        return f"the Triton backend could not be imported ({exc})"
    if not hasattr(triton_backend, "unavailable_reason"):
        return "the Triton backend is not built into this checkout"
    return triton_backend.unavailable_reason()


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run on this machine at all (None: it can)."""
    if name == "reference":
        return None
    if name == "cpu":
        return ops.EXTENSION_ERROR
    if name == "cuda":
        if ops.EXTENSION_ERROR:
            return ops.EXTENSION_ERROR
        if not ops.extension_has_cuda():
            return "lstm_fused was built without CUDA kernels (torch without CUDA, or no nvcc)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        return _triton_reason()
    raise ValueError(f"lstm_fused: unknown backend {name!r}")


def available_backends() -> list:
    """Names of the backends that can run on this machine (for some device and dtype)."""
    return [name for name in BACKENDS[1:] if unavailable_reason(name) is None]


def _forward_op(name: str) -> Callable:
    if name == "cpu" or name == "cuda":
        return torch.ops.lstm_fused.recurrence_forward.default
    if name == "triton":
        return torch.ops.lstm_fused.triton_forward.default
    return torch.ops.lstm_fused.reference_forward.default


def _cannot_run(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    reason = unavailable_reason(name)
    if reason is not None:
        return reason
    devices = _DEVICES[name]
    if devices is not None and device.type not in devices:
        return f"it runs on {'/'.join(devices)} tensors, not {device.type}"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors it needs TRITON_INTERPRET=1 (the Triton interpreter)"
    if dtype not in _DTYPES[name]:
        return f"it does not implement {dtype}"
    return None


_warned_fallback: set = set()


def left_to_choose(backend: str) -> bool:
    """Whether the caller left the choice of computation to lstm_fused: ``"auto"`` with no
    ``LSTM_FUSED_BACKEND`` override. Only then may a call run ATen's own code where that is the
    faster (functional.aten_cell_preferred); a named backend always runs its kernels."""
    return backend == "auto" and os.environ.get(ENV_VAR, "auto") in ("", "auto")


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend name that will run, or a ValueError/RuntimeError saying why not."""
    check_backend_name(backend)
    if backend == "auto":
        override = os.environ.get(ENV_VAR)
        if override:
            if override not in BACKENDS:
                raise ValueError(f"lstm_fused: {ENV_VAR}={override!r} is not one of {BACKENDS}")
            backend = override
    if backend != "auto":
        reason = _cannot_run(backend, device, dtype)
        if reason is not None:
            raise RuntimeError(f"lstm_fused: backend {backend!r} cannot run here: {reason}")
        return backend
    for name in _AUTO_ORDER.get(device.type, ()):
        if _cannot_run(name, device, dtype) is None:
            return name
    key = (device.type, dtype)
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(
            f"lstm_fused: no fused backend runs on {device.type} with {dtype}; "
            "using the (slow) reference backend",
            stacklevel=3,
        )
    return "reference"


def pick(backend: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The recurrence forward op for ``backend`` on this device and dtype."""
    return _forward_op(resolve(backend, device, dtype))
