"""The benchmark suite's own tests (CPU, fast): timing, schema, skips, registry, roofline."""

import json
import os
import sys
import time

import pytest
import torch

# `pytest` (unlike `python -m pytest`) does not put the repo root on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import machine, memory, providers, report, roofline, run, timing  # noqa: E402
from benchmarks.machine import device_slug  # noqa: E402
from benchmarks.shapes import SUITES, Shape, select_shapes  # noqa: E402


# ----------------------------------------------------------------------------- timing

def test_timing_measures_a_known_sleep():
    t = timing.measure({"sleep": lambda i: time.sleep(0.020)}, "cpu", reps=7, warmup_calls=1)
    assert t["sleep"].reps == 7 and len(t["sleep"].samples) == 7
    # sleep never returns early; a loaded 2-core machine may add a few ms, not 30%.
    assert 19.9 <= t["sleep"].ms <= 26.0, t["sleep"].samples
    assert t["sleep"].ms_min <= t["sleep"].ms


def test_timing_tells_two_sleeps_apart():
    t = timing.measure({"short": lambda i: time.sleep(0.005), "long": lambda i: time.sleep(0.015)},
                       "cpu", reps=5, warmup_calls=1)
    assert 4.9 <= t["short"].ms <= 10.0
    assert 14.9 <= t["long"].ms <= 20.0


def test_timing_interleaves_round_robin_and_rotates_inputs():
    calls = []
    fns = {n: (lambda i, n=n: calls.append((n, i))) for n in "abc"}
    timing.measure(fns, "cpu", reps=3, warmup_calls=1)
    timed = calls[3:]  # after one warm-up call each
    assert [n for n, _ in timed] == list("abc" + "bca" + "cab")  # each round starts one later
    # Every call gets the next input index, whichever provider makes it.
    assert [i for _, i in calls] == list(range(12))


def test_timing_drops_a_function_that_fails_midway():
    count = {"n": 0}

    def flaky(i):
        count["n"] += 1
        if count["n"] == 4:
            raise RuntimeError("out of memory")

    errors = {}
    t = timing.measure({"ok": lambda i: None, "flaky": flaky}, "cpu", reps=6, warmup_calls=1,
                       on_error=lambda name, exc: errors.setdefault(name, str(exc)))
    assert list(t) == ["ok"] and t["ok"].reps == 6
    assert errors == {"flaky": "out of memory"}
    with pytest.raises(RuntimeError):  # without on_error the failure is not hidden
        count["n"] = 0
        timing.measure({"flaky": flaky}, "cpu", reps=6, warmup_calls=1)


def test_choose_reps_respects_budget_and_bounds():
    assert timing.choose_reps(10.0, budget_s=1.0, min_reps=5, max_reps=200) == 100
    assert timing.choose_reps(1000.0, budget_s=1.0, min_reps=5, max_reps=200) == 5
    assert timing.choose_reps(0.001, budget_s=1.0, min_reps=5, max_reps=200) == 200


# ----------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    results = run.run(["--suite", "smoke", "--device", "cpu", "--out", str(out),
                       "--no-progress", "--reps", "3"])
    return out, results


MACHINE_KEYS = ("device", "torch", "cuda", "cudnn", "triton", "git_commit", "date", "tf32", "threads")


def test_smoke_results_json_schema(smoke):
    out, returned = smoke
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(returned))  # what was returned is what was written
    for key in MACHINE_KEYS:
        assert key in data["machine"], key
    assert isinstance(data["machine"]["tf32"], bool)
    assert isinstance(data["machine"]["threads"], int) and data["machine"]["threads"] >= 1
    assert data["machine"]["device"]

    records = data["records"]
    for r in records:
        assert report.check_record(r) is None, (report.check_record(r), r)
        assert r["mode"] in ("fwd", "fwdbwd") and r["dtype"] == "float32"

    # Every smoke shape x mode has a measured nn.LSTM row at exactly 1.0x.
    cases = {(s.name, m) for s in SUITES["smoke"].shapes for m in ("fwd", "fwdbwd")}
    native = {(r["shape"], r["mode"]): r for r in records if r["provider"] == "nn.LSTM"}
    assert set(native) == cases
    for r in native.values():
        assert r["ms"] > 0 and r["speedup_vs_nn_lstm"] == 1.0 and r["skipped"] is None

    # Other measured rows: speedup is nn.LSTM's ms over theirs, from the same case.
    for r in records:
        if r["ms"] is None:
            continue
        base = native[(r["shape"], r["mode"])]["ms"]
        assert r["speedup_vs_nn_lstm"] == pytest.approx(base / r["ms"])
        assert r["tokens_per_s"] == pytest.approx(r["T"] * r["B"] / (r["ms"] / 1e3))
        assert r["peak_mem_mb"] is None  # CPU: no allocator peak
        assert 0 < r["roofline_frac"]
        if r["mode"] == "fwdbwd":
            assert r["saved_mb"] > 0  # an LSTM must keep activations for backward
        else:
            assert r["saved_mb"] is None


def test_smoke_includes_fused_cpu_backend_when_built(smoke):
    _, results = smoke
    if "cpu" not in providers.fused_backends():
        pytest.skip("lstm_fused's CPU backend is not available here")
    fused = [r for r in results["records"] if r["provider"] == "lstm_fused:cpu"]
    assert len(fused) == 2 * len(SUITES["smoke"].shapes)
    assert all(r["ms"] is not None and r["ms"] > 0 for r in fused), fused


def test_smoke_writes_markdown_and_plot(smoke):
    out, results = smoke
    md = (out / "results.md").read_text()
    assert "| shape | mode | dtype | provider |" in md
    # Provider column (the "vs" column names nn.LSTM too).
    assert md.count("| float32 | nn.LSTM |") == sum(r["provider"] == "nn.LSTM" for r in results["records"])
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_provider_that_cannot_run_here_is_skipped(tmp_path):
    results = run.run(["--suite", "smoke", "--device", "cpu", "--shapes", "T16_B4",
                       "--modes", "fwd", "--providers", "lstm_fused:cuda,flashrnn",
                       "--out", str(tmp_path), "--no-progress", "--no-plots", "--reps", "3"])
    recs = {r["provider"]: r for r in results["records"]}
    assert list(recs) == ["nn.LSTM", "lstm_fused:cuda", "flashrnn"]  # baseline always first
    for name in ("lstm_fused:cuda", "flashrnn"):
        r = recs[name]
        assert r["ms"] is None and r["speedup_vs_nn_lstm"] is None
        assert isinstance(r["skipped"], str) and r["skipped"]
        assert report.check_record(r) is None
    assert "CUDA" in recs["flashrnn"]["skipped"]
    assert recs["nn.LSTM"]["ms"] > 0 and recs["nn.LSTM"]["reps"] == 3
    on_disk = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [r["skipped"] for r in on_disk] == [r["skipped"] for r in results["records"]]
    assert "skipped: " in (tmp_path / "results.md").read_text()


def test_provider_failing_at_first_call_is_skipped(tmp_path, monkeypatch):
    real_build = providers.build

    def build(name, native, shape):
        built = real_build(name, native, shape)
        if name == "lstm_fused:reference":
            def broken(x):
                raise RuntimeError("kernel does not support this\nsecond line")
            built.forward = broken
        return built

    monkeypatch.setattr(providers, "build", build)
    monkeypatch.setattr(providers, "skip_reason", lambda name, device, shape: None)
    results = run.run(["--suite", "smoke", "--device", "cpu", "--shapes", "T16_B4",
                       "--providers", "lstm_fused:reference", "--out", str(tmp_path),
                       "--no-progress", "--no-plots", "--reps", "2"])
    broken = [r for r in results["records"] if r["provider"] == "lstm_fused:reference"]
    assert len(broken) == 2
    for r in broken:
        assert r["ms"] is None
        assert r["skipped"] == "RuntimeError: kernel does not support this"


def test_unknown_provider_is_a_usage_error():
    with pytest.raises(SystemExit):
        run.parse_args(["--suite", "smoke", "--providers", "lstm_fused:warp-drive"])


# ----------------------------------------------------------------------------- registry

def test_suites_hold_the_required_shapes():
    # fwd and fwdbwd (modes None; two of them are also rows of their own in train mode)
    cpu = {(s.T, s.B, s.I, s.H, s.layers, s.bidirectional, s.proj_size)
           for s in SUITES["cpu"].shapes if s.modes is None}
    for key in [(100, 64, 512, 512, 1, False, 0), (100, 16, 256, 256, 1, False, 0),
                (200, 1, 128, 128, 1, False, 0)]:
        assert key in cpu
    assert any(s.layers == 2 and s.bidirectional for s in SUITES["cpu"].shapes)
    assert any(s.proj_size for s in SUITES["cpu"].shapes)
    assert SUITES["cpu"].dtypes == ("float32",)

    head = {(s.T, s.B, s.I, s.H): s for s in SUITES["headline"].shapes}
    assert set(head) == {(1024, 16, 768, 768), (100, 64, 512, 512), (256, 256, 1024, 1024),
                         (1000, 1, 256, 256)}
    assert head[(1000, 1, 256, 256)].modes == ("fwd",)

    assert [s.B for s in SUITES["sweep-batch"].shapes] == [2**k for k in range(10)]
    assert all((s.T, s.I, s.H) == (512, 512, 512) for s in SUITES["sweep-batch"].shapes)
    assert [s.H for s in SUITES["sweep-hidden"].shapes] == [2**k for k in range(6, 12)]
    assert all((s.T, s.B) == (512, 16) and s.I == s.H for s in SUITES["sweep-hidden"].shapes)


def test_shape_filter_matches_whole_tokens():
    shapes = SUITES["sweep-batch"].shapes
    assert [s.B for s in select_shapes(shapes, ["B64"])] == [64]  # not B64 and B640-ish prefixes
    assert [s.B for s in select_shapes(shapes, ["B1", "B512"])] == [1, 512]
    assert select_shapes(shapes, ["T100_B1"]) == []
    assert select_shapes(shapes, None) == list(shapes)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_other_load_sees_another_process_but_not_this_one():
    import subprocess

    meter = machine.OtherLoad().start()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:  # our own work is not "other"
        pass
    subprocess.run([sys.executable, "-c",
                    "import time\nt = time.time() + 1.0\nwhile time.time() < t: pass"], check=True)
    frac = meter.stop()
    # One core busy elsewhere for 1 s of 1.5 s; allow for neighbours, not for missing it.
    assert frac is not None and frac >= 0.8 / (1.5 * os.cpu_count())


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("NVIDIA H200") == "nvidia-h200"
    assert device_slug("Intel(R) Xeon(R) Processor", "cpu") == "cpu-intel-xeon"
    assert device_slug("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cpu") == \
        "cpu-intel-xeon-platinum-8480"
    assert device_slug("AMD EPYC 7763 64-Core Processor", "cpu") == "cpu-amd-epyc-7763"


def test_cpu_results_folder_names_the_generation_and_the_kernels_isa(monkeypatch):
    from benchmarks import machine

    monkeypatch.setattr(machine, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(machine, "cpu_generation", lambda: "zen4")
    for isa in ("avx2", "avx512"):
        monkeypatch.setattr(machine, "cpu_isa_selected", lambda isa=isa: isa)
        assert machine.results_slug("cpu") == f"cpu-amd-epyc-zen4-{isa}"
    monkeypatch.setattr(machine, "cpu_isa_selected", lambda: None)  # extension not built
    assert machine.results_slug("cpu") == "cpu-amd-epyc-zen4"
    monkeypatch.setattr(machine, "cpu_model", lambda: "Intel(R) Xeon(R) Processor")
    monkeypatch.setattr(machine, "cpu_generation", lambda: None)
    monkeypatch.setattr(machine, "cpu_isa_selected", lambda: "avx512bf16")
    assert machine.results_slug("cpu") == "cpu-intel-xeon-avx512bf16"


@pytest.mark.parametrize("vendor, family, model, generation", [
    ("AuthenticAMD", 25, 0x01, "zen3"),   # EPYC 7003 (Milan)
    ("AuthenticAMD", 25, 0x11, "zen4"),   # EPYC 9004 (Genoa)
    ("AuthenticAMD", 25, 0xA0, "zen4"),   # EPYC 97x4 (Bergamo)
    ("AuthenticAMD", 26, 0x02, "zen5"),   # EPYC 9005 (Turin)
    ("AuthenticAMD", 23, 0x31, "family23-model49"),
    ("GenuineIntel", 6, 143, None),
])
def test_cpu_generation_from_family_and_model(vendor, family, model, generation):
    from benchmarks import machine

    fields = {"vendor_id": vendor, "cpu family": str(family), "model": str(model)}
    assert machine.cpu_generation(fields) == generation


# ----------------------------------------------------------------------------- roofline, memory

def test_roofline_flops_and_floor():
    s = Shape(T=10, B=2, I=3, H=4)
    assert roofline.flops(s, "fwd") == 8 * 10 * 2 * 4 * (3 + 4)
    assert roofline.flops(s, "fwdbwd") == 3 * roofline.flops(s, "fwd")
    # Layer 2 of a bidirectional stack reads both directions' outputs: width 2H.
    deep = Shape(T=10, B=2, I=3, H=4, layers=2, bidirectional=True)
    assert roofline.flops(deep, "fwd") == 2 * 8 * 10 * 2 * 4 * ((3 + 4) + (8 + 4))

    peaks = roofline.Peaks("test", "fake", {"float32": 1e9}, bandwidth=1e9, step_s=1e-6)
    ms, bound = roofline.floor_ms(s, "fwd", "float32", peaks, tf32=False)
    assert bound == "latency" and ms == pytest.approx(10 * 1e-3)  # 10 steps of 1 us
    big = Shape(T=10, B=4096, I=1024, H=1024)
    ms, bound = roofline.floor_ms(big, "fwd", "float32", peaks, tf32=False)
    assert bound == "flops" and ms == pytest.approx(roofline.flops(big, "fwd") / 1e9 * 1e3)


def test_roofline_stream_term_reads_the_recurrent_weights_every_step():
    s = Shape(T=100, B=1, I=32, H=64)
    w_hh = 4 * 64 * 64 * 4  # fp32 bytes
    l2, l3, dram = 100e9, 50e9, 10e9
    peaks = roofline.Peaks("cpu", "fake", {"float32": 1e15, "bfloat16": 1e15}, bandwidth=dram,
                           step_s=1e-9, weight_caches=[(w_hh / 2, l2), (4 * w_hh, l3)], threads=2)
    ms, bound = roofline.floor_ms(s, "fwd", "float32", peaks, tf32=False)
    assert bound == "stream" and ms == pytest.approx(100 * w_hh / l2 * 1e3)  # each half in an L2
    assert roofline.floor_ms(s, "fwdbwd", "float32", peaks, tf32=False)[0] == pytest.approx(2 * ms)
    # bf16 weights: half the bytes, same level.
    assert roofline.floor_ms(s, "fwd", "bfloat16", peaks, tf32=False)[0] == pytest.approx(ms / 2)
    one = roofline.Peaks("cpu", "fake", {"float32": 1e15}, bandwidth=dram, step_s=1e-9,
                         weight_caches=[(w_hh / 2, l2), (4 * w_hh, l3)], threads=1)
    assert roofline.floor_ms(s, "fwd", "float32", one, tf32=False)[0] == pytest.approx(100 * w_hh / l3 * 1e3)
    # Layers, directions and a projection (W_hr) each stream their own weights.
    deep = Shape(T=100, B=1, I=32, H=64, layers=3, bidirectional=True, proj_size=16)
    per_step = (4 * 64 * 16 + 64 * 16) * 4
    ms, bound = roofline.floor_ms(deep, "fwd", "float32", peaks, tf32=False)
    assert bound == "stream" and ms == pytest.approx(6 * 100 * per_step / l2 * 1e3)
    # GPUs (no weight caches) have no such term.
    gpu = roofline.Peaks("gpu", "fake", {"float32": 1e15}, bandwidth=dram, step_s=1e-9)
    assert roofline.floor_ms(s, "fwd", "float32", gpu, tf32=False)[1] != "stream"


def test_roofline_bytes_read_the_weights_from_the_cache_that_holds_them():
    # One step of a cell: bound by its bytes, the weights from an L2 on a CPU, DRAM on a GPU.
    s = Shape(T=1, B=1, I=256, H=256, cell=True, state=True)
    weights = 4 * 256 * (256 + 256 + 2) * 4
    acts = (256 + 256) * 4
    l2, dram = 400e9, 40e9
    cpu = roofline.Peaks("cpu", "fake", {"float32": 1e15}, bandwidth=dram, step_s=1e-12,
                         weight_caches=[(weights / 2, l2)], threads=2)
    ms, bound = roofline.floor_ms(s, "fwd", "float32", cpu, tf32=False)
    assert bound == "bytes" and ms == pytest.approx((weights / l2 + acts / dram) * 1e3)
    assert roofline.floor_ms(s, "fwdbwd", "float32", cpu, tf32=False)[0] == pytest.approx(3 * ms)
    # Beyond every cache, and on a GPU: all from memory.
    one = roofline.Peaks("cpu", "fake", {"float32": 1e15}, bandwidth=dram, step_s=1e-12,
                         weight_caches=[(weights / 2, l2)], threads=1)
    gpu = roofline.Peaks("gpu", "fake", {"float32": 1e15}, bandwidth=dram, step_s=1e-12)
    for peaks in (one, gpu):
        ms, bound = roofline.floor_ms(s, "fwd", "float32", peaks, tf32=False)
        assert bound == "bytes" and ms == pytest.approx((weights + acts) / dram * 1e3)
    assert roofline.weight_bytes(s, 4) == weights and roofline.activation_bytes(s, 4) == acts


def test_roofline_gpu_table_and_tf32():
    p = roofline.device_peaks("cuda", "NVIDIA H100 80GB HBM3")
    assert p.bandwidth == pytest.approx(3.35e12)
    assert p.rate("bfloat16", tf32=False) == pytest.approx(989e12)
    assert p.rate("float32", tf32=True) == pytest.approx(495e12)
    assert p.rate("float32", tf32=False) == pytest.approx(67e12)
    assert roofline.device_peaks("cuda", "NVIDIA H200").bandwidth == pytest.approx(4.8e12)
    assert roofline.device_peaks("cuda", "Some Future GPU") is None


def test_saved_mb_counts_unique_activation_storages():
    x = torch.randn(256, 1024, requires_grad=True)
    w = torch.randn(1024, requires_grad=True)
    # exp saves its output (1 MB); the product x * w saves x and w, which are left out.
    assert memory.saved_mb(lambda t: (t * w).exp(), x, [w]) == pytest.approx(1.0)
    # e * e saves e twice more: the same storage counts once; two exps are two storages.
    assert memory.saved_mb(lambda t: (lambda e: e * e)((t * w).exp()), x, [w]) == pytest.approx(1.0)
    assert memory.saved_mb(lambda t: (t * w).exp() + (t * w).exp(), x, [w]) == pytest.approx(2.0)
    assert memory.saved_mb(lambda t: t * w, x, [w]) == 0.0


@pytest.mark.parametrize("shape", [Shape(T=7, B=3, I=5, H=8),
                                   Shape(T=6, B=2, I=4, H=8, layers=2, bidirectional=True)],
                         ids=lambda s: s.name)
def test_flashrnn_adapter_matches_nn_lstm(shape):
    """The weight/layout mapping, through flashrnn's pure-PyTorch backend (runs on CPU)."""
    pytest.importorskip("flashrnn")
    native = providers.make_native(shape, "cpu", torch.float32)
    model = providers.FlashRNNLSTM(native, backend="vanilla")
    x = torch.randn(shape.T, shape.B, shape.I, requires_grad=True)
    y, ref = model.forward(x), native(x)[0]
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, *model.params], dy)
    want = torch.autograd.grad(ref, [x, *native.parameters()], dy)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    # model.params: per layer and direction (W_ih, W_hh, b_ih + b_hh); nn.LSTM has both biases.
    want_params = list(want[1:])
    for k, g in enumerate(got[1:]):
        w_ih, w_hh, b_ih, _b_hh = want_params[4 * (k // 3): 4 * (k // 3) + 4]
        torch.testing.assert_close(g, (w_ih, w_hh, b_ih)[k % 3], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- new cpu rows

from benchmarks import load, workload  # noqa: E402
from benchmarks.shapes import Suite  # noqa: E402


def _fused_cpu_or_skip():
    if "cpu" not in providers.fused_backends():
        pytest.skip("lstm_fused's CPU backend is not available here")


def _run_tiny(monkeypatch, tmp_path, shapes, *extra):
    """run.run on a throw-away suite holding ``shapes`` (fwd, 3 reps, nn.LSTM + lstm_fused:cpu)."""
    monkeypatch.setitem(SUITES, "tiny-test", Suite("tiny-test", tuple(shapes), "test",
                                                    dtypes=("float32",), budget_s=0.05, min_reps=2))
    return run.run(["--suite", "tiny-test", "--device", "cpu", "--out", str(tmp_path),
                    "--no-progress", "--no-plots", "--reps", "3", "--modes", "fwd",
                    "--providers", "lstm_fused:cpu", *extra])


def test_cpu_suites_hold_the_new_rows():
    cpu = {s.name: s for s in SUITES["cpu"].shapes}
    for name in ("T200_B4_I256_H256", "T200_B1_I512_H512", "T512_B4_I256_H256_L6",
                 "T1_B1_I256_H256_L2_hx", "T1_B1_I256_H256_cell_hx",
                 "T200_B1_I512_H512_bf16_vs-cpu-fp32"):
        assert name in cpu, name
        assert cpu[name].modes == ("fwd",)
    step, cell = cpu["T1_B1_I256_H256_L2_hx"], cpu["T1_B1_I256_H256_cell_hx"]
    assert step.state and not step.cell and step.layers == 2
    assert cell.cell and cell.state
    bf16 = cpu["T200_B1_I512_H512_bf16_vs-cpu-fp32"]
    assert bf16.dtypes == ("bfloat16",) and bf16.baseline == "lstm_fused:cpu@float32"
    load_suite = SUITES["cpu-load"]
    assert load_suite.busy_core and not SUITES["cpu"].busy_core
    assert {s.name for s in load_suite.shapes} == {
        "T512_B4_I256_H256_L6", "T1_B1_I256_H256_L2_hx", "T1_B1_I256_H256_cell_hx"}
    # Whole-token filters reach the new rows and no others.
    assert [s.name for s in select_shapes(SUITES["cpu"].shapes, ["cell"])] == [cell.name]
    assert {s.name for s in select_shapes(SUITES["cpu"].shapes, ["hx"])} == {step.name, cell.name}
    with pytest.raises(ValueError):
        Shape(T=2, B=1, I=4, H=4, cell=True)  # a cell is one step


def test_train_mode_is_opt_in_and_in_the_cpu_suite():
    assert Shape(T=2, B=1, I=4, H=4).applies_to("fwdbwd")
    assert not Shape(T=2, B=1, I=4, H=4).applies_to("train")
    assert Shape(T=2, B=1, I=4, H=4, modes=("train",)).applies_to("train")
    trained = {s.name for s in SUITES["cpu"].shapes if s.applies_to("train")}
    assert trained == {"T100_B16_I256_H256", "T200_B1_I128_H128"}


def test_train_workload_steps_the_weights_in_place():
    """A train call returns the weights' gradients (none for the input, the data) and moves every
    weight by -TRAIN_LR times its gradient in place: new version counters, as after an optimizer
    step, so a provider caching anything of the weights must notice."""
    shape = Shape(T=3, B=2, I=5, H=6, modes=("train",))
    native = providers.make_native(shape, "cpu", torch.float32)
    base = providers.build("nn.LSTM", native, shape)
    inputs = workload.make_inputs(shape, torch.float32, "cpu", "train")
    x, dy, _ = inputs[0]
    assert not x.requires_grad
    before = [p.detach().clone() for p in base.params]
    versions = [p._version for p in base.params]
    grads = workload.make_call(base.forward, base.params, "train", inputs)(0)
    want = torch.autograd.grad(base.forward(x), [p for p in base.params], dy)  # at the new weights
    assert len(grads) == len(base.params)
    for p, old, g, w, v in zip(base.params, before, grads, want, versions):
        assert p._version > v
        torch.testing.assert_close(p.detach(), old - workload.TRAIN_LR * g, rtol=0, atol=1e-7)
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)  # weights moved by ~1e-6 only


def test_run_dtypes_of_a_shape_with_its_own():
    s = Shape(T=2, B=1, I=4, H=4, dtypes=("bfloat16",))
    assert s.run_dtypes(["float32"]) == ["bfloat16"]                 # the suite's default
    assert s.run_dtypes(["float32"], explicit=True) == []            # --dtypes float32 drops it
    assert s.run_dtypes(["float32", "bfloat16"], explicit=True) == ["bfloat16"]
    assert Shape(T=2, B=1, I=4, H=4).run_dtypes(["float16"]) == ["float16"]


@pytest.mark.parametrize("shape", [Shape(T=1, B=3, I=8, H=8, layers=2, state=True),
                                   Shape(T=1, B=3, I=8, H=8, cell=True, state=True),
                                   Shape(T=3, B=2, I=8, H=8, layers=2, bidirectional=True,
                                         proj_size=4, state=True)],
                         ids=lambda s: s.name)
def test_state_and_cell_workload_feed_the_given_state(shape):
    """Every provider gets the same fresh (h0, c0); the fused one matches nn.LSTM/nn.LSTMCell
    with it, and the state really changes the output (it is not dropped on the way)."""
    _fused_cpu_or_skip()
    import lstm_fused

    native = providers.make_native(shape, "cpu", torch.float32)
    assert isinstance(native, torch.nn.LSTMCell if shape.cell else torch.nn.LSTM)
    ours = providers.build("lstm_fused:cpu", native, shape)
    assert isinstance(ours.module, lstm_fused.LSTMCell if shape.cell else lstm_fused.LSTM)
    base = providers.build("nn.LSTM", native, shape)
    inputs = workload.make_inputs(shape, torch.float32, "cpu", "fwd")
    x, dy, hx = inputs[0]
    assert hx is not None and all(t.abs().sum() > 0 for t in hx)  # fresh, not zeros
    assert x.shape == ((shape.B, shape.I) if shape.cell else (shape.T, shape.B, shape.I))
    n = shape.layers * shape.dirs
    want_h = (shape.B, shape.H) if shape.cell else (n, shape.B, shape.proj_size or shape.H)
    assert hx[0].shape == want_h and hx[1].shape[-1] == shape.H
    got = workload.make_call(ours.forward, ours.params, "fwd", inputs)(0)
    want = workload.make_call(base.forward, base.params, "fwd", inputs)(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(base.forward(x), want)  # zero state gives something else


def test_cell_and_step_rows_time_the_right_modules(monkeypatch, tmp_path):
    _fused_cpu_or_skip()
    built = []
    real_build = providers.build

    def spy(name, native, shape):
        b = real_build(name, native, shape)
        built.append((name, type(b.module).__name__))
        return b

    monkeypatch.setattr(providers, "build", spy)
    cell = Shape(T=1, B=2, I=8, H=8, cell=True, state=True, modes=("fwd",))
    step = Shape(T=1, B=1, I=8, H=8, layers=2, state=True, modes=("fwd",))
    results = _run_tiny(monkeypatch, tmp_path, [cell, step])
    assert built == [("nn.LSTM", "LSTMCell"), ("lstm_fused:cpu", "LSTMCell"),
                     ("nn.LSTM", "LSTM"), ("lstm_fused:cpu", "LSTM")]
    recs = results["records"]
    assert [(r["shape"], r["provider"]) for r in recs] == [
        ("T1_B2_I8_H8_cell_hx", "nn.LSTM"), ("T1_B2_I8_H8_cell_hx", "lstm_fused:cpu"),
        ("T1_B1_I8_H8_L2_hx", "nn.LSTM"), ("T1_B1_I8_H8_L2_hx", "lstm_fused:cpu")]
    for r in recs:
        assert report.check_record(r) is None, r
        assert r["ms"] > 0 and r["baseline"] == "nn.LSTM"
        assert r["speedup"] == pytest.approx(r["speedup_vs_nn_lstm"])
        assert r["state"] is True and r["cell"] == ("cell" in r["shape"])


def test_bf16_row_is_relative_to_our_float32(monkeypatch, tmp_path):
    _fused_cpu_or_skip()
    shape = Shape(T=2, B=1, I=8, H=8, modes=("fwd",), dtypes=("bfloat16",),
                  baseline="lstm_fused:cpu@float32")
    assert shape.name == "T2_B1_I8_H8_bf16_vs-cpu-fp32"
    results = _run_tiny(monkeypatch, tmp_path, [shape])
    recs = results["records"]
    assert [(r["provider"], r["dtype"]) for r in recs] == [
        ("nn.LSTM", "bfloat16"), ("lstm_fused:cpu", "float32"), ("lstm_fused:cpu", "bfloat16")]
    native, base, ours = recs
    for r in recs:
        assert report.check_record(r) is None, r
        assert r["ms"] > 0, r
        assert r["baseline"] == "lstm_fused:cpu float32" and r["shape"] == shape.name
    assert base["speedup"] == 1.0
    assert ours["speedup"] == pytest.approx(base["ms"] / ours["ms"])
    assert native["speedup"] == pytest.approx(base["ms"] / native["ms"])
    # Against nn.LSTM only in the same dtype: the float32 baseline has none.
    assert base["speedup_vs_nn_lstm"] is None
    assert ours["speedup_vs_nn_lstm"] == pytest.approx(native["ms"] / ours["ms"])
    md = (tmp_path / "results.md").read_text()
    row = [l for l in md.splitlines() if "| lstm_fused:cpu |" in l and "| bfloat16 |" in l]
    assert len(row) == 1 and "| lstm_fused:cpu float32 |" in row[0]
    # --dtypes float32 leaves a bf16-only row out rather than running it in float32.
    again = _run_tiny(monkeypatch, tmp_path, [shape], "--dtypes", "float32")
    assert again["records"] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemm_options_run_the_gemm_they_name(monkeypatch, set_own_gemm, dtype):
    # Each option's forward must run our input projection op with our own product (own-gemm) or
    # ATen's (aten-gemm), whatever the package's default, and the plain provider that default.
    _fused_cpu_or_skip()
    from lstm_fused import ops

    shape = Shape(T=3, B=2, I=64, H=16)
    native = providers.make_native(shape, "cpu", dtype)
    calls = []
    real_op = torch.ops.lstm_fused.input_projection
    monkeypatch.setattr(torch.ops.lstm_fused, "input_projection", lambda *a: calls.append(a[4]) or real_op(*a))
    # The providers set the choice for their calls; the fixture restores the process's afterwards.
    x = torch.randn(3, 2, 64, dtype=dtype)
    for name, uses_op in (("lstm_fused:cpu/own-gemm", True), ("lstm_fused:cpu/aten-gemm", False),
                          ("lstm_fused:cpu", ops.OWN_GEMM_DEFAULT[dtype])):
        built = providers.build(name, native, shape)
        assert built.name == name
        calls.clear()
        with torch.no_grad():
            built.forward(x)
        assert calls == [uses_op], name  # the op projects on the cpu backend; own_product as named


def test_bf16_baseline_gets_float32_weights_and_inputs():
    _fused_cpu_or_skip()
    shape = Shape(T=2, B=1, I=8, H=8, dtypes=("bfloat16",), baseline="lstm_fused:cpu@float32")
    native = providers.make_native(shape, "cpu", torch.bfloat16)
    b = providers.build("lstm_fused:cpu@float32", native, shape)
    assert b.dtype == torch.float32 and all(p.dtype == torch.float32 for p in b.params)
    assert next(native.parameters()).dtype == torch.bfloat16  # the original is untouched
    torch.testing.assert_close(b.params[0], native.weight_ih_l0.float())
    assert run.case_providers(shape, "bfloat16", ["nn.LSTM", "lstm_fused:cpu"]) == \
        ["nn.LSTM", "lstm_fused:cpu@float32", "lstm_fused:cpu"]
    assert run.case_providers(shape, "float32", ["nn.LSTM", "lstm_fused:cpu"]) == \
        ["nn.LSTM", "lstm_fused:cpu"]  # x@float32 in a float32 case is x itself


# ----------------------------------------------------------------------------- busy core

def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_busy_core_process_is_pinned_and_stopped():
    core = load.last_core()
    busy = load.BusyCore().start()
    pid = busy.pid
    try:
        assert busy.core == core and busy.running()
        assert os.sched_getaffinity(pid) == {core}
        time.sleep(0.3)
        with open(f"/proc/{pid}/stat") as f:  # it spins: user time grows
            utime = int(f.read().rsplit(")", 1)[1].split()[11])
        assert utime > 0
    finally:
        busy.stop()
    assert _gone(pid) and not busy.running()
    busy.stop()  # twice is fine
    with pytest.raises(ValueError):
        load.BusyCore(10_000)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_busy_core_run_records_it_and_stops_it(monkeypatch, tmp_path):
    started = []
    real = load.BusyCore.start

    def start(self):
        out = real(self)
        started.append((self, self.pid))
        return out

    monkeypatch.setattr(load.BusyCore, "start", start)
    shape = Shape(T=1, B=1, I=8, H=8, state=True, modes=("fwd",))
    results = _run_tiny(monkeypatch, tmp_path, [shape], "--busy-core", "--providers", "nn.LSTM")
    assert len(started) == 1
    busy, pid = started[0]
    assert _gone(pid)
    assert results["machine"]["busy_core"] == load.last_core() == results["settings"]["busy_core"]
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["busy_core"] == busy.core
    assert f"busy core: **{busy.core}**" in (tmp_path / "results.md").read_text()

    # Without it: null, and said so.
    results = _run_tiny(monkeypatch, tmp_path, [shape], "--providers", "nn.LSTM")
    assert results["machine"]["busy_core"] is None and len(started) == 1
    assert "busy core: none" in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_busy_core_is_stopped_when_the_run_is_interrupted(monkeypatch, tmp_path):
    started = []
    real = load.BusyCore.start
    monkeypatch.setattr(load.BusyCore, "start",
                        lambda self: started.append(self) or real(self))

    def interrupted(*a, **k):
        assert started[0].running()  # the measurements run beside it
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "time_mode", interrupted)
    shape = Shape(T=1, B=1, I=8, H=8, modes=("fwd",))
    monkeypatch.setitem(SUITES, "tiny-load", Suite("tiny-load", (shape,), "test",
                                                    dtypes=("float32",), busy_core=True))
    with pytest.raises(KeyboardInterrupt):
        run.run(["--suite", "tiny-load", "--device", "cpu", "--out", str(tmp_path),
                 "--no-progress", "--no-plots", "--reps", "2"])  # busy core: the suite's default
    assert len(started) == 1 and started[0].proc is None
    # --no-busy-core overrides the suite.
    monkeypatch.setattr(run, "time_mode", lambda *a, **k: [])
    run.run(["--suite", "tiny-load", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
             "--no-plots", "--reps", "2", "--no-busy-core"])
    assert len(started) == 1


def test_busy_core_argument():
    assert run.parse_args(["--suite", "cpu", "--busy-core"]).busy_core == "last"
    assert run.parse_args(["--suite", "cpu", "--busy-core", "1"]).busy_core == 1
    assert run.parse_args(["--suite", "cpu"]).busy_core is None
    with pytest.raises(SystemExit):
        run.parse_args(["--suite", "cpu", "--busy-core", "x"])


# ----------------------------------------------------------------------------- machine peaks

def _peak_ops_or_skip():
    if not roofline.peak_ops_available():
        pytest.skip("lstm_fused's peak ops are not built here")
    return torch.ops.lstm_fused


def test_fma_peak_op_per_isa():
    ops = _peak_ops_or_skip()
    import math

    for isa in ("generic", "avx2", "avx512", "avx512bf16"):
        if not ops.cpu_isa_supported(isa):
            with pytest.raises(RuntimeError, match="cannot run"):
                ops.cpu_fma_peak_gflops(1, isa)
            continue
        g = ops.cpu_fma_peak_gflops(1, isa)
        assert isinstance(g, float) and math.isfinite(g) and g > 0, (isa, g)
    g = ops.cpu_fma_peak_gflops(2, "auto")  # the selected ISA
    assert math.isfinite(g) and g > 0
    for bad_isa in ("sse9", "AVX2", "avx512_bf16"):
        with pytest.raises(RuntimeError, match="unknown CPU instruction set"):
            ops.cpu_fma_peak_gflops(1, bad_isa)
    for bad_threads in (0, -1, 100_000):
        with pytest.raises(RuntimeError, match="threads"):
            ops.cpu_fma_peak_gflops(bad_threads, "generic")


def test_read_bandwidth_op():
    ops = _peak_ops_or_skip()
    import math

    for nbytes, threads in ((256 * 1024, 1), (64 * 1024, 2), (4096 + 4, 1)):
        g = ops.cpu_read_bandwidth_gbs(nbytes, threads)
        assert isinstance(g, float) and math.isfinite(g) and g > 0, (nbytes, threads, g)
    for nbytes, threads in ((100, 1), (2**33, 1), (65536, 0)):
        with pytest.raises(RuntimeError):
            ops.cpu_read_bandwidth_gbs(nbytes, threads)


def test_cpu_peaks_use_our_fma_loop_and_keep_mkl(monkeypatch):
    _peak_ops_or_skip()
    calls = []
    monkeypatch.setattr(roofline, "measure_cpu_fma",
                        lambda threads, isa="auto": calls.append((threads, isa)) or 123e9)
    monkeypatch.setattr(roofline, "measure_cpu_gemm", lambda dtype="float32", **k: 7e9)
    monkeypatch.setattr(roofline, "measure_cpu_copy", lambda **k: 5e9)
    monkeypatch.setattr(roofline, "cache_bytes", lambda level: {2: 2**20, 3: 96 * 2**20}[level])
    reads = {roofline.L2_BYTES_PER_THREAD: 400e9, 8 * 2**20: 200e9}  # L3: a quarter over 3 threads
    monkeypatch.setattr(roofline, "measure_cpu_read", lambda nbytes, threads: reads.get(nbytes, 40e9))
    p = roofline.cpu_peaks("some cpu", threads=3)
    isa = torch.ops.lstm_fused.cpu_isa_selected()
    assert calls == [(3, isa)]
    assert p.rate("float32", tf32=False) == 123e9 and p.rate("bfloat16", tf32=False) == 123e9
    assert p.bandwidth == 40e9  # the large buffer, not L2
    assert p.cpu["mkl_gemm_gflops"] == 7.0 and p.cpu["fma_peak_gflops"] == 123.0
    assert p.cpu["l2_read_gb_s"] == 400.0 and p.cpu["big_read_gb_s"] == 40.0
    assert p.cpu["fma_isa"] == isa and p.cpu["peak_threads"] == 3
    assert p.cpu["l3_read_gb_s"] == 200.0 and p.cpu["l3_bytes_per_thread"] == 8 * 2**20
    assert "FMA" in p.source
    # Weights re-read per step: half an L2 per thread, half the L3 over the threads, then DRAM.
    assert p.weight_caches == [(2**19, 400e9), (16 * 2**20, 200e9)]
    assert p.weight_read_rate(3 * 2**19) == 400e9 and p.weight_read_rate(3 * 2**19 + 3) == 200e9
    assert p.weight_read_rate(48 * 2**20) == 200e9 and p.weight_read_rate(49 * 2**20) == 40e9
    # No L3 measure where the L3 is unknown or no larger than the L2s.
    monkeypatch.setattr(roofline, "cache_bytes", lambda level: {2: 2**20, 3: 0}[level])
    p = roofline.cpu_peaks("some cpu", threads=3)
    assert "l3_read_gb_s" not in p.cpu and p.weight_caches == [(2**19, 400e9)]
    # Without the ops: MKL GEMM as before, and said so.
    monkeypatch.setattr(roofline, "peak_ops_available", lambda: False)
    p = roofline.cpu_peaks("some cpu", threads=3)
    assert p.rate("float32", tf32=False) == 7e9 and "MKL" in p.source


def test_smoke_records_cpu_isa_and_peaks(smoke):
    out, results = smoke
    m = json.loads((out / "results.json").read_text())["machine"]
    for key in ("cpu", "cpu_flags", "cpu_isa_selected", "mkl_gemm_gflops", "busy_core"):
        assert key in m, key
    assert m["busy_core"] is None
    if os.path.exists("/proc/cpuinfo") and machine.cpu_flags():
        assert set(m["cpu_flags"]) == set(machine.ISA_FLAGS)
    md = (out / "results.md").read_text()
    assert f"CPU: **{m['cpu']}**" in md
    if roofline.peak_ops_available():
        assert m["cpu_isa_selected"] in ("generic", "avx2", "avx512", "avx512bf16")
        assert m["fma_peak_gflops"] > 0 and m["l2_read_gb_s"] > 0 and m["big_read_gb_s"] > 0
        assert results["peaks"]["tflops"]["float32"] == pytest.approx(m["fma_peak_gflops"] / 1e3)
        assert f"{m['fma_peak_gflops']:.1f} GFLOP/s" in md
