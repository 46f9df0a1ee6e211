"""ONNX export with both exporters, dynamic batch and sequence length, run in onnxruntime.

The exported float32 graphs must match a float64 run of the same weights within 1e-5 at sizes
other than the export sample. Needs onnx and onnxruntime (and onnxscript for dynamo=True):
the tests skip without them.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import functional
from helpers import cpu_backends

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ATOL = 1e-5  # float32 graph vs float64 PyTorch
EXPORTERS = ("dynamo_false", "dynamo_true")
BACKEND = cpu_backends()[0]  # the export never runs the fused op; eager references use it

pytestmark = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning",  # nn.LSTM's shape checks, as for any traced nn.LSTM
    "ignore::UserWarning",  # the legacy exporter's notes on batch_first / dynamic axes
    "ignore::DeprecationWarning",  # dynamo=False is deprecated in torch 2.13; it must still work
)


class Tagger(nn.Module):
    """Returns y, h_n, c_n; takes (h0, c0) when ``with_state``."""

    def __init__(self, with_state, **config):
        super().__init__()
        self.with_state = with_state
        self.rnn = lstm_fused.LSTM(5, 7, backend=BACKEND, **config)

    def forward(self, x, h0=None, c0=None):
        y, (h, c) = self.rnn(x, (h0, c0) if self.with_state else None)
        return y, h, c


class PackedTagger(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.rnn = lstm_fused.LSTM(5, 7, backend=BACKEND, **config)

    def forward(self, x, lengths):
        y, (h, c) = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(y)[0], h, c


class PaddedWithLengths(nn.Module):
    """functional.lstm on a padded batch plus lengths: exportable by dynamo=True (no packing ops)."""

    def __init__(self, **config):
        super().__init__()
        self.rnn = lstm_fused.LSTM(5, 7, backend=BACKEND, **config)

    def forward(self, x, lengths):
        rnn = self.rnn
        states = rnn.num_layers * (2 if rnn.bidirectional else 1)
        h0 = x.new_zeros(states, x.size(1), rnn.proj_size or rnn.hidden_size)
        c0 = x.new_zeros(states, x.size(1), rnn.hidden_size)
        weights = [getattr(rnn, name) for name in rnn._flat_weights_names]
        return functional.lstm(
            x, h0, c0, weights, num_layers=rnn.num_layers,
            bidirectional=rnn.bidirectional, has_biases=rnn.bias, proj_size=rnn.proj_size,
            dropout=0.0, training=False, lengths=lengths, backend=BACKEND,
        )


class Stepper(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = lstm_fused.LSTMCell(5, 7, backend=BACKEND)

    def forward(self, x, h0, c0):
        return self.cell(x, (h0, c0))


def export(model, args, path, exporter, axes):
    """Export with the named exporter; ``axes`` gives, per input, {dim: name} of its dynamic dims."""
    names = [f"in{i}" for i in range(len(args))]
    if exporter == "dynamo_false":
        torch.onnx.export(
            model, args, path, dynamo=False, input_names=names,
            dynamic_axes={n: a for n, a in zip(names, axes) if a},
        )
    else:
        pytest.importorskip("onnxscript")
        dims = {name: torch.export.Dim(name) for a in axes for name in a.values()}
        dynamic_shapes = tuple({d: dims[name] for d, name in a.items()} or None for a in axes)
        torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dynamic_shapes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(session, args):
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    assert len(feeds) == len(session.get_inputs())
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def assert_matches_float64(session, model, args):
    got = run(session, args)
    expected = model.double()(*[a.double() if a.is_floating_point() else a for a in args])
    model.float()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert (g.double() - e).abs().max().item() < ATOL


def _lstm_args(model, T, B, batch_first=False):
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5))
    if not model.with_state:
        return (x,)
    rnn = model.rnn
    states = rnn.num_layers * (2 if rnn.bidirectional else 1)
    return (x, torch.randn(states, B, rnn.proj_size or 7), torch.randn(states, B, 7))


CONFIGS = {
    "2layer_bidir_state": (True, dict(num_layers=2, bidirectional=True)),
    "batch_first_no_state": (False, dict(batch_first=True, num_layers=2)),
    "no_bias_bidir_state": (True, dict(bias=False, bidirectional=True)),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_lstm_dynamic_batch_and_length(exporter, config, tmp_path):
    with_state, kwargs = config
    model = Tagger(with_state, **kwargs).eval()
    batch_first = kwargs.get("batch_first", False)
    x_axes = {0: "B", 1: "T"} if batch_first else {0: "T", 1: "B"}
    axes = [x_axes] + ([{1: "B"}, {1: "B"}] if with_state else [])
    session = export(model, _lstm_args(model, 6, 3, batch_first), tmp_path / "m.onnx", exporter, axes)
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "LSTM" in ops and "Loop" not in ops and "Scan" not in ops
    for T, B in ((9, 2), (3, 5), (1, 1)):
        assert_matches_float64(session, model, _lstm_args(model, T, B, batch_first))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cell_dynamic_batch(exporter, tmp_path):
    model = Stepper().eval()
    sample = (torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7))
    session = export(model, sample, tmp_path / "m.onnx", exporter, [{0: "B"}] * 3)
    for B in (1, 6):
        assert_matches_float64(session, model, (torch.randn(B, 5), torch.randn(B, 7), torch.randn(B, 7)))


def _lengths(B, T):
    lengths = torch.randint(1, T + 1, (B,))
    lengths[torch.randint(0, B, ())] = T  # the padded length is the longest sequence's
    return lengths


def test_packed_sequence_dynamo_false(tmp_path):
    model = PackedTagger(num_layers=2, bidirectional=True).eval()
    sample = (torch.randn(6, 3, 5), torch.tensor([6, 2, 4]))
    session = export(model, sample, tmp_path / "m.onnx", "dynamo_false", [{0: "T", 1: "B"}, {0: "B"}])
    for T, B in ((9, 4), (4, 2)):
        assert_matches_float64(session, model, (torch.randn(T, B, 5), _lengths(B, T)))


@pytest.mark.parametrize("proj_size", [0, 3], ids=["lstm_node", "proj_scan"])
def test_lengths_dynamo_true(proj_size, tmp_path):
    # Forward and reverse directions with per-sequence lengths, through functional.lstm: ONNX
    # LSTM's sequence_lens, or the projected recurrence's masks inside its Scan loop.
    model = PaddedWithLengths(num_layers=2, bidirectional=True, proj_size=proj_size).eval()
    sample = (torch.randn(6, 3, 5), torch.tensor([6, 2, 4]))
    session = export(model, sample, tmp_path / "m.onnx", "dynamo_true", [{0: "T", 1: "B"}, {0: "B"}])
    for T, B in ((9, 4), (4, 2)):
        assert_matches_float64(session, model, (torch.randn(T, B, 5), _lengths(B, T)))


def test_packed_sequence_dynamo_true_says_why(tmp_path):
    pytest.importorskip("onnxscript")
    model = PackedTagger().eval()
    with pytest.raises(torch.onnx.OnnxExporterError, match="cannot export a PackedSequence"):
        torch.onnx.export(model, (torch.randn(6, 3, 5), torch.tensor([6, 2, 4])),
                          tmp_path / "m.onnx", dynamo=True)


def test_projection_dynamo_true_scan(tmp_path):
    model = Tagger(True, num_layers=2, bidirectional=True, proj_size=3).eval()
    axes = [{0: "T", 1: "B"}, {1: "B"}, {1: "B"}]
    session = export(model, _lstm_args(model, 6, 3), tmp_path / "m.onnx", "dynamo_true", axes)
    assert "Scan" in {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    for T, B in ((9, 2), (1, 4)):
        assert_matches_float64(session, model, _lstm_args(model, T, B))


def test_projection_dynamo_false_says_why(tmp_path):
    model = Tagger(False, proj_size=3).eval()
    with pytest.raises(NotImplementedError, match="proj_size > 0"):
        export(model, (torch.randn(6, 3, 5),), tmp_path / "m.onnx", "dynamo_false", [{0: "T", 1: "B"}])
