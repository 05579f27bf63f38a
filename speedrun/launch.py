"""Several trainer processes on this machine, exiting as the trainer itself would.

    python -m speedrun.launch NPROC [train_gpt options ...]      (what run.sh runs for NPROC > 1)

This is ``torchrun --standalone --nproc_per_node=NPROC -m speedrun.train_gpt ...``, except on a
failure: torchrun then exits 1 after a ~30-line ChildFailedError traceback, which hides both the
trainer's exit code (2 bad input, 3 non-finite loss) and its one-line message. Here every worker
records its exit code and message in a file (``speedrun.train_gpt.record_exit``); the launcher
exits with the code of the worker that failed first and prints that worker's message last.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_DIR_ENV = "SPEEDRUN_EXIT_DIR"


def first_failure(exit_dir: Path) -> dict | None:
    """The earliest recorded non-zero exit among the workers' files, or None."""
    failures = []
    for path in exit_dir.glob("rank*.json"):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a worker killed while writing
        if entry.get("code"):
            failures.append(entry)
    return min(failures, key=lambda e: e["time"]) if failures else None


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print(f"usage: python -m speedrun.launch NPROC [train_gpt options]; got {argv[:1]}", file=sys.stderr)
        return 2
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with tempfile.TemporaryDirectory(prefix="speedrun-exit-") as tmp:
        os.environ[EXIT_DIR_ENV] = tmp  # the workers inherit it
        args = torchrun.parse_args(["--standalone", f"--nproc_per_node={argv[0]}", "-m", "speedrun.train_gpt",
                                    *argv[1:]])
        try:
            torchrun.run(args)
            return 0
        except ChildFailedError as e:
            recorded = first_failure(Path(tmp))
            if recorded is not None:
                print(recorded["message"], file=sys.stderr, flush=True)
                return int(recorded["code"])
            # A worker that died without recording (a signal, a crash in the interpreter).
            rank, failure = e.get_first_failure()
            code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
            print(f"error: rank {rank} exited with code {failure.exitcode} without a message "
                  "(killed, or a crash: see its output above)", file=sys.stderr, flush=True)
            return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
