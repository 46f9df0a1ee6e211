"""Our own T*B-row products on the CPU (csrc/cpu/panel_products.cpp): the input projection op
``lstm_fused::input_projection`` (x @ W_ih^T + b_ih + b_hh) and its backward op (dx, dW_ih),
against float64 on every instruction-set variant this machine runs, in float32 and in 16 bits;
the LSTM with them on and off; and how they are chosen.

Their default depends on the machine (csrc/cpu/isa.h, own_gemm_by_default), so every test here
that needs them in an LSTM sets the choice (``ops.set_own_gemm``) rather than rely on it.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lstm_fused
from lstm_fused import functional, ops
from helpers import make_pair, rel_error, run_and_grad, supported_cpu_variants
from test_parity import HALF_FLOOR  # absolute slack for tiny errors in half precision

pytestmark = pytest.mark.skipif("cpu" not in lstm_fused.available_backends(),
                                reason="the C++ extension is not built")

# (id, leading shape of x, I, H, biases): partial row tiles (13 rows), a partial unit block
# (H = 21, 200), several row panels of the work split (700 rows > 96), 3-D input, no bias, an odd
# reduction (bf16 panels pair rows of k, the last odd one stays plain: step_kernels.h), a reduction
# of one element, and input gradients whose last block of columns is one to three vectors wide
# (I = 20, 44, 70, 33 on 8- and 16-lane vectors: float32 tiles skip the vectors past I).
CASES = [
    ("row_tile_and_unit_block", (13,), 70, 21, True),
    ("odd_features", (11,), 33, 24, True),
    ("row_panels_3d", (35, 20), 96, 200, True),
    ("no_bias", (5, 3), 64, 48, False),
    ("one_feature", (9,), 1, 16, True),
    ("one_row", (1,), 256, 256, True),
    ("narrow_input_grad", (17,), 20, 12, True),
    ("three_vector_input_grad", (6, 3), 44, 8, True),
]


def _draw(lead, I, H, bias):
    f64 = dict(dtype=torch.float64)
    x = torch.randn(*lead, I, **f64)
    w = torch.randn(4 * H, I, **f64) / I**0.5
    b = (torch.randn(4 * H, **f64), torch.randn(4 * H, **f64)) if bias else (None, None)
    return x, w, b


def _f32(t):
    return None if t is None else t.float().requires_grad_()


HALF_DTYPES = [torch.bfloat16, torch.float16]


# weight_gemm: dW_ih (and db with it) on our tiles or ATen's GEMM, whichever this CPU defaults to.
@pytest.mark.parametrize("weight_gemm", ["own", "aten"])
@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_values_and_gradients_match_float64(monkeypatch, set_own_gemm, variant, case, weight_gemm):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    set_own_gemm(weight_gemm == "own", torch.float32)
    _, lead, I, H, bias = case
    x, w, (b_ih, b_hh) = _draw(lead, I, H, bias)
    want = F.linear(x, w, None if b_ih is None else b_ih + b_hh)
    xf, wf, bif, bhf = _f32(x), _f32(w), _f32(b_ih), _f32(b_hh)
    got = torch.ops.lstm_fused.input_projection(xf, wf, bif, bhf)  # own_product defaults to True
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_error(got, want) <= 2e-6

    cot = torch.randn_like(want)
    inputs = [t for t in (x, w, b_ih, b_hh) if t is not None]
    inputs_f = [t for t in (xf, wf, bif, bhf) if t is not None]
    for t in inputs:
        t.requires_grad_()
    want_grads = torch.autograd.grad(F.linear(x, w, None if b_ih is None else b_ih + b_hh), inputs, cot)
    got_grads = torch.autograd.grad(got, inputs_f, cot.float())
    for g, e in zip(got_grads, want_grads):
        assert rel_error(g, e) <= 2e-6
    # The backward op itself, each gradient alone (the others come back empty), and the bias
    # gradient with dW_ih (summed while grad is packed for it) or alone.
    backward = torch.ops.lstm_fused.input_projection_backward
    cot_f, x_f, w_f = cot.float(), x.float(), w.float()
    dx, dw_empty, db_empty = backward(cot_f, x_f, w_f, True, False)  # bias_grad defaults to False
    dx_empty, dw, db = backward(cot_f, x_f, w_f, False, True, True)
    _, dw_none, db_alone = backward(cot_f, x_f, w_f, False, False, True)
    assert dw_empty.numel() == 0 and dx_empty.numel() == 0 and db_empty.numel() == 0 and dw_none.numel() == 0
    assert rel_error(dx, want_grads[0]) <= 2e-6 and rel_error(dw, want_grads[1]) <= 2e-6
    want_db = cot.reshape(-1, 4 * H).sum(0)
    assert rel_error(db, want_db) <= 2e-6 and rel_error(db_alone, want_db) <= 2e-6


# 16 bits: inputs rounded to the dtype once; float64 of those rounded values is the oracle, and
# ATen's GEMM in the dtype (what F.linear, hence nn.LSTM, computes) the yardstick.
@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "one_feature"], ids=lambda c: c[0])
def test_half_precision_within_twice_aten(monkeypatch, variant, dtype, case):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    _, lead, I, H, bias = case
    x, w, (b_ih, b_hh) = _draw(lead, I, H, bias)
    cot = torch.randn(*lead, 4 * H, dtype=torch.float64)
    rounded = [None if t is None else t.to(dtype) for t in (x, w, b_ih, b_hh, cot)]
    x16, w16, bi16, bh16, cot16 = rounded
    x64, w64, bi64, bh64, cot64 = [None if t is None else t.double() for t in rounded]

    def project_and_grad(project, x, w, bi, bh, cot):
        x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = project(x, w, bi, bh)
        return (out,) + torch.autograd.grad(out, (x, w), cot)

    def aten(x, w, bi, bh):
        return F.linear(x, w, None if bi is None else bi + bh)

    want = project_and_grad(aten, x64, w64, bi64, bh64, cot64)
    theirs = project_and_grad(aten, x16, w16, bi16, bh16, cot16)
    ours = project_and_grad(torch.ops.lstm_fused.input_projection, x16, w16, bi16, bh16, cot16)
    for name, o, t, e in zip(("out", "dx", "dw"), ours, theirs, want):
        assert o.dtype == dtype and o.shape == e.shape
        assert rel_error(o, e) <= 2 * rel_error(t, e) + HALF_FLOOR, (name, rel_error(o, e), rel_error(t, e))


# ATen's product through the op (own_product=False: what CPU layers run where ATen's GEMM is the
# faster, into a pooled output): float32 against float64, 16 bits within twice F.linear in the same
# dtype, every gradient; a non-contiguous x (a transposed batch-first input) too.
@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_aten_product_matches_float64(dtype, case):
    _, lead, I, H, bias = case
    x, w, (b_ih, b_hh) = _draw(lead, I, H, bias)
    if len(lead) == 2:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    cot = torch.randn(*lead, 4 * H, dtype=torch.float64)
    rounded = [None if t is None else t.to(dtype) for t in (x, w, b_ih, b_hh, cot)]
    wide = [None if t is None else t.double() for t in rounded]

    def project_and_grad(project, x, w, bi, bh, cot):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, bi, bh)]
        out = project(*leaves)
        present = [t for t in leaves if t is not None]
        return (out,) + torch.autograd.grad(out, present, cot)

    def aten(x, w, bi, bh):
        return F.linear(x, w, None if bi is None else bi + bh)

    def ours(x, w, bi, bh):
        return torch.ops.lstm_fused.input_projection(x, w, bi, bh, False)

    want = project_and_grad(aten, *wide)
    got = project_and_grad(ours, *rounded)
    assert len(got) == len(want)
    if dtype == torch.float32:
        for o, e in zip(got, want):
            assert o.dtype == dtype and o.shape == e.shape
            assert rel_error(o, e) <= 2e-6
        return
    theirs = project_and_grad(aten, *rounded)
    for o, t, e in zip(got, theirs, want):
        assert o.dtype == dtype and o.shape == e.shape
        assert rel_error(o, e) <= 2 * rel_error(t, e) + HALF_FLOOR, (rel_error(o, e), rel_error(t, e))


@pytest.mark.parametrize("own", [True, False], ids=["own_product", "aten_product"])
def test_second_order_gradients_match_float64(own):
    x, w, (b_ih, b_hh) = _draw((6, 5), 80, 24, True)
    cot = torch.randn(6, 5, 96, dtype=torch.float64)

    def second_order(project, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = project(*tensors)
        # A loss that is not linear in the output, so the second derivative is not zero.
        (gx, gw) = torch.autograd.grad((out.tanh() * cot.to(out.dtype)).sum(), tensors[:2], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), tensors)

    want = second_order(lambda x, w, bi, bh: F.linear(x, w, bi + bh), [x, w, b_ih, b_hh])
    got = second_order(lambda *t: torch.ops.lstm_fused.input_projection(*t, own),
                       [t.float() for t in (x, w, b_ih, b_hh)])
    for g, e in zip(got, want):
        assert rel_error(g, e) <= 1e-5


# Bidirectional with packed lengths, two layers (the second layer's input is the first's output).
@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("own", [True, False], ids=["own_gemm", "aten_gemm"])
def test_lstm_matches_float64_with_either_gemm(monkeypatch, set_own_gemm, variant, own):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    set_own_gemm(own)
    config = dict(input_size=72, hidden_size=40, num_layers=2, bidirectional=True)
    oracle, fused = make_pair(torch.float32, "cpu", **config)
    x = torch.randn(9, 7, 72, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 7, 1, 9, 2, 6])
    assert functional.own_gemm_applies(x.float(), fused.weight_ih_l0) == own
    calls = []
    real_op = torch.ops.lstm_fused.input_projection

    def counting_op(*args):
        calls.append(args[4])  # own_product
        return real_op(*args)

    monkeypatch.setattr(torch.ops.lstm_fused, "input_projection", counting_op)
    cot = torch.randn(9, 7, 80, dtype=torch.float64)
    outs, grads = [], []
    for module, dtype in ((oracle, torch.float64), (fused, torch.float32)):
        xi = x.detach().to(dtype).requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, (h_n, c_n) = module(packed)
        y = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=9)[0]
        ((y * cot.to(dtype)).sum() + h_n.sum() + c_n.sum()).backward()
        outs.append((y, h_n, c_n))
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    # Every layer and direction went through the op (4 projections), with the product chosen.
    assert calls == [own] * 4
    for got, want in zip(outs[1] + tuple(grads[1]), outs[0] + tuple(grads[0])):
        assert rel_error(got, want) <= 2e-5


# Two layers in 16 bits, forward and every gradient, against the reference backend in the same
# dtype (plain PyTorch, ATen's GEMM; the yardstick test_cpu_kernels.py uses), both measured
# against float64.
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("own", [True, False], ids=["own_gemm", "aten_gemm"])
def test_lstm_half_precision_with_either_gemm(monkeypatch, set_own_gemm, dtype, own):
    set_own_gemm(own, dtype)
    config = dict(input_size=72, hidden_size=64, num_layers=2)
    oracle, fused = make_pair(dtype, "cpu", **config)
    reference = lstm_fused.LSTM(**config, backend="reference", dtype=torch.float64)
    reference.load_state_dict(oracle.state_dict())
    reference = reference.to(dtype)
    assert functional.own_gemm_applies(torch.randn(3, 72, dtype=dtype), fused.weight_ih_l0) == own
    assert not functional.own_gemm_applies(torch.randn(3, 72, dtype=dtype), reference.weight_ih_l0,
                                           "reference")
    calls = []
    real_op = torch.ops.lstm_fused.input_projection
    monkeypatch.setattr(torch.ops.lstm_fused, "input_projection", lambda *a: calls.append(a[4]) or real_op(*a))
    x = torch.randn(9, 5, 72, dtype=torch.float64)
    hx = (torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 5, 64, dtype=torch.float64))
    cot = (torch.randn(9, 5, 64, dtype=torch.float64), torch.randn(2, 5, 64, dtype=torch.float64),
           torch.randn(2, 5, 64, dtype=torch.float64))
    want = run_and_grad(oracle, x, hx, cot)
    got = run_and_grad(fused, x.to(dtype), tuple(t.to(dtype) for t in hx), cot)
    assert calls == [own] * 2  # both layers (I = 72, 64), with the product chosen
    yardstick = run_and_grad(reference, x.to(dtype), tuple(t.to(dtype) for t in hx), cot)
    assert calls == [own] * 2  # the reference backend's layers did not call the op

    def flat(result):
        y, h_n, c_n, grads = result
        return [("y", y), ("h_n", h_n), ("c_n", c_n)] + sorted(grads.items())

    bad = {}
    for (name, o), (_, r), (_, e) in zip(flat(got), flat(yardstick), flat(want)):
        assert o.dtype == dtype
        if not rel_error(o, e) <= 2 * rel_error(r, e) + HALF_FLOOR:
            bad[name] = (rel_error(o, e), rel_error(r, e))
    assert not bad, f"(ours, reference backend in {dtype}) relative errors: {bad}"


def test_the_op_runs_cpu_backend_layers_in_its_dtypes_whatever_the_product():
    w = torch.randn(64, 32)
    for dtype in ops.OWN_GEMM_DTYPES:
        assert functional.projection_op_applies(torch.randn(3, 32).to(dtype), w.to(dtype))
        assert functional.projection_op_applies(torch.randn(3, 32).to(dtype), w.to(dtype), "cpu")
        assert not functional.projection_op_applies(torch.randn(3, 32).to(dtype), w.to(dtype), "reference")
    assert not functional.projection_op_applies(torch.randn(3, 32).double(), w.double())
    assert not functional.projection_op_applies(torch.randn(3, 32), w.bfloat16())


def test_applies_to_cpu_backend_layers_in_the_chosen_dtypes_with_enough_features(monkeypatch):
    for dtype in ops.OWN_GEMM_DTYPES:
        monkeypatch.setitem(ops.OWN_GEMM, dtype, True)
    w = torch.randn(64, 64)
    assert functional.own_gemm_applies(torch.randn(3, 64), w)
    assert functional.own_gemm_applies(torch.randn(3, 64), w, "cpu")
    assert not functional.own_gemm_applies(torch.randn(3, 64), w, "reference")
    fewest = functional._OWN_GEMM_MIN_FEATURES
    assert fewest == (2 if torch.ops.lstm_fused.cpu_isa_supported("avx512") else 64)
    assert functional.own_gemm_applies(torch.randn(3, fewest), torch.randn(64, fewest))
    assert not functional.own_gemm_applies(torch.randn(3, fewest - 1), torch.randn(64, fewest - 1))
    assert not functional.own_gemm_applies(torch.randn(3, 64).double(), w.double())
    assert not functional.own_gemm_applies(torch.randn(3, 64), w.bfloat16())
    for dtype in (torch.bfloat16, torch.float16):
        assert functional.own_gemm_applies(torch.randn(3, 64).to(dtype), w.to(dtype))
    monkeypatch.setitem(ops.OWN_GEMM, torch.float32, False)
    assert not functional.own_gemm_applies(torch.randn(3, 64), w)
    assert functional.own_gemm_applies(torch.randn(3, 64).bfloat16(), w.bfloat16())


@pytest.mark.parametrize("weight_gemm", ["own", "aten"])
def test_no_rows_give_zero_weight_and_bias_gradients(set_own_gemm, weight_gemm):
    set_own_gemm(weight_gemm == "own", torch.float32)
    x, w = torch.randn(0, 3, 8), torch.randn(12, 8)
    dx, dw, db = torch.ops.lstm_fused.input_projection_backward(torch.randn(0, 3, 12), x, w, True, True, True)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(12, 8)) and torch.equal(db, torch.zeros(12))


# The fake kernels give what the real ones do, strides included: x transposed as a batch-first
# input reaches the op (its real dx is contiguous in grad's shape; an empty_like(x) fake broke
# the compiled backward of a batch-first model).
@pytest.mark.parametrize("own", [True, False], ids=["own_gemm", "aten_gemm"])
def test_opcheck(own):
    x, w, b = torch.randn(7, 3, 8).transpose(0, 1), torch.randn(48, 8), torch.randn(48)
    torch.library.opcheck(torch.ops.lstm_fused.input_projection.default, (x, w, b, b.flip(0), own))
    torch.library.opcheck(torch.ops.lstm_fused.input_projection.default, (x, w, None, None, own))
    grad = torch.randn(3, 7, 48)
    for wanted in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        torch.library.opcheck(torch.ops.lstm_fused.input_projection_backward.default, (grad, x, w, *wanted))


def test_bad_arguments_are_errors():
    x, w, b = torch.randn(4, 8), torch.randn(12, 8), torch.randn(12)
    op = torch.ops.lstm_fused.input_projection
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), w.double(), None, None)
    with pytest.raises(RuntimeError, match="features"):
        op(torch.randn(4, 9), w, None, None)
    with pytest.raises(RuntimeError, match="both biases or neither"):
        op(x, w, b, None)
    with pytest.raises(RuntimeError, match="b_hh"):
        op(x, w, b, torch.randn(11))
    backward = torch.ops.lstm_fused.input_projection_backward
    with pytest.raises(RuntimeError, match="takes grad"):
        backward(torch.randn(4, 11), x, w, True, True)
    with pytest.raises(RuntimeError, match="takes grad"):  # 4H gate rows: 10 is no 4H
        backward(torch.randn(4, 10), x, torch.randn(10, 8), True, True)
    with pytest.raises(RuntimeError, match="float32"):
        backward(torch.randn(4, 12).double(), x.double(), w.double(), True, True)
    with pytest.raises(RuntimeError, match="must share dtype"):
        backward(torch.randn(4, 12), x.bfloat16(), w, True, True)
    with pytest.raises(RuntimeError, match="w_ih has dtype"):
        op(x.half(), w, None, None)


def _chosen_in_a_fresh_process(value):
    env = dict(os.environ)
    env.pop("LSTM_FUSED_CPU_GEMM", None)
    if value is not None:
        env["LSTM_FUSED_CPU_GEMM"] = value
    code = ("import lstm_fused; from lstm_fused import ops\n"
            "print(*[ops.OWN_GEMM[d] for d in ops.OWN_GEMM_DTYPES])")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _cpuinfo():
    with open("/proc/cpuinfo") as f:
        text = f.read()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "GenuineIntel" in text, set(flags)


def test_the_choice_follows_the_environment_then_the_cpu():
    own = _chosen_in_a_fresh_process("own")
    aten = _chosen_in_a_fresh_process("aten")
    auto = _chosen_in_a_fresh_process(None)
    for run in (own, aten, auto):
        assert run.returncode == 0, run.stderr
    assert own.stdout.split() == ["True"] * 3
    assert aten.stdout.split() == ["False"] * 3
    intel, flags = _cpuinfo()
    simd = platform.machine() == "x86_64" and torch.ops.lstm_fused.cpu_isa_supported("avx2")
    # float32: not on Intel (MKL); 16 bits: where the CPU has no dot product for the type.
    expected = [simd and not intel,
                simd and not ({"avx512_bf16", "amx_bf16"} & flags),
                simd and "avx512_fp16" not in flags]
    assert auto.stdout.split() == [str(e) for e in expected]
    bad = _chosen_in_a_fresh_process("mkl")
    assert bad.returncode != 0 and "LSTM_FUSED_CPU_GEMM=mkl is not one of" in bad.stderr


def test_a_bad_isa_variable_fails_the_call_not_the_import():
    env = dict(os.environ, LSTM_FUSED_CPU_ISA="sse9")
    code = ("import torch, lstm_fused\n"
            "try:\n"
            "    lstm_fused.LSTM(4, 8, backend='cpu')(torch.randn(3, 2, 4))\n"
            "except RuntimeError as e:\n"
            "    print('call failed:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "call failed: lstm_fused: LSTM_FUSED_CPU_ISA=sse9 is not one of" in run.stdout


def test_set_own_gemm_per_dtype_or_all(set_own_gemm):
    set_own_gemm(True)
    assert all(ops.OWN_GEMM[d] for d in ops.OWN_GEMM_DTYPES)
    set_own_gemm(False, torch.bfloat16)
    assert ops.OWN_GEMM == {torch.float32: True, torch.bfloat16: False, torch.float16: True}
    set_own_gemm(False)
    assert not any(ops.OWN_GEMM[d] for d in ops.OWN_GEMM_DTYPES)
    with pytest.raises(ValueError, match="our own products run"):
        set_own_gemm(True, torch.float64)
