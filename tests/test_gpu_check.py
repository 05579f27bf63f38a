"""benchmarks/gpu_check.sh: it refuses a machine without a GPU, its dry run exercises every stage's
plumbing at smoke size, a SIGKILL part-way leaves the finished stages' results in OUTDIR, and
collect_results files a whole or partial OUTDIR."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import collect_results
from benchmarks.gpu_check import OUT_FILES, _descendants

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "warm", "proof", "tests", "bench", "train", "extra")


def _env():
    return {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def _stages(out: Path) -> dict[str, str]:
    """{stage: status} from summary.md's stage table."""
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in STAGES:
            rows[cells[0]] = cells[1]
    return rows


def _check_outdir_limits(out: Path) -> None:
    # The device tool returns at most 8 files, at most two folders deep: gpu_check writes flat files.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files), files
    assert {p.name for p in files} <= set(OUT_FILES), files


def test_refuses_a_machine_without_a_gpu(tmp_path):
    start = time.monotonic()
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr and "--dry-run" in res.stderr
    assert time.monotonic() - start < 60 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert time.monotonic() - start < 180
    assert _stages(out) == {name: "ok" for name in STAGES}, (out / "summary.md").read_text()
    _check_outdir_limits(out)
    assert set(OUT_FILES) <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "proof.jsonl").read_text().splitlines()]
    assert any(r.get("type") == "record" and r["status"] == "ok" for r in records)
    with tarfile.open(out / "tests.tar.gz") as tar:
        assert any(n.startswith("junit/") and n.endswith(".xml") for n in tar.getnames())
    with tarfile.open(out / "train.tar.gz") as tar:
        assert "train_triton/log.jsonl" in tar.getnames()
    summary = (out / "summary.md").read_text()
    assert "## Proof" in summary and "## Tests" in summary and "## Trainer" in summary


@pytest.mark.slow
def test_sigkill_part_way_keeps_the_finished_stages(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "summary.md").exists() and "proof" in _stages(out):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the dry run ended before it could be killed"
    finally:
        # SIGKILL the script and everything it started (stages run in their own process groups).
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    stages = _stages(out)
    assert list(stages)[:3] == ["env", "warm", "proof"] and stages["proof"] == "ok", stages
    _check_outdir_limits(out)
    assert "gpu:" in (out / "env.txt").read_text()
    assert any(json.loads(line).get("status") == "ok" for line in (out / "proof.jsonl").read_text().splitlines()
               if line.startswith("{") and '"record"' in line)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/proof.log" in names and any(n.startswith("logs/warm_") for n in names)

    # A partial run files as it is.
    results, readme = tmp_path / "results", tmp_path / "README.md"
    results.mkdir()
    (results / "README.md").write_text("# results\n\nNewest: none yet\n")
    readme.write_text("# top\n\nNewest GPU run: none yet\n")
    table = tmp_path / "tuned_configs.py"
    dest = collect_results.collect(out, name="partial", results=results, top_readme=readme, freeze_table=table)
    assert not table.exists()  # a dry run measures no tile table
    assert {"summary.md", "env.txt", "proof.md", "proof.json"} <= {p.name for p in dest.iterdir()}
    assert "Newest: [partial](partial/summary.md)" in (results / "README.md").read_text()
    assert "Newest GPU run: [partial](results/partial/summary.md)" in readme.read_text()


def test_collect_results_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="gpu_check OUTDIR"):
        collect_results.collect(tmp_path, results=tmp_path)


def test_collect_results_freezes_a_measured_tile_table(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    (out / "env.txt").write_text("date: 2026-12-01T10:00:00+00:00\ngpu: NVIDIA H200\n")
    (logs / "tuned_configs.py").write_text("MEASURED = True\nCONFIGS = {}\n")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    results = tmp_path / "results"
    results.mkdir()
    (results / "README.md").write_text("Newest: none yet\n")
    table = tmp_path / "tuned_configs.py"
    dest = collect_results.collect(out, results=results, top_readme=tmp_path / "absent.md", freeze_table=table)
    assert dest.name == "2026-12-01_NVIDIA-H200"
    assert table.read_text() == "MEASURED = True\nCONFIGS = {}\n"
