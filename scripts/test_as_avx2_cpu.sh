#!/usr/bin/env bash
# Tests run on a CPU without AVX-512, whatever CPU this is: under valgrind (--tool=none, no
# checking, ~5x slower), whose virtual CPU reports AVX2 but no AVX-512 in CPUID. Everything then
# takes its AVX2 path, as on an AMD Zen 1-3 or an older Intel: ATen's kernels, oneDNN (no bf16
# LSTM there), MKL and our step-kernel dispatch; an AVX-512 instruction anywhere would stop the
# run. Complements scripts/test_isa_capped.sh, which caps the libraries by their own switches.
# Uses scripts/setup.sh's .venv; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null; then
  apt-get install -y -q valgrind >/dev/null 2>&1 || { echo "[test_as_avx2_cpu] needs valgrind" >&2; exit 1; }
fi
. .venv/bin/activate
python - <<'PY'
import subprocess, sys
probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
got = subprocess.run(["valgrind", "--tool=none", "-q", sys.executable, "-c", probe],
                     capture_output=True, text=True).stdout.split()
assert got and got[-1] == "AVX2", f"valgrind's CPU should look like AVX2 to torch, got {got}"
PY
valgrind --tool=none -q --trace-children=yes python -m pytest -q -p no:cacheprovider \
  tests/test_module.py tests/test_cpu_kernels.py tests/test_errors.py "$@"
