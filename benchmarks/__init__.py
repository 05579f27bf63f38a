"""Kernel benchmarks: ``python -m benchmarks.run_all [--smoke] [--out DIR]``; see benchmarks/harness.py."""

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def child_env(**overrides: str) -> dict[str, str]:
    """os.environ plus ``overrides`` for a child process, the repository root first on its PYTHONPATH
    (so that it imports this checkout, installed or not)."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, **overrides, "PYTHONPATH": os.pathsep.join([str(_ROOT), *rest])}
