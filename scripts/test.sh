#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on this machine, in two pytest-xdist worker
# processes: most tests are single-threaded Python (compile, export, ONNX, gradcheck), so two
# workers on two cores take about 30% less time, and no test may depend on how busy the machine
# is anyway. Extra arguments go to pytest (-n 0: one process, e.g. for --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider -n 2 tests "$@"
