"""Op registrations: the recurrence ops of every backend, their fake (meta) kernels and autograd.

Every backend exposes the same pair of ops (schemas below, semantics in ``reference.py``):

    <prefix>forward(Tensor xproj, Tensor w_hh, Tensor? w_hr, Tensor h0, Tensor c0,
                    Tensor? lengths, bool reverse, bool save)
        -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor c_all)
    <prefix>backward(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor w_hh, Tensor? w_hr, Tensor h0,
                     Tensor c0, Tensor? lengths, bool reverse, Tensor y, Tensor gates,
                     Tensor c_all, bool weight_grads)
        -> (Tensor dxproj, Tensor dw_hh, Tensor dw_hr, Tensor dh0, Tensor dc0)

* ``lstm_fused::recurrence_*``: schema in C++ (csrc/ops.cpp); CPU kernels in csrc/cpu, CUDA
  kernels in csrc/cuda. Present when the extension ``lstm_fused._C`` is built.
* ``lstm_fused::reference_*``: the PyTorch oracle, a Python custom op on any device.
* ``lstm_fused::triton_*``: the Triton kernels (lstm_fused/triton).

Autograd is attached to each forward op as its Autograd kernel, which calls the paired backward
op, so the whole thing traces under ``torch.compile(fullgraph=True)``: with
``torch.library.register_autograd``, or, for the C++ forward ops every training step calls, with
``register_lean_autograd`` (the same kernel, without torch's per-call walk of the schema).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference

LIB = "lstm_fused"

try:  # registers lstm_fused::recurrence_forward / _backward and their CPU (and CUDA) kernels
    from . import _C  # noqa: F401

    EXTENSION_ERROR: Optional[str] = None
except ImportError as exc:  # a source checkout without a build; the reference still works
    EXTENSION_ERROR = f"the C++ extension lstm_fused._C could not be loaded ({exc})"


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


def extension_has_cuda() -> bool:
    return extension_loaded() and bool(torch.ops.lstm_fused.has_cuda_kernels())


# --------------------------------------------------------------------------------------------
# The reference backend as ops, so every backend goes through the same path.


@torch.library.custom_op(f"{LIB}::reference_forward", mutates_args=())
def reference_forward(
    xproj: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return reference.recurrence_forward_ref(xproj, w_hh, w_hr, h0, c0, lengths, reverse, save)


@torch.library.custom_op(f"{LIB}::reference_backward", mutates_args=())
def reference_backward(
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
    dxproj, dw_hh, dw_hr, dh0, dc0 = reference.recurrence_backward_ref(
        dy, dh_n, dc_n, w_hh, w_hr, h0, c0, lengths, reverse, y, gates, c_all
    )
    if not weight_grads:
        dw_hh, dw_hr = dw_hh.new_empty(0), dw_hr.new_empty(0)
    return dxproj, dw_hh, dw_hr, dh0, dc0


# --------------------------------------------------------------------------------------------
# Fake kernels: shapes only, shared by every backend.


def forward_fake(xproj, w_hh, w_hr, h0, c0, lengths, reverse, save):
    T, B, H4 = xproj.shape
    H, P = H4 // 4, w_hh.shape[1]
    acc = reference.acc_dtype(xproj.dtype)
    y = xproj.new_empty(T, B, P)
    h_n = xproj.new_empty(B, P)
    c_n = xproj.new_empty(B, H)
    if save:
        gates = xproj.new_empty(T, B, H4)
        c_all = xproj.new_empty(T, B, H, dtype=acc)
    else:
        gates = xproj.new_empty(0)
        c_all = xproj.new_empty(0, dtype=acc)
    return y, h_n, c_n, gates, c_all


# The fakes give every output contiguous, as the kernels write them: empty_like would copy the
# strides of a transposed weight or state, and strides unlike the real ones break compiled graphs.
def backward_fake(dy, dh_n, dc_n, w_hh, w_hr, h0, c0, lengths, reverse, y, gates, c_all, weight_grads):
    dxproj = gates.new_empty(gates.shape, dtype=y.dtype)
    if weight_grads:
        dw_hh = w_hh.new_empty(w_hh.shape)
        dw_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty(0)
    else:
        dw_hh, dw_hr = w_hh.new_empty(0), w_hh.new_empty(0)
    return dxproj, dw_hh, dw_hr, h0.new_empty(h0.shape), c0.new_empty(c0.shape)


# --------------------------------------------------------------------------------------------
# Autograd: forward op -> paired backward op.
#
# First order (create_graph=False, grad mode off in backward) runs the backend's fused backward
# op. With create_graph=True the first-order gradients must themselves be differentiable, which
# the fused backward ops are not; so that path recomputes the recurrence from its saved inputs
# with the reference's plain-PyTorch math and differentiates it with autograd, and every higher
# order comes out of autograd. That needs xproj at backward time, so it is saved too: T*B*4H
# more elements per layer and direction (xproj would otherwise be freed after the forward).


def _setup_context(ctx, inputs, output):
    xproj, w_hh, w_hr, h0, c0, lengths, reverse, save = inputs
    y, _h_n, _c_n, gates, c_all = output
    ctx.reverse = reverse
    ctx.saved = save
    # Gradients of unused outputs (gates, c_all: saved activations) stay None instead of zero
    # tensors as large as the activations; the backward fills in the ones it needs.
    ctx.set_materialize_grads(False)
    ctx.has_proj = w_hr is not None
    ctx.save_for_backward(xproj, w_hh, w_hr, h0, c0, lengths, y, gates, c_all)


_UNSAVED_FORWARD = (
    "lstm_fused: backward through a recurrence that was run with save=False "
    "(the forward saw no tensor requiring grad, or grad mode was off)"
)


def _reference_grads(needs_input_grad, inputs, forward, cotangents):
    """First-order gradients as a graph (for create_graph=True): autograd through ``forward()``,
    the reference's outputs (y, h_n, c_n) from ``inputs``, against ``cotangents``. One entry per
    autograd input (None where not needed; ``inputs`` are the first ones)."""
    wanted = [i for i, t in enumerate(inputs) if needs_input_grad[i] and t is not None]
    grads = [None] * len(needs_input_grad)
    if not wanted:
        return grads
    with torch.enable_grad():
        found = torch.autograd.grad(
            forward(), [inputs[i] for i in wanted], cotangents, create_graph=True, allow_unused=True
        )
    for i, g in zip(wanted, found):
        # An input the outputs do not depend on gets an explicit zero, as the fused op returns.
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads


def _dense_cotangents(dy, dh_n, dc_n, y, h0, c0):
    """(dy, dh_n, dc_n) contiguous, zeros for outputs that got no gradient."""
    dense = lambda g, like: torch.zeros_like(like) if g is None else g.contiguous()
    return dense(dy, y), dense(dh_n, h0), dense(dc_n, c0)


def _needs_graph(tensors) -> bool:
    """Grad mode is on in a backward only under create_graph=True; the fused ops' results would
    carry no graph, so a second backward through them would silently be zero."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _make_backward(backward_op):
    def backward(ctx, dy, dh_n, dc_n, _dgates, _dc_all):
        if not ctx.saved:
            raise RuntimeError(_UNSAVED_FORWARD)
        xproj, w_hh, w_hr, h0, c0, lengths, y, gates, c_all = ctx.saved_tensors
        dy, dh_n, dc_n = _dense_cotangents(dy, dh_n, dc_n, y, h0, c0)
        need = ctx.needs_input_grad
        inputs = (xproj, w_hh, w_hr, h0, c0)
        if _needs_graph((*inputs, dy, dh_n, dc_n)):
            forward = lambda: reference.recurrence_forward_ref(*inputs, lengths, ctx.reverse, False)[:3]
            return tuple(_reference_grads(need, inputs, forward, (dy, dh_n, dc_n)))
        weight_grads = bool(need[1] or need[2])
        dxproj, dw_hh, dw_hr, dh0, dc0 = backward_op(
            dy, dh_n, dc_n, w_hh, w_hr, h0, c0, lengths, ctx.reverse, y, gates, c_all, weight_grads
        )
        return (
            dxproj if need[0] else None,
            dw_hh if need[1] else None,
            dw_hr if (need[2] and ctx.has_proj) else None,
            dh0 if need[3] else None,
            dc0 if need[4] else None,
            None,
            None,
            None,
        )

    return backward


def _backward_op_is_not_differentiable(backward_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"lstm_fused: {backward_name} has no derivative; differentiate the forward op "
            "instead (its backward with create_graph=True builds a differentiable graph)"
        )

    return backward


_AUTOGRAD_LIB = torch.library.Library(LIB, "IMPL")


def register_lean_autograd(qualname: str, backward, setup_context) -> None:
    """``torch.library.register_autograd(qualname, backward, setup_context=...)`` for a forward op
    defined in C++ and called in every training step: the same Autograd kernel (the op run below
    autograd inside an autograd.Function, ``setup_context`` given the full arguments), without
    its per-call cost. torch's kernel puts back the arguments the dispatcher dropped for being at
    their defaults by walking the op's schema on every call (21 us a call on the Zen 5 EPYC: the
    forward with grad of a one-layer T=4 B=2 H=32 LSTM, two such calls, took 124-140 us through
    torch's kernel and 60-77 us through this one). For ops without keyword-only or list arguments."""
    op = torch._library.utils.lookup_op(qualname)
    arguments = op._schema.arguments
    if any(a.kwarg_only or isinstance(a.type, torch._C.ListType) for a in arguments):
        raise ValueError(f"register_lean_autograd: {qualname} has keyword-only or list arguments")
    defaults = tuple(a.default_value for a in arguments)
    below_autograd = torch._C._after_autograd_keyset

    def run_below_autograd(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    # Node.apply(*args, keyset): the op's arguments, then the dispatch keys it was called with.
    def forward(ctx, *args):
        args, keyset = args[:-1], args[-1]
        output = run_below_autograd(keyset, args)
        setup_context(ctx, args + defaults[len(args):], output)
        return output

    def backward_of_args(ctx, *grads):
        wanted = ctx.needs_input_grad
        ctx.needs_input_grad = wanted[:-1]  # the op's arguments only, as backward expects
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = wanted
        return (*result, None)

    # Named after the op, so grad_fn and profiles say which (e.g. lstm_fused_recurrence_forwardBackward).
    Node = type(qualname.replace("::", "_"), (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_of_args)})

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Node.apply(*args, keyset)
        return run_below_autograd(keyset, args)

    _AUTOGRAD_LIB.impl(qualname.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)


def register_backend_ops(forward_name: str, backward_name: str, lean: bool = False) -> None:
    """Attach the shared fake kernels and autograd to a backend's op pair (``lean``: a C++ op's
    autograd through register_lean_autograd)."""
    torch.library.register_fake(forward_name)(forward_fake)
    torch.library.register_fake(backward_name)(backward_fake)
    backward_op = getattr(torch.ops.lstm_fused, backward_name.split("::")[1]).default
    register = register_lean_autograd if lean else torch.library.register_autograd
    register(forward_name, _make_backward(backward_op), setup_context=_setup_context)
    # An explicit autograd kernel for the backward op: calling it on tensors that require grad
    # then raises on differentiation instead of PyTorch's "no autograd kernel" warning and
    # silently zero gradients.
    torch.library.register_autograd(backward_name, _backward_op_is_not_differentiable(backward_name))


register_backend_ops(f"{LIB}::reference_forward", f"{LIB}::reference_backward")
if extension_loaded():
    register_backend_ops(f"{LIB}::recurrence_forward", f"{LIB}::recurrence_backward", lean=True)

    @torch.library.register_fake(f"{LIB}::cell_forward")
    def _cell_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return h0.new_empty(h0.shape), c0.new_empty(c0.shape)

    @torch.library.register_fake(f"{LIB}::wavefront_forward")
    def _wavefront_forward_fake(x, h0, c0, weights, num_layers, has_biases):
        return x.new_empty(x.size(0), x.size(1), h0.size(2)), h0.new_empty(h0.shape), c0.new_empty(c0.shape)

    @torch.library.register_fake(f"{LIB}::stacked_cell_forward")
    def _stacked_cell_forward_fake(x, h0, c0, weights, num_layers, bidirectional, has_biases):
        y = x.new_empty(x.size(0), (2 if bidirectional else 1) * h0.size(2))
        return y, h0.new_empty(h0.shape), c0.new_empty(c0.shape)


# --------------------------------------------------------------------------------------------
# Both directions of a bidirectional CPU layer in one op pair (csrc/cpu/bidirectional.cpp), so
# that the two recurrences can run side by side; y is the layer's (T, B, 2H) output itself. The
# autograd mirrors the one-direction ops above: the fused backward op at first order, autograd
# of the reference (each direction, as the layer combines them) under create_graph=True.


def _bidirectional_forward_fake(xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0, lengths, save):
    T, B, H4 = xproj_f.shape
    H = H4 // 4
    acc = reference.acc_dtype(xproj_f.dtype)
    y = xproj_f.new_empty(T, B, 2 * H)
    h_n, c_n = xproj_f.new_empty(2, B, H), xproj_f.new_empty(2, B, H)
    if save:
        gates, c_all = xproj_f.new_empty(2, T, B, H4), xproj_f.new_empty(2, T, B, H, dtype=acc)
    else:
        gates, c_all = xproj_f.new_empty(0), xproj_f.new_empty(0, dtype=acc)
    return y, h_n, c_n, gates, c_all


def _bidirectional_backward_fake(
    dy, dh_n, dc_n, w_hh_f, w_hh_r, h0, c0, lengths, y, gates, c_all, weight_grads
):
    dxproj_f, dxproj_r = gates.new_empty(gates.shape[1:]), gates.new_empty(gates.shape[1:])
    if weight_grads:
        dw_f, dw_r = w_hh_f.new_empty(w_hh_f.shape), w_hh_r.new_empty(w_hh_r.shape)
    else:
        dw_f, dw_r = w_hh_f.new_empty(0), w_hh_r.new_empty(0)
    return dxproj_f, dxproj_r, dw_f, dw_r, h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _bidirectional_setup_context(ctx, inputs, output):
    xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0, lengths, save = inputs
    y, _h_n, _c_n, gates, c_all = output
    ctx.saved = save
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0, lengths, y, gates, c_all)


def _bidirectional_reference(xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0, lengths):
    """The pair's (y, h_n, c_n) by the reference, each direction as the layer combines them."""
    outs = [
        reference.recurrence_forward_ref(xproj, w_hh, None, h0[d], c0[d], lengths, d == 1, False)
        for d, (xproj, w_hh) in enumerate(((xproj_f, w_hh_f), (xproj_r, w_hh_r)))
    ]
    y = torch.cat([outs[0][0], outs[1][0]], dim=2)
    return y, torch.stack([outs[0][1], outs[1][1]]), torch.stack([outs[0][2], outs[1][2]])


def _bidirectional_backward(ctx, dy, dh_n, dc_n, _dgates, _dc_all):
    if not ctx.saved:
        raise RuntimeError(_UNSAVED_FORWARD)
    xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0, lengths, y, gates, c_all = ctx.saved_tensors
    dy, dh_n, dc_n = _dense_cotangents(dy, dh_n, dc_n, y, h0, c0)
    need = ctx.needs_input_grad
    inputs = (xproj_f, xproj_r, w_hh_f, w_hh_r, h0, c0)
    if _needs_graph((*inputs, dy, dh_n, dc_n)):
        forward = lambda: _bidirectional_reference(*inputs, lengths)
        return tuple(_reference_grads(need, inputs, forward, (dy, dh_n, dc_n)))
    grads = torch.ops.lstm_fused.bidirectional_backward(
        dy, dh_n, dc_n, w_hh_f, w_hh_r, h0, c0, lengths, y, gates, c_all, bool(need[2] or need[3])
    )
    return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None)


if extension_loaded():
    torch.library.register_fake(f"{LIB}::bidirectional_forward")(_bidirectional_forward_fake)
    torch.library.register_fake(f"{LIB}::bidirectional_backward")(_bidirectional_backward_fake)
    register_lean_autograd(
        f"{LIB}::bidirectional_forward", _bidirectional_backward, setup_context=_bidirectional_setup_context
    )
    torch.library.register_autograd(
        f"{LIB}::bidirectional_backward", _backward_op_is_not_differentiable(f"{LIB}::bidirectional_backward")
    )


# --------------------------------------------------------------------------------------------
# The CPU input projection (csrc/cpu/panel_products.cpp): x @ w_ih^T + b_ih + b_hh on the step
# kernels' tile product, or on ATen's GEMM into a pooled output (own_product=False). First-order
# gradients of the tile product through the paired op (dx on the same tile product), of ATen's
# as F.linear's are; under create_graph=True the gradients are plain PyTorch (two GEMMs and a
# sum), so gradients of every order come out of autograd.


# The dtypes our own products run in.
OWN_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _own_gemm_defaults() -> dict:
    """The extension's choice per dtype (csrc/cpu/isa.h, own_gemm_by_default: float32 on
    non-Intel x86 CPUs, 16-bit on CPUs without dot-product instructions for it; or
    LSTM_FUSED_CPU_GEMM)."""
    if not extension_loaded():
        return {dtype: False for dtype in OWN_GEMM_DTYPES}
    return {dtype: bool(torch.ops.lstm_fused.cpu_own_gemm_default(dtype)) for dtype in OWN_GEMM_DTYPES}


# Per dtype, whether CPU layers use our own T*B-row products (the input projection and its input
# gradient) instead of ATen's GEMM. Read it; change it with set_own_gemm.
OWN_GEMM = _own_gemm_defaults()
OWN_GEMM_DEFAULT = dict(OWN_GEMM)  # as the process started (set_own_gemm changes OWN_GEMM only)


def set_own_gemm(own: bool, dtype: Optional[torch.dtype] = None) -> None:
    """Use our own products (True) or ATen's GEMM (False) for CPU layers in ``dtype`` (None: every
    dtype in OWN_GEMM_DTYPES), process-wide. Without the extension there are none to use. The
    weight gradients computed in float32 inside the ops (16-bit layers' too where their operands
    are widened) follow the float32 choice."""
    if not extension_loaded():
        return
    if dtype is not None and dtype not in OWN_GEMM:
        raise ValueError(f"our own products run {OWN_GEMM_DTYPES}, not {dtype}")
    for d in OWN_GEMM if dtype is None else (dtype,):
        OWN_GEMM[d] = bool(own)
        torch.ops.lstm_fused.cpu_set_own_gemm(d, bool(own))


def _projection_setup_context(ctx, inputs, output):
    x, w_ih, b_ih, _b_hh, own_product = inputs
    ctx.has_bias = b_ih is not None
    ctx.own_product = own_product
    ctx.save_for_backward(x, w_ih)


def _projection_backward(ctx, grad):
    x, w_ih = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_db = ctx.has_bias and (need[2] or need[3])
    # create_graph=True: a graph autograd can differentiate again. ATen's product: its gradients
    # are ATen's too, as F.linear's would be.
    if torch.is_grad_enabled() or not ctx.own_product:
        rows = grad.reshape(-1, grad.size(-1))
        db = rows.sum(0) if want_db else None
        dx = grad @ w_ih if need[0] else None
        dw = rows.t() @ x.reshape(-1, x.size(-1)) if need[1] else None
    else:
        # db summed in the same pass over grad as dW_ih (csrc/cpu/weight_grads.cpp).
        dx, dw, db = torch.ops.lstm_fused.input_projection_backward(grad, x, w_ih, need[0], need[1], want_db)
        dx, dw, db = (dx if need[0] else None), (dw if need[1] else None), (db if want_db else None)
    return dx, dw, db if need[2] else None, db if need[3] else None, None


if extension_loaded():

    @torch.library.register_fake(f"{LIB}::input_projection")
    def _input_projection_fake(x, w_ih, b_ih, b_hh, own_product=True):
        return x.new_empty(*x.shape[:-1], w_ih.size(0))

    @torch.library.register_fake(f"{LIB}::weight_grad")
    def _weight_grad_fake(g, x):
        return g.new_empty(g.size(1), x.size(1))

    @torch.library.register_fake(f"{LIB}::input_projection_backward")
    def _input_projection_backward_fake(grad, x, w_ih, input_grad, weight_grad, bias_grad=False):
        # Contiguous, in grad's shape, as the kernel writes them (not empty_like(x): x may be a
        # transposed view, and strides that differ from the real ones break a compiled backward).
        dx = w_ih.new_empty(*grad.shape[:-1], w_ih.size(1)) if input_grad else x.new_empty(0)
        dw = w_ih.new_empty(w_ih.shape) if weight_grad else w_ih.new_empty(0)
        db = w_ih.new_empty(w_ih.size(0)) if bias_grad else w_ih.new_empty(0)
        return dx, dw, db

    register_lean_autograd(f"{LIB}::input_projection", _projection_backward, setup_context=_projection_setup_context)
    torch.library.register_autograd(
        f"{LIB}::input_projection_backward",
        _backward_op_is_not_differentiable(f"{LIB}::input_projection_backward"),
    )
