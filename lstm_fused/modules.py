"""Drop-in modules: ``LSTM`` and ``LSTMCell`` subclass their torch.nn counterparts.

They keep nn's constructors, parameters (names, shapes, init), state_dict, repr and input
handling, and replace only the computation: ``functional.lstm`` over a backend's fused
recurrence op. ``convert`` swaps them into an existing model in place.

Pickled (``torch.save(model)``, ``pickle``, multiprocessing), they are written as their torch.nn
base classes, so a saved model loads wherever one holding nn.LSTM would, lstm_fused installed or
not, and ``torch.load(..., weights_only=True)`` needs only nn.LSTM's allow-list; ``convert`` makes
the loaded modules fused again. ``copy.copy``/``copy.deepcopy`` keep the fused class and backend.
"""

# No ``from __future__ import annotations`` here: TorchScript reads forward's annotations as types.
import contextlib
import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import dispatch, functional, onnx_export, torchscript

try:  # per-sample gradients (torch.nn.utils._per_sample_grad.call_for_per_sample_grads)
    from torch.nn.utils._expanded_weights.expanded_weights_impl import ExpandedWeight
except ImportError:  # a torch without expanded weights: nothing to detect
    ExpandedWeight = ()


def _has_expanded_weights(params) -> bool:
    return any(isinstance(p, ExpandedWeight) for p in params)


def _under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running: it sees through
    ATen's LSTM, but not through our ops' autograd (torch.library's Autograd kernels are
    autograd.Functions that functorch cannot transform), so nn's own computation runs there."""
    return torch._C._functorch.maybe_current_level() is not None


@contextlib.contextmanager
def _mkldnn_disabled():
    # torch's LSTM decomposition picks a oneDNN layer op (which expanded weights cannot handle)
    # for fp32/bf16 CPU input that does not require grad; without oneDNN it takes the per-step
    # F.linear path that expanded weights do handle.
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


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


def _flat_weights_current(module) -> bool:
    """Whether ``module._flat_weights`` are still the module's weights: nn.RNNBase's
    ``_weights_have_changed`` without its hasattr + getattr (through nn.Module.__getattr__) per
    weight, about 20 us per call. A weight that is not a plain entry of ``_parameters`` (an
    instance attribute, a parametrization's property) counts as changed: nn's own update runs."""
    params, attrs = module._parameters, module.__dict__
    for name, weight in zip(module._flat_weights_names, module._flat_weights):
        if name in attrs or params.get(name) is not weight:
            return False
    return True


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


# What our classes keep beside nn's state: the backend, and an LSTMCell's weight-update record.
_FUSED_ONLY_STATE = ("backend", "_weight_update_record")


def _reduce_as_torch_nn(self, protocol):
    """Pickle as the torch.nn base class with nn's own state, less ``_FUSED_ONLY_STATE``.

    User subclasses pickle as themselves: their class is their forward.
    """
    if type(self) not in (LSTM, LSTMCell):
        return super(self._torch_nn_class, self).__reduce_ex__(protocol)
    state = {k: v for k, v in self.__getstate__().items() if k not in _FUSED_ONLY_STATE}
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

    # Signatures for TorchScript, which compiles forward once per input type (as for nn.LSTM).
    @torch._jit_internal._overload_method  # noqa: F811
    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        pass

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    def forward(self, input, hx=None):  # noqa: F811
        if torch.jit.is_scripting():
            # TorchScript cannot compile the fused path; it runs ATen's LSTM on our parameters
            # (the code below this branch is never compiled).
            if isinstance(input, PackedSequence):
                return torchscript.packed_lstm(
                    input, hx, self._flat_weights, self.bias, self.num_layers, self.dropout,
                    self.training, self.bidirectional, self.proj_size, self.hidden_size,
                )
            return torchscript.lstm(
                input, hx, self._flat_weights, self.bias, self.num_layers, self.dropout,
                self.training, self.bidirectional, self.batch_first, self.proj_size, self.hidden_size,
            )
        if torch.jit.is_tracing():
            # torch.jit.trace and torch.onnx.export(dynamo=False) record nn.LSTM's aten::lstm:
            # TorchScript replays it, and the ONNX exporter maps it to ONNX's LSTM operator.
            if onnx_export.in_onnx_export():
                onnx_export.refuse_projection(self.proj_size)
            return super().forward(input, hx)
        if isinstance(input, PackedSequence) and onnx_export.in_onnx_export():
            onnx_export.refuse_packed_input()
        if not _flat_weights_current(self):
            self._update_flat_weights()
        if _has_expanded_weights(self._flat_weights):
            # Per-sample gradients: expanded weights know how to split nn.LSTM's computation
            # (torch's per-step decomposition of it) into per-sample GEMMs, not our fused op.
            with _mkldnn_disabled():
                return super().forward(input, hx)
        if _under_torch_func():
            return super().forward(input, hx)
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
        batch = x.size(1)

        if hx is None:
            num_states = self.num_layers * num_dirs
            hx = (
                torch.zeros(num_states, batch, out_size, dtype=x.dtype, device=x.device),
                torch.zeros(num_states, batch, self.hidden_size, dtype=x.dtype, device=x.device),
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
            hx = self.permute_hidden(hx, sorted_indices)
        # nn.LSTM's own text and place: after the shape checks, before the dtype checks.
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        _check_state_dtypes(x, hx)
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

    @torch.jit.unused
    def _weight_updates(self) -> "functional.WeightUpdates":
        """This cell's record of weight updates between steps, made on first use (convert() and
        unpickling make cells without __init__)."""
        updates = self.__dict__.get("_weight_update_record")
        if updates is None:
            updates = self.__dict__["_weight_update_record"] = functional.WeightUpdates()
        return updates

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        if torch.jit.is_scripting():
            # TorchScript cannot compile the fused path; it runs ATen's cell on our parameters.
            return torchscript.lstm_cell(
                input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
            )
        # Straight from the parameter dict (nn.Module.__getattr__ costs a microsecond or more a
        # read here); torch.func.functional_call and per-sample grads swap the entries of it.
        params = self._parameters
        weights = (params["weight_ih"], params["weight_hh"], params.get("bias_ih"), params.get("bias_hh"))
        # A small training step: nn.LSTMCell's own code, checks included, is the faster there
        # (asked first: every microsecond shows at this size).
        if (functional.aten_cell_preferred(input, hx, weights, self.backend, self._weight_updates())
                and not _has_expanded_weights(weights)):
            return super().forward(input, hx)
        if torch.jit.is_tracing() or onnx_export.in_onnx_export() or _under_torch_func():
            # Tracing, and both ONNX exporters, record nn.LSTMCell's aten::lstm_cell (plain
            # GEMMs and pointwise ops after decomposition) instead of our custom op; torch.func
            # transforms can differentiate and batch only that.
            return super().forward(input, hx)
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
        if hx is None:
            zeros = torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype, device=x.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        # nn.LSTMCell's texts and order: all shapes (h before c, batch before width), then dtypes.
        for label, value in enumerate(hx):
            if value.size(0) != x.size(0):
                raise RuntimeError(
                    f"Input batch size {x.size(0)} doesn't match hidden{label} batch size {value.size(0)}"
                )
            if value.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{label} has inconsistent hidden_size: got {value.size(1)}, "
                    f"expected {self.hidden_size}"
                )
        w_ih, w_hh, b_ih, b_hh = weights
        if x.dtype != w_ih.dtype:
            raise RuntimeError(
                f"lstm_fused: input dtype ({x.dtype}) does not match weight dtype ({w_ih.dtype})"
            )
        _check_state_dtypes(x, hx)
        _check_devices(x, weights, hx)

        if _has_expanded_weights(weights):
            h, c = self._expanded_weights_step(x, hx)
            return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
        if functional.fused_cell_applies(x, (x, hx[0], hx[1]) + weights, self.backend):
            h, c = functional.cell_step(x, hx[0], hx[1], *weights)
            return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
        xproj = functional.input_projection(x, w_ih, b_ih, b_hh, self.backend)
        _, h, c = functional.recurrence(
            xproj.unsqueeze(0), w_hh, None, hx[0], hx[1], backend=self.backend
        )
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def _expanded_weights_step(self, x: Tensor, hx: tuple):
        # Per-sample gradients: expanded weights handle each weight through its own F.linear
        # (nn.LSTMCell's lstm_cell op is not handled by them), so spell the step out that way.
        z = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(hx[0], self.weight_hh, self.bias_hh)
        i, f, g, o = z.chunk(4, dim=1)
        c = f.sigmoid() * hx[1] + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.tanh(), c


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
