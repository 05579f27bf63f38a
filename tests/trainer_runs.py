"""The trainer run in this process, for test_speedrun.py and test_checkpoint.py."""

import json
from pathlib import Path

from speedrun.train_gpt import main


def run_smoke(capsys, *args):
    """-> (exit code, stdout, stderr) of ``train_gpt --preset smoke *args``."""
    code = main(["--preset", "smoke", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_log(out):
    """The run directory's log.jsonl, one dict per line."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
