#!/usr/bin/env bash
# One command on a lent GPU machine that returns the most evidence first, and keeps it when killed:
#   bash benchmarks/gpu_check.sh OUTDIR              (device tool: timeout_s 600)
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR    (a CPU machine: the plumbing at smoke size, < 3 min)
# Stages, order, time caps and outputs: the docstring of benchmarks/gpu_check.py. In short:
#   env 3% (+ CUDA build in the background) -> warm 15% (parallel compiles) -> proof 28% (speedrun shapes,
#   package first, OUTDIR/proof.jsonl) -> tests 20% (pytest -m gpu per file) -> bench 12% (run_all)
#   -> train 20% (record preset, triton) -> extra: the rest (tile tuner, interpret tier, other backends).
#   Stages 1-4 are guaranteed at a 300 s budget. GPU_CHECK_BUDGET_S (default 540) sets the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
exec "$PY" -m benchmarks.gpu_check "$@"
