"""The Triton backend: ``lstm_fused::triton_forward`` / ``triton_backward``.

Importing this package never fails: without Triton it only offers ``unavailable_reason()``.
Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before the first launch: the kernels are defined then.
"""

from __future__ import annotations

import os
from typing import Optional

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # the backend is optional
    _IMPORT_ERROR = f"triton is not installed ({exc})"

if _IMPORT_ERROR is None:
    from . import ops  # noqa: F401  (registers the ops)


def unavailable_reason() -> Optional[str]:
    """Why the Triton backend cannot run here, or None when it can."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"


__all__ = ["unavailable_reason"]
