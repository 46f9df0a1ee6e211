"""Commit-ready results from a GPU session's bundle, and the issues' targets next to them.

    python -m benchmarks.collect gpu_session.tgz            # unpack into benchmarks/results/<gpu>/
    python -m benchmarks.collect gpu_session.tgz --dry-run  # only print the targets table

`scripts/gpu_session.sh` returns one bundle (gpu_session.tgz: logs, junit XML, and one
benchmark folder per run: headline_cuda/, headline_triton/, ...). This copies each run's
results.{json,md,png} to benchmarks/results/<device slug>/<run>.{json,md,png} and the session's
summary to gpu_session.md there, then prints the target table of the CUDA and Triton issues
with the speedups measured (nn.LSTM's time over ours, from the same run), so the numbers that
go into a closing note come from the files being committed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    issue: str
    provider: str
    shape: str  # the benchmark suite's shape name
    mode: str  # fwd | fwdbwd
    speedup: float  # at least this much faster than nn.LSTM (cuDNN), bf16


# The targets tables of the CUDA backend (issue 5) and Triton backend (issue 4) issues; bf16.
TARGETS = [
    Target("5 (cuda)", "lstm_fused:cuda", "T1024_B16_I768_H768", "fwd", 2.0),
    Target("5 (cuda)", "lstm_fused:cuda", "T1024_B16_I768_H768", "fwdbwd", 1.5),
    Target("5 (cuda)", "lstm_fused:cuda", "T100_B64_I512_H512", "fwd", 1.5),
    Target("5 (cuda)", "lstm_fused:cuda", "T100_B64_I512_H512", "fwdbwd", 1.5),
    Target("5 (cuda)", "lstm_fused:cuda", "T256_B256_I1024_H1024", "fwdbwd", 1.0),
    Target("5 (cuda)", "lstm_fused:cuda", "T1000_B1_I256_H256", "fwd", 1.5),
    Target("4 (triton)", "lstm_fused:triton", "T1024_B16_I768_H768", "fwd", 1.0),
    Target("4 (triton)", "lstm_fused:triton", "T1024_B16_I768_H768", "fwdbwd", 1.0),
    Target("4 (triton)", "lstm_fused:triton", "T100_B64_I512_H512", "fwdbwd", 1.0),
    Target("4 (triton)", "lstm_fused:triton", "T256_B256_I1024_H1024", "fwdbwd", 0.8),
    Target("4 (triton)", "lstm_fused:triton", "T1000_B1_I256_H256", "fwd", 1.0),
]


def load_runs(folder: Path) -> dict:
    """{run name: results.json contents} for every <run>/results.json below `folder`."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/results.json"))}


def measured(runs: dict, target: Target) -> List[tuple]:
    """(run, record) of every bf16 record of the target's provider, shape and mode."""
    hits = []
    for name, results in runs.items():
        for rec in results.get("records", []):
            if (rec.get("provider"), rec.get("shape"), rec.get("mode"), rec.get("dtype")) == (
                target.provider, target.shape, target.mode, "bfloat16"):  # fmt: skip
                hits.append((name, rec))
    return hits


def targets_table(runs: dict, targets: Iterable[Target] = TARGETS) -> str:
    lines = ["| issue | shape | mode | target | run | nn.LSTM ms | ours ms | speedup | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in targets:
        hits = measured(runs, t)
        if not hits:
            lines.append(f"| {t.issue} | {t.shape} | {t.mode} | >= {t.speedup} | - | - | - | - | not measured |")
            continue
        for run, rec in hits:
            speedup: Optional[float] = rec.get("speedup_vs_nn_lstm")
            if rec.get("ms") is None or speedup is None:
                why = rec.get("skipped") or rec.get("note") or "no time"
                lines.append(f"| {t.issue} | {t.shape} | {t.mode} | >= {t.speedup} | {run} | - | - | - | {why} |")
                continue
            base = rec["ms"] * speedup  # nn.LSTM's median from the same run
            verdict = "met" if speedup >= t.speedup else "missed"
            lines.append(f"| {t.issue} | {t.shape} | {t.mode} | >= {t.speedup} | {run} | {base:.3f} | "
                         f"{rec['ms']:.3f} | {speedup:.2f}x | {verdict} |")  # fmt: skip
    return "\n".join(lines)


def device_slug_of(runs: dict) -> str:
    slugs = {r.get("machine", {}).get("slug") for r in runs.values()} - {None}
    if len(slugs) != 1:
        raise SystemExit(f"collect: expected one device in the bundle, found {sorted(slugs) or 'none'}")
    return slugs.pop()


def copy_results(session: Path, runs: dict, dest_root: Path = RESULTS_ROOT) -> List[Path]:
    dest = dest_root / device_slug_of(runs)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in runs:
        for ext in ("json", "md", "png"):
            src = session / name / f"results.{ext}"
            if src.exists():
                written.append(Path(shutil.copyfile(src, dest / f"{name}.{ext}")))
    summary = session / "summary.md"
    if summary.exists():
        written.append(Path(shutil.copyfile(summary, dest / "gpu_session.md")))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="gpu_session.tgz, or the gpu_session folder it unpacks to")
    parser.add_argument("--dry-run", action="store_true", help="print the table, copy nothing")
    parser.add_argument("--dest", default=str(RESULTS_ROOT), help="results root (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle)
        if bundle.is_file():
            with tarfile.open(bundle) as tar:
                tar.extractall(tmp, filter="data")
            session = Path(tmp) / "gpu_session"
        else:
            session = bundle
        runs = load_runs(session)
        if not runs:
            print(f"collect: no <run>/results.json in {args.bundle}", file=sys.stderr)
            return 1
        if not args.dry_run:
            for path in copy_results(session, runs, Path(args.dest)):
                print(f"wrote {path}")
        print(targets_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
