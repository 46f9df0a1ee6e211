#!/usr/bin/env bash
# CI check without a GPU: the full extension (C++ CPU kernels + CUDA kernels + torch binding)
# compiles and links against a CUDA build of torch, loads, and registers CUDA kernels for the
# recurrence ops.
#
#   1. .venv-cuda (idempotent): torch==2.14.1, the CUDA 13 build (~5.5 GB; pip takes it and the
#      nvidia-* wheels from the machine's local package index), plus ninja, numpy, setuptools, wheel.
#   2. A copy of the working tree's sources (git-tracked and untracked-but-not-ignored files) in
#      build/ci-cuda/src, so the CPU build in the working tree is left alone. The copy keeps the
#      files' times and its ninja build folder, so a re-run recompiles only what changed.
#   3. python setup.py build_ext --inplace there, with LSTM_FUSED_CUDA=1, CUDA_HOME at the real
#      toolkit root, TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2), and torch's
#      bundled nvidia/cu13/include (cuBLAS/cuSPARSE headers, which ATen/cuda/CUDAContext.h
#      includes) appended to CPATH, i.e. searched after the toolkit's own include folder.
#   4. Imports lstm_fused._C in that venv and checks has_cuda_kernels() and the CUDA kernels of
#      lstm_fused::recurrence_forward / recurrence_backward.
#
# Overrides: CUDA_HOME (toolkit root; default: asked from nvcc itself, which may be a wrapper
# script), NVCC, TORCH_CUDA_ARCH_LIST, MAX_JOBS, LSTM_FUSED_CUDA_VENV (default .venv-cuda),
# LSTM_FUSED_CUDA_BUILD_DIR (default build/ci-cuda), TORCH_CUDA_VERSION (default 2.14.1).
# --clean wipes the build copy first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${LSTM_FUSED_CUDA_VENV:-$ROOT/.venv-cuda}
WORK=${LSTM_FUSED_CUDA_BUILD_DIR:-$ROOT/build/ci-cuda}
TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.14.1}
PYTHON=${PYTHON:-python3}
START=$SECONDS
phase() { echo "[ci_cuda_build] $* ($((SECONDS - START)) s)"; }

if [ "${1:-}" = "--clean" ]; then rm -rf "$WORK"; fi

# --- the CUDA toolkit ----------------------------------------------------------------------------
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -n "$NVCC" ]; then
    # nvcc may be a wrapper (e.g. a shell script exec'ing the real one): ask the real driver
    # where it lives (its dry run prints "#$ _HERE_=<toolkit>/bin"), then fall back to symlinks.
    here=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1 || true)
    [ -n "$here" ] || here=$(dirname "$(readlink -f "$NVCC")")
    CUDA_HOME=$(cd "$here/.." && pwd -P)
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=$(readlink -f /usr/local/cuda)
  fi
fi
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "[ci_cuda_build] FAIL: no CUDA toolkit (nvcc not found; set CUDA_HOME)" >&2
  exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
phase "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

# --- the venv with a CUDA build of torch --------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip, less its "Location 'file:///...' is ignored" lines about the machine's local indexes.
pip_q() { "$VPY" -m pip "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }
if ! "$VPY" -c "import torch, sys; sys.exit(not (torch.__version__.split('+')[0] == '$TORCH_CUDA_VERSION' and torch.version.cuda))" 2>/dev/null; then
  phase "installing torch==$TORCH_CUDA_VERSION (CUDA build) into $VENV"
  pip_q install -q --upgrade pip
  # The default wheel for Linux x86_64 on PyPI is the CUDA build; the local index holds it.
  pip_q install -q "torch==$TORCH_CUDA_VERSION"
fi
"$VPY" -c "import ninja, numpy, setuptools, wheel" 2>/dev/null || pip_q install -q ninja numpy setuptools wheel
TORCH_INFO=$("$VPY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)")
phase "venv ready: torch $TORCH_INFO"

# torch's bundled CUDA headers (cuBLAS etc. are not part of a bare nvcc toolkit).
NV_INCLUDE=$("$VPY" - <<'EOF'
import glob, os, sysconfig
roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
hits = sorted(h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "*", "include", "cublas_v2.h")))
print(os.path.dirname(hits[0]) if hits else "")
EOF
)
if [ -n "$NV_INCLUDE" ]; then
  export CPATH="${CPATH:+$CPATH:}$NV_INCLUDE"
elif [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  echo "[ci_cuda_build] warning: no cublas_v2.h under $CUDA_HOME/include or torch's nvidia/*/include" >&2
fi

# --- a copy of the sources ----------------------------------------------------------------------
mkdir -p "$WORK/src"
# Drop everything of the previous copy but its build folder (ninja's state) and the built .so:
# files removed from the tree must not linger (setup.py globs the sources).
find "$WORK/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
else
  tar --exclude='./.venv*' --exclude='./build' --exclude='*.so' --exclude='./.git' -cf - . | tar -xf - -C "$WORK/src"
fi
phase "sources copied to $WORK/src: $(cd "$WORK/src" && ls csrc/cuda 2>/dev/null | tr '\n' ' ')"

# --- build --------------------------------------------------------------------------------------
export LSTM_FUSED_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
phase "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CPATH=${CPATH:-})"
BUILD_START=$SECONDS
(cd "$WORK/src" && "$VPY" setup.py -q build_ext --inplace) > "$WORK/build.log" 2>&1 || {
  echo "[ci_cuda_build] FAIL: the CUDA build failed ($WORK/build.log). Compiler errors:" >&2
  grep -E -B 2 -A 4 "error" "$WORK/build.log" | grep -v -E "^\s*$" | head -n 200 >&2 || true
  echo "[ci_cuda_build] ... the last lines of the log:" >&2
  grep -v -E "^\s*$|Deprecat|^\s*!!|\*{10}" "$WORK/build.log" | tail -n 40 >&2
  exit 1
}
phase "built in $((SECONDS - BUILD_START)) s"

# --- load and check the registrations -----------------------------------------------------------
(cd "$WORK/src" && "$VPY" - <<'EOF'
import glob
import torch

import lstm_fused._C as ext  # the real error if the library does not load

print("[ci_cuda_build] loaded", ext.__file__, "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| GPU present:", torch.cuda.is_available())
ok = True
has = bool(torch.ops.lstm_fused.has_cuda_kernels())
print("[ci_cuda_build] has_cuda_kernels():", has)
ok &= has
for op in ("recurrence_forward", "recurrence_backward"):
    name = f"lstm_fused::{op}"
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    print(f"[ci_cuda_build] {name}: CUDA kernel {cuda}, CPU kernel {cpu}")
    ok &= cuda and cpu
if not ok:
    print(torch._C._dispatch_dump("lstm_fused::recurrence_forward"))
    print(torch._C._dispatch_dump("lstm_fused::recurrence_backward"))
    raise SystemExit("[ci_cuda_build] FAIL: CUDA kernels are not registered")

import lstm_fused  # the package on top of the CUDA-enabled extension imports too
print("[ci_cuda_build] lstm_fused.available_backends():", lstm_fused.available_backends())
EOF
)
phase "OK: CUDA extension built, loaded and registered"
