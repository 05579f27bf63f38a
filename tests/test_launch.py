"""run.sh and speedrun.launch behave like the trainer they wrap: the checkpoint's preset on --resume,
the trainer's exit codes (2 bad input, 3 non-finite loss) and its one-line error printed last, with one
process (no torchrun) and with several (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speedrun import launch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_sh(*args, nproc=1, timeout=300):
    # PYTHON: the interpreter running the tests, whatever python3 on PATH is.
    env = {**os.environ, "NPROC": str(nproc), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    return subprocess.run(["bash", "run.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_through_run_sh_uses_the_checkpoints_preset(tmp_path):
    out, data_dir = tmp_path / "smoke", tmp_path / "data"
    first = _run_sh("--preset", "smoke", "--out", str(out), "--data", str(data_dir), "--synthetic=true")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _run_sh("--resume", str(out / "checkpoint.pt"), "--steps", "6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 4" in resumed.stdout and "step:6/6" in resumed.stdout
    assert _steps(out)[-1] == 6


def test_missing_data_exits_2_with_the_message_last(tmp_path):
    res = _run_sh("--data", "/nonexistent-speedrun-data", "--out", str(tmp_path / "o"))
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    assert _last_line(res.stderr).startswith("error: data dir /nonexistent-speedrun-data: directory does not exist")
    assert "Traceback" not in res.stderr
    assert not Path("/nonexistent-speedrun-data").exists()  # --data alone never writes a synthetic corpus


@pytest.mark.slow
def test_two_processes_return_the_workers_code_and_message(tmp_path):
    res = _run_sh("--preset", "smoke", "--data", "/nonexistent-speedrun-data", "--out", str(tmp_path / "o"), nproc=2)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: data dir /nonexistent-speedrun-data" in _last_line(res.stderr)
    assert "ChildFailedError" not in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_processes_non_finite_loss_exits_3(tmp_path):
    res = _run_sh("--preset", "smoke", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
                  "--synthetic=true", "--inject_nan_step", "2", nproc=2)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "step 2: train loss is nan (not finite); stopping" in _last_line(res.stderr)
    assert "ChildFailedError" not in res.stderr


def test_first_failure_is_the_earliest_nonzero_record(tmp_path):
    (tmp_path / "rank0.json").write_text(json.dumps({"code": 2, "message": "later", "time": 20.0}))
    (tmp_path / "rank1.json").write_text(json.dumps({"code": 3, "message": "first", "time": 10.0}))
    (tmp_path / "rank2.json").write_text(json.dumps({"code": 0, "message": "fine", "time": 1.0}))
    (tmp_path / "rank3.json").write_text('{"code": 2, "mess')  # killed while writing
    assert launch.first_failure(tmp_path)["message"] == "first"
    assert launch.first_failure(tmp_path / "none") is None


def test_launch_rejects_a_bad_process_count(capsys):
    assert launch.main(["two"]) == 2
    assert "NPROC" in capsys.readouterr().err
