"""speedrun/checkpoint.py: the run directory never loses a run.

Atomic and durable checkpoints (fsync order, a full disk, kill -9 mid-run with an exact resume),
the kept good checkpoint after a non-finite loss, the refusal to overwrite, the lock (a second run,
a stale lock, two ranks), and one-line errors for a damaged checkpoint, an OSError and a dead rank.
"""

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speedrun import checkpoint, data
from speedrun.checkpoint import CHECKPOINT, LOCK, PREVIOUS, RunDir, SetupError
from speedrun.train_gpt import _distributed_reason, main
from trainer_runs import read_log, run_smoke

REPO_ROOT = Path(__file__).resolve().parents[1]


def _resume(capsys, path, *args):
    code = main(["--resume", str(path), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _losses(out):
    return [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in read_log(out)]


def _one_line_error(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _spawn(out, smoke_data, *args, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "speedrun.train_gpt", "--preset", "smoke", "--data",
                             str(smoke_data), "--out", str(out), *args],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc=None, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended first (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _steps_logged(out):
    try:
        return len((Path(out) / "log.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


# ---------------------------------------------------------------------------
# Refusal to overwrite (issue 15 item 2, issue 12 §3)
# ---------------------------------------------------------------------------

def test_fresh_run_into_a_run_dir_is_refused_and_leaves_it_intact(tmp_path, smoke_data, capsys):
    out = tmp_path / "run"
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "2")[0] == 0
    before = _snapshot(out)
    assert set(before) == {CHECKPOINT, "log.jsonl"}  # no lock, no temp file left behind
    code, _, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "3")
    line = _one_line_error(err)
    assert code == 2
    assert f"--out {out} already holds a run: checkpoint.pt at step 2, log.jsonl" in line
    assert f"bash run.sh --resume {out / CHECKPOINT}" in line and "--overwrite" in line
    assert _snapshot(out) == before
    # the same through a resume from another directory
    other = tmp_path / "other"
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(other), "--steps", "1")[0] == 0
    code, _, err = _resume(capsys, other / CHECKPOINT, "--out", str(out))
    assert code == 2 and f"Resuming {other / CHECKPOINT} there would replace it" in _one_line_error(err)
    assert _snapshot(out) == before
    # --overwrite is the explicit way to start over
    code, stdout, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "3", "--overwrite")
    assert code == 0, err
    assert f"--overwrite: deleted checkpoint.pt, log.jsonl in {out}" in stdout
    assert [e["step"] for e in read_log(out)] == [0, 1, 2, 3]


def test_a_crash_right_after_the_start_keeps_the_old_log_and_checkpoint(tmp_path, smoke_data, capsys):
    out = tmp_path / "run"
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "3")[0] == 0
    before = _snapshot(out)
    # a fresh run into it is refused before it writes anything
    proc = _spawn(out, smoke_data, "--steps", "50")
    assert proc.wait(timeout=120) == 2 and "already holds a run" in proc.stderr.read()
    assert _snapshot(out) == before
    # a resumed run killed the moment it has started (the log was rewritten, nothing trained)
    proc = subprocess.Popen([sys.executable, "-m", "speedrun.train_gpt", "--resume", str(out / CHECKPOINT),
                             "--steps", "50"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""})
    for line in proc.stdout:
        if line.startswith("speedrun smoke:"):
            break
    proc.kill()
    proc.wait()
    assert (out / CHECKPOINT).read_bytes() == before[CHECKPOINT]
    assert read_log(out) == [json.loads(line) for line in before["log.jsonl"].decode().splitlines()]


# ---------------------------------------------------------------------------
# kill -9 mid-run: the checkpoint is whole, the lock is reported stale, the resume is exact
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_mid_run_then_stale_lock_then_exact_resume(tmp_path, smoke_data, capsys):
    common = ["--steps", "10", "--val_every", "4", "--checkpoint_every", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = _spawn(part, smoke_data, *common)
    _wait_for(lambda: _steps_logged(part) >= 5, proc)  # val at 0, steps 1-4: killed at or after step 4
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert (part / LOCK).exists()
    ckpt = torch.load(part / CHECKPOINT, weights_only=True)  # whole, whatever moment the kill hit
    prev = torch.load(part / PREVIOUS, weights_only=True)
    assert prev["step"] == ckpt["step"] - 1 >= 2

    code, _, err = _resume(capsys, part / CHECKPOINT)
    line = _one_line_error(err)
    assert code == 2 and f"{part / LOCK} is stale: it was taken by pid {proc.pid} on host" in line
    assert f"clear it with:  rm {part / LOCK}" in line and "no longer running" in line

    os.remove(part / LOCK)
    code, out, err = _resume(capsys, part / CHECKPOINT)
    assert code == 0, err
    assert f"resumed at step {ckpt['step']}" in out
    assert not list(part.glob("*.tmp")) and not (part / LOCK).exists()
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(full), *common)[0] == 0
    assert _losses(part) == _losses(full)  # bit for bit: the losses are compared as floats
    a, b = torch.load(full / CHECKPOINT, weights_only=True), torch.load(part / CHECKPOINT, weights_only=True)
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


# ---------------------------------------------------------------------------
# The lock (issue 15 item 3)
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_by_the_lock(tmp_path, smoke_data, capsys):
    out = tmp_path / "run"
    proc = _spawn(out, smoke_data, "--steps", "400", "--val_every", "1000")
    try:
        _wait_for(lambda: _steps_logged(out) >= 2, proc)
        lock = json.loads((out / LOCK).read_text())
        assert lock["pid"] == proc.pid and lock["host"] == socket.gethostname()
        code, _, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "400")
        line = _one_line_error(err)
        assert code == 2 and f"{out} is in use by another run (pid {proc.pid} on host" in line
        assert "FileNotFoundError" not in err and (out / LOCK).exists()
        steps = [e["step"] for e in read_log(out)]
        assert steps == list(range(len(steps)))  # one writer: no interleaved entries
        # SIGTERM (what torchrun and schedulers send) unwinds the run and releases the lock
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert not (out / LOCK).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lock_messages(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK
    me = checkpoint.take_lock(lock)
    assert me["pid"] == os.getpid() and json.loads(lock.read_text()) == me
    with pytest.raises(SetupError, match=f"{out} is in use by another run \\(pid {os.getpid()} on host"):
        checkpoint.take_lock(lock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))
    with pytest.raises(SetupError, match=f"is stale: .* clear it with:  rm {lock}"):
        checkpoint.take_lock(lock)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(SetupError, match=f"locked by pid 1 on host elsewhere.*rm {lock}"):
        checkpoint.take_lock(lock)
    lock.write_text("")
    with pytest.raises(SetupError, match=f"names no owner.*rm {lock}"):
        checkpoint.take_lock(lock)
    assert [p.name for p in out.iterdir()] == [LOCK]  # no temp file left by the failed attempts


@pytest.mark.slow
def test_two_ranks_stop_at_once_when_rank_0_cannot_lock(tmp_path, smoke_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "speedrun.train_gpt", "--preset", "smoke", "--data", str(smoke_data), "--out", str(out),
                          "--dist_timeout_s=600"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and time.monotonic() - t0 < 120  # not the 600 s collective timeout
    assert f"[rank 0] error: {out} is in use by another run (pid {os.getpid()}" in res.stderr
    assert f"[rank 1] error: rank 0 could not open the run directory {out}" in res.stderr
    assert (out / LOCK).exists() and not (out / "log.jsonl").exists()


# ---------------------------------------------------------------------------
# Durable writes and a full disk (issue 15 item 4)
# ---------------------------------------------------------------------------

def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name file descriptors")
def test_checkpoint_and_shard_writes_are_fsynced_before_they_take_the_name(tmp_path, smoke_data, capsys,
                                                                           monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    out = tmp_path.resolve() / "run"
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "2", "--checkpoint_every", "1")[0] == 0
    ckpt, tmp, prev = str(out / CHECKPOINT), str(out / (CHECKPOINT + ".tmp")), str(out / PREVIOUS)
    moves = [i for i, e in enumerate(events) if e == ("replace", tmp, ckpt)]
    assert len(moves) == 2  # steps 1 and 2
    for i in moves:
        last_tmp_sync = max(j for j in range(i) if events[j] == ("fsync", tmp))
        assert all(e[0] != "replace" or e[2] == prev for e in events[last_tmp_sync + 1:i])
        assert events[i + 1] == ("fsync", str(out))  # the rename itself made durable
    assert ("replace", str(out / (PREVIOUS + ".tmp")), prev) in events[moves[0]:moves[1]]
    assert torch.load(prev, weights_only=True)["step"] == 1 and torch.load(ckpt, weights_only=True)["step"] == 2

    events.clear()
    shard = tmp_path.resolve() / "shards" / "x_train_000001.bin"
    shard.parent.mkdir()
    data.write_shard(shard, list(range(100)))
    tmp = f"{shard}.{os.getpid()}.tmp"
    assert events == [("fsync", tmp), ("replace", tmp, str(shard)), ("fsync", str(shard.parent))]
    assert data.read_header(shard) == 100


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_keeps_the_previous_checkpoint_and_exits_2(tmp_path, smoke_data, capsys, monkeypatch, where):
    out = tmp_path / "run"
    writes = []  # the checkpoints' temp files so far; the second (step 4) finds the disk full
    real_write_temp, real_fsync = checkpoint._write_temp, os.fsync

    def counting_write_temp(tmp, save):
        if tmp.name == CHECKPOINT + ".tmp":
            writes.append(tmp)
        return real_write_temp(tmp, save)

    def full_write(f, b):
        if where == "write" and len(writes) == 2 and f.tell() > 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f.write(b)

    def full_fsync(fd):
        if where == "fsync" and len(writes) == 2 and _fd_path(fd).endswith(CHECKPOINT + ".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # delayed allocation reports it here
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint, "_write_temp", counting_write_temp)
    monkeypatch.setattr(checkpoint, "_write", full_write)
    monkeypatch.setattr(os, "fsync", full_fsync)
    code, _, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "4", "--checkpoint_every", "2")
    line = _one_line_error(err)
    assert code == 2
    assert f"error: no space left on {out} (writing the step-4 checkpoint)" in line
    assert f"the partial checkpoint.pt.tmp was deleted and {out / CHECKPOINT} (step 2) is as it was" in line
    assert f"bash run.sh --resume {out / CHECKPOINT}" in line
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT, "log.jsonl"]  # no .tmp, no lock
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 2


def test_disk_full_while_rewriting_the_log_keeps_it(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n')

    def full(f, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write", full)
    with pytest.raises(SetupError, match=f"no space left on {tmp_path} \\(writing log.jsonl\\)"):
        checkpoint.write_text_durably(log, "")
    assert log.read_text() == '{"step": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


# ---------------------------------------------------------------------------
# A non-finite loss names a checkpoint that is really good (issue 15 item 1)
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_non_finite_stop_names_a_checkpoint_that_resumes_to_a_finite_loss(tmp_path, smoke_data, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "6",
                           "--checkpoint_every", "1", "--val_every", "100", "--lr_muon=1.5e38")
    assert code == 3
    # step 2's update blows the weights up: the checkpoint of step 2 gives NaN, the one of step 1 does not
    assert "step 3: train loss is nan (not finite); stopping." in stdout
    assert f"The last good checkpoint is {out / PREVIOUS} (step 1; its weights gave finite losses), " \
           f"not {out / CHECKPOINT} (step 2), whose weights gave this loss." in stdout
    assert f"Continue from it with  bash run.sh --resume {out / PREVIOUS}  and a lower learning rate" in stdout
    first = _losses(out)
    assert torch.load(out / PREVIOUS, weights_only=True)["step"] == 1

    # the named checkpoint trains a finite step even with the same settings (whose next weights,
    # as before, give NaN: here the val loss after step 2, which still names step 1)
    code, stdout, err = _resume(capsys, out / PREVIOUS, "--steps", "2")
    assert f"{out / CHECKPOINT} (step 2) is not on this run's path" in stdout
    assert code == 3 and "step 2: val loss is nan" in stdout and f"checkpoint is {out / PREVIOUS} (step 1;" in stdout
    resumed = read_log(out)
    assert resumed[2]["step"] == 2 and resumed[2]["train_loss"] == first[2][1] and math.isfinite(first[2][1])
    # ... and, with the lower learning rate the message asks for, to the end
    code, _, err = _resume(capsys, out / PREVIOUS, "--lr_muon=0.05", "--steps", "6")
    assert code == 0, err
    log = read_log(out)
    assert [e["step"] for e in log] == list(range(7)) and log[2]["train_loss"] == first[2][1]
    assert all(e["train_loss"] is not None and e["train_loss"] < 11 for e in log[1:]) and log[-1]["val_loss"] < 5


def _dir_state(tmp_path, current=None, previous=None, external=None):
    rd = RunDir.__new__(RunDir)  # the bookkeeping alone, no lock
    rd.out = tmp_path
    rd.ckpt_path, rd.prev_path = tmp_path / CHECKPOINT, tmp_path / PREVIOUS
    rd.current, rd.previous, rd.external = current, previous, external
    for p in (rd.ckpt_path, rd.prev_path) + ((external[0],) if external else ()):
        p.write_bytes(b"")
    return rd


def test_last_good_is_the_newest_checkpoint_older_than_the_bad_weights(tmp_path):
    rd = _dir_state(tmp_path, current=4, previous=2)
    assert rd.last_good(weights_of_step=4) == (rd.prev_path, 2)    # train loss of step 5, or val loss after 4
    assert rd.last_good(weights_of_step=5) == (rd.ckpt_path, 4)    # train loss of step 6
    assert rd.last_good(weights_of_step=2) is None
    rd.prev_path.unlink()
    assert rd.last_good(weights_of_step=4) is None                 # a file that is gone is not named
    ext = tmp_path / "elsewhere.pt"
    rd = _dir_state(tmp_path, current=None, previous=None, external=(ext, 3))
    assert rd.last_good(weights_of_step=4) == (ext, 3) and rd.last_good(weights_of_step=3) is None


# ---------------------------------------------------------------------------
# One-line errors (issue 15 item 6)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, smoke_data):
    out = tmp_path_factory.mktemp("good")
    assert main(["--preset", "smoke", "--data", str(smoke_data), "--out", str(out), "--steps", "1"]) == 0
    return torch.load(out / CHECKPOINT, weights_only=True)


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


BROKEN = {
    "no config": (lambda c: _without(c, "config"), "not a complete speedrun checkpoint: it has no 'config' (found: "),
    "no model": (lambda c: _without(c, "model"), "it has no 'model'"),
    "no rng": (lambda c: _without(c, "rng"), "it has no 'rng'"),
    "a list": (lambda c: [c["model"]], "not a speedrun checkpoint (it holds a list, expected a dict)"),
    "step text": (lambda c: {**c, "step": "3"}, "checkpoint field 'step' is not an int >= 0"),
    "negative step": (lambda c: {**c, "step": -1}, "checkpoint field 'step' is not an int >= 0"),
    "one optimizer": (lambda c: {**c, "optimizers": c["optimizers"][:1]}, "'optimizers' is not a list of 2"),
    "rng not bytes": (lambda c: {**c, "rng": {"torch": torch.zeros(3), "cuda": []}}, "'rng' is not a dict with"),
    "model not tensors": (lambda c: {**c, "model": {"embed.weight": 3}}, "'model' is not a dict of tensors"),
    "config lacks model_dim": (lambda c: {**c, "config": _without(c["config"], "model_dim")},
                               "the checkpoint's config lacks model_dim"),
    "unknown config field": (lambda c: {**c, "config": {**c["config"], "warp_drive": 1}},
                             "config has fields this trainer does not know: warp_drive"),
    "unknown preset": (lambda c: {**c, "config": {**c["config"], "preset": "nope"}}, "has preset 'nope', expected"),
    "config value type": (lambda c: {**c, "config": {**c["config"], "lr_muon": "fast"}},
                          "the checkpoint's config is invalid: --lr_muon: expected a float, got 'fast'"),
    "wrong weight shape": (lambda c: {**c, "model": {**c["model"], "embed.weight": torch.zeros(3, 3)}},
                           "the model weights do not fit this config: Error(s) in loading state_dict for GPT"),
    "missing weight": (lambda c: {**c, "model": _without(c["model"], "embed.weight")},
                       "the model weights do not fit this config"),
    "adam state shape": (lambda c: {**c, "optimizers": [
        {**c["optimizers"][0], "state": {0: {**c["optimizers"][0]["state"][0], "exp_avg": torch.zeros(5)}}},
        c["optimizers"][1]]}, "the ShardedAdam state does not fit"),
    "muon groups": (lambda c: {**c, "optimizers": [c["optimizers"][0], {**c["optimizers"][1], "param_groups": []}]},
                    "the ShardedMuon state does not fit: state_dict: its param groups do not match"),
    "rng wrong size": (lambda c: {**c, "rng": {"torch": torch.zeros(7, dtype=torch.uint8), "cuda": []}},
                       "the saved random state is unusable"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_checkpoint_is_one_line_and_exit_2(tmp_path, good_checkpoint, capsys, case):
    damage, message = BROKEN[case]
    path = tmp_path / "bad.pt"
    torch.save(damage(good_checkpoint), path)
    code, _, err = _resume(capsys, path, "--out", str(tmp_path / "fresh"))
    line = _one_line_error(err)
    assert code == 2 and message in line, line
    assert f"--resume {path}: " in line, line
    assert not (tmp_path / "fresh" / LOCK).exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path, smoke_data, capsys):
    out = tmp_path / "run"
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(out), "--steps", "1")[0] == 0
    bad = tmp_path / "cut.pt"
    bad.write_bytes((out / CHECKPOINT).read_bytes()[:100_000])
    code, _, err = _resume(capsys, bad, "--out", str(tmp_path / "fresh"))
    assert code == 2 and f"--resume {bad}: cannot read the checkpoint" in _one_line_error(err)


def test_an_oserror_is_one_line_with_its_path(tmp_path, smoke_data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(blocker / "run"))
    line = _one_line_error(err)
    assert code == 2 and line.startswith(f"error: {blocker}") and ("Not a directory" in line or "exists" in line)


def test_distributed_errors_are_recognised():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:1955. This is typically caused by a remote worker crashing.")
    assert _distributed_reason(gloo).startswith("Connection closed by peer [127.0.0.1]:1955.")
    assert _distributed_reason(torch.distributed.DistBackendError("NCCL watchdog timeout")) == "NCCL watchdog timeout"
    assert _distributed_reason(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


@pytest.mark.slow
def test_a_dead_rank_gives_the_other_a_one_line_error(tmp_path, smoke_data):
    # two ranks launched by hand (torchrun would SIGTERM the survivor): rank 1 is killed mid-run
    out, port = tmp_path / "run", 29500 + os.getpid() % 1000
    procs = [_spawn(out, smoke_data, "--steps", "400", "--val_every", "1000", env={
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(r),
        "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        _wait_for(lambda: _steps_logged(out) >= 3, procs[0])
        procs[1].kill()
        assert procs[0].wait(timeout=120) == 2
        line = _one_line_error(procs[0].stderr.read())
        assert line.startswith("error: rank 0: ") and "another rank probably stopped first" in line
        assert not (out / LOCK).exists()  # the survivor released it
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_attention_flex_on_a_cpu_is_refused_at_setup(tmp_path, smoke_data, capsys):
    t0 = time.monotonic()
    code, _, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path / "run"), "--attention=flex")
    assert code == 2 and time.monotonic() - t0 < 5
    assert "--attention=flex: FlexAttention needs a CUDA device, this run is on cpu" in _one_line_error(err)
    assert not (tmp_path / "run").exists()
