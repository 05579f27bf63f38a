#!/usr/bin/env bash
# Launch the speedrun trainer with torchrun: one process per GPU (nccl), or a
# single CPU process (gloo). Without --preset: "record" on GPUs, "cpu-demo" on CPU.
#
#   bash run.sh                                  # record on all GPUs, or the CPU demo
#   bash run.sh --preset smoke --out runs/smoke  # any train_gpt option passes through
#   NPROC=4 bash run.sh                          # fewer processes than GPUs
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
NPROC=${NPROC:-$(( NGPU > 0 ? NGPU : 1 ))}

PRESET=()
if [[ " $* " != *" --preset"* ]]; then
    PRESET=(--preset "$([ "$NGPU" -gt 0 ] && echo record || echo cpu-demo)")
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    -m speedrun.train_gpt "${PRESET[@]}" "$@"
