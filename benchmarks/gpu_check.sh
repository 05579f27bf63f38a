#!/usr/bin/env bash
# One-command check on an offline GPU machine, within one 10-minute budget:
#   build the CUDA extension in place, run the GPU test tier, run every benchmark,
#   train the record preset for a few steps with each backend on synthetic shards.
#
# usage: bash benchmarks/gpu_check.sh OUTDIR
#
# Everything is written into a scratch directory; OUTDIR receives at most six files
# (the device machine hands back at most 8 files, at most 2 folders deep):
#   summary.md       stage table (status, seconds), test summary, benchmark targets, training lines
#   results.md/json  the benchmark report (benchmarks/run_all)
#   bench.tar.gz     the whole benchmark output: plots, per-script records, ceilings
#   logs.tar.gz      every stage's log, the pytest junit XML, the trainers' log.jsonl
#   env.txt          nvidia-smi, versions
# Commit them with: python -m benchmarks.collect_results OUTDIR
#
# Environment:
#   GPU_CHECK_BUDGET_S   total seconds for the stages (default 540; packing takes a few more)
#   GPU_CHECK_STAGES     stages to run, in order (default "build tests bench train")
#   GPU_CHECK_BACKENDS   trainer backends (default "reference triton cuda")
#   GPU_CHECK_STEPS      trainer steps (default 5)
#   BENCH_ARGS           extra arguments for benchmarks.run_all (e.g. "--full" or "--only relu2_mlp")
#   PYTHON               interpreter (default: python, else python3)
# Each stage runs under `timeout` with a share of what is left, so one stuck stage
# cannot eat the others' time; a stage's failure never stops the later stages.

set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
STAGES=${GPU_CHECK_STAGES:-"build tests bench train"}
BACKENDS=${GPU_CHECK_BACKENDS:-"reference triton cuda"}
STEPS=${GPU_CHECK_STEPS:-5}
T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
STATUS=$WORK/status.tsv
: > "$STATUS"
unset TRITON_INTERPRET  # the GPU tier runs Triton on CUDA tensors
export PYTHONUNBUFFERED=1
# Hopper only: half the nvcc work of the default "90a;80".
export KERNELS_CUDA_ARCH=${KERNELS_CUDA_ARCH:-90a}

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# run_stage NAME CAP RESERVE CMD...: run CMD with a timeout of min(CAP, time left - RESERVE),
# RESERVE being what the later stages are guaranteed; output into $LOGS/NAME.log.
run_stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local limit=$(( $(left) - reserve ))
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 10 ]; then
        printf '%s\tskipped\t0\t%s\n' "$name" "no time left" >> "$STATUS"
        echo "[gpu_check] $name: skipped (no time left)"
        return 0
    fi
    echo "[gpu_check] $name: up to ${limit}s at t=$(elapsed)s: $*"
    local start rc
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    local secs=$(( $(date +%s) - start )) word=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then word="timeout"; elif [ $rc -ne 0 ]; then word="rc=$rc"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$word" "$secs" "limit ${limit}s" >> "$STATUS"
    echo "[gpu_check] $name: $word in ${secs}s"
    tail -n 5 "$LOGS/$name.log" | sed 's/^/    /'
    return 0
}

has_stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# --- environment (a few seconds, outside the stage budget) -------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    "$PY" --version 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -n 2
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|pytest|pybind11|numpy|setuptools) '
} > "$OUT/env.txt" 2>&1

# --- stages ---------------------------------------------------------------------------
if has_stage build; then
    # Wheels carried in .whl/ (e.g. pybind11, which the offline machine may lack) go in first.
    if compgen -G ".whl/*.whl" > /dev/null; then
        run_stage wheels 60 420 "$PY" -m pip install --no-index --no-deps .whl/*.whl
    fi
    run_stage build 180 330 "$PY" -m pip install --no-build-isolation --no-deps -e .
    cp kernels/_cuda_build.json "$LOGS/" 2>/dev/null
    "$PY" -c "import kernels; print(kernels.available_backends())" >> "$LOGS/build.log" 2>&1
fi

if has_stage tests; then
    run_stage tests 150 270 "$PY" -m pytest -m "gpu or interpret" -q -rfEs -p no:cacheprovider \
        --junitxml="$LOGS/pytest.xml" tests
fi

if has_stage bench; then
    # run_all stops starting new cases 15 s before its own budget and still writes its report.
    bench_limit=$(( $(left) - 120 ))
    [ "$bench_limit" -gt 300 ] && bench_limit=300
    [ "$bench_limit" -lt 40 ] && bench_limit=40
    # shellcheck disable=SC2086
    run_stage bench 300 120 "$PY" -m benchmarks.run_all --out "$WORK/bench" --budget-s $(( bench_limit - 20 )) \
        ${BENCH_ARGS:-}
fi

if has_stage train; then
    DATA=$WORK/synthetic
    # One training pass needs STEPS*393216 tokens (+1), one validation pass 262144 (+1).
    run_stage synthetic 60 100 "$PY" -m speedrun.data synthetic --dir "$DATA" \
        --train_tokens $(( (STEPS + 1) * 393216 )) --val_tokens 524288
    n=$(echo $BACKENDS | wc -w)
    i=0
    for backend in $BACKENDS; do
        i=$(( i + 1 ))
        later=$(( (n - i) * 40 ))
        run_stage "train_$backend" 120 $later "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
            -m speedrun.train_gpt \
            --preset record --steps "$STEPS" --backend "$backend" --data "$DATA" --out "$WORK/train_$backend" \
            --val_tokens=262144 --val_at_start=false
        cp "$WORK/train_$backend/log.jsonl" "$LOGS/train_$backend.log.jsonl" 2>/dev/null
    done
fi

# --- summary and packing --------------------------------------------------------------
{
    echo "# gpu_check summary"
    echo
    echo "- $(grep -m1 -E '^date:' "$OUT/env.txt")"
    echo "- $(grep -m1 -E '^commit:' "$OUT/env.txt")"
    echo "- $(grep -m1 -E '^torch ' "$OUT/env.txt")"
    echo "- total $(elapsed) s of a ${BUDGET} s budget"
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---|---|"
    while IFS=$'\t' read -r name word secs note; do
        echo "| $name | $word | $secs | $note |"
    done < "$STATUS"
    if [ -f "$LOGS/build.log" ]; then
        echo
        echo "## build"
        echo '```'
        tail -n 3 "$LOGS/build.log"
        echo '```'
    fi
    if [ -f "$LOGS/tests.log" ]; then
        echo
        echo "## tests (pytest -m \"gpu or interpret\")"
        echo '```'
        grep -E '^(FAILED|ERROR)' "$LOGS/tests.log" | head -n 40
        tail -n 1 "$LOGS/tests.log"
        echo '```'
    fi
    if [ -f "$WORK/bench/results.md" ]; then
        echo
        sed -n '/^## Scripts/,/^## [A-Z]/p' "$WORK/bench/results.md" | sed '$d'
        sed -n '/^## Targets/,/^## [a-z]/p' "$WORK/bench/results.md" | sed '$d'
    fi
    for backend in $BACKENDS; do
        if [ -f "$LOGS/train_$backend.log" ]; then
            echo
            echo "## train --backend $backend"
            echo '```'
            grep -E '^(speedrun|step|done|final|error|Traceback)' "$LOGS/train_$backend.log" | tail -n 12
            tail -n 2 "$LOGS/train_$backend.log"
            echo '```'
        fi
    done
} > "$OUT/summary.md" 2>&1

if [ -d "$WORK/bench" ]; then
    cp "$WORK/bench/results.md" "$WORK/bench/results.json" "$OUT/" 2>/dev/null
    tar -czf "$OUT/bench.tar.gz" -C "$WORK" bench
fi
cp "$STATUS" "$LOGS/status.tsv"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
cat "$OUT/summary.md"
echo "[gpu_check] wrote $(ls "$OUT" | tr '\n' ' ')in $OUT after $(elapsed) s"
rm -rf "$WORK"
exit 0
