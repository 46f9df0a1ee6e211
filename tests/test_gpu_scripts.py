"""The one-call GPU scripts, checked where CI can: a broken script would waste a GPU lease.

scripts/gpu_session.sh runs here as a dry run (the smoke benchmark suite, the GPU-only steps
skipped): its step table, the deadline's skipping, and the bundle it returns must all work.
Nothing here may depend on how fast this machine is: the dry run gets a deadline far beyond what
its steps need, and the deadline's skipping is checked with a deadline that has already passed.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHELL_SCRIPTS = sorted(REPO.glob("scripts/*.sh")) + sorted(REPO.glob("benchmarks/*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_syntax(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sanitize_case_runs_on_cpu():
    done = subprocess.run([sys.executable, "scripts/cuda_sanitize_case.py", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": ok") == 8


SESSION_STEPS = ["env", "build", "cuda_tests", "triton_tests", "bench_cuda", "bench_triton", "bench_cluster",
                 "cuda_paths", "step_times", "grid_sync", "memcheck", "bench_half"]  # fmt: skip


def _run_gpu_session(out, **env_overrides):
    out.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, BENCH_SUITE="smoke",
               BENCH_ARGS="--budget 0.05 --shapes T16_B4 --modes fwd --no-plots", **env_overrides)  # fmt: skip
    # The timeout only guards against a hang; it is far above any plausible run time.
    done = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    summary = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in summary.splitlines() if line.startswith("| ") and line.count("|") == 4}  # fmt: skip
    return done, summary, rows


def test_gpu_session_dry_run(tmp_path):
    out = tmp_path / "out"
    # A deadline no run on any machine reaches: every step that is not skipped runs.
    done, summary, rows = _run_gpu_session(
        out, SKIP="build cuda_tests triton_tests bench_triton bench_cluster cuda_paths step_times grid_sync memcheck",
        DEADLINE="100000")  # fmt: skip
    assert rows["build"] == "skipped (SKIP)", summary
    assert rows["bench_cuda"] == "ok", done.stdout[-3000:] + done.stderr[-3000:]
    assert rows["bench_half"] == "ok", done.stdout[-3000:] + done.stderr[-3000:]
    assert "## headline_cuda" in summary and "| T16_B4_I32_H32 | fwd | bfloat16 | nn.LSTM |" in summary
    with tarfile.open(out / "gpu_session.tgz") as bundle:
        names = set(bundle.getnames())
    assert {"gpu_session/summary.md", "gpu_session/bench_cuda.log",
            "gpu_session/headline_cuda/results.json"} <= names  # fmt: skip
    # Without a GPU the env step fails (no device to report): the script must say so, not hide it.
    if not torch.cuda.is_available():
        assert rows["env"].startswith(("FAILED", "TIMEOUT")) and done.returncode != 0, summary


def test_gpu_session_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    # DEADLINE=0 has passed before the first step, however fast or loaded the machine: every step
    # is skipped for time (SKIP still wins), and the summary and bundle still come back.
    done, summary, rows = _run_gpu_session(tmp_path / "out", SKIP="build", DEADLINE="0")
    assert [name for name in rows if name in SESSION_STEPS] == SESSION_STEPS, summary
    for name in SESSION_STEPS:
        expected = "skipped (SKIP)" if name == "build" else "skipped: out of time"
        assert rows[name].startswith(expected), summary
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(tmp_path / "out" / "gpu_session.tgz") as bundle:
        assert "gpu_session/summary.md" in bundle.getnames()


def _fake_session(folder, records, slug="nvidia-h200"):
    run = folder / "gpu_session" / "headline_cuda"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"machine": {"slug": slug}, "records": records}))
    (run / "results.md").write_text("# table\n")
    (folder / "gpu_session" / "summary.md").write_text("# summary\n")
    bundle = folder / "gpu_session.tgz"
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(folder / "gpu_session", arcname="gpu_session")
    return bundle


def test_collect_copies_results_and_judges_targets(tmp_path, capsys):
    from benchmarks import collect

    rec = dict(provider="lstm_fused:cuda", dtype="bfloat16", skipped=None, note=None)
    records = [
        dict(rec, shape="T1000_B1_I256_H256", mode="fwd", ms=0.5, speedup_vs_nn_lstm=1.6),
        dict(rec, shape="T100_B64_I512_H512", mode="fwd", ms=1.0, speedup_vs_nn_lstm=1.2),
        dict(rec, shape="T100_B64_I512_H512", mode="fwdbwd", ms=None, speedup_vs_nn_lstm=None,
             note="RuntimeError: boom"),
        dict(rec, shape="T1000_B1_I256_H256", mode="fwd", dtype="float16", ms=9.0, speedup_vs_nn_lstm=0.1),
    ]  # fmt: skip
    bundle = _fake_session(tmp_path, records)
    dest = tmp_path / "results"
    assert collect.main([str(bundle), "--dest", str(dest)]) == 0
    assert sorted(p.name for p in (dest / "nvidia-h200").iterdir()) == [
        "gpu_session.md", "headline_cuda.json", "headline_cuda.md"]
    table = capsys.readouterr().out
    row = lambda shape, mode: next(line for line in table.splitlines()  # noqa: E731
                                   if f"| 5 (cuda) | {shape} | {mode} |" in line)
    assert row("T1000_B1_I256_H256", "fwd").endswith("| 0.800 | 0.500 | 1.60x | met |")  # fp16 ignored
    assert row("T100_B64_I512_H512", "fwd").endswith("| 1.20x | missed |")
    assert row("T100_B64_I512_H512", "fwdbwd").endswith("| RuntimeError: boom |")
    assert row("T1024_B16_I768_H768", "fwd").endswith("| not measured |")
