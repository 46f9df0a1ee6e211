"""Numerical parity of lstm_fused.LSTM with a float64 nn.LSTM: output, h_n, c_n, every gradient.

fp32/fp64 must be close to the float64 oracle outright. Half precision must be within about twice
the error nn.LSTM itself makes in that dtype (plus a small floor), measured on the same inputs.
"""

import pytest
import torch
from torch import nn

from helpers import cpu_backends, make_pair, rel_error, run_and_grad

# (id, T, B, I, H, extra nn.LSTM kwargs): awkward sizes on purpose.
SHAPES = [
    ("T1", 1, 3, 5, 7, {}),
    ("B1", 9, 1, 6, 8, {}),
    ("oddH", 7, 5, 4, 13, {}),
    ("B3_I_ne_H", 11, 3, 19, 6, {}),
    ("B10_not_mult8", 6, 10, 8, 16, {}),
    ("proj", 8, 4, 6, 10, {"proj_size": 3}),
    ("bidir", 6, 4, 5, 9, {"bidirectional": True}),
    ("2layers", 5, 3, 4, 6, {"num_layers": 2}),
    ("2layers_bidir_proj", 5, 3, 6, 8, {"num_layers": 2, "bidirectional": True, "proj_size": 5}),
    ("no_bias", 6, 2, 4, 5, {"bias": False}),
    ("batch_first", 7, 4, 3, 6, {"batch_first": True}),
    ("largerH", 16, 8, 32, 64, {}),
    # Big enough that the CPU kernel splits the units over threads, with ragged blocks.
    ("threads_oddH", 5, 9, 7, 33, {}),
    ("threads_proj", 4, 8, 6, 40, {"proj_size": 29}),
    ("threads_bidir_proj", 3, 12, 5, 72, {"bidirectional": True, "proj_size": 31}),
]

# Bounds for full precision, relative to the float64 oracle.
FULL_PRECISION_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
HALF_FLOOR = 2e-3  # absolute slack for tiny errors in half precision


def _inputs(T, B, I, config):
    L = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    H = config["hidden_size"]
    P = config.get("proj_size", 0) or H
    D = 2 if config.get("bidirectional") else 1
    x = torch.randn(B, T, I) if config.get("batch_first") else torch.randn(T, B, I)
    hx = (torch.randn(L, B, P) * 0.5, torch.randn(L, B, H) * 0.5)
    y_shape = (B, T, D * P) if config.get("batch_first") else (T, B, D * P)
    cot = (torch.randn(y_shape), torch.randn(L, B, P), torch.randn(L, B, H))
    return [t.double() for t in (x,)] + [tuple(t.double() for t in hx)], tuple(t.double() for t in cot)


def _compare(oracle, fused, dtype, T, B, I):
    config = {
        "hidden_size": oracle.hidden_size,
        "num_layers": oracle.num_layers,
        "bidirectional": oracle.bidirectional,
        "proj_size": oracle.proj_size,
        "batch_first": oracle.batch_first,
    }
    (x, hx), cot = _inputs(T, B, I, config)
    want = run_and_grad(oracle, x, hx, cot)
    got = run_and_grad(fused, x.to(dtype), tuple(t.to(dtype) for t in hx), cot)
    errors = {"y": rel_error(got[0], want[0]), "h_n": rel_error(got[1], want[1]),
              "c_n": rel_error(got[2], want[2])}
    for name, g in want[3].items():
        assert got[3][name] is not None, f"no gradient for {name}"
        assert got[3][name].dtype == dtype
        errors["d" + name] = rel_error(got[3][name], g)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    return errors, (x, hx, cot, want)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_full_precision_parity(backend, dtype, shape):
    _, T, B, I, H, extra = shape
    oracle, fused = make_pair(dtype, backend, input_size=I, hidden_size=H, **extra)
    errors, _ = _compare(oracle, fused, dtype, T, B, I)
    tol = FULL_PRECISION_TOL[dtype]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] in ("oddH", "proj", "2layers_bidir_proj", "largerH")],
                         ids=lambda s: s[0])
def test_half_precision_within_twice_nn_lstm(backend, dtype, shape):
    _, T, B, I, H, extra = shape
    oracle, fused = make_pair(dtype, backend, input_size=I, hidden_size=H, **extra)
    errors, (x, hx, cot, want) = _compare(oracle, fused, dtype, T, B, I)
    # nn.LSTM itself in the same dtype, same inputs: the yardstick.
    native = nn.LSTM(input_size=I, hidden_size=H, **extra, dtype=torch.float64)
    native.load_state_dict(oracle.state_dict())
    native = native.to(dtype)
    base = run_and_grad(native, x.to(dtype), tuple(t.to(dtype) for t in hx), cot)
    native_errors = {"y": rel_error(base[0], want[0]), "h_n": rel_error(base[1], want[1]),
                     "c_n": rel_error(base[2], want[2])}
    native_errors.update({"d" + k: rel_error(base[3][k], g) for k, g in want[3].items()})
    bad = {k: (v, native_errors[k]) for k, v in errors.items() if not v <= 2 * native_errors[k] + HALF_FLOOR}
    assert not bad, f"(ours, nn.LSTM) relative errors: {bad}"
