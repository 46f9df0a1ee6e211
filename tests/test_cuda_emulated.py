"""The persistent CUDA kernels' own source, run on CPU threads by a SIMT emulator.

CI has no GPU, so tests/cuda_emulation/ compiles csrc/cuda/persistent_{forward,backward}.cuh
with g++ against a small emulation of the CUDA built-ins and wmma, and this file compares what
the kernels compute with the float64 reference on the same (16-bit) inputs. The cases force each
tiling path: split-K across warps, several tiles per warp, several staged column chunks, ragged
last blocks, the scalar (H % 8 != 0) and 16-byte staging paths, lengths and reverse. Timing,
occupancy and the hardware memory model are left to the GPU tests (tests/test_cuda.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from lstm_fused import reference
from helpers import rel_error

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "tests/cuda_emulation/emulated_kernels.cpp",
    ROOT / "tests/cuda_emulation/simt_emulator.h",
    ROOT / "csrc/cuda/cluster_forward.cuh",
    ROOT / "csrc/cuda/persistent_common.cuh",
    ROOT / "csrc/cuda/persistent_forward.cuh",
    ROOT / "csrc/cuda/persistent_backward.cuh",
]
# Kernel variants: (storage dtype, driver code, relative error bound against float64 on the same
# rounded inputs). The kernels round h (and dz) to the storage dtype every step, as cuDNN does;
# fp32 multiplies either in TF32 (10 mantissa bits, like fp16) or exactly. An indexing mistake
# gives errors of order 1.
VARIANTS = {
    "bf16": (torch.bfloat16, 1, 3e-2),
    "fp16": (torch.float16, 2, 4e-3),
    "fp32_tf32": (torch.float32, 0, 4e-3),
    "fp32_exact": (torch.float32, 3, 2e-5),
}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    out = tmp_path_factory.mktemp("emu") / f"emulated_kernels_{digest}.so"
    cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC",
           "-DLSTM_FUSED_SIMT_EMULATION", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'tests/cuda_emulation'}", str(SOURCES[0]), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(out))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _inputs(T, B, H, dtype, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    xproj = r(T, B, 4 * H)
    w_hh = r(4 * H, H, scale=H ** -0.5 * 1.5)
    h0, c0 = r(B, H, scale=0.5), r(B, H, scale=0.5)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return xproj, w_hh, h0, c0, lens


def _forward_outputs(T, B, H, dtype):
    """y, h_n, c_n, gates, c_all as a forward kernel fills them."""
    return (torch.empty(T, B, H, dtype=dtype), torch.empty(B, H, dtype=dtype),
            torch.empty(B, H, dtype=dtype), torch.empty(T, B, 4 * H, dtype=dtype),
            torch.empty(T, B, H, dtype=torch.float32))  # fmt: skip


def run_forward(lib, code, units, kc, groups, T, B, H, reverse, xproj, w_hh, h0, c0, lens):
    out = _forward_outputs(T, B, H, xproj.dtype)
    rc = lib.emulated_forward(code, units, T, B, H, kc, groups, int(reverse), _ptr(xproj),
                              _ptr(w_hh), _ptr(h0), _ptr(c0), _ptr(lens), *map(_ptr, out))  # fmt: skip
    assert rc == 0
    return out


# Lengths for every row of a larger batch, drawn once (0 and T included).
_LENGTHS_70 = [(7 * i) % 5 for i in range(70)]
_LENGTHS_33 = [(3 * i) % 5 for i in range(33)]

# id: T, B, H, units, staged columns (KC), lengths, reverse[, batch groups]
FORWARD_CASES = {
    "T1_B1": (1, 1, 16, 4, 16, None, False),
    "h20_split_k": (4, 3, 20, 4, 32, None, False),          # 1 tile per block: 8-way split K
    "h40_three_chunks": (3, 5, 40, 8, 16, None, True),      # Kpad 48 staged 16 at a time
    "b20_h24_u8": (3, 20, 24, 8, 32, None, False),          # 4 tiles: 2-way split K
    "b70_h36_u16_tiles": (3, 70, 36, 16, 48, None, False),  # 20 tiles: several per warp
    "h33_scalar_staging": (4, 3, 33, 4, 48, None, False),   # H % 8 != 0, ragged last block
    "lengths": (6, 4, 17, 4, 32, [6, 1, 3, 0], False),
    "lengths_rev": (6, 4, 24, 8, 16, [2, 6, 5, 1], True),
    "b20_two_groups": (3, 20, 24, 8, 32, None, False, 2),
    "b70_three_groups_lengths_rev": (4, 70, 20, 4, 32, _LENGTHS_70, True, 3),
    "b5_one_row_groups": (3, 5, 16, 4, 16, [3, 1, 0, 2, 3], False, 5),
    # 70 rows x 4 units > 256 threads: several pointwise items per thread (xproj staged in
    # shared memory, outputs stored before the arrive); the cases above have at most one.
    "b70_several_items_lengths_rev": (4, 70, 20, 4, 32, _LENGTHS_70, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(FORWARD_CASES), ids=list(FORWARD_CASES))
def test_persistent_forward(lib, case, variant):
    dtype, code, tol = VARIANTS[variant]
    T, B, H, units, kc, lengths, reverse, *groups = FORWARD_CASES[case]
    xproj, w_hh, h0, c0, lens = _inputs(T, B, H, dtype, lengths, seed=zlib.crc32(case.encode()))
    got = run_forward(lib, code, units, kc, (groups or [1])[0], T, B, H, reverse, xproj, w_hh, h0,
                      c0, lens)
    want = reference.recurrence_forward_ref(
        xproj.double(), w_hh.double(), None, h0.double(), c0.double(), lens, reverse, True)
    for name, g, w in zip(("y", "h_n", "c_n", "gates", "c_all"), got, want):
        err = rel_error(g, w)
        assert err < tol, f"{name}: relative error {err:.2e}"
    if lengths is not None:  # padding is exactly zero, not merely small
        for b, n in enumerate(lengths):  # step t of sequence b is active when t < n, either way
            for t in range(n, T):
                assert torch.all(got[0][t, b] == 0) and torch.all(got[3][t, b] == 0)


# id: T, B, H, staged columns (KC), lengths, reverse[, batch groups]
def run_cluster_forward(lib, code, units, Bg, T, B, H, reverse, xproj, w_hh, h0, c0, lens):
    out = _forward_outputs(T, B, H, xproj.dtype)
    rc = lib.emulated_cluster_forward(code, units, T, B, H, Bg, int(reverse), _ptr(xproj),
                                      _ptr(w_hh), _ptr(h0), _ptr(c0), _ptr(lens), *map(_ptr, out))  # fmt: skip
    assert rc == 0
    return out


# Cluster forward. id: T, B, H, units per block, batch rows per cluster, lengths, reverse.
CLUSTER_CASES = {
    "T1_B1": (1, 1, 16, 8, 1, None, False),                 # 2 blocks, no exchange at all
    "b1_h64_u8": (5, 1, 64, 8, 1, None, False),             # 8 blocks: 8-way split K
    "b3_h40_u16_ragged": (4, 3, 40, 16, 3, None, True),     # 3 blocks, the last one half empty
    "b16_h128_u16_lengths": (5, 16, 128, 16, 16, _LENGTHS_70[:16], False),  # 16 blocks, full rows
    "b20_h48_u32_groups": (4, 20, 48, 32, 8, None, True),   # 3 clusters, the last with 4 rows
    "b6_h33_u8_groups_lengths_rev": (6, 6, 33, 8, 2, [6, 0, 3, 1, 6, 2], True),  # 5 blocks x 3
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CLUSTER_CASES), ids=list(CLUSTER_CASES))
def test_cluster_forward(lib, case, variant):
    dtype, code, tol = VARIANTS[variant]
    T, B, H, units, Bg, lengths, reverse = CLUSTER_CASES[case]
    xproj, w_hh, h0, c0, lens = _inputs(T, B, H, dtype, lengths, seed=zlib.crc32(case.encode()))
    got = run_cluster_forward(lib, code, units, Bg, T, B, H, reverse, xproj, w_hh, h0, c0, lens)
    want = reference.recurrence_forward_ref(
        xproj.double(), w_hh.double(), None, h0.double(), c0.double(), lens, reverse, True)
    for name, g, w in zip(("y", "h_n", "c_n", "gates", "c_all"), got, want):
        err = rel_error(g, w)
        assert err < tol, f"{name}: relative error {err:.2e}"
    if lengths is not None:
        for b, n in enumerate(lengths):
            for t in range(n, T):
                assert torch.all(got[0][t, b] == 0) and torch.all(got[3][t, b] == 0)


BACKWARD_CASES = {
    "T1_B1": (1, 1, 16, 64, None, False),
    "h20_three_chunks": (4, 3, 20, 32, None, False),       # K = 4H = 80 staged 32 at a time
    "b40_h24": (3, 40, 24, 96, None, True),               # 3 tiles: 2-way split K
    "b70_h18_two_blocks": (3, 70, 18, 80, None, False),   # 5 tiles; ragged second block
    "h33_scalar_staging": (3, 2, 33, 144, None, False),   # 4H = 132: 16-bit staging, 2 blocks
    "lengths": (6, 4, 17, 80, [6, 1, 3, 0], False),
    "lengths_rev": (6, 4, 24, 48, [2, 6, 5, 1], True),
    "b40_two_groups_rev": (3, 40, 24, 96, None, True, 2),
    "b33_three_groups_lengths": (4, 33, 17, 80, _LENGTHS_33, False, 3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(BACKWARD_CASES), ids=list(BACKWARD_CASES))
def test_persistent_backward(lib, case, variant):
    dtype, code, tol = VARIANTS[variant]
    T, B, H, kc, lengths, reverse, *groups = BACKWARD_CASES[case]
    xproj, w_hh, h0, c0, lens = _inputs(T, B, H, dtype, lengths, seed=zlib.crc32(case.encode()) + 1)
    # Saved tensors from the reference forward, rounded as the kernels store them.
    y, _, _, gates, c_all = reference.recurrence_forward_ref(
        xproj.double(), w_hh.double(), None, h0.double(), c0.double(), lens, reverse, True)
    y, gates, c_all = y.to(dtype), gates.to(dtype), c_all.float()
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(T, B, H, generator=g).to(dtype)
    dh_n, dc_n = torch.randn(B, H, generator=g).to(dtype), torch.randn(B, H, generator=g).to(dtype)

    dxproj = torch.empty(T, B, 4 * H, dtype=dtype)
    dh0, dc0 = torch.empty(B, H, dtype=dtype), torch.empty(B, H, dtype=dtype)
    rc = lib.emulated_backward(
        code, T, B, H, kc, (groups or [1])[0], int(reverse), _ptr(dy), _ptr(dh_n), _ptr(dc_n),
        _ptr(w_hh), _ptr(c0), _ptr(lens), _ptr(gates), _ptr(c_all), _ptr(dxproj), _ptr(dh0),
        _ptr(dc0))
    assert rc == 0
    want = reference.recurrence_backward_ref(
        dy.double(), dh_n.double(), dc_n.double(), w_hh.double(), None, h0.double(), c0.double(),
        lens, reverse, y.double(), gates.double(), c_all.double())
    for name, got, w in (("dxproj", dxproj, want[0]), ("dh0", dh0, want[3]), ("dc0", dc0, want[4])):
        err = rel_error(got, w)
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_kernels_race_free_under_tsan(tmp_path):
    """The grid barrier's orderings, checked by ThreadSanitizer in the C++ memory model.

    The emulator maps the barrier onto C++ atomics with the orderings the PTX uses (release add,
    acquire spin, block barriers), so a missing happens-before edge between a block writing the
    exchange buffer and another reading it shows up as a data race. (Weakening the release add
    to relaxed makes this test fail.) It says nothing about the hardware's own memory model:
    compute-sanitizer's racecheck on a GPU covers shared memory, the GPU parity tests the rest.
    """
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    exe = tmp_path / "race_driver"
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread",
           "-DLSTM_FUSED_SIMT_EMULATION", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests/cuda_emulation'}",
           str(ROOT / "tests/cuda_emulation/race_driver.cpp"), "-o", str(exe)]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0 and "tsan" in built.stderr.lower():
        pytest.skip(f"no ThreadSanitizer runtime: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr[-3000:]
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                          env={"TSAN_OPTIONS": "halt_on_error=1"})  # fmt: skip
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == 0 and done.stdout.count("rc 0") == 6, done.stdout + done.stderr[-2000:]
