"""Reporting: the table printed as a run goes, results.json and results.md."""

from __future__ import annotations

import json
import os
from typing import List, Optional

# The keys every record has, in this order (extra keys follow them).
RECORD_KEYS = ("provider", "mode", "dtype", "T", "B", "I", "H", "layers", "bidirectional",
               "ms", "speedup_vs_nn_lstm", "peak_mem_mb")

def _num(key: str, fmt: str, scale: float = 1.0):
    return lambda r: "-" if r.get(key) is None else format(r[key] * scale, fmt)


def _mb(key: str):
    # Small shapes save kilobytes: keep three significant digits there.
    return lambda r: "-" if r.get(key) is None else format(r[key], ".3f" if r[key] < 10 else ".1f")


def _shape(r: dict) -> str:
    return r.get("shape") or f"T{r['T']}_B{r['B']}_I{r['I']}_H{r['H']}"


def _speedup(r: dict):
    """Speedup over the row's baseline (``baseline``; nn.LSTM unless the shape names another)."""
    return r["speedup"] if "speedup" in r else r.get("speedup_vs_nn_lstm")


# (header, width, how to format a record)
COLUMNS = [
    ("shape", 26, _shape),
    ("mode", 6, lambda r: r["mode"]),
    ("dtype", 8, lambda r: r["dtype"]),
    ("provider", 22, lambda r: r["provider"]),
    ("ms", 10, _num("ms", ".3f")),
    ("speedup", 8, lambda r: "-" if _speedup(r) is None else f"{_speedup(r):.2f}x"),
    ("vs", 15, lambda r: r.get("baseline") or "nn.LSTM"),
    ("Mtok/s", 9, _num("tokens_per_s", ".3f", 1e-6)),
    ("floor%", 7, _num("roofline_frac", ".1f", 100.0)),
    ("bound", 8, lambda r: r.get("floor_bound") or "-"),
    ("peak MB", 9, _mb("peak_mem_mb")),
    ("saved MB", 9, _mb("saved_mb")),
    ("note", 0, lambda r: r.get("skipped") and f"skipped: {r['skipped']}" or r.get("note") or ""),
]


def _cells(values: List[str]) -> str:
    return "  ".join(v.ljust(w) if w else v for v, (_, w, _f) in zip(values, COLUMNS)).rstrip()


def table_header() -> str:
    head = _cells([h for h, _, _ in COLUMNS])
    return head + "\n" + "-" * max(len(head), 120)


def table_row(record: dict) -> str:
    values = [f(record) for _, _, f in COLUMNS]
    values[-1] = values[-1][:160]  # keep skip reasons to one line
    return _cells(values)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# lstm_fused benchmarks: suite `{results['suite']}`",
        "",
        f"- device: **{m['device']}** ({m['device_type']}), threads: {m['threads']}",
        f"- torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, Triton {m['triton']}, "
        f"flashrnn {m['flashrnn']}",
        f"- TF32: {m['tf32']} ({', '.join(f'{k}={v}' for k, v in m['tf32_flags'].items())})",
        f"- commit {m['git_commit']}, {m['date']}",
        f"- other processes' share of the CPU during the run: {m.get('other_cpu_frac')} "
        f"({m.get('cpu_count')} cores; load average {m.get('load_avg')} before, "
        f"{m.get('load_avg_end')} after)",
        f"- command: `{results.get('command', '')}`",
    ]
    if m.get("device_type") == "cpu" or m.get("cpu_flags"):
        flags = [k for k, v in (m.get("cpu_flags") or {}).items() if v]
        lines.append(f"- CPU: **{m.get('cpu')}**, ISA flags: {' '.join(flags) or 'none listed'}; "
                     f"lstm_fused kernels use: **{m.get('cpu_isa_selected')}**")
    if m.get("fma_peak_gflops") is not None:
        lines.append(
            f"- measured peak (our loops, not MKL): **{m['fma_peak_gflops']:.1f} GFLOP/s** fp32 FMA "
            f"({m.get('fma_isa')}, {m.get('peak_threads')} threads); read bandwidth "
            f"{m.get('l2_read_gb_s', 0):.1f} GB/s at {m.get('l2_bytes_per_thread', 0) // 1024} KB "
            f"per thread (L2), "
            + (f"{m['l3_read_gb_s']:.1f} GB/s at {m['l3_bytes_per_thread'] / 2**20:.3g} MB per thread (L3), "
               if m.get("l3_read_gb_s") else "")
            + f"{m.get('big_read_gb_s', 0):.1f} GB/s over "
            f"{m.get('big_read_bytes', 0) // 2**20} MB; for comparison MKL 1024^3 GEMM "
            f"{m.get('mkl_gemm_gflops', 0):.1f} GFLOP/s, copy_ {m.get('copy_gb_s', 0):.1f} GB/s")
    elif m.get("mkl_gemm_gflops") is not None:
        lines.append(f"- peak: MKL 1024^3 GEMM {m['mkl_gemm_gflops']:.1f} GFLOP/s "
                     f"({m.get('peak_source')})")
    if "busy_core" in m:
        lines.append("- busy core: " + (
            f"**{m['busy_core']}**: a spinning process was pinned to core {m['busy_core']} during "
            "the measurements (it counts among the other processes above)"
            if m["busy_core"] is not None else "none"))
    peaks = results.get("peaks")
    if peaks:
        rates = ", ".join(f"{k} {v:.3g}" for k, v in peaks["tflops"].items())
        lines.append(f"- roofline peaks ({peaks['source']}): TFLOP/s {rates}; "
                     f"{peaks['bandwidth_tb_s']:.3g} TB/s; {peaks['step_latency_us']:.3g} us/step")
    lines += [
        "",
        "`ms` is the median; speedup is the baseline's ms / provider ms from the same run, the "
        "baseline (column vs) being nn.LSTM in the row's dtype unless the row names another "
        "(e.g. `lstm_fused:cpu float32`: ours in bfloat16 over ours in float32); floor% is "
        "the roofline floor over ms and bound the term that set it: flops, bytes, stream (re-reading "
        "the recurrent weights every step from the cache that holds them: CPUs) or latency (see "
        "benchmarks/roofline.py); peak MB is the GPU memory one "
        "call adds; saved MB is what autograd keeps for backward.",
        "",
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in results["records"]:
        lines.append("| " + " | ".join(f(r).replace("|", "/") for _, _, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write(results: dict, directory: str, stem: str) -> List[str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``directory``; return their paths."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, f"{stem}.json")
    md_path = os.path.join(directory, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown(results))
    return [json_path, md_path]


def check_record(record: dict) -> Optional[str]:
    """What is wrong with one record's schema (None: nothing)."""
    keys = list(record)[: len(RECORD_KEYS)]
    if tuple(keys) != RECORD_KEYS:
        return f"keys start {keys}, expected {list(RECORD_KEYS)}"
    for k in ("T", "B", "I", "H", "layers"):
        if not isinstance(record[k], int):
            return f"{k} is not an int"
    if not isinstance(record["bidirectional"], bool):
        return "bidirectional is not a bool"
    if record["ms"] is None:
        if not record.get("skipped"):
            return "ms is null but no skipped reason"
    elif not (isinstance(record["ms"], float) and record["ms"] > 0):
        return "ms is not a positive float"
    for k in ("speedup_vs_nn_lstm", "peak_mem_mb"):
        if record[k] is not None and not isinstance(record[k], (int, float)):
            return f"{k} is not a number or null"
    return None
