"""What one timed call does, and the inputs it rotates through.

``fwd``:    the forward under ``torch.no_grad()`` (inference).
``fwdbwd``: the forward, then the gradients of sum(y * dy) with respect to the input and every
            weight, via ``torch.autograd.grad`` (nothing accumulates into ``.grad`` between calls).
``train``:  a training step: the forward, the gradients of sum(y * dy) with respect to every weight
            (not the input: the data), then an SGD step on the weights in place (a learning rate
            of TRAIN_LR keeps them where they were), so each call sees weights changed since the
            last one, as every step of a training loop does (lstm_fused then repacks them).

A shape with ``state`` passes a given (h0, c0) with every call, drawn fresh like x (never zeros);
a ``cell`` shape's x is (B, I), its hx ((B, H), (B, H)) and its output h (B, H).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .shapes import Shape
from .timing import Call

# Rotate through enough inputs that together they exceed the last-level cache (H100 L2 is 50 MB),
# so a repetition cannot find its input already cached by the previous one.
CACHE_BYTES = 128 * 2**20
MIN_POOL, MAX_POOL = 2, 8
TRAIN_LR = 1e-6


def pool_size(shape: Shape, dtype: torch.dtype) -> int:
    elsize = torch.finfo(dtype).bits // 8
    out = (shape.proj_size or shape.H) * shape.dirs
    per_input = shape.T * shape.B * (shape.I + out) * elsize  # x and dy
    return max(MIN_POOL, min(MAX_POOL, math.ceil(CACHE_BYTES / max(per_input, 1))))


Inputs = Tuple[Tensor, Tensor, Optional[Tuple[Tensor, Tensor]]]  # (x, dy, hx or None)


def make_inputs(shape: Shape, dtype: torch.dtype, device, mode: str) -> List[Inputs]:
    """Fresh random (x, dy, hx) triples, time-major (hx None unless the shape has ``state``);
    never zeros (zeros flatter some kernels)."""
    out = (shape.proj_size or shape.H) * shape.dirs
    rand = lambda *size: torch.randn(*size, device=device, dtype=dtype)
    triples = []
    for _ in range(pool_size(shape, dtype)):
        if shape.cell:
            x, dy = rand(shape.B, shape.I), rand(shape.B, shape.H)
            hx = (rand(shape.B, shape.H), rand(shape.B, shape.H)) if shape.state else None
        else:
            x, dy = rand(shape.T, shape.B, shape.I), rand(shape.T, shape.B, out)
            n = shape.layers * shape.dirs
            hx = (rand(n, shape.B, shape.proj_size or shape.H), rand(n, shape.B, shape.H)) \
                if shape.state else None
        triples.append((x.requires_grad_(mode == "fwdbwd"), dy, hx))
    return triples


def make_call(forward: Callable[..., Tensor], params: Sequence[Tensor], mode: str,
              inputs: List[Inputs]) -> Call:
    """``call(i)`` runs ``mode`` on the inputs ``i % len(inputs)``; the state, when there is one,
    is passed as ``forward(x, hx)`` (its gradient is not asked for)."""
    n = len(inputs)

    def fwd(x, hx):
        return forward(x) if hx is None else forward(x, hx)

    if mode == "fwd":
        def call(i: int):
            x, _, hx = inputs[i % n]
            with torch.no_grad():
                return fwd(x, hx)
    elif mode == "fwdbwd":
        def call(i: int):
            x, dy, hx = inputs[i % n]
            y = fwd(x, hx)
            return torch.autograd.grad(y, [x, *params], dy)
    elif mode == "train":
        weights = list(params)

        def call(i: int):
            x, dy, hx = inputs[i % n]
            y = fwd(x, hx)
            grads = torch.autograd.grad(y, weights, dy)
            with torch.no_grad():
                torch._foreach_add_(weights, grads, alpha=-TRAIN_LR)
            return grads
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return call
