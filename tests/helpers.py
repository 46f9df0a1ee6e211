"""Shared test helpers: seeded fresh inputs, float64 oracles, relative errors."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused


def cpu_backends():
    """Backends that run on CPU tensors here (triton has its own test file)."""
    return [b for b in ("cpu", "reference") if b in lstm_fused.available_backends()]


# The CPU step kernels' instruction-set variants (LSTM_FUSED_CPU_ISA), narrowest first.
CPU_ISA_VARIANTS = ("generic", "avx2", "avx512", "avx512bf16")


def supported_cpu_variants():
    """The variants this machine runs; none when the C++ extension is not built."""
    if "cpu" not in lstm_fused.available_backends():
        return []
    return [v for v in CPU_ISA_VARIANTS if torch.ops.lstm_fused.cpu_isa_supported(v)]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; NaN anywhere gives inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def draw_op_inputs(T, B, H, P, lengths, device):
    """Fresh float64 inputs of a recurrence op (weights scaled ~1/sqrt(fan-in)), its lengths
    tensor (or None) and cotangents for (y, h_n, c_n). P=None: no projection."""
    P_ = P or H
    f64 = dict(dtype=torch.float64, device=device)
    xproj = torch.randn(T, B, 4 * H, **f64)
    w_hh = torch.randn(4 * H, P_, **f64) / P_**0.5
    w_hr = torch.randn(P_, H, **f64) / H**0.5 if P else None
    h0, c0 = torch.randn(B, P_, **f64), torch.randn(B, H, **f64)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.long, device=device)
    cot = (torch.randn(T, B, P_, **f64), torch.randn(B, P_, **f64), torch.randn(B, H, **f64))
    return (xproj, w_hh, w_hr, h0, c0), lens, cot


def make_pair(dtype, backend, **config):
    """A float64 nn.LSTM oracle and an lstm_fused.LSTM in ``dtype`` with the same weights."""
    oracle = nn.LSTM(**config).double()
    with torch.no_grad():  # default init is small; widen it so the gates are not all ~linear
        for p in oracle.parameters():
            p.uniform_(-0.5, 0.5)
    fused = lstm_fused.LSTM(**config, backend=backend, dtype=torch.float64)
    fused.load_state_dict(oracle.state_dict())  # exact, then rounded once by .to(dtype)
    return oracle, fused.to(dtype)


def forward_backward(module, dtype, x, hx, cot, lengths=None):
    """Forward (packed when ``lengths`` is given) and backward of <(y, h_n, c_n), cot>, the inputs,
    state and cotangents cast to ``dtype``: returns [y, h_n, c_n, dx, dh0, dc0] + every
    parameter's gradient, in ``dtype``."""
    xi = x.detach().to(dtype).clone().requires_grad_()
    hi = tuple(t.detach().to(dtype).clone().requires_grad_() for t in hx)
    module.zero_grad(set_to_none=True)
    if lengths is not None:
        out, (h_n, c_n) = module(pack_padded_sequence(xi, lengths, enforce_sorted=False), hi)
        y = pad_packed_sequence(out, total_length=x.shape[0])[0]
    else:
        y, (h_n, c_n) = module(xi, hi)
    gy, gh, gc = cot
    loss = (y * gy.to(dtype)).sum() + (h_n * gh.to(dtype)).sum() + (c_n * gc.to(dtype)).sum()
    loss.backward()
    grads = [xi.grad, hi[0].grad, hi[1].grad] + [p.grad for p in module.parameters()]
    return [y, h_n, c_n] + grads


def run_and_grad(module, x, hx, cotangents):
    """Forward, then backward of sum(<out, cotangent>) over y, h_n, c_n.

    Returns (y, h_n, c_n, {name: grad}) with grads for the input, h0, c0 and every parameter.
    """
    x = x.detach().clone().requires_grad_()
    hx = tuple(t.detach().clone().requires_grad_() for t in hx)
    module.zero_grad(set_to_none=True)
    y, (h_n, c_n) = module(x, hx)
    gy, gh, gc = cotangents
    loss = (y * gy.to(y.dtype)).sum() + (h_n * gh.to(y.dtype)).sum() + (c_n * gc.to(y.dtype)).sum()
    loss.backward()
    grads = {"input": x.grad, "h0": hx[0].grad, "c0": hx[1].grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return y, h_n, c_n, grads


def clone_module(module, dtype):
    return copy.deepcopy(module).to(dtype)


def op_calls(key, fn):
    """How often fn() called the op ``key`` (e.g. "lstm_fused::recurrence_forward",
    "aten::lstm_cell"), counted by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == key)
