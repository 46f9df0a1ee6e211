"""Registers the Triton kernels as ``lstm_fused::triton_forward`` / ``lstm_fused::triton_backward``.

Plain ``torch.library.custom_op``s (opaque to ``torch.compile``): the body launches a data-
dependent number of kernels (one per step on the per-step path) and a few torch GEMMs, which is
simplest to keep out of the traced graph. Fake kernels and autograd are the shared ones in
``lstm_fused/ops.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops as shared_ops
from . import recurrence


@torch.library.custom_op("lstm_fused::triton_forward", mutates_args=())
def triton_forward(
    xproj: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return recurrence.forward(xproj, w_hh, w_hr, h0, c0, lengths, reverse, save)


@torch.library.custom_op("lstm_fused::triton_backward", mutates_args=())
def triton_backward(
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    y: Tensor,
    gates: Tensor,
    c_all: Tensor,
    weight_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return recurrence.backward(
        dy, dh_n, dc_n, w_hh, w_hr, h0, c0, lengths, reverse, y, gates, c_all, weight_grads
    )


shared_ops.register_backend_ops("lstm_fused::triton_forward", "lstm_fused::triton_backward")
