"""The CPU wavefront over stacked layers (csrc/cpu/wavefront.cpp): inference of a stack of
unidirectional float32 layers with small steps, chunk by chunk, one thread per layer.

It must give what the layer-by-layer path with our input projection gives (the same kernels; only
rows that land in register tiles of another height may round differently) and match a
float64 nn.LSTM, on every instruction-set variant, for sequences that end in a partial chunk and
chunks of odd length; and apply only where it should (inference, no projection, lengths,
dropout or second direction, two threads or more, small steps).
"""

import pytest
import torch
from torch import nn

import lstm_fused
from lstm_fused import functional, ops
from helpers import rel_error, supported_cpu_variants

pytestmark = pytest.mark.skipif(
    "cpu" not in lstm_fused.available_backends()
    or not hasattr(torch.ops.lstm_fused, "wavefront_forward"),
    reason="the C++ extension is not built",
)

# (id, T, B, I, H, layers, bias, batch_first). Chunks are 96 // B steps: 24 at B = 4 (T = 100:
# 4 full chunks and one of 4), 19 at B = 5 (odd: the state changes buffer), 96 at B = 1.
SHAPES = [
    ("B4_partial_chunk", 100, 4, 24, 40, 3, True, False),
    ("B5_odd_chunks", 61, 5, 9, 33, 2, False, True),
    ("B1_two_chunks", 200, 1, 16, 24, 4, True, False),
    ("B3_deep", 150, 3, 64, 64, 6, True, False),
]


@pytest.fixture(autouse=True)
def two_threads_at_least():
    """The wavefront needs two threads; a machine or OMP_NUM_THREADS with one still runs it here
    (two OpenMP threads on one core are correct, just not faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def _applies(m, x, hx):
    with torch.no_grad():
        return functional.wavefront_applies(x, hx[0], hx[1], list(m._flat_weights), m.num_layers, m.backend)


def _draw(T, B, I, H, layers, batch_first):
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    hx = (torch.randn(layers, B, H, dtype=torch.float64), torch.randn(layers, B, H, dtype=torch.float64))
    return x, hx


@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_float64_and_the_layer_path(monkeypatch, variant, shape):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    _, T, B, I, H, layers, bias, batch_first = shape
    oracle = nn.LSTM(I, H, layers, bias=bias, batch_first=batch_first, dtype=torch.float64)
    fused = lstm_fused.LSTM(I, H, layers, bias=bias, batch_first=batch_first, backend="cpu")
    fused.load_state_dict({k: v.float() for k, v in oracle.state_dict().items()})
    x, hx = _draw(T, B, I, H, layers, batch_first)
    xf, hf = x.float(), tuple(t.float() for t in hx)
    assert _applies(fused, xf.transpose(0, 1) if batch_first else xf, hf)
    with torch.no_grad():
        want = oracle(x, hx)
        got = fused(xf, hf)
        # The layer path with our input projection for every layer, as the wavefront's items.
        monkeypatch.setattr(functional, "wavefront_applies", lambda *a, **k: False)
        monkeypatch.setattr(functional, "_OWN_GEMM_MIN_FEATURES", 0)
        monkeypatch.setitem(ops.OWN_GEMM, torch.float32, True)
        layered = fused(xf, hf)
    for a, b, name in ((got[0], want[0], "y"), (got[1][0], want[1][0], "h_n"), (got[1][1], want[1][1], "c_n")):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_error(a, b) <= 2e-5, (name, rel_error(a, b))
    # The same sums, except where a row falls alone into a register tile in one path and not in
    # the other (a 1-row tile sums even and odd k apart): float32 rounding apart at most.
    for a, b in ((got[0], layered[0]), (got[1][0], layered[1][0]), (got[1][1], layered[1][1])):
        assert rel_error(a, b) <= 1e-6


def test_without_state_and_unbatched():
    oracle = nn.LSTM(12, 20, 3, dtype=torch.float64)
    fused = lstm_fused.LSTM(12, 20, 3, backend="cpu")
    fused.load_state_dict({k: v.float() for k, v in oracle.state_dict().items()})
    x = torch.randn(300, 12, dtype=torch.float64)  # unbatched: B = 1
    with torch.no_grad():
        y, (h, c) = fused(x.float())
        y_ref, (h_ref, c_ref) = oracle(x)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape == (3, 20)
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        assert rel_error(a, b) <= 2e-5


def test_applies_only_to_small_stacked_inference():
    m = lstm_fused.LSTM(16, 32, 3, backend="cpu")
    x = torch.randn(100, 4, 16)
    hx = (torch.randn(3, 4, 32), torch.randn(3, 4, 32))
    assert _applies(m, x, hx)
    w = list(m._flat_weights)
    assert not functional.wavefront_applies(x, *hx, w, 3, "cpu")  # grad mode, weights need grad
    with torch.no_grad():
        assert not functional.wavefront_applies(x, *hx, w, 1, "cpu")  # one layer
        assert not functional.wavefront_applies(x[:40], *hx, w, 3, "cpu")  # under two chunks of 24
        assert not functional.wavefront_applies(x.double(), *(t.double() for t in hx), w, 3, "cpu")
        assert not functional.wavefront_applies(x, *hx, w, 3, "reference")
        big = torch.randn(3, 4, 512)  # W_hh of 4 MB: one core would stream it alone
        assert not functional.wavefront_applies(x, big, big, w, 3, "cpu")
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert not functional.wavefront_applies(x, *hx, w, 3, "cpu")
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("config", [dict(bidirectional=True), dict(proj_size=8), dict(dropout=0.5)],
                         ids=["bidirectional", "projection", "dropout_training"])
def test_other_stacks_take_the_layer_path(monkeypatch, config):
    real, calls = functional.wavefront_applies, []
    monkeypatch.setattr(functional, "wavefront_applies", lambda *a, **k: calls.append(a) or real(*a, **k))
    m = lstm_fused.LSTM(16, 32, 3, backend="cpu", **config).train("dropout" in config)
    with torch.no_grad():
        m(torch.randn(100, 4, 16))
    assert calls == [], "the wavefront was considered for a stack it cannot run"
    # The same stack without the option does consider it.
    lstm_fused.LSTM(16, 32, 3, backend="cpu").eval()(torch.randn(100, 4, 16))
    assert len(calls) == 1


def test_bad_arguments_are_errors():
    op = torch.ops.lstm_fused.wavefront_forward
    x, h = torch.randn(10, 2, 4), torch.randn(2, 2, 8)
    w = [torch.randn(32, 4), torch.randn(32, 8), torch.randn(32, 8), torch.randn(32, 8)]
    y, h_n, c_n = op(x, h, h, w, 2, False)
    assert y.shape == (10, 2, 8) and h_n.shape == c_n.shape == (2, 2, 8)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), h.double(), h.double(), [t.double() for t in w], 2, False)
    with pytest.raises(RuntimeError, match="expected 4 weights"):
        op(x, h, h, w[:3], 2, False)
    with pytest.raises(RuntimeError, match="w_ih"):
        op(x, h, h, [torch.randn(32, 5)] + w[1:], 2, False)
    with pytest.raises(RuntimeError, match="h0"):
        op(x, h[:1], h, w, 2, False)


def test_dynamo_traces_a_stack_that_runs_the_wavefront_in_eager():
    # Dynamo cannot trace torch.get_num_threads: compiled graphs keep the layer-by-layer ops.
    m = lstm_fused.LSTM(16, 32, 3, backend="cpu").eval()
    x = torch.randn(100, 4, 16)
    assert _applies(m, x, (torch.randn(3, 4, 32), torch.randn(3, 4, 32)))
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, backend="eager", fullgraph=True)(x)
    for a, b in ((eager[0], compiled[0]), (eager[1][0], compiled[1][0]), (eager[1][1], compiled[1][1])):
        assert rel_error(a, b) <= 1e-6
