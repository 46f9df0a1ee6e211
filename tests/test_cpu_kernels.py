"""The CPU backend's SIMD step kernels: every instruction-set variant this machine can run, the
packed-weight cache, and the thread team's work stealing.

Each variant is forced with LSTM_FUSED_CPU_ISA (read on every call) and compared with a float64
nn.LSTM: output, h_n, c_n and every gradient. The shapes are chosen against the kernels' tiling:
batch rows that leave a partial row tile, hidden sizes that leave a partial unit block, and sizes
large enough that the call runs on several threads (at least 2^20 multiply-adds per call and 2^15
per step: see panel_recurrence.cpp), and batches of several row tiles with reductions longer than
one L1 chunk of the panel (step_kernels_impl.h).
"""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lstm_fused
from helpers import CPU_ISA_VARIANTS, forward_backward, make_pair, op_calls, rel_error, supported_cpu_variants

pytestmark = pytest.mark.skipif("cpu" not in lstm_fused.available_backends(),
                                reason="the C++ extension is not built")

# (id, T, B, I, H, extra nn.LSTM kwargs, packed lengths or None)
SHAPES = [
    ("T1_B1", 1, 1, 5, 7, {}, None),
    ("partial_row_tile", 4, 13, 6, 21, {}, None),
    ("threads_ragged_units", 12, 9, 7, 72, {}, None),
    ("threads_B1", 40, 1, 16, 130, {}, None),
    # W_hh small enough for batch slices on any L2 of 192 KB or more, and large enough (1.6 MB)
    # for teams by blocks both ways on any L2 up to 3 MB (test_the_plan_...).
    ("batch_slices", 60, 8, 12, 24, {}, None),
    ("threads_wide", 3, 3, 8, 320, {}, None),
    ("threads_bidir_packed", 10, 7, 8, 80, {"bidirectional": True}, [10, 3, 7, 1, 10, 6, 9]),
    ("threads_2layers_batch_first", 8, 6, 10, 90, {"num_layers": 2, "batch_first": True}, None),
    # Several row tiles and a reduction longer than one L1 chunk of the panel, on every variant;
    # test_reduction_chunks runs it with chunks forced (they are off by default). Tiles of 4 + 3
    # rows on AVX-512 (spread evenly), 3 + 3 + 1 on AVX2 and 2 + 2 + 2 + 1 on the portable
    # kernels (full tiles and a one-row remainder, chunked).
    ("chunked_reduction", 6, 7, 12, 200, {}, [6, 2, 5, 6, 1, 3, 4]),
]
HALF_FLOOR = 2e-3


def _errors(shape, dtype, backend="cpu"):
    _, T, B, I, H, extra, lengths = shape
    oracle, fused = make_pair(dtype, backend, input_size=I, hidden_size=H, **extra)
    batch_first = extra.get("batch_first", False)
    D = 2 if extra.get("bidirectional") else 1
    L = extra.get("num_layers", 1) * D
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    hx = (torch.randn(L, B, H, dtype=torch.float64), torch.randn(L, B, H, dtype=torch.float64))
    cot = (torch.randn((B, T, D * H) if batch_first else (T, B, D * H), dtype=torch.float64),
           torch.randn(L, B, H, dtype=torch.float64), torch.randn(L, B, H, dtype=torch.float64))
    lens = None if lengths is None else torch.tensor(lengths)
    want = forward_backward(oracle, torch.float64, x, hx, cot, lens)
    got = forward_backward(fused, dtype, x, hx, cot, lens)
    native = None
    if dtype in (torch.bfloat16, torch.float16):
        # The yardstick: our reference backend in the same dtype (fp32 math, the same roundings
        # of stored values), an oracle every CPU has; nn.LSTM itself has no bf16 LSTM on CPUs
        # without AVX-512 (oneDNN). The reference is checked against nn.LSTM in test_parity.py.
        same = lstm_fused.LSTM(input_size=I, hidden_size=H, **extra, backend="reference",
                               dtype=torch.float64)
        same.load_state_dict(oracle.state_dict())
        native = forward_backward(same.to(dtype), dtype, x, hx, cot, lens)
    for a in got:
        assert a is not None and a.dtype == dtype
    ours = [rel_error(a, b) for a, b in zip(got, want)]
    base = None if native is None else [rel_error(a, b) for a, b in zip(native, want)]
    return ours, base


@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_float32_parity_every_variant(monkeypatch, variant, shape):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    assert torch.ops.lstm_fused.cpu_isa_selected() == variant
    ours, _ = _errors(shape, torch.float32)
    bad = {i: e for i, e in enumerate(ours) if not e <= 2e-5}
    assert not bad, f"relative errors above 2e-5 (0-2: y, h_n, c_n; then dx, dh0, dc0, params): {bad}"


@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] in ("partial_row_tile", "threads_bidir_packed", "chunked_reduction")],
                         ids=lambda s: s[0])
def test_half_precision_every_variant(monkeypatch, variant, dtype, shape):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    ours, base = _errors(shape, dtype)
    bad = {i: (o, b) for i, (o, b) in enumerate(zip(ours, base)) if not o <= 2 * b + HALF_FLOOR}
    assert not bad, f"(ours, reference backend in {dtype}) relative errors: {bad}"


# Gate pre-activations far outside the polynomial's range, and non-finite ones, in whole unit
# blocks (H = 64: AVX-512 and AVX2 compute the gates of such blocks on registers with an exp of
# their own, vector_gates in step_kernels_impl.h; the portable kernels use activations.h).
# Weights of +-40 drive pre-activations to +-100 and beyond, where e^x over- or underflows: the
# gates must saturate as in float64, and a NaN or Inf in x must reach the same outputs as there.
@pytest.mark.parametrize("variant", supported_cpu_variants())
def test_saturated_and_non_finite_gates_every_variant(monkeypatch, variant):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    torch.manual_seed(0)
    oracle = nn.LSTM(6, 64).double()
    with torch.no_grad():
        for p in oracle.parameters():
            p.copy_(torch.empty_like(p).uniform_(-40.0, 40.0).float())  # exact in float32 too
    fused = lstm_fused.LSTM(6, 64, backend="cpu")
    fused.load_state_dict(oracle.state_dict())
    x = torch.randn(5, 3, 6).double()
    x[1, 0, 0] = float("nan")
    x[2, 1, 1] = float("inf")
    x[3, 2, 2] = -float("inf")
    with torch.no_grad():
        want, got = oracle(x), fused(x.float())
    flat = lambda out: (out[0], out[1][0], out[1][1])
    saturated = 0
    for ours, ref in zip(flat(got), flat(want)):
        assert torch.equal(torch.isnan(ours), torch.isnan(ref))
        finite = torch.isfinite(ref)
        assert rel_error(ours[finite], ref[finite]) <= 2e-5  # the float32 parity bound
        saturated += int((ref.abs() == 1).sum())
    assert saturated > 0  # some h or c hit +-1 exactly: the gates did saturate


# The reduction runs in chunks only when LSTM_FUSED_CPU_CHUNK_BYTES asks (panel_recurrence.cpp);
# both ways run here on every variant, in float32 and bfloat16 (2-byte panels: twice the k per
# chunk). 3 KB chunks cut the forward's K = 200 and the backward's K = 800 into many pieces.
@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_bytes", ["0", "3072"], ids=["whole_panel", "chunks_3KB"])
def test_reduction_chunks(monkeypatch, variant, dtype, chunk_bytes):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    monkeypatch.setenv("LSTM_FUSED_CPU_CHUNK_BYTES", chunk_bytes)
    shape = next(s for s in SHAPES if s[0] == "chunked_reduction")
    ours, base = _errors(shape, dtype)
    if dtype == torch.float32:
        bad = {i: e for i, e in enumerate(ours) if not e <= 2e-5}
    else:
        bad = {i: (o, b) for i, (o, b) in enumerate(zip(ours, base)) if not o <= 2 * b + HALF_FLOOR}
    assert not bad, f"relative errors (0-2: y, h_n, c_n; then dx, dh0, dc0, params): {bad}"


def test_a_bad_chunk_size_is_an_error(monkeypatch):
    m = lstm_fused.LSTM(4, 8, backend="cpu")
    monkeypatch.setenv("LSTM_FUSED_CPU_CHUNK_BYTES", "24k")
    with pytest.raises(RuntimeError, match="LSTM_FUSED_CPU_CHUNK_BYTES=24k is not a byte count"):
        m(torch.randn(3, 2, 4))


def test_forcing_a_variant_this_cpu_lacks_or_an_unknown_one_is_an_error(monkeypatch):
    m = lstm_fused.LSTM(4, 8, backend="cpu")
    x = torch.randn(3, 2, 4)
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="LSTM_FUSED_CPU_ISA=sse9 is not one of"):
        m(x)
    missing = [v for v in CPU_ISA_VARIANTS if not torch.ops.lstm_fused.cpu_isa_supported(v)]
    if missing:
        monkeypatch.setenv("LSTM_FUSED_CPU_ISA", missing[0])
        with pytest.raises(RuntimeError, match="this CPU cannot run that variant"):
            m(x)
    with pytest.raises(RuntimeError, match="unknown CPU instruction set variant"):
        torch.ops.lstm_fused.cpu_isa_supported("sse9")


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the kernel's CPU flags")
def test_supported_variants_agree_with_the_cpu_flags():
    # The dispatch asks CPUID (libgcc); the kernel's flags are a second opinion, and a CPU with
    # AVX-512 but without AVX512-BF16 (Skylake-SP to Ice Lake) must not get the bf16 variant.
    # Under valgrind CPUID shows its virtual CPU (AVX2), the flags the real one: there the
    # dispatch may only claim less.
    with open("/proc/cpuinfo") as f:
        line = next((l for l in f if l.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    if not {"avx2", "fma"} <= flags:
        pytest.skip("not an x86-64 CPU with AVX2")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    want = {"generic": True, "avx2": True, "avx512": avx512, "avx512bf16": avx512 and "avx512_bf16" in flags}
    got = {v: bool(torch.ops.lstm_fused.cpu_isa_supported(v)) for v in CPU_ISA_VARIANTS}
    assert all(want[v] for v in got if got[v]), (got, want)
    if "vgpreload" not in os.environ.get("LD_PRELOAD", ""):
        assert got == want


def test_default_variant_is_the_widest_supported(monkeypatch):
    monkeypatch.delenv("LSTM_FUSED_CPU_ISA", raising=False)
    assert torch.ops.lstm_fused.cpu_isa_selected() == supported_cpu_variants()[-1]


# --------------------------------------------------------------------------------------------
# The packed-weight cache: reused while the weight is unchanged, never stale.


def _fresh_pair(H=24):
    ref = nn.LSTM(H, H)
    fused = lstm_fused.LSTM(H, H, backend="cpu")
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _assert_same_as_nn(ref, fused, x):
    with torch.no_grad():
        want, _ = ref(x)
        got, _ = fused(x)
    assert rel_error(got, want) < 2e-5


def test_cache_reuses_packed_weights_across_calls():
    torch.ops.lstm_fused.cpu_packed_cache_clear()
    _ref, fused = _fresh_pair()
    x = torch.randn(1, 1, 24)
    with torch.no_grad():
        fused(x)
        held = torch.ops.lstm_fused.cpu_packed_cache_size()
        for _ in range(5):
            fused(x)
    assert held == 1
    assert torch.ops.lstm_fused.cpu_packed_cache_size() == held


@pytest.mark.parametrize("change", ["inplace_no_grad", "optimizer_step", "through_data", "new_storage",
                                    "load_state_dict"])
def test_cache_sees_every_kind_of_weight_change(change):
    ref, fused = _fresh_pair()
    x = torch.randn(5, 3, 24)
    _assert_same_as_nn(ref, fused, x)  # packs and caches
    w_ref, w = ref.weight_hh_l0, fused.weight_hh_l0
    new = torch.randn_like(w)
    if change == "inplace_no_grad":
        with torch.no_grad():
            w.copy_(new)
    elif change == "optimizer_step":
        w.grad = -new
        torch.optim.SGD([w], lr=1.0).step()
        new = w.detach().clone()
    elif change == "through_data":  # bypasses the version counter: the fingerprint sees it
        w.data.copy_(new)
    elif change == "new_storage":
        w.data = new.clone()
    else:
        state = fused.state_dict()
        state["weight_hh_l0"] = new
        fused.load_state_dict(state)
    with torch.no_grad():
        w_ref.copy_(new)
    _assert_same_as_nn(ref, fused, x)


def test_an_updated_weight_replaces_its_stale_entry():
    # A training loop repacks after every optimizer step; the entry of the old values can never
    # match again, so it goes (its panels back to the output pool) instead of waiting for the LRU.
    torch.ops.lstm_fused.cpu_packed_cache_clear()
    ref, fused = _fresh_pair()
    x = torch.randn(1, 1, 24)
    for _ in range(4):
        new = torch.randn_like(fused.weight_hh_l0)
        with torch.no_grad():
            fused.weight_hh_l0.copy_(new)
            ref.weight_hh_l0.copy_(new)
        _assert_same_as_nn(ref, fused, x)
        assert torch.ops.lstm_fused.cpu_packed_cache_size() == 1


def test_cache_drops_entries_of_freed_weights():
    torch.ops.lstm_fused.cpu_packed_cache_clear()
    x = torch.randn(2, 1, 24)
    with torch.no_grad():
        _ref, fused = _fresh_pair()
        fused(x)
        per_model = torch.ops.lstm_fused.cpu_packed_cache_size()  # W_hh, and W_ih with our product
        assert per_model >= 1
        del fused, _ref
        _ref, other = _fresh_pair()
        other(x)  # a lookup sweeps out the entries whose weights are gone
    assert torch.ops.lstm_fused.cpu_packed_cache_size() == per_model


# --------------------------------------------------------------------------------------------
# Work stealing: a thread the runtime never starts must not stall the steps.

STEAL_SCRIPT = textwrap.dedent("""
    import sys, torch, lstm_fused
    T, H = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(4)          # the recurrence plans 4 slices of blocks ...
    ref = lstm_fused.LSTM(H, H, backend="reference")
    m = lstm_fused.LSTM(H, H, backend="cpu")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(T, 5, H, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, _ = m(x); y.square().sum().backward()
    y2, _ = ref(x2); y2.square().sum().backward()
    err = ((y - y2).norm() / y2.norm()).item()
    gerr = ((x.grad - x2.grad).norm() / x2.grad.norm()).item()
    werr = ((m.weight_ih_l0.grad - ref.weight_ih_l0.grad).norm() / ref.weight_ih_l0.grad.norm()).item()
    print(err, gerr, werr)
""")


# ... but the threads that run them may be fewer: the OpenMP region that runs the steps gets one
# thread under OMP_THREAD_LIMIT=1, and the caller must then run every slice itself. The backoff
# (team_outlook.h) is off, so every call of the run (forward and backward, a sequence and a
# single step) opens a team whose helpers never come: teams by blocks (H = 320) and batch slices
# (H = 96: W_hh fits one core's L2, see test_the_plan_slices_the_batch_where_the_weights_fit_one_core).
@pytest.mark.parametrize("T,H", [(30, 320), (30, 96), (1, 256)],
                         ids=["sequence", "batch_slices", "single_step"])
def test_slices_of_threads_that_never_run_are_stolen(T, H):
    env = dict(os.environ, OMP_THREAD_LIMIT="1", LSTM_FUSED_CPU_TEAM_BACKOFF="0")
    done = subprocess.run([sys.executable, "-c", STEAL_SCRIPT, str(T), str(H)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    errors = [float(v) for v in done.stdout.split()]
    assert len(errors) == 3 and all(e < 2e-5 for e in errors), errors


# How a call is spread over the threads (panel_recurrence.cpp, plan_recurrence), as
# lstm_fused::cpu_recurrence_plan reports it: (batch slices, threads of a team by blocks).
def _plan(backward, T, B, H, dtype=torch.float32):
    return tuple(torch.ops.lstm_fused.cpu_recurrence_plan(backward, T, B, H, dtype))


def _panel_bytes(backward, H, dtype=torch.float32):
    """W_hh's panels on the selected variant (step_kernels.h): unit blocks of V forward, column
    blocks of 4V backward, zero-padded."""
    V = 16 if torch.ops.lstm_fused.cpu_isa_selected().startswith("avx512") else 8
    width = 4 * V if backward else V
    return -(-H // width) * (4 * H if backward else H) * 4 * V * dtype.itemsize


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: every call runs alone")
def test_the_plan_slices_the_batch_where_the_weights_fit_one_core():
    l2 = torch.ops.lstm_fused.cpu_core_l2_bytes()
    assert l2 >= 64 << 10
    threads = torch.get_num_threads()
    for backward in (False, True):
        for H in (32, 64, 128, 192, 256, 320, 512):
            for B in (1, 2, 4, 16, 32):
                w = _panel_bytes(backward, H)
                fits = w <= l2 // 8 or (w <= l2 // 2 and (backward or B >= 32))
                enough_work = 100 * B * 4 * H * H >= 1 << 20  # kMinCallMacsForThreads
                slices, team = _plan(backward, 100, B, H)
                if B > 1 and fits and enough_work:
                    assert (slices, team) == (min(threads, B), 1), (backward, H, B)
                else:
                    assert slices == 1, (backward, H, B)
    assert _plan(False, 1, 16, 64) == (1, 1)  # too little work for a second thread
    assert _plan(True, 1, 16, 64) == (1, 1)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: every call runs alone")
def test_the_parity_shapes_cover_both_ways_of_splitting():
    plans = [(_plan(False, s[1], s[2], s[4]), _plan(True, s[1], s[2], s[4])) for s in SHAPES]
    for direction in (0, 1):
        assert any(p[direction][0] > 1 for p in plans)  # batch slices
        assert any(p[direction][0] == 1 and p[direction][1] > 1 for p in plans)  # a team by blocks


# With the backoff on, teams whose helpers never come make the following calls run alone: after
# the first team, 1, 2, 4, ... calls alone between tries. Counted by lstm_fused::cpu_team_counts.
BACKOFF_SCRIPT = textwrap.dedent("""
    import torch, lstm_fused
    torch.manual_seed(0)
    torch.set_num_threads(4)
    ref = lstm_fused.LSTMCell(256, 256, backend="reference")
    m = lstm_fused.LSTMCell(256, 256, backend="cpu")
    m.load_state_dict(ref.state_dict())
    worst = 0.0
    with torch.no_grad():
        for _ in range(40):
            x, h0, c0 = torch.randn(3, 256), torch.randn(3, 256), torch.randn(3, 256)
            h, c = m(x, (h0, c0))
            h2, c2 = ref(x, (h0, c0))
            worst = max(worst, ((h - h2).norm() / h2.norm()).item(), ((c - c2).norm() / c2.norm()).item())
    print(worst, *torch.ops.lstm_fused.cpu_team_counts())
""")


def test_calls_run_alone_while_helpers_do_not_come():
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    env.pop("LSTM_FUSED_CPU_TEAM_BACKOFF", None)
    done = subprocess.run([sys.executable, "-c", BACKOFF_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    worst, teams, joined, alone = done.stdout.split()
    assert float(worst) < 2e-5
    # 40 calls: teams at calls 1, 3, 6, 11, 20, 37 with 1, 2, 4, 8, 16 calls alone between.
    assert (int(teams), int(joined), int(alone)) == (6, 0, 34)


# --------------------------------------------------------------------------------------------
# Streaming steps without autograd: LSTMCell and T = 1 layers run lstm_fused::cell_forward, both
# products in one kernel pass over [h | x].

# avx512bf16 uses the bf16 dot product in one-row tiles only, or in tiles of every height
# (bf16_dot_all_rows in isa.h: by the CPU's vendor, or LSTM_FUSED_CPU_BF16_DOT). Both ways here,
# wherever the variant runs: the recurrence (several row tiles, partial ones, one row: B = 1,
# chunked reductions), the cell step (odd K = H + I) and the input projection's products.
needs_avx512bf16 = pytest.mark.skipif(
    "avx512bf16" not in supported_cpu_variants(), reason="this CPU has no AVX512-BF16")
BF16_DOT_SHAPES = [s for s in SHAPES if s[0] in ("partial_row_tile", "threads_B1", "threads_bidir_packed",
                                                 "threads_2layers_batch_first", "chunked_reduction")]


@needs_avx512bf16
@pytest.mark.parametrize("dot", ["one", "rows"])
@pytest.mark.parametrize("chunk_bytes", ["0", "3072"], ids=["whole_panel", "chunks_3KB"])
@pytest.mark.parametrize("shape", BF16_DOT_SHAPES, ids=lambda s: s[0])
def test_bf16_dot_in_one_row_or_every_row_tile(monkeypatch, set_own_gemm, dot, chunk_bytes, shape):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", "avx512bf16")
    monkeypatch.setenv("LSTM_FUSED_CPU_BF16_DOT", dot)
    monkeypatch.setenv("LSTM_FUSED_CPU_CHUNK_BYTES", chunk_bytes)
    assert torch.ops.lstm_fused.cpu_bf16_dot_all_rows() == (dot == "rows")
    set_own_gemm(True, torch.bfloat16)  # the input projection on the same tiles
    ours, base = _errors(shape, torch.bfloat16)
    bad = {i: (o, b) for i, (o, b) in enumerate(zip(ours, base)) if not o <= 2 * b + HALF_FLOOR}
    assert not bad, f"(ours, reference backend in bf16) relative errors: {bad}"


@needs_avx512bf16
@pytest.mark.parametrize("dot", ["one", "rows"])
def test_bf16_dot_cell_step_in_one_row_or_every_row_tile(monkeypatch, dot):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", "avx512bf16")
    monkeypatch.setenv("LSTM_FUSED_CPU_BF16_DOT", dot)
    _check_cell_step_within_twice_the_reference(torch.bfloat16, B=9, I=7, H=30)  # rows 5 + 4, K = 37


def test_bf16_dot_choice_follows_the_environment_then_the_vendor(monkeypatch):
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    monkeypatch.delenv("LSTM_FUSED_CPU_BF16_DOT", raising=False)
    by_vendor = torch.ops.lstm_fused.cpu_bf16_dot_all_rows()
    # Under valgrind CPUID shows its virtual CPU, whose vendor need not be the real one's.
    if "vgpreload" not in os.environ.get("LD_PRELOAD", ""):
        assert by_vendor == (platform.machine() == "x86_64" and not intel)
    for forced, rows in (("rows", True), ("one", False)):
        monkeypatch.setenv("LSTM_FUSED_CPU_BF16_DOT", forced)
        assert torch.ops.lstm_fused.cpu_bf16_dot_all_rows() == rows
    monkeypatch.setenv("LSTM_FUSED_CPU_BF16_DOT", "all")
    with pytest.raises(RuntimeError, match="LSTM_FUSED_CPU_BF16_DOT=all is not one of"):
        torch.ops.lstm_fused.cpu_bf16_dot_all_rows()


@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("B,I,H", [(1, 256, 256), (5, 7, 33), (9, 300, 40)], ids=["B1_H256", "odd", "I_gt_chunk"])
def test_cell_step_without_grad_every_variant(monkeypatch, variant, B, I, H):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    oracle = nn.LSTMCell(I, H, dtype=torch.float64)
    fused = lstm_fused.LSTMCell(I, H, backend="cpu")
    fused.load_state_dict(oracle.state_dict())
    x, h0, c0 = (torch.randn(B, n, dtype=torch.float64) for n in (I, H, H))
    calls = []
    real = torch.ops.lstm_fused.cell_forward
    monkeypatch.setattr(lstm_fused.functional, "cell_step", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        want = oracle(x, (h0, c0))
        got = fused(x.float(), (h0.float(), c0.float()))
    assert calls, "the no-grad step did not take the fused cell kernel"
    assert rel_error(got[0], want[0]) < 2e-5 and rel_error(got[1], want[1]) < 2e-5


# The op copies float32 state and biases with plain loops: strided state, no biases, and inputs
# that must come out unchanged.
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_cell_step_strided_state_and_no_bias(monkeypatch, bias):
    I, H, B = 20, 48, 4
    oracle = nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
    fused = lstm_fused.LSTMCell(I, H, bias=bias, backend="cpu")
    fused.load_state_dict(oracle.state_dict())
    x, h0, c0 = (torch.randn(B, n, dtype=torch.float64) for n in (I, H, H))
    calls = []
    real = torch.ops.lstm_fused.cell_forward
    monkeypatch.setattr(lstm_fused.functional, "cell_step", lambda *a: calls.append(1) or real(*a))
    # The same values in float32 views that are not contiguous: every other column, a transpose.
    h0_f = torch.empty(B, 2 * H)[:, ::2].copy_(h0)
    c0_f = torch.empty(H, B).t().copy_(c0)
    assert not h0_f.is_contiguous() and not c0_f.is_contiguous()
    kept = (h0_f.clone(), c0_f.clone())
    with torch.no_grad():
        want = oracle(x, (h0, c0))
        got = fused(x.float(), (h0_f, c0_f))
    assert calls
    assert rel_error(got[0], want[0]) < 2e-5 and rel_error(got[1], want[1]) < 2e-5
    assert torch.equal(h0_f, kept[0]) and torch.equal(c0_f, kept[1])


# K = H + I odd: bf16 panels pair the rows of the reduction and keep a last odd one plain.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("I,H", [(40, 72), (7, 30)], ids=["K112", "K37"])
def test_cell_step_half_precision_within_twice_the_reference(dtype, I, H):
    _check_cell_step_within_twice_the_reference(dtype, B=3, I=I, H=H)


def _check_cell_step_within_twice_the_reference(dtype, B, I, H):
    oracle = nn.LSTMCell(I, H, dtype=torch.float64)
    x, h0, c0 = (torch.randn(B, n, dtype=torch.float64) for n in (I, H, H))
    with torch.no_grad():
        want = oracle(x, (h0, c0))
        errors = {}
        for backend in ("cpu", "reference"):
            m = lstm_fused.LSTMCell(I, H, backend=backend, dtype=torch.float64)
            m.load_state_dict(oracle.state_dict())
            h, c = m.to(dtype)(x.to(dtype), (h0.to(dtype), c0.to(dtype)))
            assert h.dtype == dtype and c.dtype == dtype
            errors[backend] = (rel_error(h, want[0]), rel_error(c, want[1]))
    for ours, ref in zip(errors["cpu"], errors["reference"]):
        assert ours <= 2 * ref + HALF_FLOOR, errors


def test_one_step_layers_without_grad_match_nn_lstm(monkeypatch):
    oracle = nn.LSTM(24, 40, num_layers=2, bidirectional=True, dtype=torch.float64)
    fused = lstm_fused.LSTM(24, 40, num_layers=2, bidirectional=True, backend="cpu")
    fused.load_state_dict(oracle.state_dict())
    x = torch.randn(1, 3, 24, dtype=torch.float64)
    hx = (torch.randn(4, 3, 40, dtype=torch.float64), torch.randn(4, 3, 40, dtype=torch.float64))
    calls = []
    real = lstm_fused.functional.stacked_cell_step
    monkeypatch.setattr(lstm_fused.functional, "stacked_cell_step", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        want = oracle(x, hx)
        got = fused(x.float(), tuple(t.float() for t in hx))
    assert len(calls) == 1  # every layer and direction in one op call
    for a, b in zip((got[0],) + got[1], (want[0],) + want[1]):
        assert rel_error(a, b) < 2e-5


def test_cell_step_with_grad_keeps_the_differentiable_path(monkeypatch):
    calls = []
    monkeypatch.setattr(lstm_fused.functional, "cell_step", lambda *a: calls.append(1))
    m = lstm_fused.LSTMCell(8, 16, backend="cpu")
    h, c = m(torch.randn(2, 8))
    (h.sum() + c.sum()).backward()
    assert not calls and m.weight_hh.grad is not None


# A small LSTMCell training step runs ATen's cell when the backend is left to choose
# (functional.aten_cell_preferred): nn.LSTMCell's own computation, so the same bits.

def _cell_training_step(cell, B, I, H, batched=True, dtype=torch.float32):
    torch.manual_seed(0)
    cell.zero_grad(set_to_none=True)
    shape = (lambda n: (B, n)) if batched else (lambda n: (n,))
    x, h0, c0 = (torch.randn(shape(n), dtype=dtype, requires_grad=True) for n in (I, H, H))
    h, c = cell(x, (h0, c0))
    (h.sum() + 2 * c.sum()).backward()
    return [h, c, x.grad, h0.grad, c0.grad] + [p.grad for p in cell.parameters()]


def _fused_and_nn_cells(I, H, bias=True, backend="auto"):
    native = nn.LSTMCell(I, H, bias=bias)
    fused = lstm_fused.LSTMCell(I, H, bias=bias, backend=backend)
    fused.load_state_dict(native.state_dict())
    return fused, native


# B * 4H * (I + H) multiply-adds: 0.5M, 2^20 exactly (the largest that runs ATen's cell),
# unbatched input, no biases.
@pytest.mark.parametrize("B,I,H,batched,bias", [(1, 256, 256, True, True), (8, 128, 128, True, True),
                                                (1, 24, 40, False, True), (3, 24, 40, True, False)],
                         ids=["B1_H256", "largest", "unbatched", "no_bias"])
def test_small_cell_training_step_runs_atens_cell(B, I, H, batched, bias):
    fused, native = _fused_and_nn_cells(I, H, bias)
    step = lambda: _cell_training_step(fused, B, I, H, batched)
    assert op_calls("aten::lstm_cell", step) == 1
    assert op_calls("lstm_fused::recurrence_forward", step) == 0
    assert op_calls("lstm_fused::input_projection", step) == 0
    for got, want in zip(step(), _cell_training_step(native, B, I, H, batched)):
        assert torch.equal(got, want)


def test_a_small_training_step_with_a_bad_state_fails_as_nn_does():
    fused, native = _fused_and_nn_cells(8, 16)
    x = torch.randn(3, 8, requires_grad=True)
    hx = (torch.randn(3, 15), torch.randn(3, 16))
    with pytest.raises(RuntimeError) as theirs:
        native(x, hx)
    with pytest.raises(RuntimeError) as ours:
        fused(x, hx)
    assert str(ours.value) == str(theirs.value)


def test_a_named_backend_keeps_the_fused_cell(monkeypatch):
    fused, _ = _fused_and_nn_cells(24, 40, backend="cpu")
    assert op_calls("lstm_fused::recurrence_forward", lambda: _cell_training_step(fused, 3, 24, 40)) == 1
    monkeypatch.setenv("LSTM_FUSED_BACKEND", "cpu")
    auto, _ = _fused_and_nn_cells(24, 40)
    assert op_calls("lstm_fused::recurrence_forward", lambda: _cell_training_step(auto, 3, 24, 40)) == 1
    assert op_calls("aten::lstm_cell", lambda: _cell_training_step(auto, 3, 24, 40)) == 0


@pytest.mark.parametrize("case", ["above_the_limit", "bfloat16", "no_grad"])
def test_other_cells_stay_fused(case):
    B, I, H = (9, 128, 128) if case == "above_the_limit" else (3, 24, 40)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    fused, _ = _fused_and_nn_cells(I, H)
    fused.to(dtype)
    if case == "no_grad":
        x, h0, c0 = (torch.randn(B, n) for n in (I, H, H))
        with torch.no_grad():
            assert op_calls("lstm_fused::cell_forward", lambda: fused(x, (h0, c0))) == 1
            assert op_calls("aten::lstm_cell", lambda: fused(x, (h0, c0))) == 0
        return
    step = lambda: _cell_training_step(fused, B, I, H, dtype=dtype)
    assert op_calls("lstm_fused::recurrence_forward", step) == 1
    assert op_calls("aten::lstm_cell", step) == 0


# A larger training step runs ATen's cell too while the weights change before every step (an
# optimizer step after each): from the second such step on. Unrolled steps keep the fused cell.

def _steps_with_updates(cell, B, steps, unroll, lr=1e-3):
    """``steps`` SGD steps of ``unroll`` cell calls each; the op calls profiled, then the last
    step's outputs and gradients (before its update)."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(cell.parameters(), lr=lr)
    x = torch.randn(unroll, B, cell.input_size)
    h0, c0 = torch.randn(B, cell.hidden_size), torch.randn(B, cell.hidden_size)
    results = []
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            h, c = h0, c0
            for t in range(unroll):
                h, c = cell(x[t], (h, c))
            (h.sum() + 2 * c.sum()).backward()
            results = [h.detach(), c.detach()] + [p.grad.clone() for p in cell.parameters()]
            opt.step()
    calls = {e.key: e.count for e in prof.key_averages()}
    return calls.get("aten::lstm_cell", 0), calls.get("lstm_fused::recurrence_forward", 0), results


@pytest.mark.parametrize("B,H", [(4, 256), (32, 128)])
def test_cell_with_weights_updated_every_step_runs_atens_cell(B, H):
    fused, native = _fused_and_nn_cells(H, H)
    assert B * 4 * H * 2 * H > lstm_fused.functional._ATEN_CELL_MAX_MACS
    aten, ours, got = _steps_with_updates(fused, B, steps=4, unroll=1)
    assert (aten, ours) == (3, 1)  # the first step cannot know
    _, _, want = _steps_with_updates(native, B, steps=4, unroll=1)
    for g, w in zip(got, want):
        assert rel_error(g, w) < 2e-5


@pytest.mark.parametrize("case", ["unrolled", "batch_above", "weights_above", "named_backend"])
def test_cells_with_updated_weights_stay_fused_otherwise(case):
    B, H = {"batch_above": (33, 128), "weights_above": (1, 513)}.get(case, (4, 256))
    cell = lstm_fused.LSTMCell(H, H, backend="cpu" if case == "named_backend" else "auto")
    unroll = 3 if case == "unrolled" else 1
    aten, ours, _ = _steps_with_updates(cell, B, steps=4, unroll=unroll)
    assert (aten, ours) == (0, 4 * unroll)


def test_weight_updates_counts_consecutive_changes():
    updates, w_ih, w_hh = lstm_fused.functional.WeightUpdates(), torch.randn(8, 2), torch.randn(8, 2)
    seen, old = [], []
    for change in ("first", None, "w_hh", "w_ih", None, "w_hh", "new_tensor", "w_ih"):
        if change == "w_hh":
            w_hh.add_(1)
        elif change == "w_ih":
            w_ih.add_(1)
        elif change == "new_tensor":  # fast weights made anew (the old one kept: its id stays taken)
            old.append(w_ih)
            w_ih = w_ih.clone()
        seen.append(updates.every_step(w_ih, w_hh))
    assert seen == [False, False, False, True, False, False, True, True]


def test_cell_step_cache_sees_a_changed_input_weight():
    oracle = nn.LSTMCell(16, 24)
    fused = lstm_fused.LSTMCell(16, 24, backend="cpu")
    fused.load_state_dict(oracle.state_dict())
    x, hx = torch.randn(2, 16), (torch.randn(2, 24), torch.randn(2, 24))
    with torch.no_grad():
        fused(x, hx)  # packs [W_hh | W_ih]
        new = torch.randn_like(oracle.weight_ih)
        oracle.weight_ih.copy_(new)
        fused.weight_ih.copy_(new)
        assert rel_error(fused(x, hx)[0], oracle(x, hx)[0]) < 2e-5
