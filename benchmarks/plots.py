"""Speedup plots (PNG): one panel per (mode, dtype).

Sweep suites: speedup over nn.LSTM against the swept size (B or H), one line per provider, with
nn.LSTM as the flat line at 1.0. Other suites: grouped bars, one group per shape.

``python -m benchmarks.plots RESULTS.json...`` (re)draws the PNG beside each JSON file, for
results written where matplotlib was not installed.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402


def _panels(records):
    """(mode, dtype) -> records measured in it, in run order."""
    panels = OrderedDict()
    for r in records:
        panels.setdefault((r["mode"], r["dtype"]), []).append(r)
    return panels


def _providers(records):
    return list(OrderedDict.fromkeys(r["provider"] for r in records))


def plot(results: dict, path: str, sweep: Optional[str] = None) -> Optional[str]:
    """Draw ``results`` into ``path``; None when no record has a speedup to show."""
    records = [r for r in results["records"] if r.get("speedup_vs_nn_lstm") is not None]
    if not records:
        return None
    panels = _panels(records)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, ((mode, dtype), rs) in zip(axes[0], panels.items()):
        if sweep:
            _sweep_panel(ax, rs, sweep)
        else:
            _bar_panel(ax, rs)
        ax.set_title(f"{mode}, {dtype}")
        ax.set_ylabel("speedup over nn.LSTM (x)")
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{results['suite']} on {results['machine']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_panel(ax, records, axis: str):
    for provider in _providers(records):
        pts = sorted((r[axis], r["speedup_vs_nn_lstm"]) for r in records if r["provider"] == provider)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=provider,
                linestyle="--" if provider == "nn.LSTM" else "-")
    ax.set_xscale("log", base=2)
    sizes = sorted({r[axis] for r in records})
    ax.set_xticks(sizes, [str(v) for v in sizes])  # 64, 128, ... rather than 2^6, 2^7
    ax.minorticks_off()
    ax.set_xlabel({"B": "batch size", "H": "hidden size (I = H)"}.get(axis, axis))
    ax.legend(fontsize=8)


def _bar_panel(ax, records):
    shapes = list(OrderedDict.fromkeys(r["shape"] for r in records))
    providers = _providers(records)
    width = 0.8 / len(providers)
    for k, provider in enumerate(providers):
        by_shape = {r["shape"]: r["speedup_vs_nn_lstm"] for r in records if r["provider"] == provider}
        xs = [i + (k - (len(providers) - 1) / 2) * width for i in range(len(shapes))]
        ax.bar(xs, [by_shape.get(s, 0.0) for s in shapes], width, label=provider)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
    ax.legend(fontsize=8)


def main(paths) -> int:
    from .shapes import SUITES

    for path in paths:
        with open(path) as f:
            results = json.load(f)
        suite = SUITES.get(results["suite"])
        png = plot(results, os.path.splitext(path)[0] + ".png", suite.sweep if suite else None)
        print(f"{path} -> {png or 'nothing to plot'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
