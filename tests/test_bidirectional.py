"""Bidirectional CPU layers through lstm_fused::bidirectional_forward/backward: both directions
in one op, side by side (each on its own threads, no synchronization between steps) or one
after the other, as csrc/cpu/panel_recurrence.cpp chooses; LSTM_FUSED_CPU_DIRECTIONS forces
either (read on every call), so both arrangements run here on every machine."""

import pytest
import torch

import lstm_fused
from helpers import forward_backward, make_pair, op_calls, rel_error, supported_cpu_variants

pytestmark = pytest.mark.skipif("cpu" not in lstm_fused.available_backends(),
                                reason="the C++ extension is not built")

OPS = torch.ops.lstm_fused if "cpu" in lstm_fused.available_backends() else None
ARRANGEMENTS = ["paired", "in-turn"]

# (id, T, B, I, H, extra nn.LSTM kwargs, packed lengths or None). Partial row tiles and unit
# blocks; a batch of one (one slice per direction); sequences of unequal lengths (the reverse
# direction starts at each one's own end); two layers with dropout off and batch_first; and a
# layer large enough that each direction taking its turn runs on a team of threads, by blocks
# or batch slices, writing its strided half of y from every thread.
SHAPES = [
    ("B1", 9, 1, 5, 24, {}, None),
    ("ragged_tiles", 7, 7, 6, 40, {}, None),
    ("packed", 10, 5, 8, 36, {}, [10, 3, 7, 1, 6]),
    ("two_layers_batch_first", 6, 4, 10, 20, {"num_layers": 2, "batch_first": True}, None),
    ("no_bias", 5, 3, 4, 16, {"bias": False}, None),
    ("turns_on_teams", 6, 7, 12, 200, {}, [6, 2, 5, 6, 1, 3, 4]),
]


def _forward_backward(module, dtype, x, hx, cot, lengths):
    """y, h_n, c_n and every gradient of <outputs, cot>, in float64."""
    return [t.detach().double() for t in forward_backward(module, dtype, x, hx, cot, lengths)]


def _inputs(shape):
    _, T, B, I, H, extra, lengths = shape
    batch_first = extra.get("batch_first", False)
    L = 2 * extra.get("num_layers", 1)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    hx = (torch.randn(L, B, H, dtype=torch.float64), torch.randn(L, B, H, dtype=torch.float64))
    cot = (torch.randn((B, T, 2 * H) if batch_first else (T, B, 2 * H), dtype=torch.float64),
           torch.randn(L, B, H, dtype=torch.float64), torch.randn(L, B, H, dtype=torch.float64))
    return x, hx, cot, None if lengths is None else torch.tensor(lengths)


def _calls_of(op_name, fn):
    return op_calls(f"lstm_fused::{op_name}", fn)


@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_float32_parity_both_arrangements(monkeypatch, variant, arrangement, shape):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    monkeypatch.setenv("LSTM_FUSED_CPU_DIRECTIONS", arrangement)
    _, T, B, I, H, extra, _ = shape
    oracle, fused = make_pair(torch.float32, "cpu", input_size=I, hidden_size=H, bidirectional=True, **extra)
    x, hx, cot, lengths = _inputs(shape)
    want = _forward_backward(oracle, torch.float64, x, hx, cot, lengths)
    got = _forward_backward(fused, torch.float32, x, hx, cot, lengths)
    errors = [rel_error(a, b) for a, b in zip(got, want)]
    bad = {i: e for i, e in enumerate(errors) if not e <= 2e-5}
    assert not bad, f"relative errors above 2e-5 (0-2: y, h_n, c_n; then dx, dh0, dc0, params): {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_both_arrangements_compute_the_same_bits(monkeypatch, dtype, shape):
    """The same kernels on the same rows: only the threads differ, so must the results not."""
    _, T, B, I, H, extra, _ = shape
    _, fused = make_pair(dtype, "cpu", input_size=I, hidden_size=H, bidirectional=True, **extra)
    x, hx, cot, lengths = _inputs(shape)
    results = {}
    for arrangement in ARRANGEMENTS:
        monkeypatch.setenv("LSTM_FUSED_CPU_DIRECTIONS", arrangement)
        results[arrangement] = _forward_backward(fused, dtype, x, hx, cot, lengths)
    for i, (a, b) in enumerate(zip(*results.values())):
        assert torch.equal(a, b), i


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: every call runs alone")
def test_a_shape_takes_its_turns_on_a_team():
    _, T, B, _, H, _, _ = next(s for s in SHAPES if s[0] == "turns_on_teams")
    for backward in (False, True):
        slices, team = OPS.cpu_recurrence_plan(backward, T, B, H, torch.float32)
        assert slices > 1 or team > 1, backward


def test_the_layer_runs_one_op_for_both_directions():
    m = lstm_fused.LSTM(6, 8, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(5, 3, 6, requires_grad=True)

    def train_step():
        y, _ = m(x)
        y.sum().backward()

    assert _calls_of("bidirectional_forward", train_step) == 2
    assert _calls_of("bidirectional_backward", train_step) == 2
    assert _calls_of("recurrence_forward", train_step) == 0
    with torch.no_grad():
        assert _calls_of("bidirectional_forward", lambda: m(x)) == 2
    # Projections and float64 keep the one-direction ops.
    for model in (lstm_fused.LSTM(6, 8, bidirectional=True, proj_size=4, backend="cpu"),
                  lstm_fused.LSTM(6, 8, bidirectional=True, backend="cpu", dtype=torch.float64)):
        x_ = x.detach().to(next(model.parameters()).dtype)
        assert _calls_of("bidirectional_forward", lambda: model(x_)) == 0
        assert _calls_of("recurrence_forward", lambda: model(x_)) == 2


def _expected_slices(T, B, H, itemsize, threads, l2):
    """paired_direction_slices (panel_recurrence.cpp), restated."""
    slices = max(1, min(threads // 2, B))
    if threads < 2 or 2 * slices < threads or T * B * 4 * H * H < 1 << 16:
        return 0
    fits = 4 * H * H * itemsize <= l2 // 2  # W_hh within half an L2
    return slices if fits or B // slices >= 4 else 0  # or 4 rows a slice


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: the directions take turns")
def test_side_by_side_where_the_weights_fit_one_core_or_the_slices_have_rows(monkeypatch):
    monkeypatch.delenv("LSTM_FUSED_CPU_DIRECTIONS", raising=False)
    slices = lambda T, B, H, dtype=torch.float32: OPS.cpu_paired_direction_slices(T, B, H, dtype)
    l2, threads = OPS.cpu_core_l2_bytes(), torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        for H in (8, 64, 128, 192, 256, 384, 512):
            for B in (1, 2, 3, 4, 8, 16, 64):
                for T in (1, 5, 200):
                    want = _expected_slices(T, B, H, dtype.itemsize, threads, l2)
                    assert slices(T, B, H, dtype) == want, (T, B, H, dtype)
    # Both sides of each rule are in the grid: W_hh within half an L2 and beyond it; one row a
    # slice and 4; too little work.
    small = max(8, int((l2 // 2 // 16) ** 0.5) // 8 * 8)
    large = int((l2 // 16) ** 0.5) + 64
    many = 4 * max(1, threads // 2)
    assert slices(100, many, small) > 0 and slices(100, many, large) > 0
    assert slices(200, 1, large) == 0
    assert slices(1, 1, 8) == 0
    monkeypatch.setenv("LSTM_FUSED_CPU_DIRECTIONS", "paired")
    assert slices(1, 1, 8) == 1
    monkeypatch.setenv("LSTM_FUSED_CPU_DIRECTIONS", "in-turn")
    assert slices(100, many, small) == 0


def test_side_by_side_only_where_every_thread_gets_a_slice(monkeypatch):
    monkeypatch.delenv("LSTM_FUSED_CPU_DIRECTIONS", raising=False)
    threads = torch.get_num_threads()
    slices = lambda B: OPS.cpu_paired_direction_slices(100, B, 32, torch.float32)
    try:
        torch.set_num_threads(1)
        assert slices(16) == 0
        torch.set_num_threads(8)  # 4 slices a direction: 4 rows at least
        assert [slices(B) for B in (1, 3, 4, 16)] == [0, 0, 4, 4]
    finally:
        torch.set_num_threads(threads)


def test_a_bad_arrangement_is_an_error(monkeypatch):
    m = lstm_fused.LSTM(4, 8, bidirectional=True, backend="cpu")
    monkeypatch.setenv("LSTM_FUSED_CPU_DIRECTIONS", "both")
    message = "LSTM_FUSED_CPU_DIRECTIONS=both is not one of auto, paired, in-turn"
    with pytest.raises(RuntimeError, match=message):
        m(torch.randn(3, 2, 4))


def _op_args(T=4, B=3, H=8, dtype=torch.float32, requires_grad=False):
    args = [torch.randn(T, B, 4 * H, dtype=dtype), torch.randn(T, B, 4 * H, dtype=dtype),
            torch.randn(4 * H, H, dtype=dtype) / H**0.5, torch.randn(4 * H, H, dtype=dtype) / H**0.5,
            torch.randn(2, B, H, dtype=dtype), torch.randn(2, B, H, dtype=dtype)]
    return [a.requires_grad_(requires_grad) for a in args]


@pytest.mark.parametrize("lengths", [None, [4, 1, 3]], ids=["padded", "lengths"])
def test_opcheck(lengths):
    lens = None if lengths is None else torch.tensor(lengths)
    torch.library.opcheck(OPS.bidirectional_forward, (*_op_args(requires_grad=True), lens, True))
    torch.library.opcheck(OPS.bidirectional_forward, (*_op_args(), lens, False))
    xf, xr, wf, wr, h0, c0 = _op_args()
    y, h_n, c_n, gates, c_all = OPS.bidirectional_forward(xf, xr, wf, wr, h0, c0, lens, True)
    for weight_grads in (True, False):
        torch.library.opcheck(OPS.bidirectional_backward,
                              (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), wf, wr,
                               h0, c0, lens, y, gates, c_all, weight_grads))


def test_second_order_gradients_match_the_reference_backend():
    """create_graph=True through the pair op (float32) against the reference backend's autograd."""
    torch.manual_seed(0)
    ref = lstm_fused.LSTM(3, 5, bidirectional=True, backend="reference")
    fused = lstm_fused.LSTM(3, 5, bidirectional=True, backend="cpu")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    found = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_()
        y, (h_n, c_n) = m(xi)
        loss = (y.tanh() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + h_n.pow(2).sum() + c_n.sum()
        dx, dw = torch.autograd.grad(loss, [xi, m.weight_hh_l0_reverse], create_graph=True)
        second = torch.autograd.grad(dx.pow(2).sum() + dw.pow(2).sum(), [xi, *m.parameters()])
        found.append([dx, dw, *second])
    for a, b in zip(*found):
        assert rel_error(b, a) < 1e-4


def test_backward_of_an_unsaved_forward_is_an_error():
    xf, xr, wf, wr, h0, c0 = _op_args()
    y, h_n, c_n, gates, c_all = OPS.bidirectional_forward(xf, xr, wf, wr, h0, c0, None, False)
    assert gates.numel() == 0 and c_all.numel() == 0
    with pytest.raises(RuntimeError, match=r"saved gates \(2, T, B, 4H\).*save=False"):
        OPS.bidirectional_backward(torch.randn_like(y), h_n, c_n, wf, wr, h0, c0, None, y, gates, c_all, True)


def test_bad_op_arguments_are_errors():
    xf, xr, wf, wr, h0, c0 = _op_args()
    with pytest.raises(RuntimeError, match=r"h0 \(2, B, H\), one per direction"):
        OPS.bidirectional_forward(xf, xr, wf, wr, h0[0], c0, None, False)
    with pytest.raises(RuntimeError, match="xproj_r must have shape"):
        OPS.bidirectional_forward(xf, xr[:3], wf, wr, h0, c0, None, False)
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        OPS.bidirectional_forward(xf, xr, wf, wr[:, :4], h0, c0, None, False)
    with pytest.raises(RuntimeError, match="xproj_r has dtype"):
        OPS.bidirectional_forward(xf, xr.double(), wf, wr, h0, c0, None, False)
    doubles = [t.double() for t in (xf, xr, wf, wr, h0, c0)]
    with pytest.raises(RuntimeError, match="supports float32, bfloat16 and float16, not Double"):
        OPS.bidirectional_forward(*doubles, None, False)
