#!/usr/bin/env bash
# One command for a GPU session: rebuild, test, sanitize and benchmark the CUDA backend.
#
#   bash scripts/gpu_cuda_check.sh
#
# 1. pip install --no-build-isolation --no-deps -e .   (the installed torch; no network needed)
# 2. pytest tests/test_cuda.py tests/test_parity.py tests/test_module.py
# 3. compute-sanitizer memcheck, racecheck and synccheck on a small forward + backward of both
#    paths (general: fp32, bf16 with projection and lengths; persistent: bf16/fp16/fp32, lengths,
#    reverse), with torch's caching allocator off so out-of-bounds accesses hit real allocation
#    boundaries.
# 4. benchmarks/cuda/grid_sync_latency.cu: per-step cost of the grid barrier options, and
#    scripts/cuda_paths.py: which path (persistent/general) each headline shape takes, and
#    scripts/cuda_step_times.py: per-step microseconds of cuDNN and of both paths.
# 5. python -m benchmarks.run --suite headline --providers nn.LSTM,lstm_fused:cuda (bf16) into
#    bench_out/cuda_headline (the committed headline comes from benchmarks/gpu_all.sh, which runs
#    every provider), the forward at T1000_B1 and T1024_B16 for each LSTM_FUSED_CUDA_UNITS (4, 8,
#    16: tunes the planner's choice), the cluster forward at T1000_B1 and T100_B64 for units 16
#    and 32, then the headline with the general path forced.
#
# Knobs: PYTHON (default python3), SKIP_BUILD=1, SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_BENCH=1,
# STEP_TIMEOUT=seconds per step (default 420: a hung persistent kernel must not eat a whole
# session), EXTRA_BENCH_ARGS="..." (e.g. "--budget 0.5"). Logs: bench_out/gpu_cuda_check/*.log.
# Exits non-zero if any step fails (every step still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu_tools.sh
. scripts/gpu_tools.sh
PY=${PYTHON:-python3}
LOGS=bench_out/gpu_cuda_check
mkdir -p "$LOGS"
status=0
fail() { echo "== FAILED: $*" >&2; status=1; }
step() { echo; echo "== $*"; }

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_cuda_check.sh: torch sees no CUDA device" >&2; exit 1; }

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    step "build"
    "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$LOGS/build.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || { echo "build failed (see $LOGS/build.log)" >&2; exit 1; }
fi
"$PY" - <<'EOF' 2>&1 | tee "$LOGS/backends.log"
import torch, lstm_fused
from lstm_fused import dispatch
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "cuda", torch.version.cuda)
print("lstm_fused backends:", lstm_fused.available_backends())
reason = dispatch.unavailable_reason("cuda")
raise SystemExit(f"the cuda backend is unavailable: {reason}" if reason else 0)
EOF
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "gpu_cuda_check.sh: no cuda backend, nothing to check" >&2; exit 1; }

LIMIT=${STEP_TIMEOUT:-420}
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
step "tests"
timeout "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_parity.py tests/test_module.py \
    2>&1 | tee "$LOGS/pytest.log"
[[ ${PIPESTATUS[0]} == 0 ]] || fail "pytest (see $LOGS/pytest.log)"
fi


if [[ "${SKIP_SANITIZER:-0}" != 1 ]]; then
    SANITIZER=$(find_compute_sanitizer "$PY")
    if [[ -z "$SANITIZER" ]]; then
        fail "compute-sanitizer not found (SKIP_SANITIZER=1 to skip this step)"
    else
        for tool in memcheck racecheck synccheck; do
            step "compute-sanitizer --tool $tool"
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$LIMIT" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
                "$PY" scripts/cuda_sanitize_case.py 2>&1 | tee "$LOGS/sanitizer_$tool.log"
            [[ ${PIPESTATUS[0]} == 0 ]] || fail "compute-sanitizer $tool (see $LOGS/sanitizer_$tool.log)"
        done
    fi
fi

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
    step "grid barrier options (benchmarks/cuda/grid_sync_latency.cu)"
    NVCC=$(find_nvcc "$PY")
    ARCH=$("$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
    { "$NVCC" -std=c++17 -O3 -arch="sm_$ARCH" benchmarks/cuda/grid_sync_latency.cu -o "$LOGS/grid_sync_latency" \
        && timeout "$LIMIT" "$LOGS/grid_sync_latency"; } 2>&1 | tee "$LOGS/grid_sync_latency.md"
    [[ ${PIPESTATUS[0]} == 0 ]] || fail "grid sync microbenchmark (see $LOGS/grid_sync_latency.md)"

    step "which path each headline shape takes"
    timeout "$LIMIT" "$PY" scripts/cuda_paths.py headline 2>&1 | tee "$LOGS/paths.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || fail "scripts/cuda_paths.py (see $LOGS/paths.log)"

    step "per-step times (scripts/cuda_step_times.py)"
    timeout "$LIMIT" "$PY" scripts/cuda_step_times.py --dtype bfloat16 2>&1 | tee "$LOGS/step_times.md"
    [[ ${PIPESTATUS[0]} == 0 ]] || fail "scripts/cuda_step_times.py (see $LOGS/step_times.md)"

    step "benchmark: headline, nn.LSTM vs lstm_fused:cuda (auto path), bf16"
    # shellcheck disable=SC2086  # EXTRA_BENCH_ARGS is meant to split
    timeout "$LIMIT" "$PY" -m benchmarks.run --suite headline --providers nn.LSTM,lstm_fused:cuda --dtypes bfloat16 \
        --out bench_out/cuda_headline --no-progress ${EXTRA_BENCH_ARGS:-} \
        2>&1 | tee "$LOGS/bench_headline.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || fail "benchmark headline (see $LOGS/bench_headline.log)"

    step "benchmark: forward units per block (LSTM_FUSED_CUDA_UNITS) at the streaming and T1024 shapes"
    for units in 4 8 16; do
        # shellcheck disable=SC2086
        LSTM_FUSED_CUDA_UNITS=$units timeout "$LIMIT" "$PY" -m benchmarks.run --suite headline \
            --shapes T1000_B1,T1024_B16 --modes fwd --providers nn.LSTM,lstm_fused:cuda \
            --dtypes bfloat16 --out "bench_out/cuda_units_$units" --no-progress ${EXTRA_BENCH_ARGS:-} \
            2>&1 | tee "$LOGS/bench_units_$units.log"
        [[ ${PIPESTATUS[0]} == 0 ]] || fail "benchmark with LSTM_FUSED_CUDA_UNITS=$units"
    done

    step "benchmark: the cluster forward (LSTM_FUSED_CUDA_PATH=cluster) per units per block, where it fits"
    for units in 16 32; do
        # shellcheck disable=SC2086
        LSTM_FUSED_CUDA_PATH=cluster LSTM_FUSED_CUDA_UNITS=$units timeout "$LIMIT" "$PY" -m benchmarks.run \
            --suite headline --shapes T1000_B1,T100_B64 --modes fwd --providers nn.LSTM,lstm_fused:cuda \
            --dtypes bfloat16 --out "bench_out/cuda_cluster_units_$units" --no-progress ${EXTRA_BENCH_ARGS:-} \
            2>&1 | tee "$LOGS/bench_cluster_units_$units.log"
        [[ ${PIPESTATUS[0]} == 0 ]] || fail "benchmark with LSTM_FUSED_CUDA_PATH=cluster LSTM_FUSED_CUDA_UNITS=$units"
    done

    step "benchmark: headline with LSTM_FUSED_CUDA_PATH=general (not saved)"
    # shellcheck disable=SC2086
    LSTM_FUSED_CUDA_PATH=general timeout "$LIMIT" "$PY" -m benchmarks.run --suite headline \
        --providers nn.LSTM,lstm_fused:cuda --dtypes bfloat16 --out bench_out/cuda_headline_general \
        --no-progress ${EXTRA_BENCH_ARGS:-} 2>&1 | tee "$LOGS/bench_headline_general.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || fail "benchmark headline, general path (see $LOGS/bench_headline_general.log)"
fi

echo
if [[ $status == 0 ]]; then echo "== gpu_cuda_check: all steps passed"; else echo "== gpu_cuda_check: FAILED (logs in $LOGS/)"; fi
exit $status
