import os
import sys
import zlib

import torch

# Without a GPU the Triton backend runs under its interpreter, which must be on before any
# Triton kernel (or jit helper) is defined, i.e. before anything imports lstm_fused.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU, one Triton config per kernel: autotuning each of the tests' many shapes would take
    # many minutes (the benchmarks autotune).
    os.environ.setdefault("LSTM_FUSED_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible stream per test: fresh inputs, no accidental sharing.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def set_own_gemm():
    """lstm_fused.ops.set_own_gemm, with the process's choice (Python and C++ sides) restored
    afterwards."""
    from lstm_fused import ops

    saved = dict(ops.OWN_GEMM)
    yield ops.set_own_gemm
    for dtype, own in saved.items():
        ops.set_own_gemm(own, dtype)
