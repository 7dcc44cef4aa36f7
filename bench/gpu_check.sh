#!/usr/bin/env bash
# One command for a GPU machine (no network needed): correctness compiled on CUDA, sanitizers,
# then the kernel and decode benchmarks.  Logs and JSON go to $OUT if set, else bench/results.
#
#   bench/gpu_check.sh                      # every stage
#   bench/gpu_check.sh tests sanitize       # only some: env compile tests sanitize kernels decode
#
# Environment: PYTHON (default python3), STAGE_TIMEOUT (seconds per stage, default none),
# KERNEL_BENCH_ARGS (default --quick), DECODE_ARGS (default --compile).
# The last thing printed is a short summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export BITCLIFF_CACHE="$OUTDIR/tuning"   # the tuned configurations come back with the results
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env compile tests sanitize kernels decode)
SUMMARY=()

run_stage() {  # name, command...: run, log to $OUTDIR/<name>.log, record the outcome
    local name=$1; shift
    local start=$SECONDS rc
    echo "=== $name: $*"
    if [ -n "${STAGE_TIMEOUT:-}" ]; then
        timeout "$STAGE_TIMEOUT" "$@" > "$OUTDIR/$name.log" 2>&1; rc=$?
    else
        "$@" > "$OUTDIR/$name.log" 2>&1; rc=$?
    fi
    tail -n 4 "$OUTDIR/$name.log"
    local verdict="ok"; [ $rc -ne 0 ] && verdict="FAILED (rc=$rc)"
    SUMMARY+=("$(printf '%-22s %-16s %5ss  %s' "$name" "$verdict" $((SECONDS - start)) "$OUTDIR/$name.log")")
}

find_sanitizer() {
    command -v compute-sanitizer 2>/dev/null && return
    for c in /usr/local/cuda/bin/compute-sanitizer /opt/nvidia/nsight-compute/*/compute-sanitizer/compute-sanitizer; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
}

for stage in "${STAGES[@]}"; do
    case $stage in
    env)
        run_stage env bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))'; git rev-parse HEAD 2>/dev/null || true"
        ;;
    compile)  # registers, spills, tensor-core instructions of every variant (no GPU needed)
        run_stage compile "$PY" -m bench.compile_check --json "$OUTDIR/compile.json"
        ;;
    tests)  # the kernel tests, compiled (not interpreted) on CUDA
        XDIST=""
        "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
        run_stage tests "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/kernels tests/diagnose/test_capture.py
        ;;
    sanitize)
        SAN=$(find_sanitizer)
        if [ -z "$SAN" ]; then
            SUMMARY+=("sanitize               skipped: compute-sanitizer not found")
        else
            # Exact-size allocations, so memcheck sees an overrun past a tensor's end.
            run_stage memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                "$SAN" --tool memcheck --error-exitcode 3 "$PY" bench/sanitize_kernels.py
            run_stage racecheck "$SAN" --tool racecheck --error-exitcode 3 "$PY" bench/sanitize_kernels.py
        fi
        ;;
    kernels)
        run_stage kernels "$PY" -m bench.kernels ${KERNEL_BENCH_ARGS:---quick} --out "$OUTDIR"
        ;;
    decode)
        run_stage decode "$PY" -m bench.decode ${DECODE_ARGS:---compile} --out "$OUTDIR"
        ;;
    *)
        echo "unknown stage: $stage" >&2; exit 2
        ;;
    esac
done

echo
[ -f "$OUTDIR/kernels-summary.txt" ] && { echo "--- kernels (time, GB/s, speedup vs fp16, ideal from bytes, fraction)"; cat "$OUTDIR/kernels-summary.txt"; }
[ -f "$OUTDIR/decode-cuda-summary.txt" ] && { echo "--- decode"; cat "$OUTDIR/decode-cuda-summary.txt"; }
echo "--- stages"
printf '%s\n' "${SUMMARY[@]}"
for line in "${SUMMARY[@]}"; do [[ $line == *FAILED* ]] && exit 1; done
exit 0
