"""What one timed call does, and the inputs it rotates through.

``fwd``:    the forward under ``torch.no_grad()`` (inference).
``fwdbwd``: the forward, then the gradients of sum(y * dy) with respect to the input and every
            weight, via ``torch.autograd.grad`` (nothing accumulates into ``.grad`` between calls).
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor

from .shapes import Shape
from .timing import Call

# Rotate through enough inputs that together they exceed the last-level cache (H100 L2 is 50 MB),
# so a repetition cannot find its input already cached by the previous one.
CACHE_BYTES = 128 * 2**20
MIN_POOL, MAX_POOL = 2, 8


def pool_size(shape: Shape, dtype: torch.dtype) -> int:
    elsize = torch.finfo(dtype).bits // 8
    out = (shape.proj_size or shape.H) * shape.dirs
    per_input = shape.T * shape.B * (shape.I + out) * elsize  # x and dy
    return max(MIN_POOL, min(MAX_POOL, math.ceil(CACHE_BYTES / max(per_input, 1))))


def make_inputs(shape: Shape, dtype: torch.dtype, device, mode: str) -> List[Tuple[Tensor, Tensor]]:
    """Fresh random (x, dy) pairs, time-major; never zeros (zeros flatter some kernels)."""
    out = (shape.proj_size or shape.H) * shape.dirs
    pairs = []
    for _ in range(pool_size(shape, dtype)):
        x = torch.randn(shape.T, shape.B, shape.I, device=device, dtype=dtype)
        dy = torch.randn(shape.T, shape.B, out, device=device, dtype=dtype)
        pairs.append((x.requires_grad_(mode == "fwdbwd"), dy))
    return pairs


def make_call(forward: Callable[[Tensor], Tensor], params: Sequence[Tensor], mode: str,
              inputs: List[Tuple[Tensor, Tensor]]) -> Call:
    n = len(inputs)
    if mode == "fwd":
        def call(i: int):
            with torch.no_grad():
                return forward(inputs[i % n][0])
    elif mode == "fwdbwd":
        def call(i: int):
            x, dy = inputs[i % n]
            y = forward(x)
            return torch.autograd.grad(y, [x, *params], dy)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return call
