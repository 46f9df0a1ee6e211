"""The CPU input projection op, ``lstm_fused::input_projection`` (x @ W_ih^T + b_ih + b_hh on the
step kernels' tile product): values and gradients against float64 on every instruction-set
variant this machine runs, the LSTM with it forced on, and how it is chosen.

The op is the default only on non-Intel x86 CPUs (csrc/cpu/isa.h), so every test here that needs
it in an LSTM forces it with ``ops.OWN_INPUT_GEMM`` rather than rely on the machine.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lstm_fused
from lstm_fused import functional, ops
from helpers import make_pair, rel_error

pytestmark = pytest.mark.skipif("cpu" not in lstm_fused.available_backends(),
                                reason="the C++ extension is not built")

VARIANTS = ("generic", "avx2", "avx512")


def supported_variants():
    if "cpu" not in lstm_fused.available_backends():
        return []
    return [v for v in VARIANTS if torch.ops.lstm_fused.cpu_isa_supported(v)]


# (id, leading shape of x, I, H, biases): partial row tiles (13 rows), a partial unit block
# (H = 21, 200), several row panels of the work split (700 rows > 96), 3-D input, no bias, and a
# reduction of one element.
CASES = [
    ("row_tile_and_unit_block", (13,), 70, 21, True),
    ("row_panels_3d", (35, 20), 96, 200, True),
    ("no_bias", (5, 3), 64, 48, False),
    ("one_feature", (9,), 1, 16, True),
    ("one_row", (1,), 256, 256, True),
]


def _draw(lead, I, H, bias):
    f64 = dict(dtype=torch.float64)
    x = torch.randn(*lead, I, **f64)
    w = torch.randn(4 * H, I, **f64) / I**0.5
    b = (torch.randn(4 * H, **f64), torch.randn(4 * H, **f64)) if bias else (None, None)
    return x, w, b


def _f32(t):
    return None if t is None else t.float().requires_grad_()


@pytest.mark.parametrize("variant", supported_variants())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_values_and_gradients_match_float64(monkeypatch, variant, case):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    _, lead, I, H, bias = case
    x, w, (b_ih, b_hh) = _draw(lead, I, H, bias)
    want = F.linear(x, w, None if b_ih is None else b_ih + b_hh)
    xf, wf, bif, bhf = _f32(x), _f32(w), _f32(b_ih), _f32(b_hh)
    got = torch.ops.lstm_fused.input_projection(xf, wf, bif, bhf)
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


def test_second_order_gradients_match_float64():
    x, w, (b_ih, b_hh) = _draw((6, 5), 80, 24, True)
    cot = torch.randn(6, 5, 96, dtype=torch.float64)

    def second_order(project, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = project(*tensors)
        # A loss that is not linear in the output, so the second derivative is not zero.
        (gx, gw) = torch.autograd.grad((out.tanh() * cot.to(out.dtype)).sum(), tensors[:2], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), tensors)

    want = second_order(lambda x, w, bi, bh: F.linear(x, w, bi + bh), [x, w, b_ih, b_hh])
    got = second_order(torch.ops.lstm_fused.input_projection, [t.float() for t in (x, w, b_ih, b_hh)])
    for g, e in zip(got, want):
        assert rel_error(g, e) <= 1e-5


@pytest.mark.parametrize("variant", supported_variants())
def test_lstm_with_the_op_forced_matches_float64(monkeypatch, variant):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    monkeypatch.setattr(ops, "OWN_INPUT_GEMM", True)
    config = dict(input_size=72, hidden_size=40, num_layers=2, bidirectional=True)
    oracle, fused = make_pair(torch.float32, "cpu", **config)
    x = torch.randn(9, 7, 72, dtype=torch.float64)
    assert functional.own_input_gemm_applies(x.float(), fused.weight_ih_l0)
    calls = []
    real_op = torch.ops.lstm_fused.input_projection

    def counting_op(*args):
        calls.append(args[0].shape)
        return real_op(*args)

    monkeypatch.setattr(torch.ops.lstm_fused, "input_projection", counting_op)
    cot = torch.randn(9, 7, 80, dtype=torch.float64)
    outs, grads = [], []
    for module, dtype in ((oracle, torch.float64), (fused, torch.float32)):
        xi = x.detach().to(dtype).requires_grad_()
        y, (h_n, c_n) = module(xi)
        ((y * cot.to(dtype)).sum() + h_n.sum() + c_n.sum()).backward()
        outs.append((y, h_n, c_n))
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    # Every layer and direction went through the op (4 projections).
    assert len(calls) == 4
    for got, want in zip(outs[1] + tuple(grads[1]), outs[0] + tuple(grads[0])):
        assert rel_error(got, want) <= 2e-5


def test_applies_only_to_float32_cpu_input_with_enough_features(monkeypatch):
    monkeypatch.setattr(ops, "OWN_INPUT_GEMM", True)
    w = torch.randn(64, 64)
    assert functional.own_input_gemm_applies(torch.randn(3, 64), w)
    assert not functional.own_input_gemm_applies(torch.randn(3, 32), torch.randn(64, 32))
    assert not functional.own_input_gemm_applies(torch.randn(3, 64).double(), w.double())
    assert not functional.own_input_gemm_applies(torch.randn(3, 64).bfloat16(), w.bfloat16())
    monkeypatch.setattr(ops, "OWN_INPUT_GEMM", False)
    assert not functional.own_input_gemm_applies(torch.randn(3, 64), w)


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


def _chosen_in_a_fresh_process(value):
    env = dict(os.environ)
    env.pop("LSTM_FUSED_CPU_INPUT_GEMM", None)
    if value is not None:
        env["LSTM_FUSED_CPU_INPUT_GEMM"] = value
    code = ("import torch, lstm_fused; from lstm_fused import ops; "
            "print(ops.OWN_INPUT_GEMM, torch.ops.lstm_fused.cpu_own_input_gemm_preferred())")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_the_choice_follows_the_environment_then_the_cpu():
    own = _chosen_in_a_fresh_process("own")
    aten = _chosen_in_a_fresh_process("aten")
    auto = _chosen_in_a_fresh_process(None)
    for run in (own, aten, auto):
        assert run.returncode == 0, run.stderr
    assert own.stdout.split()[0] == "True"
    assert aten.stdout.split()[0] == "False"
    chosen, preferred = auto.stdout.split()
    assert chosen == preferred
    bad = _chosen_in_a_fresh_process("mkl")
    assert bad.returncode != 0 and "LSTM_FUSED_CPU_INPUT_GEMM" in bad.stderr
