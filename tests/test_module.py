"""The drop-in surface: constructor, parameters, state_dict, copies, dtype moves, convert,
backend choice, hx handling, unbatched input, dropout, grad modes."""

import copy
import os

import pytest
import torch
from torch import nn

import lstm_fused
from lstm_fused import dispatch
from helpers import cpu_backends, rel_error

BACKEND = cpu_backends()[0]


def test_is_subclass_with_same_parameters_and_repr():
    torch.manual_seed(0)
    native = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    torch.manual_seed(0)
    fused = lstm_fused.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    assert isinstance(fused, nn.LSTM)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in native.named_parameters()]
    for (n, a), (_, b) in zip(fused.named_parameters(), native.named_parameters()):
        assert torch.equal(a, b), f"{n}: same seed must give nn.LSTM's init"
    assert repr(fused) == repr(native)
    assert "backend='reference'" in repr(lstm_fused.LSTM(4, 6, backend="reference"))
    assert isinstance(lstm_fused.LSTMCell(3, 5), nn.LSTMCell)


@pytest.mark.parametrize("direction", ["nn_to_fused", "fused_to_nn"])
def test_state_dict_round_trip(direction):
    a = nn.LSTM(5, 7, num_layers=2, proj_size=2) if direction == "nn_to_fused" else lstm_fused.LSTM(5, 7, num_layers=2, proj_size=2)
    b = lstm_fused.LSTM(5, 7, num_layers=2, proj_size=2) if direction == "nn_to_fused" else nn.LSTM(5, 7, num_layers=2, proj_size=2)
    b.load_state_dict(a.state_dict())
    assert a.state_dict().keys() == b.state_dict().keys()
    x = torch.randn(6, 3, 5)
    ya, _ = a(x)
    yb, _ = b(x)
    assert rel_error(yb, ya) < 1e-5


def test_deepcopy_keeps_backend_and_weights():
    # pickle and torch.save write the stock nn class instead: tests/test_checkpoint.py
    m = lstm_fused.LSTM(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    y, _ = m(x)
    clone = copy.deepcopy(m)
    assert type(clone) is lstm_fused.LSTM and clone.backend == "reference"
    torch.testing.assert_close(clone(x)[0], y, rtol=0, atol=0)


def test_to_dtype_moves_parameters_and_computes_in_it():
    m = lstm_fused.LSTM(3, 4, backend=BACKEND).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    y, (h, c) = m(torch.randn(5, 2, 3, dtype=torch.float64))
    assert y.dtype == h.dtype == c.dtype == torch.float64
    m = m.to(torch.bfloat16)
    y, _ = m(torch.randn(5, 2, 3, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_convert_swaps_in_place_sharing_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 5, batch_first=True)
            self.cell = nn.LSTMCell(5, 5)
            self.head = nn.Linear(5, 2)

    model = Model()
    weight = model.rnn.weight_hh_l0
    x = torch.randn(2, 6, 4)
    y_before, _ = model.rnn(x)
    h_before = model.cell(y_before[:, -1])
    out = lstm_fused.convert(model, backend="reference")
    assert out is model
    assert type(model.rnn) is lstm_fused.LSTM and type(model.cell) is lstm_fused.LSTMCell
    assert model.rnn.backend == "reference" and model.cell.backend == "reference"
    assert model.rnn.weight_hh_l0 is weight, "parameters must be shared, not copied"
    y_after, _ = model.rnn(x)
    assert rel_error(y_after, y_before) < 1e-5
    assert rel_error(model.cell(y_after[:, -1])[0], h_before[0]) < 1e-5
    single = nn.LSTM(3, 3)
    assert type(lstm_fused.convert(single)) is lstm_fused.LSTM
    with pytest.raises(ValueError, match="unknown backend"):
        lstm_fused.convert(nn.LSTM(3, 3), backend="nope")


def test_available_backends_lists_what_runs_here():
    names = lstm_fused.available_backends()
    assert "reference" in names
    assert set(names) <= {"cuda", "triton", "cpu", "reference"}
    for name in names:
        assert dispatch.unavailable_reason(name) is None
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_env_var_overrides_auto_but_not_an_explicit_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LSTM_FUSED_BACKEND", "reference")
    assert dispatch.resolve("auto", cpu, torch.float32) == "reference"
    assert dispatch.resolve(BACKEND, cpu, torch.float32) == BACKEND
    monkeypatch.setenv("LSTM_FUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LSTM_FUSED_BACKEND"):
        lstm_fused.LSTM(3, 4)(torch.randn(2, 1, 3))
    monkeypatch.delenv("LSTM_FUSED_BACKEND")
    assert dispatch.resolve("auto", cpu, torch.float32) == BACKEND


def test_unavailable_backend_raises_with_reason():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        lstm_fused.LSTM(3, 4, backend="cuda")(torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        lstm_fused.LSTM(3, 4, backend="fast")


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_matches_batched(batch_first):
    m = lstm_fused.LSTM(3, 4, num_layers=2, batch_first=batch_first, backend=BACKEND)
    x = torch.randn(6, 3)
    h0, c0 = torch.randn(2, 4), torch.randn(2, 4)
    y, (h, c) = m(x, (h0, c0))
    assert y.shape == (6, 4) and h.shape == (2, 4) and c.shape == (2, 4)
    xb = x.unsqueeze(0 if batch_first else 1)
    yb, (hb, cb) = m(xb, (h0.unsqueeze(1), c0.unsqueeze(1)))
    torch.testing.assert_close(y, yb.squeeze(0 if batch_first else 1))
    torch.testing.assert_close(h, hb.squeeze(1))
    native = nn.LSTM(3, 4, num_layers=2, batch_first=batch_first)
    native.load_state_dict(m.state_dict())
    yn, (hn, cn) = native(x, (h0, c0))
    assert rel_error(y, yn) < 1e-5 and rel_error(c, cn) < 1e-5


def test_omitted_hx_is_zeros():
    m = lstm_fused.LSTM(3, 4, proj_size=2, backend=BACKEND)
    x = torch.randn(5, 2, 3)
    y1, (h1, c1) = m(x)
    y2, (h2, c2) = m(x, (torch.zeros(1, 2, 2), torch.zeros(1, 2, 4)))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)


def test_dropout_between_layers_only_in_training():
    m = lstm_fused.LSTM(4, 8, num_layers=3, dropout=0.5, backend=BACKEND)
    native = nn.LSTM(4, 8, num_layers=3, dropout=0.5)
    native.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4)
    m.eval(), native.eval()
    assert rel_error(m(x)[0], native(x)[0]) < 1e-5
    m.train()
    a, b = m(x)[0], m(x)[0]
    assert not torch.equal(a, b), "training mode must apply dropout"
    single = lstm_fused.LSTM(4, 8, num_layers=1, backend=BACKEND).train()
    with pytest.warns(UserWarning):  # nn.LSTM's warning: dropout with one layer does nothing
        single_dropout = lstm_fused.LSTM(4, 8, num_layers=1, dropout=0.5, backend=BACKEND).train()
    single_dropout.load_state_dict(single.state_dict())
    torch.testing.assert_close(single(x)[0], single_dropout(x)[0], rtol=0, atol=0)


def test_no_grad_saves_nothing_and_frozen_params_get_no_grad():
    m = lstm_fused.LSTM(3, 4, backend=BACKEND)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        y, _ = m(x)
    assert y.grad_fn is None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            m(x)
    assert saved == []
    for p in m.parameters():
        p.requires_grad_(False)
    xi = x.clone().requires_grad_()
    y, _ = m(xi)
    y.sum().backward()
    assert xi.grad is not None and torch.isfinite(xi.grad).all()
    assert all(p.grad is None for p in m.parameters())


def test_saved_memory_not_above_nn_lstm():
    """Bytes saved for backward (unique storages) must not exceed nn.LSTM's at the same shape."""

    def saved_bytes(module, x):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(storages.values())

    x = torch.randn(50, 16, 32, requires_grad=True)
    native = nn.LSTM(32, 64, num_layers=2)
    fused = lstm_fused.LSTM(32, 64, num_layers=2, backend=BACKEND)
    fused.load_state_dict(native.state_dict())
    ours, theirs = saved_bytes(fused, x), saved_bytes(native, x)
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("backend", cpu_backends())
def test_lstm_cell_matches_nn(backend):
    native = nn.LSTMCell(5, 7).double()
    cell = lstm_fused.LSTMCell(5, 7, backend=backend, dtype=torch.float64)
    cell.load_state_dict(native.state_dict())
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64))
    (h1, c1), (h2, c2) = native(x, hx), cell(x, hx)
    torch.testing.assert_close(h2, h1)
    torch.testing.assert_close(c2, c1)
    g1 = torch.autograd.grad((h1 + 2 * c1).sum(), [x] + list(native.parameters()))
    g2 = torch.autograd.grad((h2 + 2 * c2).sum(), [x] + list(cell.parameters()))
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)
    h, c = cell(x[0])  # unbatched, hx omitted
    assert h.shape == (7,) and c.shape == (7,)
    nocell = lstm_fused.LSTMCell(5, 7, bias=False, backend=backend)
    assert nocell(x[0].float())[0].shape == (7,)


def test_nan_and_inf_behave_like_nn_lstm():
    m = lstm_fused.LSTM(3, 4, backend=BACKEND)
    native = nn.LSTM(3, 4)
    native.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 3)
    x[1, 0, 0] = float("nan")
    x[2, 1, 1] = float("inf")
    x[0, 2, 2] = -float("inf")
    y, (h, c) = m(x)
    yn, (hn, cn) = native(x)
    for ours, theirs in ((y, yn), (h, hn), (c, cn)):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        finite = torch.isfinite(theirs)
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)


def test_cpu_autocast_computes_in_autocast_dtype_like_nn_lstm():
    # nn.LSTM under CPU autocast returns bf16 (lstm is on autocast's lower-precision list).
    # The oracle is not nn.LSTM under autocast: that runs oneDNN's bf16 LSTM, which CPUs
    # without AVX-512 lack ("could not create a primitive descriptor"). nn.LSTM in fp32 runs
    # everywhere: the reference is the fp32 model; the yardstick is the error of the same fp32
    # model fed bf16-rounded inputs and weights, with its output rounded to bf16.
    m = lstm_fused.LSTM(4, 6, num_layers=2, backend=BACKEND)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = m(x)
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    fp32 = nn.LSTM(4, 6, num_layers=2)
    fp32.load_state_dict(m.state_dict())
    cast = nn.LSTM(4, 6, num_layers=2)
    cast.load_state_dict({k: v.bfloat16().float() for k, v in m.state_dict().items()})
    with torch.no_grad():
        reference, _ = fp32(x)
        yardstick, _ = cast(x.bfloat16().float())
    assert rel_error(y, reference) <= 2 * rel_error(yardstick.bfloat16(), reference) + 2e-3
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


# forward skips nn's per-weight attribute walk when its flat weights are the module's own
# parameters; weights substituted from outside (functional_call, a parametrization, a plain
# reassignment) must still be the ones used, in a sequence and in a streaming step alike.
@pytest.mark.parametrize("T", [5, 1], ids=["sequence", "one_step"])
def test_substituted_weights_are_used(T):
    from torch.nn.utils import parametrize

    ref = nn.LSTM(4, 6, num_layers=2)
    fused = lstm_fused.LSTM(4, 6, num_layers=2, backend=cpu_backends()[0])
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, 2, 4)
    new = {k: torch.randn_like(v) for k, v in fused.state_dict().items()}
    with torch.no_grad():
        want = torch.func.functional_call(ref, new, (x,))[0]
        got = torch.func.functional_call(fused, new, (x,))[0]
        assert rel_error(got, want) < 1e-5
        assert rel_error(fused(x)[0], ref(x)[0]) < 1e-5  # the module's own weights again

        class Doubled(nn.Module):
            def forward(self, w):
                return 2 * w

        for m in (ref, fused):
            parametrize.register_parametrization(m, "weight_hh_l1", Doubled())
        assert rel_error(fused(x)[0], ref(x)[0]) < 1e-5

        replacement = torch.randn(24, 4)
        for m in (ref, fused):
            m.weight_ih_l0 = nn.Parameter(replacement.clone())
        assert rel_error(fused(x)[0], ref(x)[0]) < 1e-5
