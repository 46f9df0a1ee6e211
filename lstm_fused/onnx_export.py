"""ONNX export of ``LSTM``: the recurrence as ONNX's own ``LSTM`` operator.

``torch.onnx.export(..., dynamo=False)`` traces the model with TorchScript; the module then runs
``nn.LSTM.forward`` (see ``modules.py``), whose ``aten::lstm`` the exporter already translates to
ONNX ``LSTM`` nodes, PackedSequence lengths included.

``torch.onnx.export(..., dynamo=True)`` captures with torch.export, where our recurrence is a
custom op the ONNX translator does not know. While exporting, ``functional.lstm`` therefore
builds each layer and direction with ``lstm_direction`` below: one ONNX ``LSTM`` node taking the
layer input and the weights in ONNX's layout.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor


def refuse_projection(proj_size: int) -> None:
    """ONNX's LSTM operator has no projection (W_hr): say so before an exporter fails obscurely."""
    if proj_size > 0:
        raise NotImplementedError(
            "lstm_fused: ONNX export of an LSTM with proj_size > 0 is not supported: ONNX's LSTM "
            "operator has no output projection. Export with proj_size=0, or use torch.export / "
            "AOTInductor, which support it."
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
    own length, as in our op.
    """
    refuse_projection(0 if w_hr is None else w_hr.size(0))
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
