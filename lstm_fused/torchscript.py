"""What ``LSTM``/``LSTMCell`` run inside ``torch.jit.script``: ATen's own LSTM on our parameters.

TorchScript cannot compile the fused path (backend choice in Python, custom ops registered from
Python), so a scripted module calls ``torch.lstm`` / ``torch.lstm_cell``, the kernels behind
``nn.LSTM``, on the very same parameter tensors. The results equal eager ``nn.LSTM`` with those
weights; they match our fused kernels to rounding. ``torch.jit.trace`` needs none of this: the
modules call ``nn.LSTM.forward`` while tracing, which records ``aten::lstm``.
"""

# No ``from __future__ import annotations``: TorchScript compiles these functions from their
# annotations.
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


def _zero_state(
    num_states: int, batch: int, out_size: int, hidden_size: int, like: Tensor
) -> Tuple[Tensor, Tensor]:
    h0 = torch.zeros(num_states, batch, out_size, dtype=like.dtype, device=like.device)
    c0 = torch.zeros(num_states, batch, hidden_size, dtype=like.dtype, device=like.device)
    return h0, c0


def lstm(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    weights: List[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    training: bool,
    bidirectional: bool,
    batch_first: bool,
    proj_size: int,
    hidden_size: int,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """A padded (batched 3-D or unbatched 2-D) input through ``torch.lstm``."""
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if batch_first else 1)
    batch = input.size(0 if batch_first else 1)
    num_states = num_layers * (2 if bidirectional else 1)
    out_size = proj_size if proj_size > 0 else hidden_size
    if hx is None:
        h0, c0 = _zero_state(num_states, batch, out_size, hidden_size, input)
    elif batched:
        h0, c0 = hx
    else:
        h0, c0 = hx[0].unsqueeze(1), hx[1].unsqueeze(1)
    y, h_n, c_n = torch.lstm(
        input, [h0, c0], weights, has_biases, num_layers, dropout, training, bidirectional, batch_first
    )
    if not batched:
        return y.squeeze(0 if batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))
    return y, (h_n, c_n)


def packed_lstm(
    input: PackedSequence,
    hx: Optional[Tuple[Tensor, Tensor]],
    weights: List[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    training: bool,
    bidirectional: bool,
    proj_size: int,
    hidden_size: int,
) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
    """A PackedSequence through ``torch.lstm``'s packed overload (state in the caller's batch order)."""
    data, batch_sizes, sorted_indices, unsorted_indices = input
    num_states = num_layers * (2 if bidirectional else 1)
    out_size = proj_size if proj_size > 0 else hidden_size
    if hx is None:
        h0, c0 = _zero_state(num_states, int(batch_sizes[0]), out_size, hidden_size, data)
    else:
        h0, c0 = hx
        if sorted_indices is not None:  # the packed batch is sorted by length; the state is not
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
    y, h_n, c_n = torch.lstm(
        data, batch_sizes, [h0, c0], weights, has_biases, num_layers, dropout, training, bidirectional
    )
    if unsorted_indices is not None:
        h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
    return PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)


def lstm_cell(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """One step through ``torch.lstm_cell`` (batched 2-D or unbatched 1-D input)."""
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    if hx is None:
        zeros = torch.zeros(input.size(0), w_hh.size(1), dtype=input.dtype, device=input.device)
        h0, c0 = zeros, zeros
    elif batched:
        h0, c0 = hx
    else:
        h0, c0 = hx[0].unsqueeze(0), hx[1].unsqueeze(0)
    h, c = torch.lstm_cell(input, [h0, c0], w_ih, w_hh, b_ih, b_hh)
    if not batched:
        return h.squeeze(0), c.squeeze(0)
    return h, c
