#!/usr/bin/env bash
# Both GPU backends checked and timed in ONE device call that fits a 15-minute lease:
#
#   bash scripts/gpu_session.sh            # on the GPU machine, from the repo root
#
# Device time is short (a lease is ~15 minutes, a command at most 10, and a machine start takes
# one or two of them), so this runs the steps in priority order, each under a cap and all under
# one DEADLINE; a step that no longer fits is skipped and says so. Order:
#
#   env          GPU, driver, torch/triton versions, lstm_fused backends
#   build        pip install --no-build-isolation --no-deps -e . for this GPU's arch only
#   cuda_tests   tests/test_cuda.py (parity per path x dtype vs float64, module, opcheck, compile)
#   triton_tests tests/test_triton.py, autotuning off (one config: LSTM_FUSED_TRITON_AUTOTUNE=0)
#   bench_cuda   headline suite, bf16: nn.LSTM vs lstm_fused:cuda
#   bench_triton headline suite, bf16: nn.LSTM vs lstm_fused:triton (autotuned)
#   bench_cluster the cluster-resident CUDA forward (LSTM_FUSED_CUDA_PATH=cluster, sm_90) on the
#                headline shapes it fits (T1000_B1, T100_B64), bf16
#   cuda_paths   which CUDA path (persistent/general) each headline shape takes, and why
#   step_times   per-step microseconds of cuDNN and both CUDA paths (slope over T)
#   grid_sync    per-step cost of the barrier options (benchmarks/cuda/grid_sync_latency.cu)
#   memcheck     compute-sanitizer memcheck on scripts/cuda_sanitize_case.py
#   bench_half   headline fp16 + fp32, every provider (only if time is left)
#
# Output: everything goes to a work folder; after every step $OUT/gpu_session.tgz (all logs,
# junit XML, benchmark JSON/markdown/PNG) and $OUT/summary.md are refreshed, so a run killed at
# the command limit still returns what it finished. Without $OUT (not under the device tool) the
# files stay in bench_out/gpu_session/. The summary is printed last. Back on the development
# machine, `python -m benchmarks.collect <files_at>/gpu_session.tgz` puts the benchmark results
# under benchmarks/results/<gpu>/ and prints the issues' target table from them.
#
# A second call on the still-warm machine (the device tool keeps it 30 s after a call, with the
# build and the pip install in place) can run what the first had to skip, e.g.
#   SKIP="build cuda_tests triton_tests bench_cuda bench_triton" DEADLINE=200 bash scripts/gpu_session.sh
#
# Knobs: PYTHON (default python3, the GPU image's interpreter), DEADLINE (seconds for the whole
# script, default 570: under the device tool's 600 s command limit), SKIP="step step ..." (names
# above), BENCH_ARGS (extra benchmark CLI arguments, default "--budget 0.3"), BENCH_SUITE
# (default headline; "smoke" makes a dry run of the script's plumbing possible on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu_tools.sh
. scripts/gpu_tools.sh
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-570}
BENCH_ARGS=${BENCH_ARGS:---budget 0.3}
BENCH_SUITE=${BENCH_SUITE:-headline}
WORK=bench_out/gpu_session
RESULT_DIR=${OUT:-$WORK}
rm -rf "$WORK"
mkdir -p "$WORK" "$RESULT_DIR"
SUMMARY=$WORK/summary.md
export PYTHONUNBUFFERED=1
T0=$SECONDS
status=0

echo "# gpu_session: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >"$SUMMARY"
echo >>"$SUMMARY"
echo "| step | result | seconds |" >>"$SUMMARY"
echo "|---|---|---|" >>"$SUMMARY"

publish() {  # refresh what comes back from the device machine
    [[ "$RESULT_DIR" == "$WORK" ]] && return 0
    cp "$SUMMARY" "$RESULT_DIR/summary.md"
    tar -czf "$RESULT_DIR/gpu_session.tgz.tmp" -C bench_out gpu_session && \
        mv "$RESULT_DIR/gpu_session.tgz.tmp" "$RESULT_DIR/gpu_session.tgz"
}

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND (output in $WORK/NAME.log) under
# min(CAP, time left before DEADLINE); records ok / FAILED (rc) / TIMEOUT / skipped.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - (SECONDS - T0) - 5))
    local limit=$((cap < left ? cap : left))
    if [[ " ${SKIP:-} " == *" $name "* ]]; then
        echo "| $name | skipped (SKIP) | 0 |" >>"$SUMMARY"
        return 0
    fi
    if ((limit < 20)); then
        echo "| $name | skipped: out of time (${left}s left) | 0 |" >>"$SUMMARY"
        return 0
    fi
    echo
    echo "== $name (limit ${limit}s, $((SECONDS - T0))s elapsed)"
    local start=$SECONDS rc
    # bash -c: COMMAND may be one of the helper functions below (exported), which timeout
    # cannot run itself; timeout signals the whole process group it leads.
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start)) result=ok
    if ((rc == 124 || rc == 137)); then
        result="TIMEOUT after ${limit}s"
        status=1
    elif ((rc != 0)); then
        result="FAILED (rc $rc)"
        status=1
    fi
    echo "| $name | $result | $took |" >>"$SUMMARY"
    publish
    return "$rc"
}

PYTEST=("$PY" -m pytest -v -rfE -p no:cacheprovider)
# A kernel that never returns (a barrier deadlock) must not eat the whole run: pytest-timeout's
# thread method dumps the stacks and ends pytest, and the log shows which test hung.
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST+=(--timeout=120 --timeout-method=thread)
fi
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")

env_report() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    "$PY" - <<'EOF'
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(), "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
print("cores", os.cpu_count())
EOF
}
backends_report() {
    "$PY" -c "import lstm_fused; print('lstm_fused backends:', lstm_fused.available_backends())"
}
build() {
    TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps -e . \
        && backends_report
}
bench() {  # OUT_NAME PROVIDERS DTYPES [more benchmark CLI arguments]
    local name=$1 providers=$2 dtypes=$3
    shift 3
    # shellcheck disable=SC2086  # BENCH_ARGS is meant to split
    "$PY" -m benchmarks.run --suite "$BENCH_SUITE" --providers "$providers" --dtypes "$dtypes" \
        --out "$WORK/$name" --no-progress $BENCH_ARGS "$@"
}
sanitize() {
    local sanitizer
    sanitizer=$(find_compute_sanitizer "$PY")
    [[ -n "$sanitizer" ]] || { echo "compute-sanitizer not found"; return 1; }
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
        "$PY" scripts/cuda_sanitize_case.py
}
grid_sync() {
    "$(find_nvcc "$PY")" -std=c++17 -O3 -arch="sm_${ARCH/./}" benchmarks/cuda/grid_sync_latency.cu \
        -o "$WORK/grid_sync_latency" && "$WORK/grid_sync_latency"
}

export PY WORK ARCH BENCH_ARGS BENCH_SUITE
export -f env_report backends_report build bench sanitize grid_sync find_compute_sanitizer find_nvcc

run_step env 30 env_report
run_step build 240 build || {
    echo "| (rest) | not run: the build failed | 0 |" >>"$SUMMARY"
    publish
    echo; cat "$SUMMARY"
    exit 1
}
run_step cuda_tests 200 "${PYTEST[@]}" --junitxml="$WORK/cuda_tests.xml" tests/test_cuda.py
LSTM_FUSED_TRITON_AUTOTUNE=0 run_step triton_tests 200 "${PYTEST[@]}" --junitxml="$WORK/triton_tests.xml" tests/test_triton.py
run_step bench_cuda 100 bench headline_cuda nn.LSTM,lstm_fused:cuda bfloat16
run_step bench_triton 130 bench headline_triton nn.LSTM,lstm_fused:triton bfloat16
LSTM_FUSED_CUDA_PATH=cluster run_step bench_cluster 60 bench headline_cluster nn.LSTM,lstm_fused:cuda \
    bfloat16 --shapes T1000_B1,T100_B64
run_step cuda_paths 30 "$PY" scripts/cuda_paths.py headline
run_step step_times 60 "$PY" scripts/cuda_step_times.py --dtype bfloat16
run_step grid_sync 40 grid_sync
run_step memcheck 90 sanitize
run_step bench_half 150 bench headline_fp16_fp32 nn.LSTM,lstm_fused:cuda,lstm_fused:triton float16,float32

# The tables a reader needs first: test outcomes and the benchmark rows.
{
    echo
    echo "total $((SECONDS - T0)) s"
    for name in cuda_tests triton_tests; do
        [[ -f "$WORK/$name.log" ]] || continue
        echo
        echo "## $name"
        echo '```'
        grep -E "^(FAILED|ERROR) |Timeout|^=+ .*(passed|failed|error).* =+$" "$WORK/$name.log" | tail -40
        echo '```'
    done
    for name in headline_cuda headline_triton headline_cluster headline_fp16_fp32; do
        [[ -f "$WORK/$name/results.md" ]] || continue
        echo
        echo "## $name"
        grep -E "^\|( shape|---| T[0-9])" "$WORK/$name/results.md" | cut -d'|' -f1-7,9,12-
    done
    for name in cuda_paths step_times grid_sync; do
        [[ -f "$WORK/$name.log" ]] || continue
        echo
        echo "## $name"
        echo '```'
        tail -25 "$WORK/$name.log"
        echo '```'
    done
} >>"$SUMMARY"
publish
echo
echo "==================== summary ===================="
cat "$SUMMARY"
exit $status
