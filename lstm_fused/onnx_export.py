"""ONNX export of ``LSTM``: the recurrence as ONNX's own ``LSTM`` operator.

``torch.onnx.export(..., dynamo=False)`` traces the model with TorchScript; the module then runs
``nn.LSTM.forward`` (see ``modules.py``), whose ``aten::lstm`` the exporter already translates to
ONNX ``LSTM`` nodes, PackedSequence lengths included.

``torch.onnx.export(..., dynamo=True)`` captures with torch.export, where our recurrence is a
custom op the ONNX translator does not know. While exporting, ``functional.lstm`` therefore
builds each layer and direction with ``lstm_direction`` below: one ONNX ``LSTM`` node taking the
layer input and the weights in ONNX's layout. ONNX's LSTM has no output projection, so with
``proj_size > 0`` the recurrence is instead written as a ``scan`` over time, which the
exporter turns into an ONNX ``Scan`` loop (dynamic length kept).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
# No public scan yet; the ONNX exporter translates this higher-order op to ONNX Scan.
from torch._higher_order_ops.scan import scan


_export_flags = None  # (the dynamo exporter's flags, the TorchScript exporter's), or () if absent


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without its two imports per call (a few microseconds,
    which a one-step LSTMCell call shows): the same two flags, looked up once. A torch whose
    exporter keeps them elsewhere gets the public function, and so does Dynamo, which knows it
    (and refuses to trace into the exporter's modules)."""
    global _export_flags
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    if _export_flags is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

            _export_flags = (_flags, GLOBALS) if hasattr(_flags, "_is_onnx_exporting") and \
                hasattr(GLOBALS, "in_onnx_export") else ()
        except ImportError:
            _export_flags = ()
    if not _export_flags:
        return torch.onnx.is_in_onnx_export()
    flags, globals_ = _export_flags
    return bool(globals_.in_onnx_export or flags._is_onnx_exporting)


def refuse_projection(proj_size: int) -> None:
    """For dynamo=False: ONNX's LSTM operator has no projection (W_hr), and the TorchScript
    exporter's own message about it does not say what works instead."""
    if proj_size > 0:
        raise NotImplementedError(
            "lstm_fused: torch.onnx.export(..., dynamo=False) cannot export an LSTM with "
            "proj_size > 0: ONNX's LSTM operator has no output projection. Export with "
            "dynamo=True, which writes the projected recurrence as an ONNX Scan loop."
        )


def refuse_packed_input() -> None:
    """dynamo=True cannot export PackedSequence models: say why and what works instead."""
    raise NotImplementedError(
        "lstm_fused: torch.onnx.export(..., dynamo=True) cannot export a PackedSequence input: "
        "torch.export cannot capture pack_padded_sequence / pad_packed_sequence (their sizes "
        "depend on the lengths' values; this holds for nn.LSTM models too), and the ONNX "
        "translator has no rule for them. Export with dynamo=False, which "
        "maps the lengths to the ONNX LSTM's sequence_lens, or pass padded tensors."
    )


def _onnx_gate_order(t: Tensor) -> Tensor:
    """Rows (or bias entries) from PyTorch's gate order i,f,g,o to ONNX's i,o,f,c (c is g)."""
    i, f, g, o = t.chunk(4, 0)
    return torch.cat([i, o, f, g], 0)


def lstm_direction(
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer and direction as an ONNX ``LSTM`` node, for ``torch.onnx.export(dynamo=True)``.

    Same contract as the fused path (x (T, B, I) -> y (T, B, H), h_n (B, H), c_n (B, H)), but
    written with ``torch.onnx.ops.symbolic_multi_out``: during export it becomes one ONNX node
    whose output shapes follow x's (symbolic) sizes, so batch and length stay dynamic.
    ``lengths`` becomes ``sequence_lens``: each sequence stops (or, reversed, starts) at its
    own length, as in our op. ONNX's LSTM has no projection: with ``w_hr`` the direction is
    ``projected_recurrence`` (an ONNX Scan) instead.
    """
    if w_hr is not None:
        xproj = F.linear(x, w_ih, None if b_ih is None or b_hh is None else b_ih + b_hh)
        return projected_recurrence(xproj, w_hh, w_hr, h0, c0, lengths, reverse)
    hidden = w_hh.size(1)
    seq_len, batch = x.size(0), x.size(1)
    bias = None
    if b_ih is not None and b_hh is not None:
        bias = torch.cat([_onnx_gate_order(b_ih), _onnx_gate_order(b_hh)]).unsqueeze(0)
    inputs = [
        x,
        _onnx_gate_order(w_ih).unsqueeze(0),  # W (1, 4H, I)
        _onnx_gate_order(w_hh).unsqueeze(0),  # R (1, 4H, H)
        bias,  # B (1, 8H): input bias then recurrent bias
        None if lengths is None else lengths.to(torch.int32),
        h0.unsqueeze(0),
        c0.unsqueeze(0),
    ]
    y, h_n, c_n = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        inputs,
        {"hidden_size": hidden, "direction": "reverse" if reverse else "forward"},
        dtypes=[x.dtype] * 3,
        shapes=[[seq_len, 1, batch, hidden], [1, batch, hidden], [1, batch, hidden]],
    )
    return y.squeeze(1), h_n.squeeze(0), c_n.squeeze(0)


def projected_recurrence(
    xproj: Tensor,
    w_hh: Tensor,
    w_hr: Tensor,
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The recurrence op's contract (reference.py) with a projection, as a ``scan`` over time.

    Inactive steps (t >= lengths[b]) keep the state and write zeros, as the op does; reversed,
    the steps are visited T-1 .. 0 so each sequence starts at its own last element.
    """
    steps = xproj.size(0)
    if lengths is None:
        active = xproj.new_ones(steps, xproj.size(1), 1, dtype=torch.bool)
    else:
        time = torch.arange(steps, device=xproj.device).view(steps, 1)
        active = (time < lengths.view(1, -1)).unsqueeze(2)
    if reverse:
        xproj, active = xproj.flip(0), active.flip(0)

    def step(state, inputs):
        h, c = state
        xproj_t, active_t = inputs
        i, f, g, o = (xproj_t + h @ w_hh.t()).chunk(4, 1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = (torch.sigmoid(o) * torch.tanh(c_next)) @ w_hr.t()
        next_state = (torch.where(active_t, h_next, h), torch.where(active_t, c_next, c))
        return next_state, torch.where(active_t, h_next, torch.zeros_like(h_next))

    (h_n, c_n), y = scan(step, (h0, c0), (xproj, active))
    return (y.flip(0) if reverse else y), h_n, c_n
