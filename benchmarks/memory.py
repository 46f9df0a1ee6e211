"""Memory columns.

``peak_mem_mb`` (GPU only; None on CPU, where no allocator keeps a peak): the highest
``torch.cuda.max_memory_allocated`` during one call, after a reset, minus what was allocated just
before the call. Inputs and weights, already resident, are not counted: it is what the call adds
(activations, workspaces, gradients).

``saved_mb`` (fwdbwd, any device): bytes of the unique storages autograd saves for backward during
one forward, seen through ``torch.autograd.graph.saved_tensors_hooks``. Storages of the input and
of the parameters are left out (they exist anyway); what remains is the activation memory a
training step has to hold between forward and backward.
"""

from __future__ import annotations

import gc
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from .timing import Call

MB = 2**20


def peak_memory_mb(call: Call, device) -> Optional[float]:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = call(0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / MB


def _storage_key(t: Tensor):
    st = t.untyped_storage()
    return (t.device, st.data_ptr()), st.nbytes()


def saved_mb(forward: Callable[[Tensor], Tensor], x: Tensor, exclude: Sequence[Tensor]) -> float:
    """MB autograd keeps for backward of ``forward(x)`` (unique storages, ``exclude`` left out)."""
    skip = {_storage_key(t)[0] for t in [x, *exclude]}
    seen: Dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        key, nbytes = _storage_key(t)
        if key not in skip and key[1] != 0:  # data_ptr 0: an empty storage
            seen[key] = nbytes
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x)
    del y
    return sum(seen.values()) / MB
