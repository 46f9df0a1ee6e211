#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the benchmark of every available backend against
# nn.LSTM on the best device here (the GPU "headline" suite, else the CPU suite). Extra
# arguments go to the benchmark CLI, e.g. --suite smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  SUITE=headline
else
  SUITE=cpu
fi
python -m benchmarks.run --suite "$SUITE" --out bench_out "$@"
