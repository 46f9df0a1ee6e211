"""Builds lstm_fused._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

LSTM_FUSED_CUDA=1 forces the CUDA kernels in (fails without nvcc), LSTM_FUSED_CUDA=0 keeps them
out; unset, they are built when torch is a CUDA build and nvcc is found. The CPU code is compiled for
the platform's baseline (any x86-64 CPU); its SIMD step kernels are compiled per instruction set
inside their own files and chosen at run time (csrc/cpu/isa.h). LSTM_FUSED_CPU_ARCH=<arch> adds
-march=<arch> for a build that only needs to run on such CPUs.
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("LSTM_FUSED_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    # OpenMP on both compile and link, or at::parallel_for runs on one thread.
    # -fno-trapping-math lets GCC turn the clamps in activations.h into selects and vectorize.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if os.environ.get("LSTM_FUSED_CPU_ARCH"):
        # Never by default: a build must run on every CPU of its platform (a wheel, a cluster).
        cxx += [f"-march={os.environ['LSTM_FUSED_CPU_ARCH']}"]
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


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
