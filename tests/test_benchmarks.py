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
    assert md.count("| nn.LSTM |") == sum(r["provider"] == "nn.LSTM" for r in results["records"])
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
    cpu = {(s.T, s.B, s.I, s.H, s.layers, s.bidirectional, s.proj_size): s
           for s in SUITES["cpu"].shapes}
    for key in [(100, 64, 512, 512, 1, False, 0), (100, 16, 256, 256, 1, False, 0),
                (200, 1, 128, 128, 1, False, 0)]:
        assert key in cpu and cpu[key].modes is None  # fwd and fwdbwd
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
