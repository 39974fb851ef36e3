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
# Writes OUTDIR/pytest_gpu.log, OUTDIR/pytest_kernels.log, OUTDIR/pytest.log, OUTDIR/bench.log,
# OUTDIR/bench/, OUTDIR/bench_notebook/ and OUTDIR/bench_bpe/ (each results.json, results.md, *.png),
# OUTDIR/profiles/ (torch.profiler tables and traces of the goal train steps and the bpe one), OUTDIR/pytest_distributed.log
# and OUTDIR/distributed_scaling.md (the data-parallel step's tests and its overhead at 1M), OUTDIR/seed_demo.log
# and OUTDIR/seed_demo/ (`aunn demo --preset seed` end to end: time, metrics.json, report.md, plots),
# OUTDIR/variants/ when VARIANTS_TIMEOUT > 0, OUTDIR/ncu/ when NCU_TIMEOUT > 0, OUTDIR/shakespeare/ when
# SHAKESPEARE_TIMEOUT > 0, and prints a summary table
# last. Each PART (below) takes at most ~5 minutes: each step has its own timeout (*_TIMEOUT, seconds; 0 skips the
# step), and the benchmark saves its results after every row, so a timed-out run still leaves data. On a fresh
# machine most of the benchmark's time goes to compiling (Triton's cache starts empty, torch.compile compiles each
# shape). A device machine given back after 30 s idle cannot wait for a reading of the results: the next part's
# call must follow at once.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
# PART picks the default stages, each a call of at most ~5 minutes (a lent machine's call; budget two or three):
#   PART=1 (default): what was never run on a GPU: the fused CUDA step's stage (build, its tests and the wide
#          products', compute-sanitizer, its benchmark rows), the data-parallel graphed step's tests and overhead,
#          then the GPU-only tests of the Triton kernels (restructured since their last GPU run).
#   PART=2: the benchmark (seed, H=512, bpe), the profiles, the CLI/data tests, the seed demo end to end.
#   PART=3: TinyShakespeare memorised with its last 10,000 characters held out (docs/experiments.md).
# Any *_TIMEOUT given in the environment overrides its part's default (0 skips that stage).
PART=${PART:-1}
case "$PART" in
1) part_defaults=(GPU_TEST=70 CUDA_STEP=170 DISTRIBUTED_TEST=30 DISTRIBUTED_BENCH=25) ;;
2) part_defaults=(TEST=50 BENCH=110 NOTEBOOK=40 BPE=40 PROFILE=15 SEED_DEMO=0) ;;
3) part_defaults=(SHAKESPEARE=210) ;;
*) echo "PART must be 1, 2 or 3, got $PART" >&2; exit 2 ;;
esac
for stage_name in GPU_TEST KERNEL_TEST TEST BENCH NOTEBOOK BPE VARIANTS PROFILE SEED_DEMO NCU DISTRIBUTED_TEST \
    DISTRIBUTED_BENCH SHAKESPEARE CUDA_STEP; do
    default=0
    for pair in "${part_defaults[@]}"; do
        [ "${pair%%=*}" = "$stage_name" ] && default=${pair#*=}
    done
    var=${stage_name}_TIMEOUT
    printf -v "$var" '%s' "${!var:-$default}"
done
# The seed demo (`aunn demo --preset seed`, 500 epochs; the goal is 20 s end to end) needs a call of its own:
#   PART=2 SEED_DEMO_TIMEOUT=240 TEST_TIMEOUT=0 BENCH_TIMEOUT=0 NOTEBOOK_TIMEOUT=0 BPE_TIMEOUT=0 PROFILE_TIMEOUT=0
# Data-parallel (docs/distributed.md): the tests of the graphed step with its NCCL all-reduce, and its overhead
# against the plain trainer at batch 1M (1 process, NCCL world size 1), graphed and eager.
# TinyShakespeare (PART=3; the goal is >= 99% training accuracy within 10 minutes): SHAKESPEARE is the corpus
# (default shared/data/tinyshakespeare.txt in the repository; skipped when absent). The run lives in a temporary
# folder (its checkpoint is ~70 MB); OUTDIR/shakespeare/ gets its log.csv (batch accuracy every 100 steps, kept
# when the timeout cuts the run), metrics.json, report.md and plots.
SHAKESPEARE_HOLD_OUT=${SHAKESPEARE_HOLD_OUT:-10000}
SHAKESPEARE_EVAL_TIMEOUT=${SHAKESPEARE_EVAL_TIMEOUT:-60}
# The fused CUDA step (backend `cuda`, csrc/cuda/fused_step.cu, never yet run on a GPU): its own stage, see
# "fused CUDA step" below; CUDA_STEP_ONLY=1 runs it alone.
if [ "${CUDA_STEP_ONLY:-0}" = 1 ]; then
    GPU_TEST_TIMEOUT=0 KERNEL_TEST_TIMEOUT=0 TEST_TIMEOUT=0 BENCH_TIMEOUT=0 NOTEBOOK_TIMEOUT=0 BPE_TIMEOUT=0
    VARIANTS_TIMEOUT=0 PROFILE_TIMEOUT=0 SEED_DEMO_TIMEOUT=0 NCU_TIMEOUT=0 SHAKESPEARE_TIMEOUT=0
    DISTRIBUTED_TEST_TIMEOUT=0 DISTRIBUTED_BENCH_TIMEOUT=0
    [ "$CUDA_STEP_TIMEOUT" -gt 0 ] || CUDA_STEP_TIMEOUT=240
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT/bench"
OUT=$(cd "$OUT" && pwd)

SHAKESPEARE=${SHAKESPEARE:-$REPO/shared/data/tinyshakespeare.txt}
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

# -v names each test as it finishes (a timeout still shows how far it got); up to 5 failures
# are collected with short tracebacks, not just the first. First what only a GPU can check
# (the CUDA graphs; the kernels' tf32/bf16 hardware products, tanh sigmoid, cuBLAS GEMMs;
# torch.compile tracing into the kernels, whose names match "graph"; opcheck of the operators
# as the GPU registers them, triton_op; autograd's fills; kernel_variants' graphed step), then,
# only when KERNEL_TEST_TIMEOUT is given, the other kernel tests (written for the interpreter, here in
# fp32 on the GPU; their logic is covered in CI; on a cold machine they need minutes), then the tests
# whose code takes a CUDA path of its own: the data (first: a second, with the GPU copy of bytes and
# token files) and the CLI (trainer with its CUDA graph, checkpoints, eval, generate, condition).
# Triton's cache starts empty on a fresh machine: every kernel specialisation compiles once.
PYTEST=("$PYTHON" -m pytest -v --maxfail=5 --tb=short -p no:cacheprovider)
# Test processes share the one GPU; several of them compile the cold cache's kernels in parallel.
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    PYTEST+=(-n "${TEST_WORKERS:-8}")
fi
# stage TIMEOUT LOG COMMAND...: runs COMMAND under the timeout with its output in LOG, unless TIMEOUT is 0
# (then LOG is left empty); its exit status is the command's (124: timed out), 0 when skipped.
stage() {
    local limit=$1 log=$2
    shift 2
    : > "$log"
    [ "$limit" -gt 0 ] || return 0
    timeout "$limit" "$@" > "$log" 2>&1
}

echo "== GPU-only tests (timeout ${GPU_TEST_TIMEOUT}s) -> $OUT/pytest_gpu.log"
GPU_TESTS="graph or gpu or opcheck or materializes"
stage "$GPU_TEST_TIMEOUT" "$OUT/pytest_gpu.log" "${PYTEST[@]}" tests/test_cuda_graph.py tests/test_triton_kernels.py \
    tests/test_bench.py -k "$GPU_TESTS"
GPU_TEST_RC=$?
tail -n 1 "$OUT/pytest_gpu.log"
# ---- fused CUDA step (backend `cuda`; csrc/cuda/DESIGN.md "What a GPU must check"), self-contained: OUT/cuda_step/.
# 1. build the CUDA extension (nvcc, once per machine: the cache is ~/.cache/aunn_fast/cpp) and record its time;
# 2. tests/test_cuda_fused.py and test_cuda_wide.py (the H >= 256 products, csrc/cuda/WIDE.md): loss, logits,
#    predictions and every gradient against the float64 oracle (2x rule, bf16), opcheck, torch.compile; 3. compute-sanitizer memcheck and racecheck on small shapes of every operator
#    (bench/cuda_fused_smoke.py); 4. the quick seed benchmark with the cuda provider beside triton, eager and
#    compile (train, graphed train, predict), and the 1M-index train step (the goal: >= 1,000 M idx/s).
# The whole stage is bounded by CUDA_STEP_TIMEOUT seconds, split below; each part is skipped once it is spent.
CUDA_STEP_RC=0
CUDA_OUT=$OUT/cuda_step
if [ "$CUDA_STEP_TIMEOUT" -gt 0 ]; then
    mkdir -p "$CUDA_OUT"
    cuda_deadline=$((SECONDS + CUDA_STEP_TIMEOUT))
    # cuda_part CAP LOG COMMAND...: stage() under CAP seconds or what is left of the stage's time (124 when none is)
    cuda_part() {
        local cap=$1 left=$((cuda_deadline - SECONDS))
        shift
        [ "$left" -lt "$cap" ] && cap=$left
        if [ "$cap" -le 0 ]; then
            echo "not run: CUDA_STEP_TIMEOUT spent" > "$1"
            return 124
        fi
        stage "$cap" "$@"
    }
    # torch guesses CUDA_HOME from nvcc's folder; where nvcc is a wrapper (/usr/local/bin/nvcc) that guess lacks
    # the headers, so point it at the toolkit when it is there
    if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
        export CUDA_HOME=/usr/local/cuda
    fi
    echo "== fused CUDA step (timeout ${CUDA_STEP_TIMEOUT}s, CUDA_HOME ${CUDA_HOME:-unset}) -> $CUDA_OUT"
    start=$SECONDS
    cuda_part 150 "$CUDA_OUT/build.log" "$PYTHON" -c "import torch; from aunn_fast import cpp_build, cuda_backend; \
print('cuda extension:', cpp_build.cuda_unavailable_reason() or 'built'); \
print('cuda backend:', cuda_backend.unavailable_reason(torch.device('cuda')) or 'available')"
    CUDA_BUILD_RC=$?
    echo "build exit status $CUDA_BUILD_RC in $((SECONDS - start)) s:" \
        "$(tr '\n' ' ' < "$CUDA_OUT/build.log" | tail -c 300)"
    cuda_part 90 "$CUDA_OUT/pytest.log" "${PYTEST[@]}" tests/test_cuda_fused.py tests/test_cuda_wide.py
    CUDA_TEST_RC=$?
    echo "tests exit status $CUDA_TEST_RC: $(tail -n 1 "$CUDA_OUT/pytest.log")"
    SANITIZE_RC=0
    for tool in memcheck racecheck; do
        extra=()
        [ "$tool" = memcheck ] && extra=(--large)
        cuda_part 40 "$CUDA_OUT/$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 3 \
            "$PYTHON" -m aunn_fast.bench.cuda_fused_smoke "${extra[@]}"
        rc=$?
        [ "$SANITIZE_RC" = 0 ] && SANITIZE_RC=$rc
        echo "compute-sanitizer $tool exit status $rc:" \
            "$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|not run" "$CUDA_OUT/$tool.log" | tr '\n' ' ')"
    done
    cuda_part 60 "$CUDA_OUT/bench.log" "$PYTHON" -m aunn_fast.bench.run --device cuda --quick \
        --out "$CUDA_OUT/bench" --providers cuda,triton,reference,compile --workloads train,train-graph,predict
    CUDA_BENCH_RC=$?
    cuda_part 45 "$CUDA_OUT/bench_1M.log" "$PYTHON" -m aunn_fast.bench.run --device cuda --quick \
        --out "$CUDA_OUT/bench_1M" --providers cuda,triton --precisions bf16 --workloads train --batches 1M
    CUDA_BENCH_1M_RC=$?
    echo "benchmark exit status $CUDA_BENCH_RC, 1M train $CUDA_BENCH_1M_RC (124: timed out)"
    for rc in "$CUDA_BUILD_RC" "$CUDA_TEST_RC" "$SANITIZE_RC" "$CUDA_BENCH_RC" "$CUDA_BENCH_1M_RC"; do
        [ "$CUDA_STEP_RC" = 0 ] && CUDA_STEP_RC=$rc
    done
fi
echo "== other kernel tests (timeout ${KERNEL_TEST_TIMEOUT}s) -> $OUT/pytest_kernels.log"
stage "$KERNEL_TEST_TIMEOUT" "$OUT/pytest_kernels.log" "${PYTEST[@]}" tests/test_triton_kernels.py -k "not ($GPU_TESTS)"
KERNEL_TEST_RC=$?
tail -n 1 "$OUT/pytest_kernels.log"
echo "== CLI and data tests (timeout ${TEST_TIMEOUT}s) -> $OUT/pytest.log"
stage "$TEST_TIMEOUT" "$OUT/pytest.log" "${PYTEST[@]}" tests/test_data.py tests/test_cli.py
TEST_RC=$?
tail -n 1 "$OUT/pytest.log"

echo "== quick benchmark (timeout ${BENCH_TIMEOUT}s) -> $OUT/bench.log"
# Most important work first, as the timeout may cut the run: the goal workloads, and in each
# batch the fused kernels, then eager, then torch.compile (which compiles once per shape).
PROVIDERS=triton,reference,compile
stage "$BENCH_TIMEOUT" "$OUT/bench.log" "$PYTHON" -m aunn_fast.bench.run --device cuda --quick --out "$OUT/bench" \
    --providers "$PROVIDERS" --workloads predict,train,train-graph,seed-run,condition,condition-graph,loss
BENCH_RC=$?

echo "== H=512 train step at batch 2,048 and the seed run (timeout ${NOTEBOOK_TIMEOUT}s) -> $OUT/bench_notebook.log"
stage "$NOTEBOOK_TIMEOUT" "$OUT/bench_notebook.log" "$PYTHON" -m aunn_fast.bench.run --device cuda --quick \
    --configs notebook --batches 2048 --out "$OUT/bench_notebook" --providers "$PROVIDERS" \
    --workloads train,train-graph,seed-run-graph,seed-run
NOTEBOOK_RC=$?

echo "== bpe train step at batch 16,384 (timeout ${BPE_TIMEOUT}s) -> $OUT/bench_bpe.log"
stage "$BPE_TIMEOUT" "$OUT/bench_bpe.log" "$PYTHON" -m aunn_fast.bench.run --device cuda --quick \
    --configs bpe --batches 16K --out "$OUT/bench_bpe" --providers "$PROVIDERS" --workloads train
BPE_RC=$?

# ---- data-parallel stage (issue 25, docs/distributed.md) ----------------------------------------------------
# First the GPU tests of the graphed data-parallel step (an NCCL group of 1 made in the test process; 2 spawned
# ranks where there are 2 GPUs), one process (no xdist: each test makes its own group); then the overhead of
# the distributed path at batch 1M, 1 process in an NCCL group against the plain trainer, graphed and eager:
# a markdown table, the goal being at most +5% (docs/distributed.md, "Measured").
echo "== data-parallel tests (timeout ${DISTRIBUTED_TEST_TIMEOUT}s) -> $OUT/pytest_distributed.log"
stage "$DISTRIBUTED_TEST_TIMEOUT" "$OUT/pytest_distributed.log" "$PYTHON" -m pytest -v --maxfail=5 --tb=short \
    -p no:cacheprovider -p no:xdist tests/test_distributed_graph.py
DISTRIBUTED_TEST_RC=$?
tail -n 1 "$OUT/pytest_distributed.log"
echo "== data-parallel overhead at 1M on one GPU (timeout ${DISTRIBUTED_BENCH_TIMEOUT}s) -> $OUT/distributed_scaling.md"
stage "$DISTRIBUTED_BENCH_TIMEOUT" "$OUT/distributed_scaling.md" "$PYTHON" -m aunn_fast.bench.distributed_scaling \
    --device cuda --batch 1048576 --warmup 3 --steps 20
DISTRIBUTED_BENCH_RC=$?
cat "$OUT/distributed_scaling.md"
# ---- end of the data-parallel stage ----------------------------------------------------------------------------

# The seed notebook's own run end to end (`aunn demo --preset seed`: 100,000 chunks, H=512, 98,000 steps of
# 2,048 with the default recipe, then the evaluation): its time and final accuracy, in seed_demo.log and
# seed_demo/metrics.json. Alone (about 2-4 minutes, an estimate until it has run): every other *_TIMEOUT=0.
echo "== the seed's run, aunn demo --preset seed (timeout ${SEED_DEMO_TIMEOUT}s) -> $OUT/seed_demo.log"
rm -rf "$OUT/seed_demo"
stage "$SEED_DEMO_TIMEOUT" "$OUT/seed_demo.log" "$PYTHON" -m aunn_fast demo --preset seed --out "$OUT/seed_demo" \
    --quiet --device cuda
SEED_DEMO_RC=$?
rm -f "$OUT/seed_demo/model.safetensors"  # ~20 MB (weights and AdamW moments) that the check does not need
grep -E "^(trained in|training accuracy|valid)" "$OUT/seed_demo.log"

echo "== profiles of the goal train steps (timeout ${PROFILE_TIMEOUT}s each) -> $OUT/profiles"
stage "$PROFILE_TIMEOUT" "$OUT/profile_seed.log" "$PYTHON" -m aunn_fast.bench.profile_step --config seed \
    --workloads train,train-graph --batches 1048576,8192 --calls 10 --out "$OUT/profiles"
PROFILE_SEED_RC=$?
stage "$PROFILE_TIMEOUT" "$OUT/profile_notebook.log" "$PYTHON" -m aunn_fast.bench.profile_step --config notebook \
    --workloads train-graph --batches 2048 --calls 10 --out "$OUT/profiles"
PROFILE_NOTEBOOK_RC=$?
stage "$PROFILE_TIMEOUT" "$OUT/profile_bpe.log" "$PYTHON" -m aunn_fast.bench.profile_step --config bpe \
    --workloads train --batches 16384 --calls 10 --out "$OUT/profiles"
PROFILE_BPE_RC=$?

# Hardware counters (Nsight Compute, kernels/DESIGN.md "Open questions"): the fused backward and
# forward of the seed model's 1M-index train step, and the forward of its 16M-index predict, one launch
# each after two warm-up calls (--launch-skip counts the matching launches: forward, backward, ...).
# --clock-control none: the device's clocks are left alone (.library/device/METHOD.md). The reports are
# also printed as text (details page: throughput, occupancy, warp stalls; source page: per-SASS-line
# samples), as this machine has no ncu to open them with. NCU_TIMEOUT bounds each of the two runs.
NCU_RC=0
echo "== Nsight Compute (timeout ${NCU_TIMEOUT}s each) -> $OUT/ncu"
if [ "$NCU_TIMEOUT" -gt 0 ]; then
    mkdir -p "$OUT/ncu"
    NCU=(ncu --clock-control none --set full --import-source no -f)
    stage "$NCU_TIMEOUT" "$OUT/ncu/train.log" "${NCU[@]}" -o "$OUT/ncu/train_1M" \
        --kernel-name regex:'aunn_(forward|backward)_kernel' --launch-skip 4 --launch-count 2 \
        "$PYTHON" -m aunn_fast.bench.profile_step --config seed --workloads train --batches 1048576 --calls 1 \
        --no-profiler
    NCU_RC=$?
    stage "$NCU_TIMEOUT" "$OUT/ncu/predict.log" "${NCU[@]}" -o "$OUT/ncu/predict_16M" \
        --kernel-name aunn_forward_kernel --launch-skip 3 --launch-count 1 \
        "$PYTHON" -m aunn_fast.bench.profile_step --config seed --workloads predict --batches 16M --calls 1 \
        --no-profiler
    PREDICT_NCU_RC=$?
    [ "$NCU_RC" = 0 ] && NCU_RC=$PREDICT_NCU_RC
    for report in "$OUT"/ncu/*.ncu-rep; do
        [ -f "$report" ] || continue
        ncu --import "$report" --page details > "${report%.ncu-rep}_details.txt" 2>&1
        ncu --import "$report" --page source --print-source sass --csv > "${report%.ncu-rep}_source.csv" 2>&1
    done
fi

# Only when given time: the candidates the H100 has not settled (kernels/DESIGN.md, "Open
# questions"): the bpe train step's head backward on all 256 hidden columns (its logits computed once per
# kernel instead of twice) or as cuBLAS products on materialised dlogits, against the default; H = 512's graphed step with its per-layer kernels on
# 8 rows or 4 warps against 16 rows on 8, and with its weight-gradient products unsplit over the batch; a
# 2-index prompt's graphed step with "partials" weight gradients. The full plan is `kernel_variants` unfiltered.
echo "== kernel candidates (timeout ${VARIANTS_TIMEOUT}s) -> $OUT/variants"
stage "$VARIANTS_TIMEOUT" "$OUT/variants.log" "$PYTHON" -m aunn_fast.bench.kernel_variants --out "$OUT/variants" \
    --workloads train,train-graph --shapes bpe,notebook,prompt --precisions bf16 --labels "torch + tanh;\
torch + tanh + head backward on 256 columns;torch + tanh + head backward by products;layer-wise + tanh;layer-wise + tanh, layer kernels on 8 rows;\
layer-wise + tanh, layer kernels on 4 warps;layer-wise + tanh, no batch split;partials + tanh"
VARIANTS_RC=$?

SHAKESPEARE_RC=0
echo "== TinyShakespeare demo (timeout ${SHAKESPEARE_TIMEOUT}s) -> $OUT/shakespeare"
if [ "$SHAKESPEARE_TIMEOUT" -gt 0 ] && [ -f "$SHAKESPEARE" ]; then
    mkdir -p "$OUT/shakespeare"
    timeout -s INT -k 60 "$SHAKESPEARE_TIMEOUT" "$PYTHON" -m aunn_fast demo --preset shakespeare \
        --data "text:$SHAKESPEARE" --hold-out "$SHAKESPEARE_HOLD_OUT" --out "$SHIM/shakespeare" --device cuda \
        --quiet > "$OUT/shakespeare.log" 2>&1
    SHAKESPEARE_RC=$?
    if [ "$SHAKESPEARE_RC" != 0 ] && [ -f "$SHIM/shakespeare/model.safetensors" ]; then
        echo "== cut (exit status $SHAKESPEARE_RC): aunn eval of the checkpoint it left" >> "$OUT/shakespeare.log"
        timeout "$SHAKESPEARE_EVAL_TIMEOUT" "$PYTHON" -m aunn_fast eval "$SHIM/shakespeare" --device cuda \
            >> "$OUT/shakespeare.log" 2>&1
    fi
    cp "$SHIM"/shakespeare/{log.csv,metrics.json,report.md,*.png} "$OUT/shakespeare/" 2>/dev/null
    tail -n 12 "$OUT/shakespeare.log"
elif [ "$SHAKESPEARE_TIMEOUT" -gt 0 ]; then
    echo "skipped: no corpus at $SHAKESPEARE (set SHAKESPEARE=PATH)" | tee "$OUT/shakespeare.log"
fi

echo "== summary"
echo "GPU-only tests exit status $GPU_TEST_RC: $(tail -n 1 "$OUT/pytest_gpu.log")"
echo "kernel tests exit status $KERNEL_TEST_RC: $(tail -n 1 "$OUT/pytest_kernels.log")"
echo "CLI and data tests exit status $TEST_RC: $(tail -n 1 "$OUT/pytest.log")"
grep -hE "^(FAILED|ERROR) " "$OUT/pytest_gpu.log" "$OUT/pytest_kernels.log" "$OUT/pytest.log" | head -n 10
echo "benchmark exit status $BENCH_RC, H=512 benchmark $NOTEBOOK_RC, bpe $BPE_RC (0 ok, 1 some provider incorrect/failed, 124 timed out)"
echo "profiles exit status $PROFILE_SEED_RC (seed), $PROFILE_NOTEBOOK_RC (notebook), $PROFILE_BPE_RC (bpe); tables in $OUT/profiles"
echo "ncu exit status $NCU_RC; reports in $OUT/ncu; kernel variants exit status $VARIANTS_RC; table in $OUT/variants"
echo "TinyShakespeare demo exit status $SHAKESPEARE_RC (124 timed out): $(grep -E \
    "^(trained in|training accuracy|held-out tail)" "$OUT/shakespeare.log" 2>/dev/null | tr '\n' ';') $OUT/shakespeare"
echo "data-parallel tests exit status $DISTRIBUTED_TEST_RC: $(tail -n 1 "$OUT/pytest_distributed.log"); overhead \
benchmark $DISTRIBUTED_BENCH_RC (table in $OUT/distributed_scaling.md)"
echo "fused CUDA step exit status $CUDA_STEP_RC (first failing part; logs in $OUT/cuda_step)"
echo "seed demo exit status $SEED_DEMO_RC (124 timed out): $(grep -E "^(trained in|training accuracy)" \
    "$OUT/seed_demo.log" | tr '\n' ';')"
for run in bench bench_notebook bench_bpe cuda_step/bench cuda_step/bench_1M; do
    if [ -f "$OUT/$run/results.json" ]; then
        "$PYTHON" -m aunn_fast.bench.summary "$OUT/$run/results.json"
    elif [ -s "$OUT/$run.log" ]; then
        tail -n 20 "$OUT/$run.log"
    fi
done
for rc in "$GPU_TEST_RC" "$KERNEL_TEST_RC" "$TEST_RC" "$BENCH_RC" "$NOTEBOOK_RC" "$BPE_RC" "$NCU_RC" "$VARIANTS_RC" \
        "$SEED_DEMO_RC" "$SHAKESPEARE_RC" "$DISTRIBUTED_TEST_RC" "$DISTRIBUTED_BENCH_RC" "$CUDA_STEP_RC"; do
    [ "$rc" = 0 ] || exit 1
done
