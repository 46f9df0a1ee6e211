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
