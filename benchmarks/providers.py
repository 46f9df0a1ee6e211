"""Providers: the LSTM implementations a benchmark compares, all holding the same weights.

  nn.LSTM                torch's own (cuDNN on GPU, ATen/oneDNN on CPU): the baseline of every row
  lstm_fused:<backend>   this package, one provider per backend ("auto" and "reference" on request)
  lstm_fused:cpu/own-gemm, lstm_fused:cpu/aten-gemm
                         the CPU backend with its float32 input projection and input gradient
                         forced onto our tile product or ATen's GEMM (MKL); the plain provider
                         takes the package's choice
  flashrnn               NX-AI's FlashRNN (GPU only, when installed)

A provider that cannot run a case is skipped with a reason: either known up front
(``skip_reason``) or found when it is built or first called (the caller catches that).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .shapes import DTYPES, Shape, split_provider

NATIVE = "nn.LSTM"
FLASHRNN = "flashrnn"
FUSED_PREFIX = "lstm_fused:"
FUSED_BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

# Where each lstm_fused backend is a fast path; only there is it in the default provider list.
# ("triton" can also run CPU tensors under TRITON_INTERPRET=1, a correctness tool, not a contender.)
_FAST_ON = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
# Never in the default list: "reference" is a Python time loop; "auto" duplicates a backend.
_OPT_IN = ("reference", "auto")
# GEMM options of the CPU backend: ``lstm_fused:cpu/<option>`` (see lstm_fused.ops.set_own_gemm).
INPUT_GEMMS = {"own-gemm": True, "aten-gemm": False}


def split_option(name: str):
    """``"lstm_fused:cpu/aten-gemm"`` -> ``("lstm_fused:cpu", "aten-gemm")``; none: option None."""
    base, _, option = name.partition("/")
    return base, (option or None)


def other_input_gemm() -> Optional[str]:
    """The CPU provider with the float32 GEMM the package does not pick here, or None when the
    extension is not built: the cpu suite times both, so the choice is measured, not assumed."""
    mod, _ = _import("lstm_fused.ops")
    if mod is None or not mod.extension_loaded():
        return None
    return FUSED_PREFIX + "cpu/" + ("aten-gemm" if mod.OWN_GEMM[torch.float32] else "own-gemm")


@dataclass
class Built:
    """One provider ready to run a case: a time-major ``forward(x) -> y`` (``forward(x, hx)`` for a
    shape with ``state``: hx = (h0, c0)) and its parameters. A cell shape's x is (B, I) and y is h."""

    name: str
    forward: Callable[..., Tensor]
    params: List[Tensor]
    module: Optional[nn.Module] = None
    notes: List[str] = field(default_factory=list)
    dtype: Optional[torch.dtype] = None  # set when it differs from the case's (a baseline@dtype)

    def set_training(self, training: bool) -> None:
        # eval for fwd so nn.LSTM takes cuDNN's inference path; dropout is 0 so results match.
        if self.module is not None:
            self.module.train(training)


# ----------------------------------------------------------------------------- discovery

def _import(name: str):
    """(module, None) or (None, why it failed); import errors never escape."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # a broken build raises more than ImportError
        return None, f"import {name} failed: {type(exc).__name__}: {exc}"


def fused_backends() -> List[str]:
    """``lstm_fused.available_backends()``, or [] when the package does not import."""
    mod, _ = _import("lstm_fused")
    if mod is None:
        return []
    try:
        return list(mod.available_backends())
    except Exception:
        return []


def flashrnn_installed() -> bool:
    return importlib.util.find_spec("flashrnn") is not None


def known(name: str) -> bool:
    name, dtype = split_provider(name)
    if dtype is not None and dtype not in DTYPES:
        return False
    name, option = split_option(name)
    if option is not None:
        return name == FUSED_PREFIX + "cpu" and option in INPUT_GEMMS
    if name in (NATIVE, FLASHRNN):
        return True
    return name.startswith(FUSED_PREFIX) and name[len(FUSED_PREFIX):] in FUSED_BACKENDS


def default_providers(device) -> List[str]:
    """nn.LSTM, every lstm_fused backend that is a fast path on ``device``, and flashrnn on GPU."""
    dev = torch.device(device).type
    names = [NATIVE]
    for backend in fused_backends():
        if backend in _OPT_IN:
            continue
        if dev in _FAST_ON.get(backend, (dev,)):  # an unknown new backend: let it try
            names.append(FUSED_PREFIX + backend)
    if dev == "cuda" and flashrnn_installed():
        names.append(FLASHRNN)
    return names


def skip_reason(name: str, device, shape: Shape) -> Optional[str]:
    """Why ``name`` cannot run ``shape`` on ``device``, when that is known without trying."""
    dev = torch.device(device).type
    name, option = split_option(split_provider(name)[0])
    if option is not None and (shape.cell or shape.T == 1):
        return "a one-step call has no separate input projection (one fused cell step)"
    if name.startswith(FUSED_PREFIX):
        mod, err = _import("lstm_fused")
        if mod is None:
            return err
        backend = name[len(FUSED_PREFIX):]
        if backend != "auto" and backend not in fused_backends():
            why = None
            dispatch = getattr(mod, "dispatch", None)
            if dispatch is not None and hasattr(dispatch, "unavailable_reason"):
                why = dispatch.unavailable_reason(backend)
            return f"backend {backend!r} unavailable here" + (f": {why}" if why else "")
    if name == FLASHRNN:
        if dev != "cuda":
            return "flashrnn runs on CUDA devices only"
        if not flashrnn_installed():
            return "flashrnn is not installed"
        if shape.proj_size:
            return "flashrnn has no LSTM projection (proj_size)"
        if shape.cell:
            return "flashrnn has no LSTMCell"
        if shape.state:
            return "the flashrnn adapter starts from zero state (no given h0, c0)"
    return None


# ----------------------------------------------------------------------------- building

def make_native(shape: Shape, device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The nn.LSTM (nn.LSTMCell for a cell shape) whose seeded, default-initialized weights every
    provider copies."""
    torch.manual_seed(seed)
    if shape.cell:
        return nn.LSTMCell(shape.I, shape.H, device=device, dtype=dtype)
    return nn.LSTM(shape.I, shape.H, num_layers=shape.layers, bidirectional=shape.bidirectional,
                   proj_size=shape.proj_size, device=device, dtype=dtype)


def _module_forward(module: nn.Module, shape: Shape) -> Callable[..., Tensor]:
    """``forward(x[, hx]) -> y``: the output sequence of an LSTM, h of a cell (both return it
    first: (y, (h_n, c_n)) and (h, c))."""
    return lambda x, hx=None: module(x, hx)[0]


def build(name: str, native: nn.Module, shape: Shape) -> Built:
    """Provider ``name`` holding ``native``'s weights. May raise: the caller records a skip.
    ``name@dtype`` (e.g. ``lstm_fused:cpu@float32``) is that provider with the weights cast to
    ``dtype``: a baseline in another dtype than the case's."""
    name, dtype = split_provider(name)
    if dtype is not None and getattr(torch, dtype) != next(native.parameters()).dtype:
        native = copy.deepcopy(native).to(getattr(torch, dtype))
        built = build(name, native, shape)
        built.dtype = getattr(torch, dtype)
        return built
    name, option = split_option(name)
    if option is not None:
        from lstm_fused import ops

        if next(native.parameters()).dtype not in ops.OWN_GEMM_DTYPES:
            raise ValueError(f"the GEMM options apply to {ops.OWN_GEMM_DTYPES} only")
    if name == NATIVE:
        return Built(name, _module_forward(native, shape), list(native.parameters()), native)
    if name.startswith(FUSED_PREFIX):
        import lstm_fused

        p = next(native.parameters())
        backend = name[len(FUSED_PREFIX):]
        if shape.cell:
            fused = lstm_fused.LSTMCell(shape.I, shape.H, device=p.device, dtype=p.dtype,
                                        backend=backend)
        else:
            fused = lstm_fused.LSTM(
                shape.I, shape.H, num_layers=shape.layers, bidirectional=shape.bidirectional,
                proj_size=shape.proj_size, device=p.device, dtype=p.dtype, backend=backend,
            )
        fused.load_state_dict(native.state_dict())
        forward = _module_forward(fused, shape)
        if backend == "cpu":
            from lstm_fused import ops

            # The option's GEMM, or the package's own choice, whatever another provider set.
            own = (ops.OWN_GEMM_DEFAULT if option is None
                   else dict.fromkeys(ops.OWN_GEMM_DTYPES, INPUT_GEMMS[option]))
            forward = _with_own_gemm(forward, own)
        full_name = name if option is None else f"{name}/{option}"
        return Built(full_name, forward, list(fused.parameters()), fused)
    if name == FLASHRNN:
        model = FlashRNNLSTM(native)
        return Built(name, model.forward, model.params, None, model.notes)
    raise ValueError(f"unknown provider {name!r}")


def _with_own_gemm(forward: Callable[..., Tensor], own: dict) -> Callable[..., Tensor]:
    """``forward`` with lstm_fused's GEMM choice (per dtype, as ``ops.OWN_GEMM``) forced for the
    call; it stays set after the call, for the backward (only this provider runs between its
    forward and backward)."""
    from lstm_fused import ops

    def run(*args):
        for dtype, choice in own.items():
            ops.set_own_gemm(choice, dtype)
        return forward(*args)

    return run


# ----------------------------------------------------------------------------- flashrnn

_FLASHRNN_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _flashrnn_function():
    """The ``flashrnn(Wx, R, b, states=None, function=..., backend=..., dtype=...)`` callable;
    the package exports it at top level and in its ``flashrnn.flashrnn`` submodule."""
    pkg = importlib.import_module("flashrnn")
    fn = getattr(pkg, "flashrnn", None)
    if fn is not None and not callable(fn):  # the submodule shadows the function
        fn = getattr(fn, "flashrnn", None)
    if not callable(fn):
        fn = importlib.import_module("flashrnn.flashrnn").flashrnn
    return fn


class FlashRNNLSTM:
    """nn.LSTM's computation through FlashRNN, with the same weights.

    Checked on CPU against flashrnn 1.0.8's pure-PyTorch backends ("vanilla", "vanilla_fwbw"):
    output and every gradient match nn.LSTM (tests/test_benchmarks.py, when flashrnn is
    installed). UNTESTED on a GPU, i.e. with its CUDA backends, which take the same arguments
    (the library permutes them per backend). What it relies on:
      * ``Wx``: the input projection, layout BTGHD = (B, T, 4 gates, 1 head, H); it is computed
        here (x @ W_ih^T) inside the timed call so the work matches nn.LSTM's;
      * ``R``: layout GHDP = (4, 1, H_out, H_in), i.e. W_hh split per gate, as nn.LSTM stores it;
      * ``b``: layout GHD = (4, 1, H) = b_ih + b_hh;
      * gate order i, f, z(=g), o, the same as nn.LSTM; zero initial states;
      * it returns (states, last_states), states laid out SBTHD with S = (h, c).
    Its kernels run in ``dtype`` (bf16 unless told otherwise; we pass the case's dtype) and are
    JIT-compiled per configuration at first use, minutes: the caller's untimed first call does it.
    Backend "cuda_fused" (weights on chip) is tried first; if it rejects a size, "cuda" is used and
    the record notes it. Layers and directions are looped here; projection is not supported.
    """

    def __init__(self, native: nn.LSTM, backend: str = "cuda_fused"):
        if native.proj_size:
            raise ValueError("flashrnn has no LSTM projection (proj_size)")
        self.fn = _flashrnn_function()
        self.H = native.hidden_size
        self.dtype = _FLASHRNN_DTYPE[next(native.parameters()).dtype]
        self.backend = backend
        self.notes: List[str] = []
        self.cells = []  # per layer, per direction: (w_ih, w_hh, bias)
        for layer in range(native.num_layers):
            dirs = []
            for sfx in ([""] + (["_reverse"] if native.bidirectional else [])):
                get = lambda n: getattr(native, f"{n}_l{layer}{sfx}").detach().clone()
                w_ih = get("weight_ih").requires_grad_()
                w_hh = get("weight_hh").requires_grad_()
                bias = (get("bias_ih") + get("bias_hh")).requires_grad_()
                dirs.append((w_ih, w_hh, bias))
            self.cells.append(dirs)
        self.params = [t for dirs in self.cells for cell in dirs for t in cell]

    def _recur(self, wx: Tensor, w_hh: Tensor, bias: Tensor) -> Tensor:
        H = self.H
        R = w_hh.view(4, 1, H, H)
        b = bias.view(4, 1, H)
        try:
            states, _ = self.fn(Wx=wx, R=R, b=b, states=None, function="lstm",
                                backend=self.backend, dtype=self.dtype)
        except Exception as exc:
            if self.backend != "cuda_fused":
                raise
            self.backend = "cuda"
            self.notes.append(f"flashrnn cuda_fused failed ({type(exc).__name__}); used backend=cuda")
            states, _ = self.fn(Wx=wx, R=R, b=b, states=None, function="lstm",
                                backend=self.backend, dtype=self.dtype)
        return states[0, :, :, 0, :]  # h: (B, T, H)

    def forward(self, x: Tensor) -> Tensor:
        inp = x.transpose(0, 1)  # (B, T, I): FlashRNN is batch-major
        B, T = inp.shape[0], inp.shape[1]
        for dirs in self.cells:
            outs = []
            for d, (w_ih, w_hh, bias) in enumerate(dirs):
                src = inp if d == 0 else inp.flip(1)
                wx = torch.matmul(src, w_ih.t()).view(B, T, 4, 1, self.H)
                h = self._recur(wx, w_hh, bias)
                outs.append(h if d == 0 else h.flip(1))
            inp = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return inp.transpose(0, 1).to(x.dtype)  # (T, B, dirs*H) like nn.LSTM
