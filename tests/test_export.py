"""torch.export with dynamic batch and length, saved and loaded, and AOTInductor packages.

The exported graphs hold our recurrence custom op (nn.LSTM cannot be exported with a dynamic
length), so loading them needs ``import lstm_fused``; the artefacts are run at sizes other than
the export sample and compared with the eager module in float64.
"""

import pytest
import torch
from torch import nn
from torch.export import Dim

import lstm_fused
from helpers import cpu_backends, rel_error

# nn.LSTM's forward re-reads its parameters into the plain list _flat_weights each call;
# torch.export notes that as an attribute assignment. The parameters themselves are exported.
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")

TOL = 1e-12  # float64; the same op on the same inputs, only the graph around it differs


class Tagger(nn.Module):
    def __init__(self, backend, **config):
        super().__init__()
        self.rnn = lstm_fused.LSTM(5, 7, backend=backend, dtype=torch.float64, **config)
        features = (self.rnn.proj_size or 7) * (2 if self.rnn.bidirectional else 1)
        self.head = nn.Linear(features, 3, dtype=torch.float64)

    def forward(self, x, h0, c0):
        y, (h, c) = self.rnn(x, (h0, c0))
        return self.head(y), h, c


def _args(model, T, B):
    rnn = model.rnn
    states = rnn.num_layers * (2 if rnn.bidirectional else 1)
    f64 = dict(dtype=torch.float64)
    x = torch.randn((B, T, 5) if rnn.batch_first else (T, B, 5), **f64)
    return (x, torch.randn(states, B, rnn.proj_size or 7, **f64), torch.randn(states, B, 7, **f64))


def _dynamic_shapes(model):
    T, B = Dim("T", min=1), Dim("B", min=1)
    x_dims = {0: B, 1: T} if model.rnn.batch_first else {0: T, 1: B}
    return (x_dims, {1: B}, {1: B})


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_error(g, e) < TOL


CONFIGS = {
    "2layer_bidir": dict(num_layers=2, bidirectional=True),
    "batch_first_proj": dict(batch_first=True, proj_size=4),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_export_save_load_dynamic(backend, config, tmp_path):
    model = Tagger(backend, **config).eval()
    program = torch.export.export(model, _args(model, 6, 3), dynamic_shapes=_dynamic_shapes(model))
    assert any("lstm_fused" in str(node.target) for node in program.graph.nodes)
    torch.export.save(program, tmp_path / "tagger.pt2")
    loaded = torch.export.load(tmp_path / "tagger.pt2").module()
    with torch.no_grad():
        for T, B in ((9, 2), (1, 5), (6, 3)):
            args = _args(model, T, B)
            _assert_same(loaded(*args), model(*args))


# Slow: AOTInductor compiles and links C++ (about 35 s on 2 busy cores).
def test_aoti_package_dynamic(tmp_path):
    # One small model: the point is that the package runs our op at other sizes, not coverage.
    model = Tagger(cpu_backends()[0], bidirectional=True).eval()
    program = torch.export.export(model, _args(model, 6, 3), dynamic_shapes=_dynamic_shapes(model))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "tagger.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for T, B in ((9, 2), (2, 5)):
            args = _args(model, T, B)
            _assert_same(runner(*args), model(*args))
