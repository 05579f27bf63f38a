#!/usr/bin/env bash
# Installs what this repository needs into the current Python; safe to run again.
#
#   bash install.sh            install (or refresh) torch, the package, its CUDA extension and test tools
#   bash install.sh --quick    do nothing when everything already imports (used by run.sh)
#
# On a machine without a GPU, torch comes from its CPU wheel first, so that nothing
# pulls a several-GB CUDA build; on a GPU machine an existing CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if [ "${1:-}" = "--quick" ] && $PY -c "import torch, numpy, tqdm, huggingface_hub, triton, pytest" 2>/dev/null; then
  exit 0
fi

if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PY -m pip install torch
  else
    $PY -m pip install torch==2.13.0
  fi
fi
# Editable, so the CUDA extension (when nvcc exists) is built next to the sources of this checkout.
$PY -m pip install -e ".[test]"
