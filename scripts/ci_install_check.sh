#!/usr/bin/env bash
# CI: lstm_fused installs the way users install it. A fresh virtual environment gets only torch
# (TORCH_VERSION, default 2.13.0: the CPU build on the machines' local package index); then
#   1. python -m build --sdist (in .venv; no compiler runs), and the sdist's listing is checked;
#   2. pip install <sdist> into the fresh venv, no flags: pip's isolated build, where the in-tree
#      backend finds the venv's torch, from the sdist alone (so the sdist holds all a build
#      needs); the installed metadata must require the torch minor version it was built against.
# One build of the extension, not three: a wheel built from the sdist without isolation and
# pip install <clone> each compiled it again (two minutes apiece on 2 cores) and proved nothing
# these two steps do not (a build from a checkout is what scripts/setup.sh does).
# After the install, from outside any source tree: the package imports from the venv, the fused
# CPU backend is available, and backend="cpu" and "reference" match nn.LSTM (forward and input
# gradient, fp32 against float64).
#
# pip runs with --no-cache-dir so that it really builds (pip caches wheels it built).
# Overrides: TORCH_VERSION, LSTM_FUSED_INSTALL_DIR (default build/ci-install), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${LSTM_FUSED_INSTALL_DIR:-$ROOT/build/ci-install}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
VENV=$WORK/venv
VPY=$VENV/bin/python
START=$SECONDS
phase() { echo "[ci_install_check] $* ($((SECONDS - START)) s)"; }
# pip, less its "Location 'file:///...' is ignored" lines about the machine's local indexes.
pip_q() { local py=$1; shift; "$py" -m pip "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }

rm -rf "$WORK/dist" "$WORK/run"
mkdir -p "$WORK/dist" "$WORK/run"

# --- the fresh venv: torch only (kept between local runs; CI starts from a clean clone) -------
if ! "$VPY" -W ignore -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  pip_q "$VPY" install -q --upgrade pip
  pip_q "$VPY" install -q "torch==$TORCH_VERSION"
fi
"$VPY" -m pip uninstall -q -y lstm_fused 2>/dev/null || true
phase "fresh venv $VENV: $("$VPY" -W ignore -c 'import torch; print("torch", torch.__version__)')"

# What each install must pass, run from $WORK/run (no lstm_fused source there).
check() {
  (cd "$WORK/run" && "$VPY" - "$VENV" <<'PY'
import os, sys, warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy
import torch
from torch import nn
import lstm_fused

venv = os.path.realpath(sys.argv[1])
assert os.path.realpath(lstm_fused.__file__).startswith(venv), f"imported from {lstm_fused.__file__}, not {venv}"
assert "cpu" in lstm_fused.available_backends(), f"no fused CPU backend: {lstm_fused.available_backends()}"
torch.manual_seed(0)
# Both CPU kernel paths: the SIMD step kernels (no projection) and the projection one.
for proj_size in (0, 5):
    config = dict(input_size=8, hidden_size=16, num_layers=2, bidirectional=True, proj_size=proj_size)
    oracle = nn.LSTM(**config, dtype=torch.float64)
    x = torch.randn(7, 3, 8, dtype=torch.float64, requires_grad=True)
    y_ref = oracle(x)[0]
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    for backend in ("cpu", "reference"):
        m = lstm_fused.LSTM(**config, backend=backend)
        m.load_state_dict({k: v.float() for k, v in oracle.state_dict().items()})
        xf = x.detach().float().requires_grad_()
        y = m(xf)[0]
        (dx,) = torch.autograd.grad(y.sum(), xf)
        err = max(((a.double() - b).norm() / b.norm()).item() for a, b in ((y, y_ref), (dx, dx_ref)))
        print(f"[ci_install_check]   backend={backend} proj_size={proj_size}: relative error vs float64 nn.LSTM {err:.1e}")
        assert err < 2e-5, (backend, proj_size, err)
print("[ci_install_check]   OK: lstm_fused", lstm_fused.__version__, "from", os.path.dirname(lstm_fused.__file__),
      "| backends", lstm_fused.available_backends())
PY
  )
}

# --- 1. the sdist ----------------------------------------------------------------------------
[ -x .venv/bin/python ] || { echo "[ci_install_check] FAIL: no .venv: run scripts/setup.sh first" >&2; exit 1; }
. .venv/bin/activate
# (not "import build": the build/ folder here imports as a namespace package)
python -m pip show -q build >/dev/null 2>&1 || pip_q python install -q build
python -m build --sdist --outdir "$WORK/dist" > "$WORK/sdist.log" 2>&1 || { tail -n 40 "$WORK/sdist.log"; exit 1; }
deactivate
SDIST=$(ls "$WORK"/dist/lstm_fused-*.tar.gz)
LISTING=$(tar tzf "$SDIST")
for need in build_backend/lstm_fused_build.py csrc/ops.cpp csrc/cpu/ csrc/cuda/ setup.py pyproject.toml MANIFEST.in; do
  grep -q "^lstm_fused-[^/]*/$need" <<<"$LISTING" || { echo "[ci_install_check] FAIL: $need missing from $SDIST" >&2; exit 1; }
done
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "[ci_install_check] note: the sdist holds the working tree's files, uncommitted changes included"
fi
phase "sdist: $(basename "$SDIST") ($(wc -l <<<"$LISTING") entries)"

# --- 2. pip install <sdist>, no flags --------------------------------------------------------------
"$VPY" -m pip install --no-cache-dir "$SDIST" > "$WORK/pip-sdist.log" 2>&1 || { tail -n 40 "$WORK/pip-sdist.log"; exit 1; }
# From $WORK/run: here, the source tree's own metadata (an editable install's egg-info) would be found first.
REQUIRES=$(cd "$WORK/run" && "$VPY" -W ignore -c "import importlib.metadata as m; print(';'.join(r for r in m.requires('lstm_fused') if r.startswith('torch')))")
want="torch==${TORCH_VERSION%.*}.*"
[ "$REQUIRES" = "$want" ] || { echo "[ci_install_check] FAIL: the built package requires '$REQUIRES', want '$want'" >&2; exit 1; }
phase "pip install <sdist> built and installed it; Requires-Dist: $REQUIRES"
check
"$VPY" -m pip uninstall -q -y lstm_fused
phase "OK: pip install <sdist> checked"
