"""Saved models load wherever a model holding nn.LSTM would (issue 14).

lstm_fused.LSTM/LSTMCell pickle as their torch.nn base classes, so torch.save(model) after
convert(model) writes a file naming torch.nn classes only: it loads without lstm_fused, and with
torch.load(weights_only=True) under the allow-list a stock model needs. Loaded where lstm_fused
is installed, it holds stock modules, which convert makes fused again. copy/deepcopy stay fused.
"""

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lstm_fused
from checkpoint_model import Tagger
from helpers import cpu_backends, rel_error

BACKEND = cpu_backends()[0]
TESTS = os.path.dirname(os.path.abspath(__file__))
# What torch.load(weights_only=True) needs beyond its defaults for a stock Tagger.
STOCK_ALLOW_LIST = [Tagger, nn.LSTM, nn.LSTMCell, nn.Linear]


def _converted():
    return lstm_fused.convert(Tagger(), backend=BACKEND)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _assert_close_outputs(got, want, tol=2e-5):
    # fused kernel vs nn.LSTM: the same math in a different order
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_error(g, w) <= tol


# Run in the fresh process: lstm_fused made unimportable before anything else (the package is
# installed in this venv, editable, so PYTHONPATH alone would not hide it).
_LOAD_WITHOUT_LSTM_FUSED = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lstm_fused" or name.startswith("lstm_fused."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import lstm_fused
        raise SystemExit("lstm_fused is importable; the test needs a process without it")
    except ModuleNotFoundError:
        print("lstm_fused is not importable here")

    import torch
    model_path, x_path, out_path = sys.argv[1:]
    model = torch.load(model_path, weights_only=False)
    assert type(model.rnn) is torch.nn.LSTM and type(model.cell) is torch.nn.LSTMCell, model
    assert not [m for m in sys.modules if m.startswith("lstm_fused")]
    with torch.no_grad():
        out = model(torch.load(x_path))
    torch.save({"out": out, "state_dict": model.state_dict()}, out_path)
    """
)


def test_saved_model_loads_in_a_process_without_lstm_fused(tmp_path):
    model = _converted()
    assert isinstance(model.rnn, lstm_fused.LSTM) and isinstance(model.cell, lstm_fused.LSTMCell)
    x = torch.randn(3, 6, 5)
    with torch.no_grad():
        want = model(x)
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = TESTS  # checkpoint_model only
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_LSTM_FUSED, "model.pt", "x.pt", "out.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lstm_fused is not importable here" in proc.stdout
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    _assert_close_outputs(got["out"], want)
    want_state = model.state_dict()
    assert list(got["state_dict"]) == list(want_state)
    for k, v in want_state.items():
        assert torch.equal(got["state_dict"][k], v), k


def test_weights_only_load_needs_only_the_stock_allow_list(tmp_path):
    stock = Tagger()
    torch.save(stock, tmp_path / "stock.pt")
    fused = lstm_fused.convert(copy.deepcopy(stock), backend=BACKEND)
    torch.save(fused, tmp_path / "fused.pt")
    # The file names exactly the globals a stock model's file names.
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint
    assert unsafe(tmp_path / "fused.pt") == unsafe(tmp_path / "stock.pt")
    with torch.serialization.safe_globals(STOCK_ALLOW_LIST):
        torch.load(tmp_path / "stock.pt", weights_only=True)  # the list is what a stock model needs
        loaded = torch.load(tmp_path / "fused.pt", weights_only=True)
    assert type(loaded.rnn) is nn.LSTM and type(loaded.cell) is nn.LSTMCell
    _assert_same_state(loaded, fused)
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        _assert_close_outputs(loaded(x), fused(x))


def test_loaded_with_lstm_fused_gives_stock_modules_that_convert_makes_fused(tmp_path):
    model = _converted()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.rnn) is nn.LSTM and type(loaded.cell) is nn.LSTMCell
    assert not hasattr(loaded.rnn, "backend")
    lstm_fused.convert(loaded, backend=BACKEND)
    assert type(loaded.rnn) is lstm_fused.LSTM and loaded.rnn.backend == BACKEND
    _assert_same_state(loaded, model)
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        for g, w in zip(loaded(x), model(x)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # same kernels, same weights


def _flat(out):
    """(y, (h, c)) or (h, c) -> a flat list of tensors."""
    return [t for o in out for t in (o if isinstance(o, tuple) else (o,))]


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_copies_stay_fused_while_pickles_become_stock(kind):
    if kind == "LSTM":
        m = lstm_fused.LSTM(3, 4, num_layers=2, proj_size=2, backend="reference")
        stock, x = nn.LSTM(3, 4, num_layers=2, proj_size=2), torch.randn(5, 2, 3)
    else:
        m = lstm_fused.LSTMCell(3, 4, backend="reference")
        stock, x = nn.LSTMCell(3, 4), torch.randn(2, 3)
    with torch.no_grad():
        want = _flat(m(x))
    deep, shallow = copy.deepcopy(m), copy.copy(m)
    first = lambda mod: next(mod.parameters())
    assert first(deep) is not first(m) and first(shallow) is first(m)
    for clone in (deep, shallow):
        assert type(clone) is type(m) and clone.backend == "reference"
        _assert_same_state(clone, m)
        with torch.no_grad():
            torch.testing.assert_close(_flat(clone(x)), want, rtol=0, atol=0)
    # Pickled: the stock class with exactly the stock attributes (ours, backend, left out).
    stock_attrs = set(vars(pickle.loads(pickle.dumps(stock))))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(m, protocol=protocol))
        assert type(back) is type(stock), protocol
        assert set(vars(back)) == stock_attrs, protocol
        _assert_same_state(back, m)
        with torch.no_grad():
            _assert_close_outputs(_flat(back(x)), want)
