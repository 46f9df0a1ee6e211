#!/usr/bin/env bash
# CI: lstm_fused installs the way users install it. A fresh virtual environment gets only torch
# (TORCH_VERSION, default 2.13.0: the CPU build on the machines' local package index); then
#   1. python -m build --sdist, then --wheel --no-isolation from the unpacked sdist (in .venv,
#      which has the same torch): the sdist holds all a build needs, the wheel requires the
#      torch minor version it was built against;
#   2. pip install <wheel> into the fresh venv;
#   3. pip install <clone> (a git clone of this repository's HEAD), no flags: pip's isolated
#      build, where the in-tree backend finds the venv's torch.
# pip install <sdist> is left out: its two halves (the sdist is complete, pip's isolated build
# works) are steps 1 and 3, and a third build of the extension costs two minutes on 2 cores.
# After each install, from outside any source tree: the package imports from the venv, the fused
# CPU backend is available, and backend="cpu" and "reference" match nn.LSTM (forward and input
# gradient, fp32 against float64). lstm_fused is uninstalled between steps; torch stays.
#
# pip runs with --no-cache-dir so that every step really builds (pip caches wheels it built).
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

rm -rf "$WORK/dist" "$WORK/clone" "$WORK/sdist-src" "$WORK/run"
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

# --- 1. sdist, and a wheel built from it ---------------------------------------------------------
[ -x .venv/bin/python ] || { echo "[ci_install_check] FAIL: no .venv: run scripts/setup.sh first" >&2; exit 1; }
. .venv/bin/activate
python -c "import build, wheel" 2>/dev/null || pip_q python install -q build wheel
python -m build --sdist --outdir "$WORK/dist" > "$WORK/sdist.log" 2>&1 || { tail -n 40 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/lstm_fused-*.tar.gz)
LISTING=$(tar tzf "$SDIST")
for need in build_backend/lstm_fused_build.py csrc/ops.cpp csrc/cpu/ csrc/cuda/ setup.py pyproject.toml MANIFEST.in; do
  grep -q "^lstm_fused-[^/]*/$need" <<<"$LISTING" || { echo "[ci_install_check] FAIL: $need missing from $SDIST" >&2; exit 1; }
done
phase "sdist: $(basename "$SDIST") ($(wc -l <<<"$LISTING") entries)"
mkdir -p "$WORK/sdist-src" && tar xzf "$SDIST" -C "$WORK/sdist-src"
python -m build --wheel --no-isolation --outdir "$WORK/dist" "$WORK"/sdist-src/lstm_fused-* > "$WORK/wheel.log" 2>&1 \
  || { tail -n 40 "$WORK/wheel.log"; exit 1; }
deactivate
WHEEL=$(ls "$WORK"/dist/lstm_fused-*.whl)
REQUIRES=$(unzip -p "$WHEEL" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: \(torch[^;]*\)$/\1/p')
want="torch==${TORCH_VERSION%.*}.*"
[ "$REQUIRES" = "$want" ] || { echo "[ci_install_check] FAIL: wheel requires '$REQUIRES', want '$want'" >&2; exit 1; }
phase "wheel: $(basename "$WHEEL"), Requires-Dist: $REQUIRES"

# --- 2. the wheel into the fresh venv ------------------------------------------------------------
pip_q "$VPY" install -q --no-cache-dir "$WHEEL"
check
"$VPY" -m pip uninstall -q -y lstm_fused
phase "wheel installed and checked"

# --- 3. pip install <clone>, no flags ------------------------------------------------------------
git clone -q "$ROOT" "$WORK/clone"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "[ci_install_check] note: the clone is HEAD ($(git rev-parse --short HEAD)); uncommitted changes are not in it"
fi
"$VPY" -m pip install --no-cache-dir "$WORK/clone" > "$WORK/pip-clone.log" 2>&1 || { tail -n 40 "$WORK/pip-clone.log"; exit 1; }
(cd "$WORK/run" && "$VPY" -W ignore -c "import lstm_fused, torch; m = lstm_fused.LSTM(8, 16, backend='cpu'); print(m(torch.randn(5, 2, 8))[0].shape)")
check
"$VPY" -m pip uninstall -q -y lstm_fused
phase "OK: pip install <clone> checked"
