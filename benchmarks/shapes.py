"""The registry of named suites: which LSTM shapes each one times, in which modes and dtypes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

MODES = ("fwd", "fwdbwd")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16", "float": "float32"}


@dataclass(frozen=True)
class Shape:
    """One LSTM problem: input (T, B, I), hidden H, stacked layers, directions, projection."""

    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    modes: Optional[Tuple[str, ...]] = None  # None: every mode the run asks for

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def name(self) -> str:
        """Underscore-separated tokens, e.g. ``T100_B64_I512_H512_L2_bi``; --shapes matches these."""
        parts = [f"T{self.T}", f"B{self.B}", f"I{self.I}", f"H{self.H}"]
        if self.layers != 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        return "_".join(parts)

    def applies_to(self, mode: str) -> bool:
        return self.modes is None or mode in self.modes


@dataclass(frozen=True)
class Suite:
    name: str
    shapes: Tuple[Shape, ...]
    description: str
    sweep: Optional[str] = None            # "B" or "H": the x axis of the speedup plot
    dtypes: Optional[Tuple[str, ...]] = None  # None: bfloat16 on GPU, float32 on CPU
    budget_s: float = 1.0                  # timed seconds per provider per case (see timing.py)
    min_reps: int = 10
    extra: dict = field(default_factory=dict)


def _pow2(lo: int, hi: int):
    n = lo
    while n <= hi:
        yield n
        n *= 2


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
                Shape(T=50, B=16, I=128, H=128, layers=2, bidirectional=True),
                Shape(T=100, B=16, I=256, H=256, proj_size=128),
            ),
            "CPU-sized shapes",
            dtypes=("float32",),
            budget_s=1.5,
            min_reps=5,
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
