"""The benchmark command.

    python -m benchmarks.run --suite NAME [--out DIR] [--save-results]
        [--providers nn.LSTM,lstm_fused:cpu,lstm_fused:cpu/aten-gemm,...] [--modes fwd,fwdbwd,train]
        [--dtypes float32,bfloat16,float16] [--shapes B64,T100_B16] [--device cpu|cuda]

Prints a table as it goes (progress bar on stderr), then writes DIR/results.json,
DIR/results.md and DIR/results.png (DIR defaults to bench_out/<suite>). ``--save-results`` also
writes benchmarks/results/<device-slug>/<suite>.json|.md|.png, the committed copy.
``python -m benchmarks.run --list`` shows the suites, their shapes and the providers found here.

nn.LSTM is always timed, whatever ``--providers`` says: every speedup is relative to it, in the
same run, except in rows whose shape names another baseline (e.g. ``lstm_fused:cpu@float32`` for a
bfloat16 row: ours-bf16 over ours-fp32), which is then timed too. A provider that cannot run a case
is reported as skipped, with the reason.

``--busy-core [CORE]`` runs the measurements beside a busy process pinned to one core (default: the
last core this process may use), stopped afterwards; suite ``cpu-load`` does that by default.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import warnings
from typing import List, Optional

import torch

from . import load, machine, memory, providers, report, roofline, timing, workload
from .shapes import MODES, SUITES, Shape, normalize_dtype, provider_label, select_shapes, split_provider

try:
    from tqdm import tqdm
except ImportError:  # the table still prints; only the bar is lost
    tqdm = None

RESULTS_ROOT = os.path.join(machine.REPO_ROOT, "benchmarks", "results")


# ----------------------------------------------------------------------------- arguments

def _csv(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), help="which named suite to run")
    p.add_argument("--out", help="output folder (default: bench_out/<suite>)")
    p.add_argument("--save-results", action="store_true",
                   help="also write benchmarks/results/<device-slug>/<suite>.json|.md|.png")
    p.add_argument("--providers", help="comma list: nn.LSTM, lstm_fused:<backend>, flashrnn "
                   "(default: nn.LSTM, the fast lstm_fused backends of the device, flashrnn on GPU)")
    p.add_argument("--modes", help="comma list of fwd, fwdbwd, train (default: each shape's own: "
                                   "fwd and fwdbwd unless it names its modes)")
    p.add_argument("--dtypes", help="comma list of float32, bfloat16, float16 "
                   "(default: the suite's, else bfloat16 on GPU and float32 on CPU)")
    p.add_argument("--shapes", help="comma list of shape patterns: B64 keeps every shape with "
                   "B=64, T100_B16 those with both (names as printed by --list)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, help="timed repetitions per provider (default: from --budget)")
    p.add_argument("--budget", type=float, help="timed seconds per provider per case "
                   "(default: the suite's)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per provider per case "
                   "(default: 0.2 on GPU, one call on CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    p.add_argument("--tf32", choices=("on", "off"), help="set both TF32 switches (default: torch's)")
    p.add_argument("--busy-core", nargs="?", const="last", default=None, metavar="CORE",
                   help="run beside a busy process pinned to core CORE (default: the last core "
                   "this process may use); stopped when the run ends. Suite cpu-load turns it on")
    p.add_argument("--no-busy-core", action="store_true",
                   help="no busy process, even for a suite that has one by default (cpu-load)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG")
    p.add_argument("--list", action="store_true", help="list suites, shapes and providers; exit")
    args = p.parse_args(argv)
    if not args.list and not args.suite:
        p.error("--suite is required (or --list)")
    try:
        args.dtypes = [normalize_dtype(d) for d in _csv(args.dtypes)] if args.dtypes else None
    except ValueError as exc:
        p.error(str(exc))
    args.modes = _csv(args.modes)
    for m in args.modes or []:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; expected one of {MODES}")
    args.providers = _csv(args.providers)
    for name in args.providers or []:
        if not providers.known(name):
            p.error(f"unknown provider {name!r}; expected nn.LSTM, flashrnn or "
                    f"lstm_fused:<{'|'.join(providers.FUSED_BACKENDS)}>, "
                    f"lstm_fused:cpu/<{'|'.join(providers.INPUT_GEMMS)}>")
    args.shapes = _csv(args.shapes)
    if args.busy_core not in (None, "last"):
        try:
            args.busy_core = int(args.busy_core)
        except ValueError:
            p.error(f"--busy-core takes a core number, got {args.busy_core!r}")
    return args


def list_suites(device) -> str:
    lines = []
    for suite in SUITES.values():
        extra = f", dtypes {','.join(suite.dtypes)}" if suite.dtypes else ""
        lines.append(f"{suite.name}: {suite.description}{extra}")
        for s in suite.shapes:
            lines.append(f"    {s.name}" + (f"  (modes: {','.join(s.modes)})" if s.modes else ""))
    lines.append(f"default providers on {device}: {', '.join(providers.default_providers(device))}")
    lines.append(f"lstm_fused backends here: {providers.fused_backends()}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- records

def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def new_record(shape: Shape, mode: str, dtype: str, provider: str) -> dict:
    """An empty record; ``provider`` may carry a dtype (``lstm_fused:cpu@float32``: a baseline in
    another dtype than the case's), which then is the record's dtype."""
    provider, own_dtype = split_provider(provider)
    rec = dict(provider=provider, mode=mode, dtype=own_dtype or dtype, T=shape.T, B=shape.B,
               I=shape.I, H=shape.H, layers=shape.layers, bidirectional=shape.bidirectional,
               ms=None, speedup_vs_nn_lstm=None, peak_mem_mb=None)
    rec.update(shape=shape.name, proj_size=shape.proj_size, ms_min=None, reps=None,
               tokens_per_s=None, roofline_frac=None, floor_ms=None, floor_bound=None,
               saved_mb=None, skipped=None, note=None, cell=shape.cell, state=shape.state,
               baseline=provider_label(shape.baseline_provider), speedup=None)
    return rec


def case_providers(shape: Shape, dtype_name: str, names: List[str]) -> List[str]:
    """The providers of one case: ``names`` (nn.LSTM first) plus the shape's own baseline right
    after nn.LSTM when it is another one; ``x@dtype`` in the case's dtype is just ``x``."""
    base = shape.baseline_provider
    name, dt = split_provider(base)
    if dt == dtype_name:
        base = name
    out = [names[0]] + ([base] if base != names[0] else []) + names[1:]
    return list(dict.fromkeys(out))


def case_baseline(shape: Shape, dtype_name: str) -> str:
    return case_providers(shape, dtype_name, [providers.NATIVE])[-1]


# ----------------------------------------------------------------------------- the run

class _Bar:
    """tqdm when it is installed and wanted, else a silent stand-in."""

    def __init__(self, total: int, enabled: bool):
        # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI).
        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False, disable=None) \
            if (tqdm is not None and enabled) else None

    def write(self, line: str):
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line)
        sys.stdout.flush()

    def step(self, desc: str = ""):
        if self.bar is not None:
            self.bar.set_description(desc[:40])
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _free_cuda(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_providers(shape: Shape, dtype: torch.dtype, names: List[str], device, seed: int):
    """Every provider holding one seeded nn.LSTM's weights: ({name: Built}, {name: skip reason})."""
    try:
        native = providers.make_native(shape, device, dtype, seed)
    except Exception as exc:
        return {}, {n: f"could not create nn.LSTM: {_why(exc)}" for n in names}
    built, skipped = {}, {}
    for name in names:
        reason = providers.skip_reason(name, device, shape)
        if reason:
            skipped[name] = reason
            continue
        try:
            built[name] = providers.build(name, native, shape)
        except Exception as exc:
            skipped[name] = _why(exc)
    return built, skipped


def time_mode(shape: Shape, dtype_name: str, mode: str, names: List[str], built: dict,
              skipped: dict, device, args, suite, floor_for) -> List[dict]:
    """One record per provider for one shape, dtype and mode. ``floor_for(dtype name)``: the
    roofline (floor ms, bound) or None."""
    dtype = getattr(torch, dtype_name)
    cuda = device.type == "cuda"
    recs = {n: new_record(shape, mode, dtype_name, n) for n in names}
    for name, reason in skipped.items():
        recs[name]["skipped"] = reason

    def skip(name, exc):
        recs[name]["skipped"] = _why(exc)
        _free_cuda(device)

    pools = {dtype: workload.make_inputs(shape, dtype, device, mode)}
    calls = {}
    for name, b in built.items():
        b.set_training(mode != "fwd")
        own = b.dtype or dtype  # a baseline in another dtype gets inputs of its own dtype
        if own not in pools:
            pools[own] = workload.make_inputs(shape, own, device, mode)
        call = workload.make_call(b.forward, b.params, mode, pools[own])
        try:
            call(0)  # untimed first call: lazy init, JIT compilation (flashrnn: minutes)
            if cuda:
                torch.cuda.synchronize(device)
        except Exception as exc:
            skip(name, exc)
            continue
        calls[name] = call

    timings = timing.measure(
        calls, device, reps=args.reps,
        budget_s=args.budget if args.budget is not None else suite.budget_s,
        min_reps=suite.min_reps,
        max_reps=suite.max_reps,
        warmup_calls=3 if cuda else 2,
        warmup_s=args.warmup if args.warmup is not None else (0.2 if cuda else 0.0),
        on_error=skip,
    )

    native = timings.get(providers.NATIVE)
    base = timings.get(case_baseline(shape, dtype_name))
    for name, t in timings.items():
        r, b = recs[name], built[name]
        r.update(ms=t.ms, ms_min=t.ms_min, reps=t.reps,
                 tokens_per_s=shape.T * shape.B / (t.ms / 1e3))
        if native is not None and r["dtype"] == dtype_name:  # nn.LSTM runs in the case's dtype
            r["speedup_vs_nn_lstm"] = native.ms / t.ms
        if base is not None:
            r["speedup"] = base.ms / t.ms
        floor = floor_for(r["dtype"])
        if floor is not None:
            r["floor_ms"], r["floor_bound"] = floor
            r["roofline_frac"] = floor[0] / t.ms
        try:
            r["peak_mem_mb"] = memory.peak_memory_mb(calls[name], device)
            if mode == "fwdbwd":
                x, _, hx = pools[b.dtype or dtype][0]
                fwd = b.forward if hx is None else (lambda x, f=b.forward, hx=hx: f(x, hx))
                r["saved_mb"] = memory.saved_mb(fwd, x, b.params)
        except Exception as exc:  # e.g. out of memory on the extra call: keep the timing
            b.notes.append(f"memory not measured: {_why(exc)}")
            _free_cuda(device)
        if b.notes:
            r["note"] = "; ".join(b.notes)
    return [recs[n] for n in names]


def run(argv=None) -> dict:
    """Run a suite as the command line would; return the results dict (also written to disk)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.list:
        print(list_suites(device))
        return {}
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"

    # nn.LSTM warns on every call with proj_size on CPU (no oneDNN path); once is enough.
    warnings.filterwarnings("once", message="LSTM with projections is not supported")

    suite = SUITES[args.suite]
    shapes = select_shapes(suite.shapes, args.shapes)
    dtypes = args.dtypes or list(suite.dtypes or (("bfloat16",) if device.type == "cuda"
                                                  else ("float32",)))
    busy = args.busy_core if args.busy_core is not None else ("last" if suite.busy_core else None)
    if args.no_busy_core:
        busy = None
    modes = args.modes or list(MODES)
    names = [providers.NATIVE] + [n for n in (args.providers or providers.default_providers(device))
                                  if n != providers.NATIVE]
    if not args.providers and suite.both_input_gemms and device.type == "cpu":
        other = providers.other_input_gemm()
        if other is not None and providers.FUSED_PREFIX + "cpu" in names:
            names.append(other)
    names = list(dict.fromkeys(names))

    info = machine.machine_info(device)
    peaks = roofline.device_peaks(device, info["device"])
    if peaks is not None and peaks.cpu is not None:
        info.update(peaks.cpu)  # CPU model, ISA flags, selected kernel ISA, measured peaks
    tf32 = machine.tf32_enabled(device)
    cases = [(s, d, [m for m in modes if s.applies_to(m)]) for s in shapes
             for d in s.run_dtypes(dtypes, explicit=args.dtypes is not None)]
    cases = [c for c in cases if c[2]]

    print(f"suite {suite.name} on {info['device']} ({device}), torch {info['torch']}, "
          f"threads {info['threads']}, tf32 {tf32}; providers: {', '.join(names)}")
    busy_proc = None
    records = []
    try:
        if busy is not None:  # after the peaks: they describe the machine, not the load
            busy_proc = load.BusyCore(None if busy == "last" else busy).start()
            print(f"busy process (pid {busy_proc.pid}) pinned to core {busy_proc.core}")
        info["busy_core"] = busy_proc.core if busy_proc is not None else None
        other_load = machine.OtherLoad().start()
        out = _Bar(sum(len(c[2]) for c in cases), not args.no_progress)
        out.write(report.table_header())
        try:
            for shape, dtype_name, case_modes in cases:
                case_names = case_providers(shape, dtype_name, names)
                built, skipped = build_providers(shape, getattr(torch, dtype_name), case_names,
                                                 device, args.seed)
                for mode in case_modes:
                    def floor_for(dt, shape=shape, mode=mode):
                        return roofline.floor_ms(shape, mode, dt, peaks, tf32) if peaks else None

                    for r in time_mode(shape, dtype_name, mode, case_names, built, skipped, device,
                                       args, suite, floor_for):
                        records.append(r)
                        out.write(report.table_row(r))
                    out.step(f"{shape.name} {mode} {dtype_name}")
                    _free_cuda(device)
                del built
                _free_cuda(device)
        finally:
            out.close()
        info["other_cpu_frac"] = other_load.stop()
    finally:
        if busy_proc is not None:
            busy_proc.stop()

    info["load_avg_end"] = machine.load_avg()
    # The busy process is one of the "other processes": about one core's share of the machine.
    expected = 1 / (os.cpu_count() or 1) if busy_proc is not None else 0.0
    if device.type == "cpu" and (info["other_cpu_frac"] or 0) - expected > 0.1:
        print(f"note: other processes took {info['other_cpu_frac']:.0%} of the CPU during this "
              "run; CPU timings are unreliable (OpenMP threads wait for cores held elsewhere)")
    results = {
        "suite": suite.name,
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in
                                                          (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "peaks": peaks.as_dict() if peaks else None,
        "settings": {"providers": names, "dtypes": dtypes, "modes": modes,
                     "busy_core": info["busy_core"],
                     "shapes": [s.name for s in shapes], "reps": args.reps,
                     "budget_s": args.budget if args.budget is not None else suite.budget_s,
                     "seed": args.seed},
        "records": records,
    }
    targets = [(args.out or os.path.join("bench_out", suite.name), "results")]
    if args.save_results:
        targets.append((os.path.join(RESULTS_ROOT, info["slug"]), suite.name))
    plots = None
    if not args.no_plots:
        try:
            from . import plots
        except ImportError as exc:  # e.g. a GPU box without matplotlib: JSON and markdown still
            print(f"no PNG ({exc}); draw it later with: python -m benchmarks.plots <results.json>")
    for directory, stem in targets:
        written = report.write(results, directory, stem)
        if plots is not None:
            png = plots.plot(results, os.path.join(directory, f"{stem}.png"), suite.sweep)
            written += [png] if png else []
        print("wrote " + ", ".join(written))
    return results


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
