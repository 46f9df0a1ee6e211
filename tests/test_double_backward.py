"""Second-order gradients (create_graph=True, then differentiate the gradients again).

gradgradcheck in float64 on every backend that runs float64 here (cpu, reference), second-order
results against nn.LSTM / nn.LSTMCell in float64 (gradient penalty, Hessian-vector product), the
float32-only kernels (Triton, under its interpreter on CPU tensors here; CUDA on a GPU) against the
float64 nn.LSTM, and no "silently incorrect" autograd warning anywhere.
"""

import os
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lstm_fused  # noqa: E402
from helpers import cpu_backends, draw_op_inputs, rel_error  # noqa: E402

F64 = torch.float64
FP32_TOL = 2e-5  # the fp32 parity bound used for first-order gradients (test_parity.py)

# id: nn.LSTM config, T, B, lengths (None: a plain tensor), whether h0/c0 are given
LSTM_CASES = {
    "1layer": (dict(input_size=3, hidden_size=4), 4, 2, None, False),
    "1layer_h0c0": (dict(input_size=3, hidden_size=4), 3, 2, None, True),
    "2layers_bidir": (dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True), 3, 2, None, True),
    "proj": (dict(input_size=3, hidden_size=4, proj_size=2), 3, 2, None, True),
    "packed_unsorted": (dict(input_size=2, hidden_size=3, bidirectional=True), 4, 3, [2, 4, 1], True),
    "batch_first_packed_proj": (dict(input_size=2, hidden_size=3, proj_size=2, batch_first=True), 3, 3,
                                [3, 1, 2], True),
}  # fmt: skip


CUDA = torch.cuda.is_available()


def _kernel_backends():
    """(backend, device, dtype) for every backend that runs here; float64 where it exists."""
    available = lstm_fused.available_backends()
    found = [(b, "cpu", F64) for b in cpu_backends()]
    if "triton" in available:  # no float64 kernels; on CPU tensors under the interpreter
        found.append(("triton", "cuda" if CUDA else "cpu", torch.float32))
    if CUDA and "cuda" in available:
        found.append(("cuda", "cuda", torch.float32))
    return found


FP32_KERNEL_BACKENDS = [k for k in _kernel_backends() if k[2] == torch.float32]


@pytest.fixture(autouse=True)
def _exact_fp32_on_gpus(monkeypatch):
    # The CUDA kernels follow cuDNN's TF32 switch as nn.LSTM does; fp32 bounds need it off.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _make_lstm(backend, dtype, config, device="cpu"):
    oracle = nn.LSTM(**config, dtype=F64)
    with torch.no_grad():  # wider than the default init, so the gates are not all ~linear
        for p in oracle.parameters():
            p.uniform_(-0.6, 0.6)
    fused = lstm_fused.LSTM(**config, backend=backend, dtype=F64)
    fused.load_state_dict(oracle.state_dict())
    return oracle, fused.to(device=device, dtype=dtype)


def _lstm_inputs(config, T, B, lengths, dtype=F64):
    num_states = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    out = config.get("proj_size", 0) or config["hidden_size"]
    shape = (B, T) if config.get("batch_first") else (T, B)
    x = torch.randn(*shape, config["input_size"], dtype=dtype)
    h0 = torch.randn(num_states, B, out, dtype=dtype)
    c0 = torch.randn(num_states, B, config["hidden_size"], dtype=dtype)
    return [t.requires_grad_() for t in (x, h0, c0)]


def _lstm_fn(module, lengths, given_state):
    """(x, [h0, c0,] *params) -> (y, h_n, c_n), y as a plain tensor (the packed data if packed)."""
    names = [name for name, _ in module.named_parameters()]
    batch_first = module.batch_first

    def fn(x, *rest):
        hx, params = ((rest[0], rest[1]), rest[2:]) if given_state else (None, rest)
        inp = x
        if lengths is not None:
            inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        y, (h_n, c_n) = functional_call(module, dict(zip(names, params)), (inp, hx))
        return (y.data if lengths is not None else y), h_n, c_n

    return fn


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", LSTM_CASES, ids=list(LSTM_CASES))
def test_lstm_gradgradcheck(backend, case):
    config, T, B, lengths, given_state = LSTM_CASES[case]
    _, fused = _make_lstm(backend, F64, config)
    x, h0, c0 = _lstm_inputs(config, T, B, lengths)
    inputs = (x, h0, c0, *fused.parameters()) if given_state else (x, *fused.parameters())
    # The two-layer stack has ~500 inputs: the full numerical Jacobian of its backward took
    # 17-23 s a backend. Fast mode compares that Jacobian between random vectors u^T J v (every
    # entry weighs in); the other cases still compare it entry by entry.
    fast = case == "2layers_bidir"
    assert torch.autograd.gradgradcheck(_lstm_fn(fused, lengths, given_state), inputs, fast_mode=fast)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("given_state", [False, True], ids=["no_hx", "hx"])
def test_cell_gradgradcheck(backend, given_state):
    cell = lstm_fused.LSTMCell(3, 4, backend=backend, dtype=F64)
    names = [name for name, _ in cell.named_parameters()]
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    h0, c0 = (torch.randn(2, 4, dtype=F64, requires_grad=True) for _ in range(2))

    def fn(x, h0, c0, *params):
        return functional_call(cell, dict(zip(names, params)), (x, (h0, c0) if given_state else None))

    assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *cell.parameters()))


def _gradient_penalty_grads(module, x, hx, lengths):
    """Gradient of sum(d loss / d (x, h0, c0))^2 w.r.t. x, h0, c0 and every parameter."""
    module.zero_grad(set_to_none=True)
    x, h0, c0 = (t.detach().clone().requires_grad_() for t in (x, *hx))
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False)
    y, (h_n, c_n) = module(inp, (h0, c0))
    y = y.data if lengths is not None else y
    loss = y.pow(2).sum() + (h_n.sum(-1) * c_n.sum(-1)).sum()
    penalty_terms = torch.autograd.grad(loss, (x, h0, c0), create_graph=True)
    sum(g.pow(2).sum() for g in penalty_terms).backward()
    grads = {"input": x.grad, "h0": h0.grad, "c0": c0.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return grads


def _hessian_vector_product(module, x, hx, directions):
    """H v for loss(x, params): the Hessian of the loss w.r.t. (x, every parameter) times v."""
    x = x.detach().clone().requires_grad_()
    y, (h_n, c_n) = module(x, tuple(t.detach() for t in hx))
    loss = (y.pow(2).sum() + (h_n.sum(-1) * c_n.sum(-1)).sum()) / 2
    wrt = [x, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, create_graph=True)
    dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, directions))
    return torch.autograd.grad(dot, wrt)


SECOND_ORDER_CASES = ["2layers_bidir", "proj", "packed_unsorted", "batch_first_packed_proj"]


def _check_second_order_against_nn(backend, dtype, case, tol, device="cpu"):
    config, T, B, lengths, _ = LSTM_CASES[case]
    oracle, fused = _make_lstm(backend, dtype, config, device)
    x, h0, c0 = _lstm_inputs(config, T, B, lengths)
    ours = dict(device=device, dtype=dtype)
    want = _gradient_penalty_grads(oracle, x, (h0, c0), lengths)
    got = _gradient_penalty_grads(fused, x.to(**ours), (h0.to(**ours), c0.to(**ours)), lengths)
    errors = {name: rel_error(got[name].cpu(), g) for name, g in want.items()}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"gradient-penalty relative errors above {tol}: {bad}"

    if lengths is None:
        directions = [torch.randn_like(x), *(torch.randn_like(p) for p in oracle.parameters())]
        want_hv = _hessian_vector_product(oracle, x, (h0, c0), directions)
        got_hv = _hessian_vector_product(
            fused, x.to(**ours), (h0.to(**ours), c0.to(**ours)), [v.to(device) for v in directions]
        )
        errors = [rel_error(a.cpu(), e) for a, e in zip(got_hv, want_hv)]
        assert max(errors) <= tol, f"Hessian-vector product relative errors: {errors}"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
def test_second_order_matches_nn_lstm(backend, case):
    _check_second_order_against_nn(backend, F64, case, 1e-10)


@pytest.mark.skipif(not FP32_KERNEL_BACKENDS, reason="no Triton or CUDA backend here")
@pytest.mark.parametrize("backend,device,dtype", FP32_KERNEL_BACKENDS, ids=[k[0] for k in FP32_KERNEL_BACKENDS])
@pytest.mark.parametrize("case", ["proj", "packed_unsorted"])
def test_second_order_matches_nn_lstm_fp32_kernels(backend, device, dtype, case):
    # These kernels have no float64: float32 against the float64 nn.LSTM.
    _check_second_order_against_nn(backend, dtype, case, FP32_TOL, device)


@pytest.mark.parametrize("backend", cpu_backends())
def test_cell_second_order_matches_nn_lstm_cell(backend):
    oracle = nn.LSTMCell(3, 5, dtype=F64)
    fused = lstm_fused.LSTMCell(3, 5, backend=backend, dtype=F64)
    fused.load_state_dict(oracle.state_dict())
    x, h0, c0 = torch.randn(4, 3, dtype=F64), torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    results = []
    for module in (oracle, fused):
        xi, hi, ci = (t.clone().requires_grad_() for t in (x, h0, c0))
        h, c = module(xi, (hi, ci))
        g = torch.autograd.grad((h.pow(2).sum() + (h * c).sum()), (xi, hi, ci, module.weight_hh), create_graph=True)
        sum(t.pow(2).sum() for t in g).backward()
        results.append([xi.grad, hi.grad, ci.grad, *(p.grad for p in module.parameters())])
    for got, want in zip(results[1], results[0]):
        assert rel_error(got, want) <= 1e-10


KERNEL_IDS = [k[0] for k in _kernel_backends()]


@pytest.mark.parametrize("backend,device,dtype", _kernel_backends(), ids=KERNEL_IDS)
def test_no_silently_incorrect_warning(backend, device, dtype):
    lstm = lstm_fused.LSTM(2, 3, backend=backend, device=device, dtype=dtype)
    cell = lstm_fused.LSTMCell(2, 3, backend=backend, device=device, dtype=dtype)
    like = dict(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for module, x in ((lstm, torch.randn(3, 2, 2, **like)), (cell, torch.randn(2, 2, **like))):
            x.requires_grad_()
            out = module(x)[0]
            (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
            g.pow(2).sum().backward()
            w_ih = module.weight_ih_l0 if module is lstm else module.weight_ih
            assert w_ih.grad.abs().sum() > 0


_OP_PREFIX = {"cpu": "recurrence", "cuda": "recurrence", "reference": "reference", "triton": "triton"}


@pytest.mark.parametrize("backend,device,dtype", _kernel_backends(), ids=KERNEL_IDS)
def test_backward_op_itself_raises_instead_of_zeros(backend, device, dtype):
    prefix = _OP_PREFIX[backend]
    forward = getattr(torch.ops.lstm_fused, f"{prefix}_forward")
    backward = getattr(torch.ops.lstm_fused, f"{prefix}_backward")
    (xproj, w_hh, w_hr, h0, c0), lengths, (dy, dh_n, dc_n) = draw_op_inputs(3, 2, 4, None, None, device)
    xproj, w_hh, h0, c0, dy, dh_n, dc_n = (t.to(dtype) for t in (xproj, w_hh, h0, c0, dy, dh_n, dc_n))
    y, _, _, gates, c_all = forward(xproj, w_hh, None, h0, c0, None, False, True)
    dy.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dxproj = backward(dy, dh_n, dc_n, w_hh, None, h0, c0, None, False, y, gates, c_all, True)[0]
    with pytest.raises(RuntimeError, match=f"lstm_fused: lstm_fused::{prefix}_backward has no derivative"):
        dxproj.sum().backward()


@pytest.mark.parametrize("backend", cpu_backends())
def test_only_create_graph_takes_the_recomputing_path(backend, monkeypatch):
    from lstm_fused import ops

    recomputed = []
    original = ops.reference.recurrence_forward_ref

    def counting(*args):
        recomputed.append(args[6])  # reverse
        return original(*args)

    monkeypatch.setattr(ops.reference, "recurrence_forward_ref", counting)
    lstm = lstm_fused.LSTM(3, 4, bidirectional=True, backend=backend, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    y = lstm(x)[0]
    in_forward = len(recomputed)  # the reference backend's forward op runs that function too
    y.pow(2).sum().backward()
    assert len(recomputed) == in_forward, "a plain backward must run the fused backward op"

    recomputed.clear()
    y = lstm(x)[0]
    in_forward = len(recomputed)
    torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert sorted(recomputed[in_forward:]) == [False, True]  # once per direction
