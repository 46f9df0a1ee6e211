"""Builds lstm_fused._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

LSTM_FUSED_CUDA=1 forces the CUDA kernels in (fails without nvcc), LSTM_FUSED_CUDA=0 keeps them
out; unset, they are built when torch is a CUDA build and nvcc is found. On x86 the CPU kernels
are compiled for the build machine (-march=native) unless LSTM_FUSED_CPU_ARCH names a target.
"""

import glob
import os
import platform
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
    if platform.machine() in ("x86_64", "AMD64"):
        # The pointwise passes vectorize to the widest vectors the build machine has (AVX-512
        # measured ~10% faster than AVX2 here). Building for other machines (a wheel, a mixed
        # cluster): set LSTM_FUSED_CPU_ARCH, e.g. x86-64-v3 for any AVX2 CPU.
        cxx += [f"-march={os.environ.get('LSTM_FUSED_CPU_ARCH', 'native')}"]
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
