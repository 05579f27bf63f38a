#!/usr/bin/env bash
# Installs what this repository needs into the current Python; safe to run again.
#
#   bash install.sh            install torch, the package (editable), its CUDA extension and the test and
#                              benchmark tools; does nothing when an earlier run installed the same sources
#                              into this same Python
#   bash install.sh --quick    do nothing when the trainer's dependencies already import (used by run.sh)
#
# On a machine without a GPU, torch comes from its CPU wheel first, so that nothing
# pulls a several-GB CUDA build; on a GPU machine an existing CUDA torch is kept.
#
# The editable install compiles csrc/ with nvcc (1-2 minutes on 2 cores). It is repeated only when
# setup.py, pyproject.toml, csrc/ or the build's environment variables change: build/install-stamp
# records a hash of those and the Python it went into. Rebuilds reuse the objects of unchanged
# sources (build/cuda_objects). KERNELS_NO_CUDA_EXT=1 skips the extension.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if [ "${1:-}" = "--quick" ] && $PY -c "import torch, numpy, tqdm, huggingface_hub, triton" 2>/dev/null; then
  exit 0
fi

STAMP=build/install-stamp
install_key() {
  # Everything the installed result depends on, in one line.
  {
    $PY -c "import sys; print(sys.prefix, sys.version)"
    cat setup.py pyproject.toml csrc/* 2>/dev/null
    echo "arch=${KERNELS_CUDA_ARCH:-} nvcc=${KERNELS_NVCC:-} no_ext=${KERNELS_NO_CUDA_EXT:-} cuda_home=${CUDA_HOME:-}"
  } | sha256sum | cut -d' ' -f1
}
key=$(install_key)
# Up to date: same key, and this Python imports every declared dependency and this checkout's package.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && (cd / && $PY - "$OLDPWD/kernels" <<'PY'
import importlib.metadata, os, sys
import torch, triton, numpy, tqdm, huggingface_hub, pytest, matplotlib, pybind11  # noqa: F401
importlib.metadata.distribution("speedrun-kernels")
import kernels
sys.exit(0 if os.path.dirname(os.path.realpath(kernels.__file__)) == os.path.realpath(sys.argv[1]) else 1)
PY
) >/dev/null 2>&1
then
  echo "install.sh: up to date (nothing in setup.py, pyproject.toml or csrc/ changed since the last install)"
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
mkdir -p build
echo "$key" > "$STAMP"
