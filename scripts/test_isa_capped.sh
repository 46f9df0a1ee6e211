#!/usr/bin/env bash
# The tests whose oracle is nn.LSTM (oneDNN), once more as on a CPU without AVX-512 (AMD before
# Zen 4, older Intel), where oneDNN lacks some primitives (e.g. the bf16 LSTM that nn.LSTM uses
# under CPU autocast): no test may lean on an oracle such a CPU cannot run (issue 15).
# Uses scripts/setup.sh's .venv; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export ONEDNN_MAX_CPU_ISA=AVX2   # oneDNN's own cap
export LSTM_FUSED_CPU_ISA=avx2   # our CPU step kernels' cap (csrc/cpu/isa.h)
python -m pytest -q -p no:cacheprovider tests/test_module.py tests/test_parity.py \
  tests/test_packed.py tests/test_errors.py tests/test_checkpoint.py tests/test_ops.py "$@"
