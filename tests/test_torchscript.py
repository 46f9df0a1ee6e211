"""torch.jit.script / torch.jit.trace of models holding LSTM / LSTMCell, saved, loaded and rerun.

Inside TorchScript the modules run ATen's LSTM on their own parameters (lstm_fused/torchscript.py
for script; nn.LSTM.forward while tracing), so the scripted/traced results must equal the eager
fused module's in float64 to rounding, at sizes other than the trace sample too.
"""

import io
from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from helpers import cpu_backends, rel_error

pytestmark = [
    # TorchScript is deprecated in torch 2.13 (it warns on script/save/load); it still has to work.
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
    # nn.LSTM's own shape checks, as when tracing any nn.LSTM; the tests run other shapes.
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

TOL = 1e-12  # float64: both sides are the same math in a different order

CONFIGS = {
    "2layer_bidir": dict(num_layers=2, bidirectional=True),
    "batch_first_proj": dict(batch_first=True, proj_size=3),
    "no_bias_bidir_proj": dict(bias=False, bidirectional=True, proj_size=4),
}


class Tagger(nn.Module):
    def __init__(self, backend, **config):
        super().__init__()
        self.rnn = lstm_fused.LSTM(5, 7, backend=backend, dtype=torch.float64, **config)
        features = (self.rnn.proj_size or 7) * (2 if self.rnn.bidirectional else 1)
        self.head = nn.Linear(features, 3, dtype=torch.float64)

    def forward(self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        y, (h, c) = self.rnn(x, hx)
        return self.head(y), h, c


class PackedTagger(nn.Module):
    def __init__(self, backend, **config):
        super().__init__()
        self.rnn = lstm_fused.LSTM(5, 7, backend=backend, dtype=torch.float64, **config)

    def forward(self, x: Tensor, lengths: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        packed = pack_padded_sequence(x, lengths, batch_first=self.rnn.batch_first, enforce_sorted=False)
        y, (h, c) = self.rnn(packed, hx)
        return pad_packed_sequence(y, batch_first=self.rnn.batch_first)[0], h, c


class Stepper(nn.Module):
    def __init__(self, backend, bias=True):
        super().__init__()
        self.cell = lstm_fused.LSTMCell(5, 7, bias=bias, backend=backend, dtype=torch.float64)

    def forward(self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        return self.cell(x, hx)


def _inputs(config, T, B, with_state):
    shape = (B, T, 5) if config.get("batch_first") else (T, B, 5)
    x = torch.randn(shape, dtype=torch.float64)
    if not with_state:
        return (x,)
    states = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    out = config.get("proj_size") or 7
    h0 = torch.randn(states, B, out, dtype=torch.float64)
    c0 = torch.randn(states, B, 7, dtype=torch.float64)
    return (x, (h0, c0))


def _save_and_load(module):
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert rel_error(g, e) < TOL


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_script_matches_eager_and_survives_save_load(backend, config):
    model = Tagger(backend, **config)
    scripted = torch.jit.script(model)
    loaded = _save_and_load(scripted)
    for T, B, with_state in ((6, 3, True), (1, 5, False), (9, 2, False)):
        args = _inputs(config, T, B, with_state)
        expected = model(*args)
        _assert_same(scripted(*args), expected)
        _assert_same(loaded(*args), expected)
    # Unbatched input goes through the same scripted forward.
    x = torch.randn(4, 5, dtype=torch.float64)
    _assert_same(loaded(x), model(x))
    # Scripting leaves the eager model as it was: still ours, still on the fused path.
    assert type(model.rnn) is lstm_fused.LSTM


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_script_packed_sequence(backend, config):
    model = PackedTagger(backend, **config)
    loaded = _save_and_load(torch.jit.script(model))
    for B in (3, 5):
        lengths = torch.randint(1, 8, (B,))
        lengths[0] = 8
        x, hx = _inputs(config, 8, B, with_state=True)
        _assert_same(loaded(x, lengths), model(x, lengths))
        _assert_same(loaded(x, lengths, hx), model(x, lengths, hx))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_trace_generalizes_to_other_sizes(backend, config):
    model = Tagger(backend, **config)
    traced = torch.jit.trace(model, _inputs(config, 6, 3, with_state=True))
    loaded = _save_and_load(traced)
    for T, B in ((6, 3), (11, 2), (1, 4)):
        args = _inputs(config, T, B, with_state=True)
        expected = model(*args)
        _assert_same(traced(*args), expected)
        _assert_same(loaded(*args), expected)


@pytest.mark.parametrize("backend", cpu_backends())
def test_trace_packed_sequence(backend):
    model = PackedTagger(backend, num_layers=2, bidirectional=True)
    sample = (torch.randn(6, 3, 5, dtype=torch.float64), torch.tensor([6, 2, 4]))
    loaded = _save_and_load(torch.jit.trace(model, sample))
    x, lengths = torch.randn(9, 4, 5, dtype=torch.float64), torch.tensor([3, 9, 1, 5])
    _assert_same(loaded(x, lengths), model(x, lengths))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_cell_script_and_trace(backend, bias):
    model = Stepper(backend, bias)
    x0 = torch.randn(3, 5, dtype=torch.float64)
    hx0 = (torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64))
    scripted = _save_and_load(torch.jit.script(model))
    traced = _save_and_load(torch.jit.trace(model, (x0, hx0)))
    x = torch.randn(6, 5, dtype=torch.float64)
    hx = (torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64))
    _assert_same(scripted(x, hx), model(x, hx))
    _assert_same(traced(x, hx), model(x, hx))
    _assert_same(scripted(x), model(x))
    _assert_same(scripted(x[0], (hx[0][0], hx[1][0])), model(x[0], (hx[0][0], hx[1][0])))
    assert type(model.cell) is lstm_fused.LSTMCell
