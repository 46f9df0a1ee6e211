"""The CUDA backend (csrc/cuda) on a GPU: both of its paths against the float64 reference.

GPU only: skipped where there is no CUDA device or the extension has no CUDA kernels (CI compiles
the sources instead: tests/test_cuda_compile.py). Run it with scripts/gpu_cuda_check.sh.

* Op level: torch.ops.lstm_fused.recurrence_forward / _backward on each path (forced with
  LSTM_FUSED_CUDA_PATH) against reference.recurrence_forward_ref in float64, differentiated by
  plain autograd (independent of every hand-written backward). fp32: 2e-5 relative, with cuDNN
  TF32 off (the kernels follow torch.backends.cudnn.allow_tf32 like nn.LSTM). bf16/fp16: at most
  twice the error of nn.LSTM (cuDNN) in the same dtype on the same inputs, plus a small floor;
  cuDNN runs the very same recurrence as an nn.LSTM whose W_ih is the identity and has no bias,
  so its input projection is xproj itself.
* Module level: lstm_fused.LSTM(backend="cuda") on tests/test_parity.py's SHAPES table.
* opcheck, torch.compile(fullgraph=True), save=False / frozen weights, errors, and offsets past
  2^31 elements.
Outputs are poisoned with NaN before the kernels run (LSTM_FUSED_CUDA_POISON=1): an element a
kernel forgets to write fails the test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import dispatch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if "cuda" not in lstm_fused.available_backends():
    pytest.skip(f"the cuda backend is unavailable: {dispatch.unavailable_reason('cuda')}",
                allow_module_level=True)

from lstm_fused import reference  # noqa: E402
from helpers import draw_op_inputs, make_pair, rel_error, run_and_grad  # noqa: E402
from test_parity import FULL_PRECISION_TOL, HALF_FLOOR, SHAPES  # noqa: E402

DEVICE = torch.device("cuda")
FWD = torch.ops.lstm_fused.recurrence_forward
BWD = torch.ops.lstm_fused.recurrence_backward
PATH_ENV = "LSTM_FUSED_CUDA_PATH"
HALF = [torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(autouse=True)
def _exact_fp32_and_poison(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setenv("LSTM_FUSED_CUDA_POISON", "1")


def _lengths(B, T, zero=False):
    """Deterministic, ragged, at least one full-length sequence (and one empty one if asked)."""
    lens = [T] + [(7 * b + 3) % T + 1 for b in range(1, B)]
    if zero:
        lens[-1] = 0
    return lens


# id: (T, B, H, P or None: no projection, lengths or None, reverse). Awkward sizes on purpose.
CASES = {
    "T1": (1, 3, 16, None, None, False),
    "B1": (9, 1, 32, None, None, False),
    "oddH": (7, 5, 13, None, None, False),
    "B10_rev": (6, 10, 24, None, None, True),
    "B3_oddH_rev": (5, 3, 33, None, None, True),
    "lengths": (6, 4, 17, None, [6, 1, 3, 2], False),
    "lengths_rev": (6, 4, 17, None, [2, 6, 5, 1], True),
    "proj": (8, 4, 20, 12, None, False),
    "proj_rev_oddP": (5, 3, 24, 7, None, True),
    "proj_lengths_rev": (5, 3, 33, 7, [5, 2, 3], True),
    "proj_lengths": (5, 6, 24, 16, [1, 5, 4, 3, 5, 2], False),
}
# A zero-length sequence (legal in the op contract; pack_padded_sequence, hence nn.LSTM, refuses
# it, so these have no cuDNN yardstick and run in fp32 only).
ZERO_LENGTH_CASES = {
    "zero_len": (6, 4, 17, None, [6, 0, 3, 2], False),
    "zero_len_rev": (6, 4, 17, None, [0, 6, 5, 1], True),
    "zero_len_proj_rev": (5, 3, 20, 9, [5, 0, 3], True),
}
# GPU-sized: the hidden sizes and batches the benchmarks use.
GPU_CASES = {
    "h256_b1": (64, 1, 256, None, None, False),
    "h256_b16_rev": (48, 16, 256, None, None, True),
    "h512_b64_lengths": (32, 64, 512, None, _lengths(64, 32), False),
    "h768_b16_lengths_rev": (32, 16, 768, None, _lengths(16, 32), True),
    "h1024_b1": (32, 1, 1024, None, None, False),
    "h1024_b64_rev": (16, 64, 1024, None, None, True),
    "h512_b16_proj_lengths_rev": (24, 16, 512, 128, _lengths(16, 24), True),
    "h1024_b64_proj": (16, 64, 1024, 512, None, False),
    # Several batch groups on the persistent path, the last one ragged (70 = 16 * 4 + 6).
    "h256_b70_groups_lengths_rev": (24, 70, 256, None, _lengths(70, 24), True),
}
ALL_CASES = {**CASES, **ZERO_LENGTH_CASES, **GPU_CASES}
# Shapes the persistent kernels must accept in every dtype (no projection, small W_hh): refusing
# one of these is a failure, not a skip. Larger ones may legitimately not fit a given GPU.
MUST_FIT_PERSISTENT = {"T1", "B1", "oddH", "B10_rev", "B3_oddH_rev", "lengths", "lengths_rev",
                       "h256_b1", "h256_b16_rev", "h256_b70_groups_lengths_rev"}

NAMES = ["y", "h_n", "c_n", "d_xproj", "d_w_hh", "d_w_hr", "d_h0", "d_c0"]


def _use_path(monkeypatch, path):
    monkeypatch.setenv(PATH_ENV, path)


def _draw(T, B, H, P, lengths):
    return draw_op_inputs(T, B, H, P, lengths, DEVICE)


def _run(forward, inputs, lens, reverse, cot, dtype):
    """{name: tensor} of y, h_n, c_n and the grads of <(y, h_n, c_n), cot>, plus what else the
    forward returned (gates, c_all for the ops)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    y, h_n, c_n, *extra = forward(*leaves, lens, reverse)
    loss = sum((out * g.to(dtype)).sum() for out, g in zip((y, h_n, c_n), cot))
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    out = dict(zip(("y", "h_n", "c_n"), (y, h_n, c_n)))
    for name, t in zip(("d_xproj", "d_w_hh", "d_w_hr", "d_h0", "d_c0"), leaves):
        out[name] = None if t is None else next(grads)
    return out, extra


def _fused(xproj, w_hh, w_hr, h0, c0, lens, reverse):
    return FWD(xproj, w_hh, w_hr, h0, c0, lens, reverse, True)


def _reference(xproj, w_hh, w_hr, h0, c0, lens, reverse):
    return reference.recurrence_forward_ref(xproj, w_hh, w_hr, h0, c0, lens, reverse, True)


def _flip_index(T, B, lens, device):
    """(T, B) time index reversing each sequence within its own length (padding stays put)."""
    t = torch.arange(T, device=device).view(T, 1).expand(T, B)
    if lens is None:
        return T - 1 - t
    L = lens.view(1, B)
    return torch.where(t < L, L - 1 - t, t)


def _cudnn(xproj, w_hh, w_hr, h0, c0, lens, reverse):
    """The same recurrence through nn.LSTM (cuDNN): W_ih = I and no bias make its input projection
    exactly xproj; reverse (per sequence, within its length) by flipping in and out; lengths
    through a PackedSequence. Differentiable in all five inputs."""
    T, B, H4 = xproj.shape
    H, P = H4 // 4, w_hh.shape[1]
    lstm = nn.LSTM(H4, H, bias=False, proj_size=P if w_hr is not None else 0,
                   device=xproj.device, dtype=xproj.dtype)
    lstm.weight_ih_l0 = nn.Parameter(torch.eye(H4, device=xproj.device, dtype=xproj.dtype),
                                     requires_grad=False)
    # Non-leaf weights keep the graph to w_hh / w_hr; nn.LSTM warns that they are not one
    # flattened chunk, which only costs a copy.
    del lstm.weight_hh_l0
    lstm.weight_hh_l0 = w_hh
    if w_hr is not None:
        del lstm.weight_hr_l0
        lstm.weight_hr_l0 = w_hr  # RNNBase.__setattr__ keeps its _flat_weights list in step
    x = xproj
    if reverse:
        idx = _flip_index(T, B, lens, x.device)
        x = x.gather(0, idx.unsqueeze(-1).expand(T, B, H4))
    hx = (h0.unsqueeze(0), c0.unsqueeze(0))
    if lens is None:
        y, (h_n, c_n) = lstm(x, hx)
    else:
        packed = pack_padded_sequence(x, lens.cpu(), enforce_sorted=False)
        y, (h_n, c_n) = lstm(packed, hx)
        y, _ = pad_packed_sequence(y, total_length=T)
    if reverse:
        y = y.gather(0, idx.unsqueeze(-1).expand(T, B, y.shape[2]))
    return y, h_n[0], c_n[0]


def _compare(case, dtype):
    T, B, H, P, lengths, reverse = case
    inputs, lens, cot = _draw(T, B, H, P, lengths)
    got, (gates, c_all) = _run(_fused, inputs, lens, reverse, cot, dtype)
    want, (want_gates, want_c_all) = _run(_reference, inputs, lens, reverse, cot, torch.float64)
    got.update(gates=gates, c_all=c_all)
    want.update(gates=want_gates, c_all=want_c_all)
    if dtype == torch.float32:
        bounds = {name: FULL_PRECISION_TOL[torch.float32] for name in want}
    else:
        # nn.LSTM in the same dtype is the yardstick. gates / c_all have no cuDNN counterpart;
        # they are checked in fp32 and, here, through the gradients computed from them.
        base, _ = _run(_cudnn, inputs, lens, reverse, cot, dtype)
        bounds = {name: 2 * rel_error(base[name], want[name]) + HALF_FLOOR
                  for name in NAMES if want[name] is not None}
    errors = {}
    for name, expected in want.items():
        actual = got[name]
        if expected is None:
            assert actual is None, name
            continue
        assert actual.dtype == (torch.float32 if name == "c_all" else dtype), name
        assert actual.shape == expected.shape, name
        if name in bounds:
            errors[name] = rel_error(actual, expected)
    bad = {k: (f"{v:.3g}", f"{bounds[k]:.3g}") for k, v in errors.items() if not v <= bounds[k]}
    assert not bad, f"(relative error, bound): {bad}"


def _compare_on_path(monkeypatch, name, case, dtype, path):
    """Run on `path`; a persistent refusal is expected with projection (tested separately) and
    tolerated (skip) only for shapes that may not fit the device. fp32 here has TF32 off, so the
    persistent kernels multiply with exact fp32 FMAs and must meet the fp32 bound."""
    _use_path(monkeypatch, path)
    if path == "persistent" and case[3] is not None:
        pytest.skip("the persistent kernels have no projection (refusal tested below)")
    try:
        _compare(case, dtype)
    except RuntimeError as exc:
        refused = f"{PATH_ENV}=persistent" in str(exc)
        if not refused or name in MUST_FIT_PERSISTENT:
            raise
        pytest.skip(f"persistent does not fit here: {str(exc).splitlines()[0]}")


@pytest.mark.parametrize("path", ["general", "persistent", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(CASES))
def test_op_parity(monkeypatch, name, dtype, path):
    _compare_on_path(monkeypatch, name, CASES[name], dtype, path)


@pytest.mark.parametrize("name", list(ZERO_LENGTH_CASES))
def test_op_parity_zero_length_fp32(monkeypatch, name):
    _use_path(monkeypatch, "general")
    _compare(ZERO_LENGTH_CASES[name], torch.float32)


@pytest.mark.parametrize("name", ["zero_len", "zero_len_rev"])
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("path", ["general", "persistent"])
def test_op_zero_length_half_paths_agree(monkeypatch, name, dtype, path):
    """No cuDNN yardstick with an empty sequence: the empty sequence's outputs are exact (zeros,
    state passed through), and the others equal a run without it."""
    T, B, H, P, lengths, reverse = ZERO_LENGTH_CASES[name]
    _use_path(monkeypatch, path)
    inputs, lens, cot = _draw(T, B, H, P, lengths)
    got, _ = _run(_fused, inputs, lens, reverse, cot, dtype)
    empty = lengths.index(0)
    keep = [b for b in range(B) if b != empty]
    assert torch.equal(got["y"][:, empty], torch.zeros_like(got["y"][:, empty]))
    assert torch.equal(got["h_n"][empty], inputs[3][empty].to(dtype))
    assert torch.equal(got["c_n"][empty], inputs[4][empty].to(dtype))
    assert torch.equal(got["d_xproj"][:, empty], torch.zeros_like(got["d_xproj"][:, empty]))
    assert torch.equal(got["d_h0"][empty], cot[1][empty].to(dtype))
    assert torch.equal(got["d_c0"][empty], cot[2][empty].to(dtype))
    xproj, w_hh, w_hr, h0, c0 = inputs
    sub_inputs = (xproj[:, keep], w_hh, w_hr, h0[keep], c0[keep])
    sub_cot = (cot[0][:, keep], cot[1][keep], cot[2][keep])
    alone, _ = _run(_fused, sub_inputs, lens[keep], reverse, sub_cot, dtype)
    # Same math, but cuBLAS / the kernel may pick another tiling (summation order) for a batch
    # one smaller, so agreement is to rounding, not bitwise.
    for key in ("y", "h_n", "c_n", "d_xproj", "d_h0", "d_c0", "d_w_hh"):
        part = got[key] if key == "d_w_hh" else (got[key][:, keep] if got[key].dim() == 3 else got[key][keep])
        assert rel_error(part, alone[key]) < 1e-2, key


@pytest.mark.parametrize("path", ["general", "persistent"])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_op_parity_gpu_shapes(monkeypatch, name, dtype, path):
    _compare_on_path(monkeypatch, name, GPU_CASES[name], dtype, path)


# --------------------------------------------------------------------------------------------
# The cluster-resident forward (sm_90; forced with LSTM_FUSED_CUDA_PATH=cluster, whose backward
# runs as under auto, so these check the cluster forward's outputs and saved tensors).

needs_clusters = pytest.mark.skipif(torch.cuda.get_device_capability(DEVICE)[0] < 9,
                                    reason="thread-block clusters need sm_90")
# Small W_hh: refusing one of these is a failure; the larger ones may not fit (fp32 at H=512).
MUST_FIT_CLUSTER = {"T1", "B1", "oddH", "B10_rev", "B3_oddH_rev", "lengths", "lengths_rev",
                    "h256_b1", "h256_b16_rev", "h256_b70_groups_lengths_rev"}
CLUSTER_CASES = sorted(MUST_FIT_CLUSTER) + ["h512_b64_lengths"]


def _compare_cluster(monkeypatch, name, dtype, may_refuse=False):
    _use_path(monkeypatch, "cluster")
    try:
        _compare(ALL_CASES[name], dtype)
    except RuntimeError as exc:
        if f"{PATH_ENV}=cluster" not in str(exc) or (name in MUST_FIT_CLUSTER and not may_refuse):
            raise
        pytest.skip(f"the cluster kernel does not fit here: {str(exc).splitlines()[0]}")


@needs_clusters
@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", CLUSTER_CASES)
def test_op_parity_cluster_forward(monkeypatch, name, dtype):
    _compare_cluster(monkeypatch, name, dtype)


@needs_clusters
@pytest.mark.parametrize("units,name", [(8, "B3_oddH_rev"), (16, "h256_b16_rev"),
                                        (32, "h256_b70_groups_lengths_rev")])  # fmt: skip
def test_op_parity_cluster_forced_units(monkeypatch, units, name):
    # A forced size may exceed what this GPU runs (16-block clusters are a non-portable size):
    # a refusal is a skip here; the default plan's refusals are failures above.
    monkeypatch.setenv("LSTM_FUSED_CUDA_UNITS", str(units))
    _compare_cluster(monkeypatch, name, torch.bfloat16, may_refuse=True)


@needs_clusters
def test_cluster_refuses_projection_with_reason(monkeypatch):
    _use_path(monkeypatch, "cluster")
    (xproj, w_hh, w_hr, h0, c0), lens, _ = _draw(3, 2, 16, 8, None)
    with pytest.raises(RuntimeError, match=f"{PATH_ENV}=cluster.*proj_size"):
        FWD(xproj, w_hh, w_hr, h0, c0, lens, False, False)


# Tile configurations the planner does not pick by default, forced through its tuning knobs:
# every units-per-block instance, and the state restaged in several chunks per step.
TUNING_KNOBS = {
    "units4": ({"LSTM_FUSED_CUDA_UNITS": "4"}, "h256_b16_rev"),
    "units8": ({"LSTM_FUSED_CUDA_UNITS": "8"}, "h512_b64_lengths"),
    "units16": ({"LSTM_FUSED_CUDA_UNITS": "16"}, "h768_b16_lengths_rev"),
    "many_chunks": ({"LSTM_FUSED_CUDA_MAX_CHUNKS": "64"}, "h1024_b64_rev"),
}


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("knob", list(TUNING_KNOBS))
def test_op_parity_forced_configurations(monkeypatch, knob, dtype):
    env, name = TUNING_KNOBS[knob]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _compare_on_path(monkeypatch, name, GPU_CASES[name], dtype, "persistent")


@pytest.mark.parametrize("path", ["general", "persistent"])
@pytest.mark.parametrize("name", ["h256_b16_rev", "h512_b16_proj_lengths_rev"])
def test_tf32_follows_cudnn_switch(monkeypatch, name, path):
    """With cuDNN TF32 allowed (as nn.LSTM's cuDNN path would use it) fp32 stays close; the
    persistent kernels then multiply fp32 in TF32 on the tensor cores (no projection there)."""
    if path == "persistent" and GPU_CASES[name][3] is not None:
        pytest.skip("projection runs the general path")
    _use_path(monkeypatch, path)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    T, B, H, P, lengths, reverse = GPU_CASES[name]
    inputs, lens, cot = _draw(T, B, H, P, lengths)
    got, _ = _run(_fused, inputs, lens, reverse, cot, torch.float32)
    want, _ = _run(_reference, inputs, lens, reverse, cot, torch.float64)
    for key, expected in want.items():
        if expected is not None:
            assert rel_error(got[key], expected) < 2e-2, key


# --------------------------------------------------------------------------------------------
# Paths and errors.


@pytest.mark.parametrize(
    "dtype,proj,reason",
    [(torch.float32, True, "proj_size"), (torch.bfloat16, True, "proj_size"), (torch.float16, True, "proj_size")],
    ids=["fp32_proj", "bf16_proj", "fp16_proj"],
)
def test_persistent_refuses_with_reason(monkeypatch, dtype, proj, reason):
    _use_path(monkeypatch, "persistent")
    (xproj, w_hh, w_hr, h0, c0), lens, _ = _draw(3, 2, 16, 8 if proj else None, None)
    args = [None if t is None else t.to(dtype) for t in (xproj, w_hh, w_hr, h0, c0)]
    with pytest.raises(RuntimeError, match=f"{PATH_ENV}=persistent.*{reason}"):
        FWD(*args, lens, False, False)
    monkeypatch.setenv(PATH_ENV, "auto")  # auto falls back to the general path silently
    FWD(*args, lens, False, False)


def test_bad_path_value_and_float64_are_errors(monkeypatch):
    (xproj, w_hh, _, h0, c0), lens, _ = _draw(2, 2, 8, None, None)
    with pytest.raises(RuntimeError, match="float64"):
        FWD(xproj, w_hh, None, h0, c0, lens, False, False)
    _use_path(monkeypatch, "fastest")
    with pytest.raises(RuntimeError, match=f"{PATH_ENV}=fastest"):
        FWD(xproj.float(), w_hh.float(), None, h0.float(), c0.float(), lens, False, False)
    with pytest.raises(RuntimeError, match="float64"):
        lstm_fused.LSTM(4, 8, backend="cuda", device=DEVICE, dtype=torch.float64)(
            torch.randn(3, 2, 4, device=DEVICE, dtype=torch.float64))


@pytest.mark.parametrize("path", ["general", "persistent"])
def test_save_false_and_frozen_weights(monkeypatch, path):
    _use_path(monkeypatch, path)
    T, B, H = 5, 3, 32
    (xproj, w_hh, _, h0, c0), lens, (dy, dh, dc) = _draw(T, B, H, None, [5, 2, 3])
    args = [t.bfloat16() for t in (xproj, w_hh)] + [None] + [t.bfloat16() for t in (h0, c0)]
    y, h_n, c_n, gates, c_all = FWD(*args, lens, False, True)
    y2, h2, c2, no_gates, no_c_all = FWD(*args, lens, False, False)
    assert no_gates.numel() == 0 and no_c_all.numel() == 0 and no_c_all.dtype == torch.float32
    assert torch.equal(y, y2) and torch.equal(h_n, h2) and torch.equal(c_n, c2)
    bwd = (dy.bfloat16(), dh.bfloat16(), dc.bfloat16(), args[1], None, args[3], args[4], lens, False,
           y, gates, c_all)  # fmt: skip
    full = BWD(*bwd, True)
    frozen = BWD(*bwd, False)
    assert frozen[1].numel() == 0 and frozen[2].numel() == 0 and full[2].numel() == 0
    assert full[1].shape == w_hh.shape and full[1].dtype == torch.bfloat16
    for a, b in zip((full[0], full[3], full[4]), (frozen[0], frozen[3], frozen[4])):
        assert torch.equal(a, b)


def test_non_contiguous_inputs(monkeypatch):
    _use_path(monkeypatch, "general")
    (xproj, w_hh, w_hr, h0, c0), lens, _ = _draw(4, 3, 16, 8, [4, 1, 3])
    args = [t.float() for t in (xproj, w_hh, w_hr, h0, c0)]
    strided = [args[0].transpose(0, 1).contiguous().transpose(0, 1),
               args[1].t().contiguous().t(), args[2].t().contiguous().t(),
               args[3].t().contiguous().t(), args[4].t().contiguous().t()]
    assert not any(t.is_contiguous() for t in strided)
    for a, b in zip(FWD(*args, lens, True, True), FWD(*strided, lens, True, True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offsets_past_2_31_elements(monkeypatch):
    """T*B*4H > 2^31: the last step's xproj / gates / d(xproj) sit past int32 offsets. Checked
    against one step of the reference from the saved state before it (a full float64 reference
    would not fit)."""
    _use_path(monkeypatch, "general")
    monkeypatch.delenv("LSTM_FUSED_CUDA_POISON")  # 10 GB of fills buy nothing here
    T, B, H = 4100, 256, 512
    assert T * B * 4 * H > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GB of free GPU memory")
    dt = torch.bfloat16
    xproj = torch.randn(T, B, 4 * H, device=DEVICE, dtype=dt)
    w_hh = (torch.randn(4 * H, H, device=DEVICE) / H**0.5).to(dt)
    h0, c0 = torch.randn(B, H, device=DEVICE, dtype=dt), torch.randn(B, H, device=DEVICE, dtype=dt)
    y, h_n, c_n, gates, c_all = FWD(xproj, w_hh, None, h0, c0, None, False, True)
    # the last step from the state after step T-2
    t = T - 1
    y_t, h_t, c_t, g_t, call_t = reference.recurrence_forward_ref(
        xproj[t:].double(), w_hh.double(), None, y[t - 1].double(), c_all[t - 1].double(), None, False, True)
    assert rel_error(gates[t], g_t[0]) < 1e-2
    assert rel_error(c_all[t], call_t[0]) < 1e-2
    assert rel_error(y[t], y_t[0]) < 1e-2
    assert torch.equal(h_n, y[t])
    # backward: the first processed step's d(xproj) is a function of that step alone
    dy = torch.randn(T, B, H, device=DEVICE, dtype=dt)
    dh_n, dc_n = torch.randn_like(h0), torch.randn_like(c0)
    dxproj = BWD(dy, dh_n, dc_n, w_hh, None, h0, c0, None, False, y, gates, c_all, False)[0]
    del gates  # memory
    _, _, _, g_t, _ = reference.recurrence_forward_ref(
        xproj[t:].double(), w_hh.double(), None, y[t - 1].double(), c_all[t - 1].double(), None, False, True)
    dx_t = reference.recurrence_backward_ref(
        dy[t:].double(), dh_n.double(), dc_n.double(), w_hh.double(), None, y[t - 1].double(),
        c_all[t - 1].double(), None, False, y[t:].double(), g_t, c_all[t:].double())[0]
    assert rel_error(dxproj[t], dx_t[0]) < 1e-2
    assert torch.isfinite(dxproj[0]).all()


# --------------------------------------------------------------------------------------------
# Module level: lstm_fused.LSTM(backend="cuda") against nn.LSTM, the SHAPES table.


def _module_inputs(T, B, I, module):
    L = module.num_layers * (2 if module.bidirectional else 1)
    H, P = module.hidden_size, module.proj_size or module.hidden_size
    D = 2 if module.bidirectional else 1
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(B, T, I, **f64) if module.batch_first else torch.randn(T, B, I, **f64)
    hx = (torch.randn(L, B, P, **f64) * 0.5, torch.randn(L, B, H, **f64) * 0.5)
    y_shape = (B, T, D * P) if module.batch_first else (T, B, D * P)
    cot = (torch.randn(y_shape, **f64), torch.randn(L, B, P, **f64), torch.randn(L, B, H, **f64))
    return x, hx, cot


def _module_errors(got, want):
    errors = {"y": rel_error(got[0], want[0]), "h_n": rel_error(got[1], want[1]),
              "c_n": rel_error(got[2], want[2])}
    for name, g in want[3].items():
        assert got[3][name] is not None, f"no gradient for {name}"
        errors["d" + name] = rel_error(got[3][name], g)
    return errors


def _module_case(shape, dtype):
    _, T, B, I, H, extra = shape
    oracle, fused = make_pair(dtype, "cuda", input_size=I, hidden_size=H, **extra)
    oracle, fused = oracle.to(DEVICE), fused.to(DEVICE)
    x, hx, cot = _module_inputs(T, B, I, oracle)
    want = run_and_grad(oracle, x, hx, cot)
    got = run_and_grad(fused, x.to(dtype), tuple(t.to(dtype) for t in hx), cot)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    for name, g in got[3].items():
        assert g.dtype == dtype, name
    return oracle, (x, hx, cot), want, _module_errors(got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_module_fp32_parity(monkeypatch, shape):
    _use_path(monkeypatch, "auto")
    _, _, _, errors = _module_case(shape, torch.float32)
    tol = FULL_PRECISION_TOL[torch.float32]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("path", ["auto", "general"])
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_module_half_within_twice_nn_lstm(monkeypatch, shape, dtype, path):
    _use_path(monkeypatch, path)
    _, T, B, I, H, extra = shape
    oracle, (x, hx, cot), want, errors = _module_case(shape, dtype)
    # nn.LSTM itself (cuDNN) in the same dtype on the same inputs: the yardstick.
    native = nn.LSTM(input_size=I, hidden_size=H, **extra, dtype=torch.float64, device=DEVICE)
    native.load_state_dict(oracle.state_dict())
    native = native.to(dtype)
    base = run_and_grad(native, x.to(dtype), tuple(t.to(dtype) for t in hx), cot)
    native_errors = _module_errors(base, want)
    bad = {k: (v, native_errors[k]) for k, v in errors.items() if not v <= 2 * native_errors[k] + HALF_FLOOR}
    assert not bad, f"(ours, nn.LSTM) relative errors: {bad}"


def test_module_packed_sequence_bidirectional(monkeypatch):
    _use_path(monkeypatch, "general")
    oracle, fused = make_pair(torch.float32, "cuda", input_size=6, hidden_size=19, bidirectional=True)
    oracle, fused = oracle.to(DEVICE), fused.to(DEVICE)
    lengths = [5, 3, 1]
    x = torch.randn(5, 3, 6, dtype=torch.float64, device=DEVICE)
    y_ref, (h_ref, c_ref) = oracle(pack_padded_sequence(x, lengths))
    y, (h, c) = fused(pack_padded_sequence(x.float(), lengths))
    assert torch.equal(y.batch_sizes, y_ref.batch_sizes)
    for a, e in ((y.data, y_ref.data), (h, h_ref), (c, c_ref)):
        assert rel_error(a, e) < 2e-5


def test_auto_picks_cuda_on_gpu(monkeypatch):
    monkeypatch.delenv(lstm_fused.dispatch.ENV_VAR, raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert lstm_fused.dispatch.resolve("auto", DEVICE, dtype) == "cuda"


# --------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile.


@pytest.mark.parametrize(
    "path,dtype", [("general", torch.float32), ("general", torch.bfloat16), ("auto", torch.float16)],
    ids=["general_fp32", "general_bf16", "auto_fp16"],
)
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_opcheck(monkeypatch, path, dtype, proj):
    _use_path(monkeypatch, path)
    T, B, H = 3, 2, 16
    (xproj, w_hh, w_hr, h0, c0), lens, _ = _draw(T, B, H, 8 if proj else None, [3, 1])
    args = [None if t is None else t.to(dtype).requires_grad_() for t in (xproj, w_hh, w_hr, h0, c0)]
    torch.library.opcheck(FWD, (*args, lens, True, True))
    torch.library.opcheck(FWD, (*[None if a is None else a.detach() for a in args], None, False, False))
    y, h_n, c_n, gates, c_all = FWD(*[None if a is None else a.detach() for a in args], lens, True, True)
    bwd_args = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), args[1].detach(),
                None if w_hr is None else args[2].detach(), args[3].detach(), args[4].detach(), lens, True,
                y, gates, c_all, True)  # fmt: skip
    torch.library.opcheck(BWD, bwd_args)


def test_compile_fullgraph(monkeypatch):
    _use_path(monkeypatch, "general")
    torch._dynamo.reset()
    (xproj, w_hh, _, h0, c0), lens, cot = _draw(3, 2, 16, None, [3, 2])
    args = [t.float().requires_grad_() for t in (xproj, w_hh, h0, c0)]
    gy, gh, gc = (t.float() for t in cot)

    def step(xproj, w_hh, h0, c0):
        y, h_n, c_n, _, _ = FWD(xproj, w_hh, None, h0, c0, lens, False, True)
        return (y * gy).sum() + (h_n * gh).sum() + (c_n * gc).sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    expected = step(*args)
    expected_grads = torch.autograd.grad(expected, args)
    actual = compiled(*args)
    actual_grads = torch.autograd.grad(actual, args)
    # the same kernels; only inductor's own reductions around them may sum in another order
    assert rel_error(actual, expected) < 1e-5
    for a, e in zip(actual_grads, expected_grads):
        assert rel_error(a, e) < 1e-5


def test_compile_module_fullgraph(monkeypatch):
    _use_path(monkeypatch, "auto")
    torch._dynamo.reset()
    model = lstm_fused.LSTM(8, 32, num_layers=2, bidirectional=True, backend="cuda",
                            device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(6, 4, 8, device=DEVICE, dtype=torch.bfloat16)
    y, (h, c) = model(x)
    (y.float().sum() + h.float().sum()).backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    y2, (h2, c2) = compiled(x)
    (y2.float().sum() + h2.float().sum()).backward()
    # inductor may fuse the input projection differently: bf16 rounding-level differences
    assert rel_error(y2, y) < 1e-2 and rel_error(h2, h) < 1e-2 and rel_error(c2, c) < 1e-2
    for g, e in zip([p.grad for p in model.parameters()], eager):
        assert rel_error(g, e) < 1e-2
