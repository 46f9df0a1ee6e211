#!/usr/bin/env bash
# CI: the CPU test suite on a second torch release, the one scripts/ci_cuda_build.sh built
# against (TORCH_CUDA_VERSION, default 2.14.1, a CUDA build; without a GPU its GPU tests skip),
# in that script's venv and on its build, which it must have made first. Left out, since
# scripts/test.sh runs them and they do not depend on the torch release: the files that test
# torch-free code (nvcc compiles of the CUDA sources, the GPU scripts, the emulated CUDA kernels),
# and the sweeps of our CPU kernels over every instruction-set variant and tile shape
# (test_cpu_kernels, test_input_projection): what they run is our code, called the same way on
# both torches; the rest of the suite calls every op through this torch. Two pytest-xdist
# workers, as scripts/test.sh. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${LSTM_FUSED_CUDA_VENV:-$ROOT/.venv-cuda}
WORK=${LSTM_FUSED_CUDA_BUILD_DIR:-$ROOT/build/ci-cuda}
VPY=$VENV/bin/python
if ! ls "$WORK"/src/lstm_fused/_C*.so >/dev/null 2>&1; then
  echo "[ci_test_cuda_venv] FAIL: no build in $WORK/src: run scripts/ci_cuda_build.sh first" >&2
  exit 1
fi
# The test tools (matplotlib: the benchmark tests draw their plot).
"$VPY" -c "import pytest, xdist, matplotlib, tqdm" 2>/dev/null \
  || "$VPY" -m pip install -q pytest pytest-xdist matplotlib tqdm 2>&1 | { grep -v "is neither a file nor a directory" || true; }
echo "[ci_test_cuda_venv] $("$VPY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
cd "$WORK/src"
"$VPY" -m pytest -q -p no:cacheprovider -n 2 tests \
  --ignore=tests/test_cuda_compile.py --ignore=tests/test_gpu_scripts.py \
  --ignore=tests/test_cuda_emulated.py --ignore=tests/test_cpu_kernels.py \
  --ignore=tests/test_input_projection.py "$@"
