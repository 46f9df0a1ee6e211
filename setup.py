"""Builds lstm_fused._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

It compiles against the torch importable here, and the built package then requires that torch's
minor version (libtorch's C++ ABI changes between releases). Under pip's build isolation the
in-tree backend build_backend/lstm_fused_build.py makes the target environment's torch
importable first; pyproject.toml's [tool.lstm_fused] gives the torch versions this release
supports. LSTM_FUSED_SDIST=1 (set by the backend for source distributions): no torch needed or
used; the requirement is the supported range.

LSTM_FUSED_CUDA=1 forces the CUDA kernels in (fails without nvcc), LSTM_FUSED_CUDA=0 keeps them
out; unset, they are built when torch is a CUDA build and nvcc is found. The CPU code is compiled for
the platform's baseline (any x86-64 CPU); its SIMD step kernels are compiled per instruction set
inside their own files and chosen at run time (csrc/cpu/isa.h). LSTM_FUSED_CPU_ARCH=<arch> adds
-march=<arch> for a build that only needs to run on such CPUs.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SDIST = os.environ.get("LSTM_FUSED_SDIST") == "1"

if not SDIST:
    try:
        import torch
        from torch.utils import cpp_extension
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        sys.exit(
            "lstm_fused: torch is not importable, and lstm_fused compiles against the torch it "
            "will run with. Install torch first, then install lstm_fused (README: Install)."
        )


def supported_torch():
    """(oldest, newest) (major, minor) torch versions, from pyproject.toml's [tool.lstm_fused]."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11; a build requirement there
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        table = tomllib.load(f)["tool"]["lstm_fused"]
    return tuple(tuple(int(p) for p in table[k].split(".")) for k in ("torch-oldest", "torch-newest"))


def torch_requirement() -> str:
    oldest, newest = supported_torch()
    supported = f"torch>={oldest[0]}.{oldest[1]},<{newest[0]}.{newest[1] + 1}"
    if SDIST:
        return supported
    have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if have < oldest:
        sys.exit(f"lstm_fused: needs {supported}; this environment has torch {torch.__version__}")
    if have > newest:
        print(f"lstm_fused: warning: torch {torch.__version__} is newer than this release is "
              f"tested with ({supported})", file=sys.stderr)
    # The compiled extension loads only into the torch minor version it was built against.
    return f"torch=={have[0]}.{have[1]}.*"


def check_compiler():
    # torch's build calls $CXX (default c++) through ninja, whose failure would read
    # "c++: not found" deep inside a compile log.
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        sys.exit(
            f"lstm_fused: no C++ compiler: '{cxx}' is not on PATH. Install a C++17 compiler "
            "with OpenMP (Debian/Ubuntu: apt-get install g++; Fedora: dnf install gcc-c++), "
            "or point CXX at one."
        )


def want_cuda() -> bool:
    forced = os.environ.get("LSTM_FUSED_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc


def cxx_flags():
    # OpenMP on both compile and link, or at::parallel_for runs on one thread.
    # -fno-trapping-math lets GCC turn the clamps in activations.h into selects and vectorize.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if os.environ.get("LSTM_FUSED_CPU_ARCH"):
        # Never by default: a build must run on every CPU of its platform (a wheel, a cluster).
        cxx += [f"-march={os.environ['LSTM_FUSED_CPU_ARCH']}"]
    return cxx


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    cxx = cxx_flags()
    link = ["-fopenmp"]
    include = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "lstm_fused._C", sources, include_dirs=include,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    sources += rel("csrc/cuda/*.cu")
    # No --use_fast_math: the kernels need accurate expf/tanhf and IEEE division (fp32 parity
    # with the float64 reference is ~2e-5 relative; the approximate intrinsics miss it).
    nvcc = ["-O3", "-lineinfo", "-DLSTM_FUSED_WITH_CUDA"]
    return cpp_extension.CUDAExtension(
        "lstm_fused._C", sources, include_dirs=include,
        define_macros=[("LSTM_FUSED_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
    )


if SDIST:
    setup(install_requires=[torch_requirement()])
else:
    check_compiler()
    setup(
        install_requires=[torch_requirement()],
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
