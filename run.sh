#!/usr/bin/env bash
# Launch the speedrun trainer: one process per GPU (nccl, through speedrun.launch, a torchrun wrapper),
# or, on a CPU machine or with NPROC=1, the trainer itself in this process.
# Without --preset: "record" on GPUs, "cpu-demo" on CPU; with --resume, the checkpoint's own preset.
#
#   bash run.sh                                       # record on all GPUs, or the CPU demo
#   bash run.sh --preset smoke --out runs/smoke       # any train_gpt option passes through
#   bash run.sh --resume runs/smoke/checkpoint.pt --steps 6
#   NPROC=4 bash run.sh                               # fewer processes than GPUs
#
# Exit code: the trainer's (0 done, 2 bad input or setup, 3 non-finite loss); with several processes,
# that of the process that failed first, whose one-line error is printed last.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -f install.sh ] && bash install.sh --quick  # installs what is missing (nothing when all imports work)

NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
NPROC=${NPROC:-$(( NGPU > 0 ? NGPU : 1 ))}

if [ "$NGPU" -eq 0 ]; then
    # glibc hands every freed block over 32 MB back to the OS, so each [tokens, 50304] logits
    # temporary of the CPU head costs fresh page faults; keeping them in the heap halves a CPU step.
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-1073741824}
    export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}
fi

PRESET=()
if [[ " $* " != *" --preset"* && " $* " != *" --resume"* ]]; then
    PRESET=(--preset "$([ "$NGPU" -gt 0 ] && echo record || echo cpu-demo)")
fi

if [ "$NPROC" -eq 1 ]; then
    exec "$PYTHON" -m speedrun.train_gpt "${PRESET[@]}" "$@"
fi
exec "$PYTHON" -m speedrun.launch "$NPROC" "${PRESET[@]}" "$@"
