"""The Triton backend's ops against the float64 reference.

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set below before any kernel is defined). The interpreter runs programs one
after another, so the hidden_split path (grid-wide spin barrier) is tested on GPUs only; its
chunk striding is still covered here by the per_step path with fewer programs than chunks.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import lstm_fused  # noqa: E402
import lstm_fused.triton as triton_backend  # noqa: E402
from lstm_fused import reference  # noqa: E402
from lstm_fused.triton import recurrence  # noqa: E402
from helpers import draw_op_inputs, make_pair, rel_error, run_and_grad  # noqa: E402

if triton_backend.unavailable_reason() is not None:
    pytest.skip(triton_backend.unavailable_reason(), allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")
FWD = torch.ops.lstm_fused.triton_forward
BWD = torch.ops.lstm_fused.triton_backward

# Paths and the environment that forces them. per_step_g2: two programs stride over 3+ chunks.
PATHS = {
    "batch_tile": {recurrence.PATH_ENV: "batch_tile"},
    "per_step": {recurrence.PATH_ENV: "per_step"},
    "per_step_g2": {recurrence.PATH_ENV: "per_step", recurrence.HIDDEN_PROGRAMS_ENV: "2"},
}
if CUDA:
    PATHS["hidden_split"] = {recurrence.PATH_ENV: "hidden_split"}

# id: T, B, H, P (None: no projection), lengths (None: all T), reverse
CASES = {
    "T1_B1": (1, 1, 16, None, None, False),
    "h17_b3": (5, 3, 17, None, None, False),
    "h33_b3_rev": (4, 3, 33, None, None, True),
    "h70_3chunks": (3, 2, 70, None, None, False),
    "b70_2batch_tiles": (3, 70, 5, None, None, True),
    "proj_h20_p12": (4, 3, 20, 12, None, False),
    "lengths": (6, 4, 17, None, [6, 1, 3, 0], False),
    "lengths_rev": (6, 4, 17, None, [2, 6, 5, 1], True),
    "proj_lengths_rev": (5, 3, 33, 7, [5, 2, 3], True),
}
HALF_CASES = ["h17_b3", "proj_h20_p12", "lengths_rev", "proj_lengths_rev"]

# GPU-sized shapes (run by lstm_fused/triton/gpu_check.py): several hidden programs per batch
# tile, chunks striding over more chunks than SMs, two batch tiles, projection + lengths.
GPU_CASES = {
    "gpu_b8_h256": (32, 8, 256, None, None, False),
    "gpu_b4_h512_lengths_rev": (24, 4, 512, None, [24, 3, 17, 24], True),
    "gpu_b2_h2560_strided": (8, 2, 2560, None, None, False),
    "gpu_b40_h384_proj": (16, 40, 384, 128, [16, 9] * 20, False),
}

HALF_FLOOR = {torch.bfloat16: 8e-4, torch.float16: 1e-4}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Outputs and scratch start as NaN: any element a kernel forgets to write fails the test.
    monkeypatch.setattr(recurrence, "POISON_OUTPUTS", True)


def _use_path(monkeypatch, path):
    for key, value in PATHS[path].items():
        monkeypatch.setenv(key, value)


def _draw(T, B, H, P, lengths):
    return draw_op_inputs(T, B, H, P, lengths, DEVICE)


def _run(forward_op, inputs, lens, reverse, cot, dtype):
    """Outputs (y, h_n, c_n, gates, c_all) and grads of <outputs, cot> w.r.t. every input."""
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
    y, h_n, c_n, gates, c_all = forward_op(*leaves, lens, reverse, True)
    loss = sum((out * g.to(dtype)).sum() for out, g in zip((y, h_n, c_n), cot))
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    grad_list = [None if t is None else next(grads) for t in leaves]
    return [y, h_n, c_n, gates, c_all], grad_list


def _ref_op(xproj, w_hh, w_hr, h0, c0, lens, reverse, save):
    # plain autograd through the readable loop: independent of every hand-written backward
    return reference.recurrence_forward_ref(xproj, w_hh, w_hr, h0, c0, lens, reverse, save)


NAMES = ["y", "h_n", "c_n", "gates", "c_all", "d_xproj", "d_w_hh", "d_w_hr", "d_h0", "d_c0"]


def _compare(case, dtype, tf32=False):
    T, B, H, P, lengths, reverse = case
    inputs, lens, cot = _draw(T, B, H, P, lengths)
    out, grads = _run(FWD, inputs, lens, reverse, cot, dtype)
    ref_out, ref_grads = _run(_ref_op, inputs, lens, reverse, cot, torch.float64)
    if dtype != torch.float32:  # the reference's own error in this dtype sets the bar
        half_out, half_grads = _run(torch.ops.lstm_fused.reference_forward, inputs, lens, reverse, cot, dtype)
    for i, name in enumerate(NAMES):
        actual = (out + grads)[i]
        expected = (ref_out + ref_grads)[i]
        if expected is None:
            assert actual is None, name
            continue
        assert actual.dtype == (torch.float32 if name == "c_all" else dtype), name
        assert actual.shape == expected.shape, name
        err = rel_error(actual, expected)
        if dtype == torch.float32:
            bound = 2e-2 if tf32 else 2e-5
        else:
            bound = 2 * rel_error((half_out + half_grads)[i], expected) + HALF_FLOOR[dtype]
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_parity_fp32(monkeypatch, case, path):
    _use_path(monkeypatch, path)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _compare(CASES[case], torch.float32)


@pytest.mark.parametrize("path", ["batch_tile", "per_step"] + (["hidden_split"] if CUDA else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_parity_half(monkeypatch, case, dtype, path):
    _use_path(monkeypatch, path)
    _compare(CASES[case], dtype)


@pytest.mark.skipif(not CUDA, reason="GPU-sized shapes need a GPU")
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_parity_gpu_shapes(monkeypatch, case, dtype, path):
    _use_path(monkeypatch, path)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _compare(GPU_CASES[case], dtype)


@pytest.mark.skipif(not CUDA, reason="TF32 exists on GPUs only")
@pytest.mark.parametrize("case", ["gpu_b8_h256", "gpu_b40_h384_proj"])
def test_parity_tf32(monkeypatch, case):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    _compare(GPU_CASES[case], torch.float32, tf32=True)


@pytest.mark.skipif(not CUDA, reason="the heuristic only chooses among paths on a GPU")
@pytest.mark.parametrize(
    "shape,path",
    [((1, 256, 256), "hidden_split"), ((16, 768, 768), "hidden_split"), ((4096, 64, 64), "batch_tile")],
)
def test_plan_heuristic(monkeypatch, shape, path):
    monkeypatch.delenv(recurrence.PATH_ENV, raising=False)
    assert recurrence.plan(*shape, DEVICE).path == path


def test_autotune_switch():
    kernels = recurrence._kernels()
    tuned = kernels._tuning_configs(interpret=False, autotune=True)
    distinct = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in tuned}
    assert len(distinct) == len(tuned) > 1
    assert len(kernels._tuning_configs(interpret=False, autotune=False)) == 1
    assert len(kernels._tuning_configs(interpret=True, autotune=True)) == 1
    # What the kernels were defined with follows the environment (GPU test runs switch it off).
    expect_one = kernels.INTERPRET or os.environ.get(kernels.AUTOTUNE_ENV) == "0"
    for kernel in (kernels.lstm_forward_kernel, kernels.lstm_backward_kernel):
        assert (len(kernel.configs) == 1) == expect_one


def test_host_mirrors_kernel_constants():
    kernels = recurrence._kernels()
    assert (recurrence.SYNC_NONE, recurrence.SYNC_PROGRAM, recurrence.SYNC_GRID) == (
        kernels.SYNC_NONE, kernels.SYNC_PROGRAM, kernels.SYNC_GRID)
    assert recurrence.COUNTER_STRIDE == kernels.COUNTER_STRIDE.value


def test_grid_barrier_launches_cooperatively():
    # A cooperative launch is what turns "other work holds SMs" into an error instead of a
    # deadlock of the spinning programs; the other paths have no cross-program wait.
    cuda = torch.device("cuda")
    assert recurrence._kernel_flags(torch.bfloat16, cuda, recurrence.SYNC_GRID)["launch_cooperative_grid"] is True
    for sync in (recurrence.SYNC_NONE, recurrence.SYNC_PROGRAM):
        assert "launch_cooperative_grid" not in recurrence._kernel_flags(torch.bfloat16, cuda, sync)


def test_save_false_and_frozen_weights():
    T, B, H = 4, 3, 17
    (xproj, w_hh, _, h0, c0), lens, (dy, dh, dc) = _draw(T, B, H, None, [4, 2, 3])
    args = [t.float() for t in (xproj, w_hh)] + [None] + [t.float() for t in (h0, c0)]
    y, h_n, c_n, gates, c_all = FWD(*args, lens, False, True)
    y2, h2, c2, no_gates, no_c_all = FWD(*args, lens, False, False)
    assert no_gates.numel() == 0 and no_c_all.numel() == 0 and no_c_all.dtype == torch.float32
    assert torch.equal(y, y2) and torch.equal(h_n, h2) and torch.equal(c_n, c2)
    bwd = (dy.float(), dh.float(), dc.float(), args[1], None, args[3], args[4], lens, False, y, gates, c_all)
    full = BWD(*bwd, True)
    frozen = BWD(*bwd, False)
    assert frozen[1].numel() == 0 and frozen[2].numel() == 0
    for a, b in zip((full[0], full[3], full[4]), (frozen[0], frozen[3], frozen[4])):
        assert torch.equal(a, b)


def test_empty_sequence():
    inputs, _, _ = _draw(0, 2, 16, None, None)
    xproj, w_hh, _, h0, c0 = [None if t is None else t.float() for t in inputs]
    y, h_n, c_n, _, _ = FWD(xproj, w_hh, None, h0, c0, None, False, False)
    assert y.shape == (0, 2, 16) and torch.equal(h_n, h0) and torch.equal(c_n, c0)


@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_opcheck(proj):
    T, B, H = 3, 2, 16
    (xproj, w_hh, w_hr, h0, c0), lens, _ = _draw(T, B, H, 8 if proj else None, [3, 1])
    args = [None if t is None else t.float().requires_grad_() for t in (xproj, w_hh, w_hr, h0, c0)]
    torch.library.opcheck(FWD, (*args, lens, True, True))
    y, h_n, c_n, gates, c_all = FWD(*[None if a is None else a.detach() for a in args], lens, True, True)
    bwd_args = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), args[1].detach(),
                None if w_hr is None else args[2].detach(), args[3].detach(), args[4].detach(), lens, True,
                y, gates, c_all, True)  # fmt: skip
    torch.library.opcheck(BWD, bwd_args)


def test_module_matches_nn_lstm(monkeypatch):
    """Through lstm_fused.LSTM: input size != hidden, two layers, both directions, projection."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = dict(input_size=7, hidden_size=17, num_layers=2, bidirectional=True, proj_size=5)
    oracle, fused = make_pair(torch.float32, "triton", **config)
    oracle, fused = oracle.to(DEVICE), fused.to(DEVICE)
    T, B = 4, 3
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(T, B, 7, **f64)
    hx = (torch.randn(4, B, 5, **f64), torch.randn(4, B, 17, **f64))
    cot = (torch.randn(T, B, 10, **f64), torch.randn_like(hx[0]), torch.randn_like(hx[1]))
    expected = run_and_grad(oracle, x, hx, cot)
    actual = run_and_grad(fused, x.float(), tuple(h.float() for h in hx), cot)
    for a, e in zip(actual[:3], expected[:3]):
        assert rel_error(a, e) < 2e-5
    for name, e in expected[3].items():
        assert rel_error(actual[3][name], e) < 2e-5, name


def test_module_packed_sequence(monkeypatch):
    """A PackedSequence through a bidirectional lstm_fused.LSTM: lengths on both directions."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    oracle, fused = make_pair(torch.float32, "triton", input_size=6, hidden_size=19, bidirectional=True)
    oracle, fused = oracle.to(DEVICE), fused.to(DEVICE)
    lengths = [5, 3, 1]
    x = torch.randn(5, 3, 6, dtype=torch.float64, device=DEVICE)
    pack = torch.nn.utils.rnn.pack_padded_sequence
    y_ref, (h_ref, c_ref) = oracle(pack(x, lengths))
    y, (h, c) = fused(pack(x.float(), lengths))
    assert torch.equal(y.batch_sizes, y_ref.batch_sizes)
    for a, e in ((y.data, y_ref.data), (h, h_ref), (c, c_ref)):
        assert rel_error(a, e) < 2e-5


def test_compile_fullgraph():
    torch._dynamo.reset()
    (xproj, w_hh, _, h0, c0), lens, _ = _draw(3, 2, 16, None, [3, 2])
    args = [t.float().requires_grad_() for t in (xproj, w_hh, h0, c0)]

    def step(xproj, w_hh, h0, c0):
        y, h_n, c_n, _, _ = FWD(xproj, w_hh, None, h0, c0, lens, False, True)
        return (y.sum() + h_n.sum() * 2 + c_n.sum() * 3).tanh()

    backend = "inductor" if CUDA else "aot_eager"  # inductor on CPU would need a C++ toolchain per test
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    expected = step(*args)
    expected_grads = torch.autograd.grad(expected, args)
    actual = compiled(*args)
    actual_grads = torch.autograd.grad(actual, args)
    assert rel_error(actual, expected) < 1e-6
    for a, e in zip(actual_grads, expected_grads):
        assert rel_error(a, e) < 1e-6


def test_unavailable_reason_is_none_here():
    assert triton_backend.unavailable_reason() is None
    assert "triton" in lstm_fused.available_backends()


def test_kernels_compile_for_sm90():
    """A real (ptxas) compile of every kernel variant: catches what the interpreter lets through."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-m", "lstm_fused.triton.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # the repo root
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
