"""The multi-layer LSTM as plain PyTorch around one fused op: the recurrence.

Per layer and direction the input projection x @ W_ih^T + b_ih + b_hh is a single GEMM over all
T*B rows (on the cpu backend our op, with our own product where ATen's GEMM is the slower for
the dtype, see ops.OWN_GEMM), and only the sequential part goes through a backend's recurrence op.
Dropout sits between layers; directions are concatenated on the feature dim.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, onnx_export, ops


def _own_gemm_min_features() -> int:
    """The fewest input features that take our own product (ops.OWN_GEMM permitting).

    With AVX-512 kernels: two. One feature is an outer product, where ATen's GEMM wins (on a Zen 5
    EPYC, M = 1600 rows, H = 32: forward level, input gradient 0.26-0.42x, weight gradient
    0.16-0.19x of ATen's speed). From two features on our tiles won every product measured there,
    the gradients most, whose ATen (MKL) versions are slow at few columns: I = 2..16, M =
    200..6400, H = 32..256, 1 and 2 threads: forward 1.1-3.8x, input gradient 1.4-3.1x, weight and
    bias gradients 1.2-12.9x (but 0.77x at M = 200, I = 8, H = 32, 2 threads: 22 against 17 us).
    Elsewhere: 64, as measured on a Zen 4 EPYC before (forward: I = 8 0.6x, I = 32 1.0x). The AVX2
    kernels forced on that Zen 5 lost some small cases to MKL (its AVX-512 code there: at I = 16,
    H = 32 the weight gradient took 2-3x its time), and no CPU with only AVX2 has been measured.
    """
    if ops.extension_loaded() and torch.ops.lstm_fused.cpu_isa_supported("avx512"):
        return 2
    return 64


_OWN_GEMM_MIN_FEATURES = _own_gemm_min_features()


def projection_op_applies(x: Tensor, w_ih: Tensor, backend: str = "auto") -> bool:
    """Whether ``lstm_fused::input_projection`` computes the input projection (see ops.py), with
    our own product or ATen's GEMM into a pooled output: only for layers the cpu backend runs,
    so the reference backend stays plain PyTorch throughout."""
    return (
        x.device.type == "cpu"
        and x.dtype in ops.OWN_GEMM_DTYPES
        and w_ih.dtype == x.dtype
        and ops.extension_loaded()
        and dispatch.resolve(backend, x.device, x.dtype) == "cpu"
    )


def _own_product_chosen(x: Tensor, w_ih: Tensor) -> bool:
    return ops.OWN_GEMM.get(x.dtype, False) and w_ih.size(1) >= _OWN_GEMM_MIN_FEATURES


def own_gemm_applies(x: Tensor, w_ih: Tensor, backend: str = "auto") -> bool:
    """Whether that op uses our own product (ops.OWN_GEMM, and enough input features)."""
    return _own_product_chosen(x, w_ih) and projection_op_applies(x, w_ih, backend)


def input_projection(
    x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], backend: str = "auto"
) -> Tensor:
    """(T, B, I) -> (T, B, 4H), both biases folded into one."""
    if projection_op_applies(x, w_ih, backend):
        own = _own_product_chosen(x, w_ih)
        return torch.ops.lstm_fused.input_projection(x, w_ih, b_ih, b_hh, own)
    bias = None if b_ih is None else b_ih + b_hh
    return F.linear(x, w_ih, bias)


def _autograd_records(tensors) -> bool:
    """Whether autograd would record an op on ``tensors`` (grad mode on, one of them needs grad):
    then the forward must save for backward, and the inference-only ops do not apply."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def recurrence(
    xproj: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    backend: str = "auto",
):
    """Run one direction of one layer: returns y (T, B, P), h_n (B, P), c_n (B, H)."""
    op = dispatch.pick(backend, xproj.device, xproj.dtype)
    save = _autograd_records((xproj, w_hh, w_hr, h0, c0))
    y, h_n, c_n, _gates, _c_all = op(
        xproj.contiguous(), w_hh, w_hr, h0.contiguous(), c0.contiguous(), lengths, reverse, save
    )
    return y, h_n, c_n


_CELL_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_cell_applies(x: Tensor, tensors, backend: str) -> bool:
    """Whether one step can run as ``lstm_fused::cell_forward``: both products in one CPU kernel
    pass, nothing saved, so only where autograd has nothing to record."""
    if x.device.type != "cpu" or x.dtype not in _CELL_OP_DTYPES:
        return False
    if _autograd_records(tensors):
        return False
    return dispatch.resolve(backend, x.device, x.dtype) == "cpu"


# An LSTMCell training step of at most this many multiply-adds (B * 4H * (I + H)) runs ATen's
# cell, nn.LSTMCell's own code, when the backend is left to choose. There the fused path's fixed
# costs decide: its two ops each pass through a Python autograd wrapper (a C++ node for ATen's),
# and a step of T = 1 amortizes no packing of the weights. Measured on a 2-core Zen 5 EPYC
# (float32, 10 steps unrolled then an SGD step, fused over nn.LSTMCell, lean autograd kernels):
# 0.75-0.98x up to 1M multiply-adds (B = 1 at H <= 256, B = 4 at H <= 128, B = 16 and 32 at
# H = 64), 1.05-1.75x from 2.1M (B = 16 and 32 at H = 128, B = 4 to 32 at H = 256).
_ATEN_CELL_MAX_MACS = 1 << 20

# A larger step runs ATen's cell too while its weights change before every step (an optimizer
# step after each one, or fast weights made anew for each), up to these sizes: the fused cell then
# packs both weights again for every step, for its forward and for its backward, which costs more
# than the step saves. Measured on a 2-core Zen 5 EPYC (float32, I = H, one step then an SGD step,
# over nn.LSTMCell): the fused cell 0.63-0.85x at B = 1..32, H = 256 and 512 (but 1.01x at B = 32,
# H = 256), ATen's 0.88-1.33x; at B = 64 both 1.09-1.19x. Larger weights stay fused: ATen's
# weight gradients are new memory every step, and at H = 1024 (16 MB each) their page faults
# made nn.LSTMCell 12-27 ms a step against the fused cell's 14-19 (its gradients are pooled).
_ATEN_CELL_FRESH_WEIGHTS_MAX_BATCH = 32
_ATEN_CELL_FRESH_WEIGHTS_MAX_ELEMENTS = 1 << 21  # 4H * (I + H): I = H = 512


class WeightUpdates:
    """Counts an LSTMCell's consecutive training steps that found its weights changed since the
    step before (their in-place version counters, or other tensors)."""

    __slots__ = ("_last", "_streak")

    def __init__(self):
        self._last, self._streak = None, 0

    def __reduce__(self):  # a copy or an unpickled cell starts a record of its own
        return (WeightUpdates, ())

    def every_step(self, w_ih: Tensor, w_hh: Tensor) -> bool:
        """Record this step's weights; whether they changed before this step and the one before."""
        seen = (id(w_ih), id(w_hh), w_ih._version, w_hh._version)
        self._streak = self._streak + 1 if seen != self._last else 0
        self._last = seen
        return self._streak >= 2


def aten_cell_preferred(x: Tensor, hx, weights, backend: str, updates: WeightUpdates) -> bool:
    """Whether an LSTMCell step runs ATen's cell instead (see _ATEN_CELL_MAX_MACS): a float32 CPU
    step autograd records, small enough or with weights that change before every step (updates,
    the module's record), with the backend left to choose. Asked before the module's own checks
    (nn.LSTMCell's forward makes them then), so x is any input: (B, I) or (I,), hx None or the
    given state, weights (w_ih, w_hh, b_ih, b_hh)."""
    # Cheapest tests first: this runs before every LSTMCell step.
    if backend != "auto" or not torch.is_grad_enabled() or x.dtype != torch.float32:
        return False
    dims = x.dim()
    if dims not in (1, 2) or x.device.type != "cpu":
        return False
    if not _autograd_records((x, *weights) if hx is None else (x, *hx, *weights)):
        return False
    for w in weights:
        if w is not None and (w.dtype != torch.float32 or w.device.type != "cpu"):
            return False  # the module's own checks say what is wrong
    w_ih, w_hh = weights[0], weights[1]
    batch = x.size(0) if dims == 2 else 1
    if batch * w_hh.size(0) * (w_ih.size(1) + w_hh.size(1)) > _ATEN_CELL_MAX_MACS:
        if (batch > _ATEN_CELL_FRESH_WEIGHTS_MAX_BATCH
                or w_ih.numel() + w_hh.numel() > _ATEN_CELL_FRESH_WEIGHTS_MAX_ELEMENTS
                or not updates.every_step(w_ih, w_hh)):
            return False
    # With the choice left to us, float32 CPU tensors resolve to the cpu backend exactly when the
    # extension is built (dispatch.resolve, without its per-call work).
    return dispatch.left_to_choose(backend) and ops.extension_loaded()


def cell_step(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """(h, c) of one step, x (B, I), h0/c0 (B, H), through ``lstm_fused::cell_forward``."""
    return torch.ops.lstm_fused.cell_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)


def bidirectional_op_applies(x: Tensor, proj_size: int, backend: str) -> bool:
    """Whether a bidirectional layer's two recurrences run as one
    ``lstm_fused::bidirectional_forward`` (the CPU backend, no projection): the op runs them side
    by side where that pays (csrc/cpu/panel_recurrence.cpp) and writes the layer's output in place."""
    if proj_size > 0 or x.device.type != "cpu" or x.dtype not in _CELL_OP_DTYPES:
        return False
    if not hasattr(torch.ops.lstm_fused, "bidirectional_forward"):
        return False
    return dispatch.resolve(backend, x.device, x.dtype) == "cpu"


def bidirectional_recurrence(xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0, lengths=None):
    """Both directions of a layer: y (T, B, 2H), h_n and c_n (2, B, H); h0/c0 (2, B, H)."""
    save = _autograd_records((xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0))
    y, h_n, c_n, _gates, _c_all = torch.ops.lstm_fused.bidirectional_forward(
        xproj_f.contiguous(), xproj_r.contiguous(), w_hh_f, w_hh_r, h0.contiguous(), c0.contiguous(),
        lengths, save,
    )
    return y, h_n, c_n


def _bidirectional_layer(layer_input, w_f, w_r, has_biases, h0, c0, lengths, backend):
    """A bidirectional layer without projection: each direction's input projection, then both
    recurrences in one op. w_f / w_r: a direction's w_ih, w_hh[, b_ih, b_hh]."""
    xproj = []
    for w in (w_f, w_r):
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        xproj.append(input_projection(layer_input, w[0], b_ih, b_hh, backend))
    return bidirectional_recurrence(xproj[0], xproj[1], w_f[1], w_r[1], h0, c0, lengths)


def stacked_cell_step(x, h0, c0, weights, num_layers, bidirectional, has_biases):
    """(y (B, D*H), h_n, c_n) of one time step of a stack, x (B, I), h0/c0 (L*D, B, H), through
    ``lstm_fused::stacked_cell_forward``."""
    return torch.ops.lstm_fused.stacked_cell_forward(
        x, h0, c0, list(weights), num_layers, bidirectional, has_biases
    )


# Rows of one chunk's input projection in the wavefront (csrc/cpu/wavefront.cpp, kChunkRows).
_WAVEFRONT_CHUNK_ROWS = 96
# One thread per layer beats splitting each step over the threads only for a small step whose
# W_hh one core can stream fast. Measured on a 2-core Zen 3 (T = 512, 6 layers; 200, 2 layers):
# B = 3, H = 128 (0.2M multiply-adds a step, 256 KB of W_hh): 32 -> 23 ms; B = 4, H = 256 (1M,
# 1 MB): 137 -> 114 ms; but B = 10, H = 256 (2.6M): 267 -> 278 ms, and B = 1, H = 512 (1M,
# 4 MB, streamed from L3 by one core instead of two): 21 -> 31 ms.
_WAVEFRONT_MAX_STEP_MACS = 1 << 20
_WAVEFRONT_MAX_W_HH_BYTES = 1 << 20


def wavefront_applies(x: Tensor, h0: Tensor, c0: Tensor, weights, num_layers: int, backend: str) -> bool:
    """Whether a stack of unidirectional float32 layers (no projection, lengths or dropout: the
    caller checks those) runs as ``lstm_fused::wavefront_forward``: inference on the CPU backend,
    two threads or more, a small step and two chunks or more. Its input projections are always
    our tile product (they run inside the wavefront's items), whatever ``ops.OWN_GEMM`` says."""
    if num_layers < 2 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    # Dynamo cannot trace torch.get_num_threads(); compiled graphs keep the layer-by-layer ops.
    if torch.compiler.is_compiling() or not hasattr(torch.ops.lstm_fused, "wavefront_forward"):
        return False
    if torch.get_num_threads() < 2:
        return False
    T, B, H = x.size(0), x.size(1), c0.size(-1)
    chunk = max(1, _WAVEFRONT_CHUNK_ROWS // max(1, B))
    if T < 2 * chunk or B * 4 * H * H > _WAVEFRONT_MAX_STEP_MACS or 16 * H * H > _WAVEFRONT_MAX_W_HH_BYTES:
        return False
    if _autograd_records((x, h0, c0, *weights)):
        return False
    return dispatch.resolve(backend, x.device, x.dtype) == "cpu"


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    # nn.LSTM is on autocast's lower-precision list for CPU and CUDA: under autocast it computes
    # in the autocast dtype whatever the dtype of its input and weights.
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def lstm(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[Optional[Tensor]],
    *,
    num_layers: int,
    bidirectional: bool,
    has_biases: bool,
    proj_size: int,
    dropout: float,
    training: bool,
    lengths: Optional[Tensor] = None,
    backend: str = "auto",
):
    """Time-major multi-layer LSTM.

    ``x`` (T, B, I); ``h0`` (L*D, B, P); ``c0`` (L*D, B, H); ``weights`` in nn.LSTM's
    ``_flat_weights`` order: per layer, per direction, w_ih, w_hh, [b_ih, b_hh], [w_hr].
    ``lengths`` (B,) int64 on x's device, or None. Returns (y (T, B, D*P), h_n, c_n).
    """
    num_dirs = 2 if bidirectional else 1
    per_dir = 2 + (2 if has_biases else 0) + (1 if proj_size > 0 else 0)
    cast = _autocast_dtype(x.device)
    if cast is not None:
        x, h0, c0 = x.to(cast), h0.to(cast), c0.to(cast)
        weights = [w.to(cast) for w in weights]

    # torch.onnx.export(dynamo=True) gets ONNX LSTM nodes instead of our op (onnx_export.py).
    onnx_exporting = onnx_export.in_onnx_export()
    dropout_between_layers = dropout > 0 and training and num_layers > 1
    if (
        x.size(0) == 1 and proj_size == 0 and lengths is None and not onnx_exporting
        and not dropout_between_layers and fused_cell_applies(x, (x, h0, c0, *weights), backend)
    ):
        # One streaming step without autograd: cell steps for the whole stack in one op call
        # (no separate input GEMM, no Python per layer).
        y, h_n, c_n = stacked_cell_step(x[0], h0, c0, weights, num_layers, num_dirs == 2, has_biases)
        return y.unsqueeze(0), h_n, c_n
    if (
        num_dirs == 1 and proj_size == 0 and lengths is None and not onnx_exporting
        and not dropout_between_layers and wavefront_applies(x, h0, c0, weights, num_layers, backend)
    ):
        return torch.ops.lstm_fused.wavefront_forward(x, h0, c0, list(weights), num_layers, has_biases)
    h0_k, c0_k = h0.unbind(0), c0.unbind(0)  # one call each instead of an index per direction
    h_n, c_n = [], []
    layer_input = x
    both_directions = (
        num_dirs == 2 and not onnx_exporting and bidirectional_op_applies(x, proj_size, backend)
    )
    for layer in range(num_layers):
        if both_directions:
            k = 2 * layer
            w_f, w_r = weights[k * per_dir : (k + 1) * per_dir], weights[(k + 1) * per_dir : (k + 2) * per_dir]
            layer_input, h, c = _bidirectional_layer(
                layer_input, w_f, w_r, has_biases, h0.narrow(0, k, 2), c0.narrow(0, k, 2), lengths, backend
            )
            h_n.extend(h.unbind(0))
            c_n.extend(c.unbind(0))
        else:
            outputs = []
            for direction in range(num_dirs):
                k = layer * num_dirs + direction
                w = weights[k * per_dir : (k + 1) * per_dir]
                w_ih, w_hh = w[0], w[1]
                b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
                w_hr = w[-1] if proj_size > 0 else None
                if onnx_exporting:
                    y, h, c = onnx_export.lstm_direction(
                        layer_input, w_ih, w_hh, b_ih, b_hh, w_hr, h0_k[k], c0_k[k], lengths, direction == 1
                    )
                else:
                    xproj = input_projection(layer_input, w_ih, b_ih, b_hh, backend)
                    y, h, c = recurrence(
                        xproj, w_hh, w_hr, h0_k[k], c0_k[k], lengths, reverse=direction == 1, backend=backend
                    )
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_dirs == 1 else torch.cat(outputs, dim=2)
        if dropout_between_layers and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, torch.stack(h_n), torch.stack(c_n)
