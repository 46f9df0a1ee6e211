#!/usr/bin/env bash
# One command on a GPU machine (no network needed): build lstm_fused, run the GPU suites for every
# provider found, and write the committed copies to benchmarks/results/<device-slug>/.
#
#   bash benchmarks/gpu_all.sh
#
# Environment knobs:
#   PYTHON=python3     interpreter to use (its torch must have CUDA)
#   SKIP_BUILD=1       do not run `pip install -e .` (already built)
#   FLASHRNN=auto|0    auto: include flashrnn if it is installed and compiles; 0: leave it out
#   EXTRA_ARGS="..."   passed to every `python -m benchmarks.run` (e.g. "--budget 0.5")
# Logs go to bench_out/<suite>.log beside the usual bench_out/<suite>/results.* files.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FLASHRNN=${FLASHRNN:-auto}
mkdir -p bench_out

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_all.sh: torch sees no CUDA device" >&2; exit 1; }

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    # No build isolation: use the installed torch (no network to fetch another one).
    "$PY" -m pip install --no-build-isolation --no-deps -e . || { echo "build failed" >&2; exit 1; }
fi
"$PY" -c "import lstm_fused; print('lstm_fused backends:', lstm_fused.available_backends())" \
    || { echo "gpu_all.sh: lstm_fused does not import" >&2; exit 1; }

# The providers: the device's defaults (nn.LSTM, lstm_fused fast backends, flashrnn if installed).
PROVIDERS=$("$PY" -c "from benchmarks.providers import default_providers as d; print(','.join(d('cuda')))")

# FlashRNN compiles kernels per shape and dtype at first use (minutes each): do it here, untimed,
# so the runs below find them in the on-disk cache; drop flashrnn if nothing compiles.
warm_flashrnn() {  # suite dtypes
    [[ ",$PROVIDERS," == *",flashrnn,"* ]] || return 0
    echo "== warming up flashrnn for $1 ($2); this can take a long time"
    "$PY" -m benchmarks.warmup_flashrnn --suite "$1" --dtypes "$2" 2>&1 | tee -a bench_out/flashrnn_warmup.log
    if [[ ${PIPESTATUS[0]} != 0 ]]; then
        echo "== flashrnn did not run for any $1 shape: leaving it out"
        PROVIDERS=${PROVIDERS/,flashrnn/}
    fi
}
if [[ "$FLASHRNN" == 0 ]]; then PROVIDERS=${PROVIDERS/,flashrnn/}; fi

status=0
run_suite() {  # suite dtypes
    warm_flashrnn "$1" "$2"
    echo "== $1 ($2) with $PROVIDERS"
    # shellcheck disable=SC2086  # EXTRA_ARGS is meant to split
    "$PY" -m benchmarks.run --suite "$1" --dtypes "$2" --providers "$PROVIDERS" \
        --out "bench_out/$1" --save-results --no-progress ${EXTRA_ARGS:-} 2>&1 | tee "bench_out/$1.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || { echo "== $1 failed" >&2; status=1; }
}

run_suite headline bfloat16,float16,float32
run_suite sweep-batch bfloat16
run_suite sweep-hidden bfloat16

SLUG=$("$PY" -c "from benchmarks.machine import device_name, device_slug; print(device_slug(device_name('cuda')))")
echo "== results in benchmarks/results/$SLUG/ (commit them); logs in bench_out/"
exit $status
