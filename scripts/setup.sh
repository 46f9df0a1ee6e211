#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with a CPU build of PyTorch, the test and
# benchmark tools, and lstm_fused built in place (C++ CPU kernels; CUDA kernels when torch has
# CUDA). Re-running it only rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q numpy pytest pytest-xdist ninja matplotlib tqdm triton
# The ONNX export tests run the exported models in onnxruntime (tests/test_onnx.py).
python -m pip install -q onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 2>&1 \
  | { grep -v "is neither a file nor a directory" || true; }
# No build isolation: the extension must compile against the torch installed above.
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import lstm_fused; print('lstm_fused backends:', lstm_fused.available_backends())"
