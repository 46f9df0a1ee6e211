"""Drop-in modules: ``LSTM`` and ``LSTMCell`` subclass their torch.nn counterparts.

They keep nn's constructors, parameters (names, shapes, init), state_dict, repr and input
handling, and replace only the computation: ``functional.lstm`` over a backend's fused
recurrence op. ``convert`` swaps them into an existing model in place.

Pickled (``torch.save(model)``, ``pickle``, multiprocessing), they are written as their torch.nn
base classes, so a saved model loads wherever one holding nn.LSTM would, lstm_fused installed or
not, and ``torch.load(..., weights_only=True)`` needs only nn.LSTM's allow-list; ``convert`` makes
the loaded modules fused again. ``copy.copy``/``copy.deepcopy`` keep the fused class and backend.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import dispatch, functional


def _check_devices(input: Tensor, params, hx) -> None:
    device = input.device
    for p in params:
        if p is not None and p.device != device:
            raise RuntimeError(
                f"lstm_fused: input is on {device} but the module's parameters are on {p.device}; "
                f"move one of them (module.to({str(device)!r}) or input.to({str(p.device)!r}))"
            )
    for name, t in zip(("h0", "c0"), hx):
        if t.device != device:
            raise RuntimeError(f"lstm_fused: input is on {device} but {name} is on {t.device}")


def _check_state_dtypes(input: Tensor, hx) -> None:
    for name, t in zip(("h0", "c0"), hx):
        if t.dtype != input.dtype:
            raise RuntimeError(
                f"lstm_fused: {name} has dtype {t.dtype} but input has dtype {input.dtype}"
            )


def _let_dynamo_trace_rnn_subclasses() -> None:
    # Dynamo refuses every isinstance(m, nn.LSTM) module unless allow_rnn is set, because
    # nn.LSTM's _VF.lstm cannot be traced; ours is plain PyTorch around registered custom ops,
    # so it traces fully. The flag is global: with it, plain nn.LSTM modules are traced too
    # (Dynamo's experimental RNN support) instead of graph-breaking.
    import torch._dynamo

    torch._dynamo.config.allow_rnn = True


# Pickling and copying, shared by LSTM and LSTMCell (plain functions rather than a mixin base:
# an extra base changes the object layout, and convert could no longer assign __class__).


def _reduce_as_torch_nn(self, protocol):
    """Pickle as the torch.nn base class with nn's own state, less ``backend``.

    User subclasses pickle as themselves: their class is their forward.
    """
    if type(self) not in (LSTM, LSTMCell):
        return super(self._torch_nn_class, self).__reduce_ex__(protocol)
    state = {k: v for k, v in self.__getstate__().items() if k != "backend"}
    # pickle's NEWOBJ (how nn.LSTM itself pickles) insists on the object's own class, so name
    # the nn class as a call instead: its cheapest instance, (1, 1), whose whole __dict__ the
    # state then replaces through nn's __setstate__.
    return (self._torch_nn_class, (1, 1), state)


# copy.copy/deepcopy would otherwise use __reduce_ex__ and return the nn class: rebuild our own
# class the way their default path does (an empty instance, then __setstate__).
def _copy_fused(self):
    clone = type(self).__new__(type(self))
    clone.__setstate__(self.__getstate__())
    return clone


def _deepcopy_fused(self, memo):
    clone = type(self).__new__(type(self))
    memo[id(self)] = clone  # before copying the state, which may refer back to self
    clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
    return clone


class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` with fused kernels. Extra keyword: ``backend`` (see ``dispatch.BACKENDS``)."""

    _torch_nn_class = nn.LSTM
    __reduce_ex__ = _reduce_as_torch_nn
    __copy__ = _copy_fused
    __deepcopy__ = _deepcopy_fused

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = dispatch.check_backend_name(backend)
        _let_dynamo_trace_rnn_subclasses()

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")

    def forward(self, input, hx: Optional[tuple] = None):
        self._update_flat_weights()
        num_dirs = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)

        lengths = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self.check_input(data, batch_sizes)
            # Padded, time-major, in the packed (length-sorted) batch order.
            x, lengths_cpu = pad_packed_sequence(PackedSequence(data, batch_sizes))
            lengths = lengths_cpu.to(x.device)
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            x = input if is_batched else input.unsqueeze(batch_dim)
            batch_sizes = sorted_indices = unsorted_indices = None
            self.check_input(x, None)
            if self.batch_first:
                x = x.transpose(0, 1)
        if x.size(0) == 0:
            raise RuntimeError("lstm_fused: the input sequence has length 0")
        batch = x.size(1)

        if hx is None:
            zeros = dict(dtype=x.dtype, device=x.device)
            hx = (
                torch.zeros(self.num_layers * num_dirs, batch, out_size, **zeros),
                torch.zeros(self.num_layers * num_dirs, batch, self.hidden_size, **zeros),
            )
        else:
            want = 3 if is_batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            expected_h = (self.num_layers * num_dirs, batch, out_size)
            expected_c = (self.num_layers * num_dirs, batch, self.hidden_size)
            self.check_hidden_size(hx[0], expected_h, "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hx[1], expected_c, "Expected hidden[1] size {}, got {}")
            _check_state_dtypes(x, hx)
            hx = self.permute_hidden(hx, sorted_indices)
        _check_devices(x, self._flat_weights, hx)

        y, h_n, c_n = functional.lstm(
            x,
            hx[0],
            hx[1],
            self._flat_weights,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            has_biases=self.bias,
            proj_size=self.proj_size,
            dropout=self.dropout,
            training=self.training,
            lengths=lengths,
            backend=self.backend,
        )
        hidden = self.permute_hidden((h_n, c_n), unsorted_indices)

        if packed:
            out = pack_padded_sequence(y, lengths_cpu)
            return PackedSequence(out.data, batch_sizes, sorted_indices, unsorted_indices), hidden
        if self.batch_first:
            y = y.transpose(0, 1)
        if not is_batched:
            y = y.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return y, hidden


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` with fused kernels: one step of the same recurrence op."""

    _torch_nn_class = nn.LSTMCell
    __reduce_ex__ = _reduce_as_torch_nn
    __copy__ = _copy_fused
    __deepcopy__ = _deepcopy_fused

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = dispatch.check_backend_name(backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")

    def forward(self, input: Tensor, hx: Optional[tuple] = None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead"
                    )
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        if x.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {x.size(1)} expected {self.input_size}"
            )
        if x.dtype != self.weight_ih.dtype:
            raise RuntimeError(
                f"lstm_fused: input dtype ({x.dtype}) does not match weight dtype ({self.weight_ih.dtype})"
            )
        if hx is None:
            zeros = torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype, device=x.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        for idx, value in enumerate(hx):
            if value.shape != (x.size(0), self.hidden_size):
                raise RuntimeError(
                    f"LSTMCell: Expected hx[{idx}] of size {(x.size(0), self.hidden_size)}, "
                    f"got {tuple(value.shape)}"
                )
        _check_state_dtypes(x, hx)
        _check_devices(x, [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh], hx)

        xproj = functional.input_projection(x, self.weight_ih, self.bias_ih, self.bias_hh)
        _, h, c = functional.recurrence(
            xproj.unsqueeze(0), self.weight_hh, None, hx[0], hx[1], backend=self.backend
        )
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


def convert(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every ``nn.LSTM``/``nn.LSTMCell`` in ``module`` (``module`` included) fused, in place.

    The modules keep their identity, parameters (the very same tensors), hooks and state; only
    their class changes, so optimizers and references held elsewhere stay valid. Subclasses of
    nn.LSTM with their own forward are left alone. Returns ``module``.
    """
    dispatch.check_backend_name(backend)
    for m in module.modules():
        if type(m) is nn.LSTM:
            m.__class__ = LSTM
        elif type(m) is nn.LSTMCell:
            m.__class__ = LSTMCell
        elif not isinstance(m, (LSTM, LSTMCell)):
            continue
        m.backend = backend
        _let_dynamo_trace_rnn_subclasses()
    return module
