"""The run directory (--out): its lock, its checkpoints, and the rules that keep a run from being lost.

    out/run.lock            pid, host and start time of the run using the directory
    out/log.jsonl           one JSON object per step (written by the trainer)
    out/checkpoint.pt       the newest checkpoint
    out/checkpoint.prev.pt  the one before it

Guarantees (tests/test_checkpoint.py):
- A checkpoint file is always whole: it is written to a temp file, fsynced, and moved
  into place with os.replace, then the directory is fsynced. A kill -9 or a full disk at
  any moment leaves the previous checkpoint as it was.
- checkpoint.prev.pt is a checkpoint whose weights are known to give a finite loss: it
  becomes "prev" only after a later step trained from it. checkpoint.pt may hold the
  weights that made the loss non-finite, so a non-finite stop names the newest checkpoint
  that is known good (``RunDir.last_good``).
- One run per directory: the lock is a file created atomically; a second run is refused,
  and a lock left by a killed run is reported with the command that clears it.
- A fresh run into a directory that holds a run is refused unless --overwrite; a resumed
  run may only write into the directory it resumed from (or an empty one).
"""

from __future__ import annotations

import datetime
import errno
import io
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
LOG = "log.jsonl"
LOCK = "run.lock"
RUN_FILES = (CHECKPOINT, PREVIOUS, LOG)


class SetupError(Exception):
    """A problem with the run's inputs (data, checkpoint, launch, run directory) that the message explains."""


def resume_command(path, extra: str = "") -> str:
    """The command that continues a run: run.sh takes the checkpoint's preset and launch."""
    return f"bash run.sh --resume {path}{extra}"


# ---------------------------------------------------------------------------
# Durable files
# ---------------------------------------------------------------------------

def fsync_dir(path) -> None:
    """Make a rename or unlink inside ``path`` survive a power cut (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory; the rename itself is done
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class _Writer(io.RawIOBase):
    """A file wrapper that remembers the OSError of a failed write.

    torch.save reports a failed write on a Python file object as a RuntimeError without
    the errno; this keeps the original (ENOSPC, EIO, ...) so the caller can re-raise it.
    """

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return _write(self.f, b)
        except OSError as e:
            self.error = e
            raise


def _write(f, b) -> int:
    # One indirection so the tests can fail a write (a full disk) without filling one.
    return f.write(b)


def _no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _write_temp(tmp: Path, save) -> None:
    """``save(file)`` into ``tmp``, flushed and fsynced; on any failure tmp is deleted and the error re-raised."""
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                save(writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_durably(path, save, tmp=None) -> None:
    """Write ``path`` by ``save(file)``: into ``tmp`` (default path.tmp), fsync it, os.replace it over
    path, fsync the directory.

    On any failure the temp file is deleted and ``path`` is untouched; a full disk raises
    SetupError("no space left on ..."), any other write error the OSError itself.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    try:
        _write_temp(tmp, save)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _no_space(e):
            raise SetupError(f"no space left on {path.parent} (writing {path.name}); the partial {tmp.name} "
                             f"was deleted and {path} is as it was") from None
        raise
    fsync_dir(path.parent)


def write_text_durably(path, text: str) -> None:
    write_durably(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------
# Checkpoint contents
# ---------------------------------------------------------------------------

def checkpoint_state(step: int, model, optimizer_states, stream, cfg, world_size: int) -> dict:
    return {
        "step": step,
        "config": {k: v for k, v in vars(cfg).items()},
        "world_size": world_size,
        "model": model.state_dict(),
        "optimizers": optimizer_states,  # unsharded (gathered on every rank beforehand)
        "data": stream.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


# key -> (what it must be, check)
_LAYOUT = {
    "step": ("an int >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "config": ("a dict of config fields", lambda v: isinstance(v, dict)),
    "world_size": ("an int >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "model": ("a dict of tensors", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())),
    "optimizers": ("a list of 2 optimizer states", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(s, dict) and "state" in s and "param_groups" in s for s in v)),
    "data": ("a dict (the data position)", lambda v: isinstance(v, dict)),
    "rng": ("a dict with a 'torch' byte tensor", lambda v: isinstance(v, dict) and isinstance(
        v.get("torch"), torch.Tensor) and v["torch"].dtype == torch.uint8
        and isinstance(v.get("cuda", []), (list, tuple))),
}


def check_layout(ckpt, where: str, required_config=()) -> dict:
    """Every field a resume reads, with its type, or SetupError naming the first one that is wrong.

    ``required_config``: config fields the checkpoint must hold (those that shape the model and the
    batch); any other missing field takes its preset's value, as in a fresh run.
    """
    if not isinstance(ckpt, dict):
        raise SetupError(f"{where}: not a speedrun checkpoint (it holds a {type(ckpt).__name__}, expected a dict)")
    for key, (expected, ok) in _LAYOUT.items():
        if key not in ckpt:
            raise SetupError(f"{where}: not a complete speedrun checkpoint: it has no {key!r} "
                             f"(found: {', '.join(map(str, ckpt)) or 'nothing'})")
        if not ok(ckpt[key]):
            raise SetupError(f"{where}: checkpoint field {key!r} is not {expected}")
    from speedrun.config import PRESETS, Config, build_config  # config imports data, which imports this
    cfg = ckpt["config"]
    names = {f for f in Config.__dataclass_fields__}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise SetupError(f"{where}: the checkpoint's config has fields this trainer does not know: "
                         f"{', '.join(unknown)} (written by another version?)")
    if cfg.get("preset") not in PRESETS:
        raise SetupError(f"{where}: the checkpoint's config has preset {cfg.get('preset')!r}, "
                         f"expected one of {', '.join(PRESETS)}")
    missing = [name for name in required_config if name not in cfg]
    if missing:
        raise SetupError(f"{where}: the checkpoint's config lacks {', '.join(missing)}")
    try:
        build_config(cfg["preset"], {}, base=cfg)
    except (ValueError, TypeError) as e:
        raise SetupError(f"{where}: the checkpoint's config is invalid: {e}") from None
    return ckpt


def load_checkpoint(path, required_config=()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise SetupError(f"--resume {path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    return check_layout(ckpt, f"--resume {path}", required_config)


def peek_step(path) -> int | None:
    """The step of a checkpoint file without reading its tensors (None when it cannot be read)."""
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:
        return None
    return step if isinstance(step, int) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().replace("\n\t", " ").splitlines()
    return f"{text[0]}{' ...' if len(text) > 1 else ''}" if text else type(e).__name__


def restore(ckpt: dict, model, optimizers, stream, world_size: int, say, source="the checkpoint") -> int:
    """Load a checked checkpoint into the run; a part that does not fit is a SetupError naming it.

    The optimizers' hyperparameters stay this run's (a resumed run may change a learning rate);
    only their state (moments, momentum buffers, step counts) comes from the checkpoint.
    """
    where = f"--resume {source}"
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise SetupError(f"{where}: the model weights do not fit this config: {_first_line(e)}") from None
    for opt, state in zip(optimizers, ckpt["optimizers"]):
        mine = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            opt.load_state_dict(state)
        except Exception as e:
            raise SetupError(f"{where}: the {type(opt).__name__} state does not fit: {_first_line(e)}") from None
        for group, hyper in zip(opt.param_groups, mine):
            group.update(hyper)
    try:
        stream.load_state_dict(ckpt["data"])
    except SetupError:
        raise
    except Exception as e:
        raise SetupError(f"{where}: data position: {_first_line(e)}") from None
    try:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except Exception as e:
        raise SetupError(f"{where}: the saved random state is unusable: {_first_line(e)}") from None
    if ckpt["world_size"] != world_size:
        say(f"note: the checkpoint was written by {ckpt['world_size']} process(es), this run has {world_size}; "
            "each step takes the same tokens (the stream is step-based), but the gradients are summed in "
            "another order, so the losses match an uninterrupted run only to float rounding")
    return int(ckpt["step"])


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S") if isinstance(
        started, (int, float)) else "an unknown time"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {when}"


def take_lock(lock: Path) -> dict:
    """Create ``lock`` holding this process's pid and host, or SetupError saying who holds it."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    tmp = lock.with_name(f"{lock.name}.{me['pid']}.tmp")
    tmp.write_text(json.dumps(me) + "\n")
    try:
        try:
            os.link(tmp, lock)  # atomic, and the lock is never seen empty
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
    except FileExistsError:
        raise SetupError(_held_message(lock)) from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(lock.parent)
    return me


def _held_message(lock: Path) -> str:
    out = lock.parent
    try:
        owner = json.loads(lock.read_text())
        assert isinstance(owner, dict)
    except (OSError, ValueError, AssertionError):
        owner = None
    clear = f"  rm {lock}"
    if owner is None:
        return (f"{lock} exists but names no owner (a run was killed while taking it?). If no run is using "
                f"{out}, clear it with:{clear}")
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        cont = (f" (to continue the run: {resume_command(out / CHECKPOINT)})"
                if (out / CHECKPOINT).exists() else "")
        return (f"{lock} is stale: it was taken by {_describe(owner)}, which is no longer running (killed?). "
                f"If no run is using {out}, clear it with:{clear}  and start again{cont}")
    if owner.get("host") != socket.gethostname():
        return (f"{out} is locked by {_describe(owner)}. If that run has ended, clear the lock with:{clear}")
    return (f"{out} is in use by another run ({_describe(owner)}; see {lock}). Wait for it to finish, "
            f"or pick another --out (if pid {pid} is not a training run, its pid was reused and the lock "
            f"is stale:{clear})")


# ---------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------

_open_dirs: list["RunDir"] = []


def close_all() -> None:
    """Release the lock of every run directory this process opened (main's finally)."""
    while _open_dirs:
        _open_dirs.pop().close()


class RunDir:
    """--out for one run: taken (locked) on rank 0, checked against clobbering, then the checkpoints' home.

    Every rank builds one; only rank 0 touches the disk. A refusal on rank 0 is broadcast,
    so every rank stops with exit code 2 instead of waiting on a collective.
    """

    def __init__(self, out, resume: str | None, overwrite: bool, master: bool, device, say=print):
        self.out, self.say = Path(out), say
        self.ckpt_path, self.prev_path, self.lock_path = self.out / CHECKPOINT, self.out / PREVIOUS, self.out / LOCK
        # What this run knows of the files: the step each holds, None when absent or not ours.
        self.current: int | None = None
        self.previous: int | None = None
        self.external: tuple[Path, int] | None = None
        self._owner, self._old_sigterm = None, None
        failure = None
        if master:
            try:
                self._open(resume, overwrite)
            except Exception as e:
                failure = e
                self.close()
        if dist.is_initialized():
            flag = torch.tensor([failure is not None], dtype=torch.int32, device=device)
            dist.broadcast(flag, 0)
            if flag.item() and not master:
                raise SetupError(f"rank 0 could not open the run directory {self.out} (its message says why)")
        if failure is not None:
            raise failure

    # -- opening ----------------------------------------------------------------

    def _open(self, resume: str | None, overwrite: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._owner = take_lock(self.lock_path)
        _open_dirs.append(self)
        if threading.current_thread() is threading.main_thread():
            # torchrun and schedulers stop a run with SIGTERM: unwind, so the lock is released
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        for name in RUN_FILES:
            self.out.joinpath(name + ".tmp").unlink(missing_ok=True)  # a killed write's leftovers; we hold the lock
        held = self._held_files()
        resumed_here = resume is not None and self._inside(resume)
        if held and not resumed_here:
            if not overwrite:
                raise SetupError(self._refusal(held, resume))
            for name in RUN_FILES:
                self.out.joinpath(name).unlink(missing_ok=True)
            fsync_dir(self.out)
            self.say(f"--overwrite: deleted {', '.join(held)} in {self.out}")
        if resume is None:
            return
        step = peek_step(resume)
        if not resumed_here:
            self.external = (Path(resume), step)
        elif Path(resume).name == CHECKPOINT:
            self.current = step
            self.previous = peek_step(self.prev_path) if self.prev_path.exists() else None
        else:  # resumed from checkpoint.prev.pt (or another file in out): checkpoint.pt is not this lineage's
            self.previous = step if Path(resume).name == PREVIOUS else None
            if Path(resume).name != PREVIOUS:
                self.external = (Path(resume), step)
            if self.ckpt_path.exists():
                newer = peek_step(self.ckpt_path)
                self.say(f"note: resuming from step {step}; {self.ckpt_path} (step {newer}) is not on this run's "
                         "path and is replaced at its first checkpoint")

    def _inside(self, path) -> bool:
        try:
            return Path(path).resolve().parent == self.out.resolve()
        except OSError:
            return False

    def _held_files(self) -> list[str]:
        held = []
        for name in RUN_FILES:
            p = self.out / name
            if p.exists() and (name != LOG or p.stat().st_size > 0):
                held.append(name)
        return held

    def _refusal(self, held: list[str], resume: str | None) -> str:
        what = []
        for name in held:
            step = peek_step(self.out / name) if name != LOG else None
            what.append(f"{name} at step {step}" if step is not None else name)
        found = f"--out {self.out} already holds a run: {', '.join(what)}"
        cont = self.ckpt_path if CHECKPOINT in held else self.prev_path if PREVIOUS in held else None
        hint = f"continue it with  {resume_command(cont)}  (add --steps N to train longer), " if cont else ""
        if resume is not None:
            return (f"{found}. Resuming {resume} there would replace it. {hint[:1].upper() + hint[1:]}"
                    f"pick another --out, or pass --overwrite to delete it")
        return (f"{found}. A fresh run would replace it. {hint[:1].upper() + hint[1:]}"
                f"pass --overwrite to delete it and start over, or pick another --out")

    # -- checkpoints --------------------------------------------------------------

    def save(self, step: int, state: dict) -> None:
        """checkpoint.pt <- state; the checkpoint it replaces becomes checkpoint.prev.pt (rank 0 only).

        The replaced checkpoint has trained at least one finite step since (a save comes after
        a finite loss), so prev is always known good. checkpoint.pt stays whole throughout: the
        new file is complete and fsynced before it replaces the old, and prev is made by a hard
        link (no copy, and no moment without a checkpoint.pt).
        """
        new, tmp_prev = self.out / (CHECKPOINT + ".tmp"), self.out / (PREVIOUS + ".tmp")
        try:
            _write_temp(new, lambda f: torch.save(state, f))
            if self.current is not None and self.ckpt_path.exists():
                tmp_prev.unlink(missing_ok=True)
                try:
                    os.link(self.ckpt_path, tmp_prev)
                except OSError:  # no hard links here: a copy (the space of one more checkpoint)
                    shutil.copyfile(self.ckpt_path, tmp_prev)
                os.replace(tmp_prev, self.prev_path)
                fsync_dir(self.out)
                self.previous = self.current
            os.replace(new, self.ckpt_path)
        except BaseException as e:
            new.unlink(missing_ok=True)
            tmp_prev.unlink(missing_ok=True)
            if not _no_space(e):
                raise
            known = self._newest()
            kept = (f"{known[0]} (step {known[1]}) is as it was. Free some space, then continue with  "
                    f"{resume_command(known[0])}" if known else
                    "this run has no earlier checkpoint. Free some space and start again with --overwrite")
            raise SetupError(f"no space left on {self.out} (writing the step-{step} checkpoint); "
                             f"the partial {new.name} was deleted and {kept}") from None
        fsync_dir(self.out)
        self.current = step

    def _newest(self, before: float = float("inf")) -> tuple[Path, int] | None:
        """The newest checkpoint of this run on disk with a step < ``before``."""
        candidates = [(self.ckpt_path, self.current), (self.prev_path, self.previous)]
        if self.external:
            candidates.append(self.external)
        for path, step in candidates:
            if step is not None and step < before and Path(path).exists():
                return Path(path), step
        return None

    def last_good(self, weights_of_step: int) -> tuple[Path, int] | None:
        """The newest checkpoint known to give finite losses, given that the weights after
        step ``weights_of_step`` gave a non-finite one: any older checkpoint trained a finite
        step after it (the losses up to there were finite)."""
        return self._newest(before=weights_of_step)

    def close(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if self._owner is not None:
            try:
                if json.loads(self.lock_path.read_text()) == self._owner:
                    self.lock_path.unlink()
            except (OSError, ValueError):
                pass
            self._owner = None
        if self in _open_dirs:
            _open_dirs.remove(self)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
