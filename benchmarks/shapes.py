"""The registry of named suites: which LSTM shapes each one times, in which modes and dtypes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

MODES = ("fwd", "fwdbwd", "train")
DEFAULT_MODES = ("fwd", "fwdbwd")  # a shape without modes of its own runs these; "train" is opt-in
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16", "float": "float32"}


DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def split_provider(spec: str) -> Tuple[str, Optional[str]]:
    """``"lstm_fused:cpu@float32"`` -> ``("lstm_fused:cpu", "float32")``; no ``@``: dtype None."""
    name, _, dtype = spec.partition("@")
    return name, (dtype or None)


def provider_label(spec: str) -> str:
    """How a baseline is named in tables: ``"lstm_fused:cpu@float32"`` -> ``"lstm_fused:cpu float32"``."""
    name, dtype = split_provider(spec)
    return f"{name} {dtype}" if dtype else name


@dataclass(frozen=True)
class Shape:
    """One LSTM problem: input (T, B, I), hidden H, stacked layers, directions, projection.

    ``cell``: time ``nn.LSTMCell`` against ``lstm_fused.LSTMCell`` (one step: T must be 1; x is
    (B, I)) instead of the LSTM modules. ``state``: every call gets a given, fresh random
    (h0, c0) (``hx`` for a cell) instead of none (zeros). ``dtypes``: the only dtypes this shape
    runs in (else the run's). ``baseline``: the provider its speedup is relative to, instead of
    nn.LSTM in the case's dtype; ``"lstm_fused:cpu@float32"`` is our CPU backend in float32 (e.g.
    for a bfloat16 row: ours-bf16 over ours-fp32). nn.LSTM is timed in every case all the same.
    """

    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    modes: Optional[Tuple[str, ...]] = None  # None: DEFAULT_MODES (of those the run asks for)
    cell: bool = False
    state: bool = False
    dtypes: Optional[Tuple[str, ...]] = None
    baseline: Optional[str] = None           # None: nn.LSTM

    def __post_init__(self):
        if self.cell and (self.T != 1 or self.layers != 1 or self.bidirectional or self.proj_size):
            raise ValueError("an LSTMCell shape has T=1, one layer, one direction, no projection")
        for d in self.dtypes or ():
            if d not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}")
        if self.baseline is not None:
            _, dt = split_provider(self.baseline)
            if dt is not None and dt not in DTYPES:
                raise ValueError(f"unknown baseline dtype {dt!r}")

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def name(self) -> str:
        """Underscore-separated tokens, e.g. ``T100_B64_I512_H512_L2_bi``; --shapes matches these.
        ``cell``: LSTMCell; ``hx``: given initial state; a one-dtype shape names its dtype
        (``bf16``) and a baseline other than nn.LSTM (``vs-cpu-fp32``: lstm_fused:cpu, float32)."""
        parts = [f"T{self.T}", f"B{self.B}", f"I{self.I}", f"H{self.H}"]
        if self.layers != 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        if self.cell:
            parts.append("cell")
        if self.state:
            parts.append("hx")
        if self.dtypes and len(self.dtypes) == 1:
            parts.append(DTYPE_SHORT[self.dtypes[0]])
        if self.baseline:
            name, dt = split_provider(self.baseline)
            short = "nn" if name == "nn.LSTM" else name.rsplit(":", 1)[-1]
            parts.append("vs-" + short + (f"-{DTYPE_SHORT[dt]}" if dt else ""))
        return "_".join(parts)

    @property
    def baseline_provider(self) -> str:
        return self.baseline or "nn.LSTM"

    def run_dtypes(self, wanted: Sequence[str], explicit: bool = False) -> list:
        """The dtypes this shape runs in: ``wanted`` (the run's), or the shape's own when it has
        them, narrowed to ``wanted`` when the user named dtypes (``--dtypes``)."""
        if self.dtypes is None:
            return list(wanted)
        return [d for d in self.dtypes if not explicit or d in wanted]

    def applies_to(self, mode: str) -> bool:
        return mode in (DEFAULT_MODES if self.modes is None else self.modes)


@dataclass(frozen=True)
class Suite:
    name: str
    shapes: Tuple[Shape, ...]
    description: str
    sweep: Optional[str] = None            # "B" or "H": the x axis of the speedup plot
    dtypes: Optional[Tuple[str, ...]] = None  # None: bfloat16 on GPU, float32 on CPU
    budget_s: float = 1.0                  # timed seconds per provider per case (see timing.py)
    min_reps: int = 10
    max_reps: int = 200                    # one-step rows take microseconds: allow more there
    busy_core: bool = False                # run beside a busy process on one core (--busy-core)
    both_input_gemms: bool = False         # also time lstm_fused:cpu with the other input GEMM
    extra: dict = field(default_factory=dict)


def _pow2(lo: int, hi: int):
    n = lo
    while n <= hi:
        yield n
        n *= 2


# Rows shared by the "cpu" and "cpu-load" suites (forward only).
DEEP = Shape(T=512, B=4, I=256, H=256, layers=6, modes=("fwd",))           # the heavy one
STREAM_STEP = Shape(T=1, B=1, I=256, H=256, layers=2, state=True, modes=("fwd",))  # one step
CELL_STEP = Shape(T=1, B=1, I=256, H=256, cell=True, state=True, modes=("fwd",))  # LSTMCell

SUITES = {
    s.name: s
    for s in [
        Suite(
            "headline",
            (
                Shape(T=1024, B=16, I=768, H=768),
                Shape(T=100, B=64, I=512, H=512),
                Shape(T=256, B=256, I=1024, H=1024),
                Shape(T=1000, B=1, I=256, H=256, modes=("fwd",)),  # streaming inference
            ),
            "the shapes quoted in the README",
        ),
        Suite(
            "sweep-batch",
            tuple(Shape(T=512, B=b, I=512, H=512) for b in _pow2(1, 512)),
            "batch 1..512 at T=512, I=H=512",
            sweep="B",
        ),
        Suite(
            "sweep-hidden",
            tuple(Shape(T=512, B=16, I=h, H=h) for h in _pow2(64, 2048)),
            "hidden 64..2048 (I=H) at T=512, B=16",
            sweep="H",
        ),
        Suite(
            "cpu",
            (
                Shape(T=100, B=64, I=512, H=512),
                Shape(T=100, B=16, I=256, H=256),
                Shape(T=200, B=1, I=128, H=128),
                # a small model: few input features and a small state, where ATen's (MKL's)
                # products are slow at so few columns
                Shape(T=50, B=32, I=32, H=32),
                # medium and large batches of a mid-sized state, where nn.LSTM's oneDNN runs at
                # its most efficient (on a Zen 5 our weakest region: about level with it)
                Shape(T=50, B=32, I=256, H=256),
                Shape(T=50, B=128, I=128, H=128, modes=("fwd",)),
                Shape(T=50, B=16, I=128, H=128, layers=2, bidirectional=True),
                Shape(T=100, B=16, I=256, H=256, proj_size=128),
                Shape(T=200, B=4, I=256, H=256, modes=("fwd",)),
                Shape(T=200, B=1, I=512, H=512, modes=("fwd",)),
                DEEP,
                STREAM_STEP,
                CELL_STEP,
                # a training step: the gradients, then an SGD update of the weights in place,
                # so every call repacks them (as after each optimizer step of a training loop)
                Shape(T=100, B=16, I=256, H=256, modes=("train",)),
                Shape(T=200, B=1, I=128, H=128, modes=("train",)),
                # ours in bfloat16 over ours in float32 (target >= 1.6x); nn.LSTM bf16 timed too
                Shape(T=200, B=1, I=512, H=512, modes=("fwd",), dtypes=("bfloat16",),
                      baseline="lstm_fused:cpu@float32"),
            ),
            "CPU-sized shapes (float32; one bfloat16-vs-our-float32 row); lstm_fused:cpu also "
            "with the input GEMM it does not pick here (/own-gemm or /aten-gemm)",
            dtypes=("float32",),
            budget_s=1.5,
            min_reps=5,
            max_reps=2000,
            both_input_gemms=True,
        ),
        Suite(
            "cpu-grid",
            tuple(Shape(T=50, B=b, I=h, H=h) for b in (8, 32, 64, 128) for h in _pow2(64, 512)),
            "batch 8..128 x hidden 64..512 (I=H) at T=50: a map of where we stand against nn.LSTM "
            "beyond the cpu suite's rows",
            dtypes=("float32",),
            min_reps=5,
        ),
        Suite(
            "cpu-load",
            (DEEP, STREAM_STEP, CELL_STEP),
            "the deep, one-step and LSTMCell rows beside a busy process on the last core "
            "(busy core on by default; --busy-core N picks the core, --no-busy-core turns it off)",
            dtypes=("float32",),
            budget_s=1.5,
            min_reps=5,
            max_reps=2000,
            busy_core=True,
        ),
        Suite(
            "smoke",
            (
                Shape(T=16, B=4, I=32, H=32),
                Shape(T=8, B=3, I=16, H=24, layers=2, bidirectional=True),
                Shape(T=8, B=2, I=16, H=24, proj_size=8),
            ),
            "tiny shapes that exercise every code path in seconds",
            dtypes=("float32",),
            budget_s=0.2,
            min_reps=5,
        ),
    ]
}


def normalize_dtype(name: str) -> str:
    name = name.strip().lower().replace("torch.", "")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPES} (or {sorted(DTYPE_ALIASES)})")
    return name


def select_shapes(shapes: Sequence[Shape], patterns: Optional[Sequence[str]]) -> list:
    """Keep the shapes matching any pattern; a pattern matches when all its ``_``-separated tokens
    are tokens of the shape's name (``B64`` keeps every shape with B=64, ``T100_B64`` narrows it)."""
    if not patterns:
        return list(shapes)
    wanted = [set(p.split("_")) for p in patterns if p]
    return [s for s in shapes if any(w <= set(s.name.split("_")) for w in wanted)]
