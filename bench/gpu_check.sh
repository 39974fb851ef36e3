#!/usr/bin/env bash
# One command for a lent GPU machine: the test suite, then a quick CUDA benchmark.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Needs only python with torch and triton; nothing is installed. aunn_fast is imported
# from a throwaway shim directory that mirrors setup.py's package_dir mapping
# (aunn_fast/* plus kernels/ -> aunn_fast.kernels and bench/ -> aunn_fast.bench).
# On the project's lent device only 8 files come back from $OUT, so run it as
#   bash bench/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp gc
# Writes OUTDIR/pytest.log, OUTDIR/bench.log, OUTDIR/variants/ and OUTDIR/bench/{results.json,results.md,*.png},
# and prints a summary table last. Stays under 5 minutes: each step has its own timeout,
# and the benchmark saves its results after every row, so a timed-out run still leaves data.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
TEST_TIMEOUT=${TEST_TIMEOUT:-110}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
VARIANTS_TIMEOUT=${VARIANTS_TIMEOUT:-70}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT/bench"
OUT=$(cd "$OUT" && pwd)

SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/aunn_fast"
for entry in "$REPO"/aunn_fast/*; do
    [ "$(basename "$entry")" = __pycache__ ] || ln -s "$entry" "$SHIM/aunn_fast/"
done
ln -s "$REPO/kernels" "$SHIM/aunn_fast/kernels"
ln -s "$REPO/bench" "$SHIM/aunn_fast/bench"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # python >= 3.11: do not put the cwd first, where aunn_fast/ lacks kernels and bench
cd "$REPO"

"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/env.log"
import aunn_fast, torch, triton
print("aunn_fast from", aunn_fast.__file__)
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY

echo "== tests (timeout ${TEST_TIMEOUT}s) -> $OUT/pytest.log"
# -v names each test as it finishes (a timeout still shows how far it got); up to 5 failures
# are collected with short tracebacks, not just the first.
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest tests -v --maxfail=5 --tb=short -p no:cacheprovider \
    > "$OUT/pytest.log" 2>&1
TEST_RC=$?
tail -n 3 "$OUT/pytest.log"

echo "== quick benchmark (timeout ${BENCH_TIMEOUT}s) -> $OUT/bench.log"
# Most important work first: the run may be cut off by the timeout.
timeout "$BENCH_TIMEOUT" "$PYTHON" -m aunn_fast.bench.run --device cuda --quick --out "$OUT/bench" \
    --workloads predict,train,train-graph,seed-run,condition,loss > "$OUT/bench.log" 2>&1
BENCH_RC=$?

echo "== kernel candidates (timeout ${VARIANTS_TIMEOUT}s) -> $OUT/variants"
timeout "$VARIANTS_TIMEOUT" "$PYTHON" -m aunn_fast.bench.kernel_variants --out "$OUT/variants" > "$OUT/variants.log" 2>&1
VARIANTS_RC=$?

echo "== summary"
echo "pytest exit status $TEST_RC: $(tail -n 1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -n 10
echo "benchmark exit status $BENCH_RC (0 ok, 1 some provider incorrect/failed, 124 timed out)"
echo "kernel variants exit status $VARIANTS_RC; table in $OUT/variants"
if [ -f "$OUT/bench/results.json" ]; then
    "$PYTHON" -m aunn_fast.bench.summary "$OUT/bench/results.json"
else
    tail -n 20 "$OUT/bench.log"
fi
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$VARIANTS_RC" = 0 ]
