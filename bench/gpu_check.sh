#!/usr/bin/env bash
# The whole GPU verification in one call on a lent GPU (see ../shared/GPU.md):
#   PYTHONPATH=$PWD bash bench/gpu_check.sh
# GPU tests, the kernel tests under compute-sanitizer (memcheck, racecheck), then the
# benchmarks; full logs under $OUT (default ./gpu-check), the short tables printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu-check}"
QUICK="${QUICK:-}"  # QUICK=1: fewer benchmark shapes
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember failures
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
step info python3 -m cuattn info --compile
step gpu-tests python3 -m pytest -q -m gpu tests
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
            python3 -m pytest -q -m gpu tests/test_attention.py -k "cuda and (decode or gqa-4 or window-both or ragged or mha)"
    done
else
    echo "compute-sanitizer not found: skipped"
fi
for bench in prefill decode memory; do
    step "bench-$bench" python3 -m cuattn bench "$bench" ${QUICK:+--quick} --out "$OUT"
done
cp "$OUT"/*.json "$OUT"/*.md bench/results/ 2>/dev/null

echo
echo "== results"
for f in "$OUT"/prefill-*.md "$OUT"/decode-*.md "$OUT"/memory-*.md; do [ -f "$f" ] && cat "$f"; done
exit $status
