#!/usr/bin/env bash
# The whole GPU verification in one call on a lent GPU (see ../shared/GPU.md):
#   PYTHONPATH=$PWD BUDGET=540 bash bench/gpu_check.sh
# (on a copy of the tree without its git history, also CUATTN_GIT_COMMIT=<commit>; a device
# call may run 600 s, so BUDGET leaves a minute for the last step's publishing and the pack)
# Fills the kernel cache, runs the GPU tests, the tile sweep and the benchmarks, then the
# kernel tests under compute-sanitizer (memcheck, racecheck), each step cut off at its own
# limit and none started past BUDGET seconds, so that the script always ends and packs its
# results. The sanitizers come last, as the timings are what only a GPU can give (the
# emulator runs the kernels under AddressSanitizer and looks for overwrite races in CI);
# a change to the table waits for a run in which they passed, and a tile with a ring of K/V
# stages for racecheck on it.
# Everything lands in $OUT/gpu-check.tar.gz (logs, JSON, Markdown, PNG); the short tables are
# printed last. STEPS picks the steps and their order (default: all); QUICK=1 runs fewer
# benchmark shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-check}"
BUDGET="${BUDGET:-1500}"
QUICK="${QUICK:-}"
STEPS="${STEPS:-compile demo tests tiles prefill decode memcheck racecheck memory}"
WORK="$(mktemp -d)/gpu-check"
mkdir -p "$OUT" "$WORK"
# The script's own output (each step's limit, exit status and time) is packed with the logs.
exec > >(tee "$WORK/gpu-check.log") 2>&1
export CUATTN_CACHE_DIR="$WORK/cache"
status=0

pack() {
    rm -rf "$CUATTN_CACHE_DIR"
    tar -czf "$OUT/gpu-check.tar.gz" -C "$(dirname "$WORK")" gpu-check
}
trap pack EXIT

step() {  # step NAME LIMIT COMMAND...: run with a time limit, log to $WORK/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left} s of the budget left"
        status=1
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit $limit s): $*"
    local start=$SECONDS
    # SIGTERM first: a benchmark then publishes what it measured (bench/report.py), which
    # takes seconds (imports for the environment record, the plot) before the SIGKILL.
    timeout --kill-after=30 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
    if [ $rc -eq 0 ]; then
        tail -n 2 "$WORK/$name.log" | sed 's/^/   | /'
    else
        status=1
        tail -n 40 "$WORK/$name.log" | cut -c1-300 | sed 's/^/   | /'
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv,noheader | tee "$WORK/device.txt"
# A tree copied without its history is told its commit through CUATTN_GIT_COMMIT.
echo "commit ${CUATTN_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" >>"$WORK/device.txt"
arch="sm_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d .)"
# JAX would otherwise take most of the GPU's memory at its first use in the test process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# A cross-section for the sanitizers: each kernel (forward packed and not, split and
# combine, merge, append), each dtype, ragged lengths, masks that hide whole tiles, and the
# candidate tiles with rings of K/V stages (s2, s3).
sanitized="tests/test_attention.py tests/test_varlen.py tests/test_kvcache.py tests/test_merge.py
    tests/test_split_kv.py tests/test_tiles.py"
selection="mha or decode or gqa-4 or window-both or cross-lengths or merging or splits_a_long"
selection="$selection or s2 or s3"
# pytest-timeout's thread method ends a process stuck in a kernel, where a signal cannot.
timeouts="-o timeout=120 -o timeout_method=thread"
for name in $STEPS; do
    case $name in
    compile) step compile 120 python3 -m cuattn compile --arch "$arch" ;;
    demo) step demo 60 python3 -m cuattn demo ;;
    tests) step tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider $timeouts -rfE tests ;;
    memcheck | racecheck)
        if ! command -v compute-sanitizer >/dev/null; then
            echo "== $name: skipped, compute-sanitizer not found"
            continue
        fi
        step "$name" 150 compute-sanitizer --tool "$name" --error-exitcode 1 \
            python3 -m pytest -q -p no:cacheprovider -m gpu $timeouts $sanitized -k "$selection"
        ;;
    prefill)
        # After a sweep in the same run, its fastest tile per head dim is timed beside the
        # table's (bench/prefill.py).
        sweep=$(ls "$WORK"/tiles-*.json 2>/dev/null | head -n 1)
        step prefill 240 python3 -m cuattn bench prefill ${QUICK:+--quick} \
            ${sweep:+--tiles-from "$sweep"} --out "$WORK"
        ;;
    decode | memory | tiles)
        step "$name" 240 python3 -m cuattn bench "$name" ${QUICK:+--quick} --out "$WORK"
        ;;
    *) echo "unknown step $name" && status=1 ;;
    esac
done

echo
echo "== results (all files in $OUT/gpu-check.tar.gz)"
for f in "$WORK"/prefill-*.md "$WORK"/decode-*.md "$WORK"/memory-*.md "$WORK"/tiles-*.md; do
    [ -f "$f" ] && cat "$f"
done
exit $status
