"""The recurrence ops themselves: opcheck, gradcheck, the reference's hand-written backward,
and the CPU kernel's ATen-GEMM fallback."""

import os
import subprocess
import sys

import pytest
import torch

from lstm_fused import reference
from helpers import cpu_backends

OPS = {"cpu": "recurrence", "reference": "reference"}


def _op(backend, which):
    return getattr(torch.ops.lstm_fused, f"{OPS[backend]}_{which}")


def _args(T, B, H, P, proj, lengths, dtype=torch.float64, reverse=False, requires_grad=True):
    xproj = torch.randn(T, B, 4 * H, dtype=dtype)
    w_hh = torch.randn(4 * H, P, dtype=dtype) / P**0.5
    w_hr = torch.randn(P, H, dtype=dtype) / H**0.5 if proj else None
    h0 = torch.randn(B, P, dtype=dtype)
    c0 = torch.randn(B, H, dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.long) if lengths is not None else None
    tensors = [xproj, w_hh, w_hr, h0, c0]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_()
    return (*tensors, lens, reverse)


CASES = [
    ("plain", dict(T=4, B=3, H=5, P=5, proj=False, lengths=None)),
    ("proj", dict(T=3, B=2, H=6, P=4, proj=True, lengths=None)),
    ("lengths", dict(T=5, B=3, H=4, P=4, proj=False, lengths=[5, 2, 3])),
    ("lengths_proj", dict(T=4, B=3, H=5, P=3, proj=True, lengths=[1, 4, 2])),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd_dir", "rev_dir"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradcheck(backend, reverse, case):
    args = _args(**case[1], reverse=reverse)
    fwd = _op(backend, "forward")

    def f(xproj, w_hh, w_hr, h0, c0):
        y, h, c, _, _ = fwd(xproj, w_hh, w_hr, h0, c0, args[5], reverse, True)
        return y, h, c

    inputs = tuple(t for t in args[:5] if t is not None)
    if args[2] is None:
        f_no_proj = lambda xproj, w_hh, h0, c0: f(xproj, w_hh, None, h0, c0)
        assert torch.autograd.gradcheck(f_no_proj, inputs)
    else:
        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_opcheck(backend, case):
    fwd = _op(backend, "forward")
    args = _args(**case[1], dtype=torch.float32)
    torch.library.opcheck(fwd, (*args, True))
    torch.library.opcheck(fwd, (*_args(**case[1], dtype=torch.float32, requires_grad=False), False))
    y, h, c, gates, c_all = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args], True)
    xproj, w_hh, w_hr, h0, c0, lens, reverse = args
    bwd_args = (torch.randn_like(y), torch.randn_like(h), torch.randn_like(c), w_hh.detach(),
                None if w_hr is None else w_hr.detach(), h0.detach(), c0.detach(), lens, reverse,
                y, gates, c_all, True)
    torch.library.opcheck(_op(backend, "backward"), bwd_args)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd_dir", "rev_dir"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_backward_matches_autograd(reverse, case):
    """The reference's hand-written backward equals autograd through its own forward."""
    xproj, w_hh, w_hr, h0, c0, lens, _ = _args(**case[1])
    y, h_n, c_n, gates, c_all = reference.recurrence_forward_ref(xproj, w_hh, w_hr, h0, c0, lens, reverse, True)
    dy, dh, dc = torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n)
    inputs = [t for t in (xproj, w_hh, w_hr, h0, c0) if t is not None]
    auto = torch.autograd.grad((y * dy).sum() + (h_n * dh).sum() + (c_n * dc).sum(), inputs)
    manual = reference.recurrence_backward_ref(
        dy, dh, dc, w_hh.detach(), None if w_hr is None else w_hr.detach(), h0.detach(), c0.detach(),
        lens, reverse, y.detach(), gates.detach(), c_all.detach())
    manual = [m for m, t in zip(manual[:2] + manual[2:3] + manual[3:], (xproj, w_hh, w_hr, h0, c0)) if t is not None]
    for a, m in zip(auto, manual):
        torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_aten_gemm_fallback(dtype):
    """The path taken where MKL's BLAS isn't exported (forced by env): same results as the oracle."""
    code = f"""
import torch, lstm_fused
from torch import nn
torch.manual_seed(0)
ref = nn.LSTM(6, 9, num_layers=2, bidirectional=True, proj_size=4).double()
m = lstm_fused.LSTM(6, 9, num_layers=2, bidirectional=True, proj_size=4, backend="cpu", dtype=torch.float64)
m.load_state_dict(ref.state_dict()); m = m.to(torch.{dtype})
x = torch.randn(7, 3, 6, dtype=torch.float64)
y_ref, _ = ref(x)
xi = x.to(torch.{dtype}).requires_grad_()
y, _ = m(xi); y.sum().backward()
err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
assert err < (2e-5 if torch.{dtype} == torch.float32 else 2e-2), err
assert torch.isfinite(xi.grad).all()
print("ok", err)
"""
    env = dict(os.environ, LSTM_FUSED_CPU_GEMM="aten")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_cpu_thread_count_does_not_change_results(proj):
    """The unit split over threads is an implementation detail: 1 and N threads agree."""
    args = _args(T=6, B=16, H=72, P=40 if proj else 72, proj=proj, lengths=[6, 3] * 8,
                 dtype=torch.float32, requires_grad=False)
    fwd, bwd = _op("cpu", "forward"), _op("cpu", "backward")
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            y, h, c, gates, c_all = fwd(*args, True)
            g = torch.Generator().manual_seed(0)
            dy, dh, dc = (torch.randn(t.shape, generator=g) for t in (y, h, c))
            xproj, w_hh, w_hr, h0, c0, lens, reverse = args
            grads = bwd(dy, dh, dc, w_hh, w_hr, h0, c0, lens, reverse, y, gates, c_all, True)
            results.append((y, h, c) + tuple(grads))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_does_not_build_zero_gradients_for_the_saved_activations(backend):
    # gates (T, B, 4H) and c_all (T, B, H) are outputs of the forward op only so that autograd
    # keeps them; a zero "gradient" for each would cost a fill as large as the activations.
    import lstm_fused
    from torch.profiler import profile

    T, B, I, H = 7, 5, 6, 12
    m = lstm_fused.LSTM(I, H, backend=backend)
    x = torch.randn(T, B, I, requires_grad=True)
    y, _ = m(x)
    with profile(record_shapes=True) as prof:
        torch.autograd.grad(y.sum(), [x, *m.parameters()])
    filled = [e.input_shapes for e in prof.events()
              if e.name in ("aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like")]
    assert not [s for s in filled if s and list(s[0]) in ([T, B, 4 * H], [T, B, H])], filled


# The C++ forward ops' Autograd kernels (ops.register_lean_autograd): a node named after the op,
# defaults restored for setup_context (input_projection called without own_product), and no
# registration for a schema the kernel does not handle.
@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
def test_lean_autograd_kernels():
    from lstm_fused import ops

    x = torch.randn(3, 2, 8, requires_grad=True)
    w, b = torch.randn(16, 8, requires_grad=True), torch.randn(16, requires_grad=True)
    xproj = torch.ops.lstm_fused.input_projection(x, w, b, b)  # own_product left at its default
    assert type(xproj.grad_fn).__name__ == "lstm_fused_input_projectionBackward"
    got = torch.autograd.grad(xproj, [x, w, b], torch.ones_like(xproj))
    want = torch.autograd.grad(torch.nn.functional.linear(x, w, b + b), [x, w, b], torch.ones_like(xproj))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="keyword-only or list arguments"):
        ops.register_lean_autograd("lstm_fused::stacked_cell_forward", None, None)
