"""The speedrun trainer: the record's GPT, Muon + Adam, evaluation, checkpoints.

    python -m speedrun.train_gpt --preset {record,cpu-demo,smoke} [--steps N] [--seed S] [--out DIR]
        [--backend {auto,reference,triton,cuda}] [--resume CKPT] [--overwrite] [--data DIR] [--<config field>=VALUE ...]

Single process, or one process per GPU under torchrun (see run.sh). Writes
DIR/log.jsonl (one JSON object per step), DIR/checkpoint.pt (at the end and
every --checkpoint_every steps; the one before it is kept as checkpoint.prev.pt)
and DIR/plot.png (speedrun.plot, at the end), under DIR/run.lock
(speedrun/checkpoint.py). Exit codes: 0 done, 2 bad input or setup, 3 non-finite
loss (the message names the checkpoint known to be good).

On CUDA the model is compiled and warmed up (untimed) before the first step;
``train_time`` is counted as the record counts it (validation excluded) and
progress lines start with the record's form, ``step:N/1770 val_loss:X
train_time:Tms step_avg:Ams``, so a run compares line by line with its log.
The host reads the losses only every --log_every steps (one wait per read).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
from speedrun import data
from speedrun.checkpoint import LOG, RunDir, SetupError, checkpoint_state, close_all, load_checkpoint, resume_command, \
    restore, write_text_durably
from speedrun.config import PRESETS, Config, build_config, check_device, parse_overrides, synthetic_spec
from speedrun.grad_sync import GradSync, all_reduce_mean, broadcast_parameters, world
from speedrun.grad_sync import close_all as close_grad_syncs
from speedrun.sharded_optim import ShardedAdam, ShardedMuon
from speedrun.model import GPT

# Fields a resumed run may not change: they define the parameters or the token stream.
FROZEN_ON_RESUME = ("vocab_size", "num_layers", "model_dim", "num_heads", "head_dim", "mlp_ratio",
                    "num_value_embeds", "no_attention_layers", "dtype", "seq_len", "batch_tokens")


# ---------------------------------------------------------------------------
# Schedules (progress = completed steps / num_steps, in [0, 1])
# ---------------------------------------------------------------------------

def lr_multiplier(progress: float, cooldown_frac: float, final_frac: float) -> float:
    """1 until the last ``cooldown_frac`` of training, then linear down to ``final_frac``."""
    if cooldown_frac <= 0 or progress < 1 - cooldown_frac:
        return 1.0
    w = (1 - progress) / cooldown_frac
    return w + (1 - w) * final_frac


def window_blocks(progress: float, max_tokens: int, block: int) -> int:
    """Window warm-up: the next multiple of ``block`` at or above max_tokens*progress (at least one block)."""
    return max(1, math.ceil(max_tokens * progress / block))


def muon_momentum(step: int, cfg) -> float:
    frac = min(step / cfg.muon_momentum_warmup, 1.0) if cfg.muon_momentum_warmup > 0 else 1.0
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

def _fields_help() -> str:
    defaults = Config()
    return "config fields (record defaults): " + ", ".join(
        f"{f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(Config))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m speedrun.train_gpt", description="Train the speedrun GPT.",
        epilog="Any config field can be overridden with --name=value (e.g. --model_dim=128 --val_every=50). "
               + _fields_help())
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: record")
    parser.add_argument("--resume", default=None, help="checkpoint.pt to continue from (its config is the base)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds a run, deleting its checkpoints and log")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (num_steps)")
    parser.add_argument("--seed", type=int, default=None, help="model init seed")
    parser.add_argument("--out", default=None, help="output directory (default runs/<preset>)")
    parser.add_argument("--backend", choices=["auto", "reference", "triton", "cuda"], default=None,
                        help="kernels backend for every op (auto: $KERNELS_BACKEND or the best here)")
    parser.add_argument("--data", default=None, help="directory of *_train_*.bin / *_val_*.bin shards (data_dir); "
                        "the synthetic corpus is written there only with --synthetic=true")
    known, rest = parser.parse_known_args(argv)
    named = {"num_steps": known.steps, "seed": known.seed, "out": known.out, "backend": known.backend,
             "data_dir": known.data}
    overrides = {**parse_overrides(rest), **{k: v for k, v in named.items() if v is not None}}
    if known.data is not None:
        # --data names shards to train on; only an explicit --synthetic=true writes the synthetic corpus there.
        overrides.setdefault("synthetic", False)
    base = None
    if known.resume:
        ckpt = load_checkpoint(known.resume, FROZEN_ON_RESUME)
        base = ckpt["config"]
        if known.preset and known.preset != base["preset"]:
            raise SetupError(f"--preset {known.preset} differs from the checkpoint's preset {base['preset']!r}")
        for name in FROZEN_ON_RESUME:
            if name in overrides and overrides[name] != base[name]:
                raise SetupError(f"--{name}={overrides[name]!r} differs from the checkpoint's {base[name]!r}; "
                                 "a resumed run keeps its model and batch shape")
    else:
        ckpt = None
    cfg = build_config(known.preset or (base["preset"] if base else "record"), overrides, base=base)
    return cfg, ckpt, known.resume, known.overwrite


def setup_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process.

    ``timeout_s`` bounds every collective: a rank that dies makes the others fail
    after at most this long instead of hanging (gloo usually notices the closed
    connection at once).
    """
    use_cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    rank, world_size = world()
    return rank, world_size, device


def prepare_data(cfg, rank: int, say) -> tuple[list[Path], list[Path], dict | None]:
    data_dir = Path(cfg.data_dir)
    if cfg.synthetic:
        if rank == 0:
            data.ensure_synthetic(data_dir, synthetic_spec(cfg), log=say)
        if dist.is_initialized():
            dist.barrier()
    train_files, val_files = data.list_shards(data_dir, "train"), data.list_shards(data_dir, "val")
    if not train_files or not val_files:
        missing = "directory does not exist" if not data_dir.is_dir() else (
            f"no {'training' if not train_files else 'validation'} shards (*_train_*.bin / *_val_*.bin) in it")
        raise SetupError(f"data dir {data_dir}: {missing}; download the FineWeb shards with "
                         f"`{data.download_command(data_dir)}`, or train on the embedded synthetic corpus with "
                         "`bash run.sh --preset cpu-demo`")
    for f in train_files + val_files:
        data.read_header(f)  # a corrupt shard fails here, named, before any training
    return train_files, val_files, data.read_source_info(data_dir)  # None unless a synthetic corpus


def data_identity(val_shards: list, source: dict | None) -> dict:
    """What, besides the training shards, makes the data of a run: the validation shards
    (``data.shard_identity``), and the spec of the synthetic corpus when the data dir holds one
    (``source``: its synthetic_source.json)."""
    return {"val_shards": val_shards, "synthetic": source["spec"] if source else None}


def build_optimizers(model: GPT, cfg) -> tuple[list[torch.optim.Optimizer], GradSync]:
    """Adam and Muon, each sharded over the ranks, fed by one GradSync (its buckets, its hooks).

    With one process the shards are whole and no collective runs: the updates are
    those of torch.optim.Adam and kernels.muon.Muon, bit for bit (tests/test_grad_sync.py).
    """
    groups = model.param_groups()
    grad_sync = GradSync(bucket_bytes=max(1, int(cfg.bucket_mb * 2**20)), overlap=cfg.overlap_comm)
    adam_groups = [dict(params=groups["head"], lr=cfg.lr_head), dict(params=groups["embed"], lr=cfg.lr_embed),
                   dict(params=groups["scalar"], lr=cfg.lr_scalar)]
    adam = ShardedAdam(adam_groups, grad_sync, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    muon = ShardedMuon(groups["muon"], grad_sync, lr=cfg.lr_muon, momentum=cfg.muon_momentum, nesterov=True,
                       ns_steps=cfg.ns_steps, coefficients="quintic",
                       backend=None if cfg.backend == "auto" else cfg.backend)
    grad_sync.build(model.parameters())
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers, grad_sync


# ---------------------------------------------------------------------------
# The log (checkpoints and the run directory: speedrun/checkpoint.py)
# ---------------------------------------------------------------------------

class JsonlLog:
    """DIR/log.jsonl: a fresh run truncates it; a resumed run keeps the entries up to its start step."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.last_kept: dict = {}  # the resumed run's last entry (its train_time_ms continues)
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    if entry.get("step", 0) <= start_step:
                        kept.append(line)
                        self.last_kept = entry
                except (ValueError, AttributeError):
                    continue
        write_text_durably(path, "".join(line + "\n" for line in kept))  # a crash here keeps the old log

    def write(self, *entries: dict) -> None:
        if self.enabled and entries:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(entry) + "\n" for entry in entries))


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def evaluate(model, cfg, val_stream: data.TokenStream, world_size: int, device, window) -> float:
    """Mean loss over exactly val_tokens validation tokens, whatever the number of ranks.

    The validation set is the stream's first step: one window of val_tokens (+1) cut into
    val_seq_len sequences, dealt round-robin to the ranks (with more ranks than a whole
    number of rounds needs, the last round leaves some ranks idle). The loss is the mean of
    the sequences' mean losses, i.e. the mean over the tokens, as the record computes it.
    """
    val_stream.reset()
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    with torch.no_grad():
        for window_tokens in val_stream.next_windows():
            inputs, targets = data.to_device(window_tokens, device)
            total += model(inputs, targets, window)
    model.train()
    if world_size > 1:
        dist.all_reduce(total)
    return float(total / (cfg.val_tokens // cfg.val_seq_len))


def approx_flops_per_token(model: GPT, cfg, window: int) -> float:
    """6N for the matmuls plus attention (QKᵀ and PV, forward and backward) over ~half the window."""
    attn_layers = [i for i in range(cfg.num_layers) if i not in cfg.no_attention_layers]
    ctx = [min(cfg.seq_len, cfg.attn_block * (window if cfg.window_pattern[i] == "L" else max(1, window // 2))) / 2
           for i in attn_layers]
    return 6 * model.matmul_params() + sum(12 * c * cfg.num_heads * cfg.head_dim for c in ctx)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

class TrainClock:
    """``train_time`` as the record counts it: wall time of the training steps only.

    The clock stops (after waiting for the device) for validation, checkpoints and the
    periodic log reads, and restarts after them; warm-up runs before it starts.
    """

    def __init__(self, device: torch.device, start_s: float = 0.0):
        self.device, self.total, self.t0 = device, start_s, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        if self.t0 is not None:
            self.total += time.perf_counter() - self.t0
            self.t0 = None
        return self.total


class StepTimer:
    """Per-step device time without waiting: CUDA events on a GPU (read at the next log read), else the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1000.0 * (end - start)


def record_line(step: int, num_steps: int, train_time_ms: float, timed_steps: int, val_loss=None) -> str:
    """The record's log line: step:N/1770 [val_loss:X] train_time:Tms step_avg:Ams."""
    val = f" val_loss:{val_loss:.4f}" if val_loss is not None else ""
    return (f"step:{step}/{num_steps}{val} train_time:{train_time_ms:.0f}ms "
            f"step_avg:{train_time_ms / max(timed_steps, 1):.2f}ms")


def train(cfg, ckpt: dict | None, resume_path: str | None, overwrite: bool = False) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world_size, device = setup_distributed(cfg.dist_timeout_s)
    master = rank == 0

    def say(msg: str) -> None:
        if master:
            print(msg, flush=True)

    check_device(cfg, device)
    accum = cfg.grad_accum(world_size)
    out = Path(cfg.out)
    run_dir = RunDir(out, resume_path, overwrite, master, device, say)  # locked, never clobbered
    train_files, val_files, source = prepare_data(cfg, rank, say)
    val_shards = data.shard_identity(val_files)
    if not any(n > cfg.val_tokens + 1 for _, n in val_shards):
        raise SetupError(f"--val_tokens={cfg.val_tokens}: no validation shard in {cfg.data_dir} can hold them "
                         f"(a shard needs more than {cfg.val_tokens + 1} tokens; the largest has "
                         f"{max(n for _, n in val_shards)}); lower --val_tokens")
    if device.type == "cuda":
        kernels.set_target_checks(False)  # token ids are checked per shard by the reader instead
    pin = device.type == "cuda"
    val_stream = data.TokenStream(val_files, cfg.val_tokens, cfg.val_seq_len, rank, world_size, cfg.vocab_size,
                                  wrap=False, pin_memory=pin)

    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    broadcast_parameters(model)
    optimizers, grad_sync = build_optimizers(model, cfg)
    stream = data.TokenStream(train_files, cfg.batch_tokens, cfg.seq_len, rank, world_size, cfg.vocab_size,
                              identity=data_identity(val_shards, source), allow_data_change=cfg.allow_data_change,
                              pin_memory=pin)
    step = restore(ckpt, model, optimizers, stream, world_size, say, resume_path) if ckpt else 0
    start_step = step
    if stream.changes:
        say("warning: resuming on other data than the checkpoint's (--allow_data_change): "
            + "; ".join(stream.changes))
    compile_backend = cfg.compile_backend(device.type)
    run_model = torch.compile(model, dynamic=False, backend=compile_backend) if compile_backend else model
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps >= 0 else (10 if device.type == "cuda" else 0)
    log = JsonlLog(out / LOG, step, master)
    ckpt_path = run_dir.ckpt_path

    n_params = sum(p.numel() for p in model.parameters())
    say(f"speedrun {cfg.preset}: {n_params / 1e6:.1f}M parameters, {cfg.num_steps} steps of {cfg.batch_tokens} tokens "
        f"({world_size} process(es) x {accum} micro-step(s) x {cfg.seq_len}), device {device}, "
        f"kernels backend {cfg.backend}, attention {model.attention_kind(device)}, "
        f"compile {compile_backend or 'off'}, warm-up {warmup_steps} step(s), data {cfg.data_dir} "
        f"({len(train_files)} train shard(s)), out {out}" + (f", resumed at step {step}" if step else ""))
    if source:
        say(f"synthetic source: entropy {source['entropy_nats_per_token']:.4f} nats/token (the lowest reachable "
            f"val loss); {source.get('bigram_floor', float('nan')):.4f} without attending past the last token")

    windows: dict[int, torch.Tensor] = {}

    def window_tensor(blocks: int) -> torch.Tensor:
        # A tensor, so that the compiled model takes every window size without recompiling.
        if blocks not in windows:
            windows[blocks] = torch.tensor(blocks, dtype=torch.int32, device=device)
        return windows[blocks]

    def train_step(at_step: int, inject_nan: bool) -> tuple[torch.Tensor, int, float]:
        """One optimizer step on the schedule of step ``at_step`` (0-based) -> (summed loss of this rank, window, lr)."""
        progress = at_step / cfg.num_steps
        window = window_blocks(progress, cfg.window_max_tokens, cfg.attn_block)
        lr_mult = lr_multiplier(progress, cfg.cooldown_frac, cfg.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
        for group in optimizers[1].param_groups:
            group["momentum"] = muon_momentum(at_step, cfg)
        local_loss = torch.zeros((), device=device)
        for micro, (inputs, targets) in enumerate(stream.next_step(device)):
            if micro == accum - 1:
                grad_sync.arm()  # only the last micro-step's backward communicates
            loss = run_model(inputs, targets, window_tensor(window))
            if inject_nan:
                loss = loss * float("nan")
            (loss / accum).backward()  # the record's gradient scale: sum over tokens, mean over 8 passes
            local_loss += loss.detach()
        grad_sync.finish()  # launches what backward did not (all of it with --overlap_comm=false)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return local_loss, window, lr_mult

    def warm_up(n: int) -> float:
        """n untimed steps (compilation, autotuning, allocator growth), then every state put back as it was."""
        t = time.perf_counter()
        # What a checkpoint holds, put back as a resume would; the optimizer states are copies (a collective:
        # gathered shards), the weights are copied here (training updates them in place).
        saved = checkpoint_state(step, model, [opt.state_dict() for opt in optimizers], stream, cfg, world_size)
        saved["model"] = {k: v.detach().clone() for k, v in saved["model"].items()}
        for _ in range(n):
            train_step(step, inject_nan=False)
        restore(saved, model, optimizers, stream, world_size, say, source="the warm-up's snapshot")
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    def checkpoint(at_step: int) -> None:
        states = [opt.state_dict() for opt in optimizers]  # a collective: the shards are gathered
        if master:
            run_dir.save(at_step, checkpoint_state(at_step, model, states, stream, cfg, world_size))
        if dist.is_initialized():
            dist.barrier()

    def stop_non_finite(at_step: int, what: str, value: float) -> int:
        # the train loss of step k comes from the weights after step k-1, the val loss from those after k
        weights_of = at_step - 1 if what == "train loss" else at_step
        good = run_dir.last_good(weights_of)
        if good:
            kept = (f"The last good checkpoint is {good[0]} (step {good[1]}; its weights gave finite losses)"
                    + (f", not {ckpt_path} (step {weights_of}), whose weights gave this loss"
                       if run_dir.current == weights_of else "")
                    + f". Continue from it with  {resume_command(good[0])}  and a lower learning rate, e.g. "
                      f"--lr_muon={min(cfg.lr_muon / 2, Config.lr_muon):g} (the same settings would diverge again)")
        else:
            kept = ("no checkpoint known to be good was written before it"
                    + (" (use --checkpoint_every)" if not cfg.checkpoint_every else ""))
        message = f"step {at_step}: {what} is {value} (not finite); stopping. {kept}"
        say(message)
        record_exit(3, message)
        log.write({"step": at_step, "train_loss": None, "error": f"non-finite {what}"})
        return 3

    if warmup_steps:
        say(f"warm-up: {warmup_steps} untimed step(s) in {warm_up(warmup_steps):.1f} s "
            "(model, optimizer and data state restored)")

    # train_time continues over a resume when the log has it; step_avg divides by the steps it covers.
    clock = TrainClock(device, start_s=log.last_kept.get("train_time_ms", 0.0) / 1000 if step else 0.0)
    timed_from = 0 if (step == 0 or "train_time_ms" in log.last_kept) else step
    timer = StepTimer(device)
    flops_per_step = {}
    recent_ms = collections.deque(maxlen=20)
    unit = "GPU" if device.type == "cuda" else "process"

    val_loss = None
    if step == 0 and cfg.val_at_start:
        window = window_blocks(0.0, cfg.window_max_tokens, cfg.attn_block)
        val_loss = evaluate(run_model, cfg, val_stream, world_size, device, window_tensor(window))
        say(record_line(0, cfg.num_steps, 0.0, 0, val_loss) + f" | {cfg.val_tokens} val tokens")
        log.write({"step": 0, "val_loss": val_loss, "tokens": 0, "train_time_ms": 0.0})

    pending = []  # the steps since the last log read: their losses stay on the device until then
    clock.start()
    while step < cfg.num_steps:
        t_start = timer.mark()
        local_loss, window, lr_mult = train_step(step, inject_nan=step + 1 == cfg.inject_nan_step)
        step += 1
        record = {"step": step, "loss": local_loss, "lr": lr_mult, "window": window, "t": (t_start, timer.mark())}
        if device.type == "cuda":  # host-side counters: no wait
            record["mem"] = (torch.cuda.max_memory_allocated(device) / 2**20,
                             torch.cuda.max_memory_reserved(device) / 2**20)
        else:
            record["comm"] = grad_sync.timings()  # host clocks: ready now
        pending.append(record)

        is_val = step % cfg.val_every == 0 or step == cfg.num_steps
        is_ckpt = step == cfg.num_steps or step == cfg.stop_after or (
            cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if not (is_val or is_ckpt or step % cfg.log_every == 0):
            continue

        # --- the one host read of the losses since the last one (the clock stops: train_time excludes it)
        train_time = clock.stop()
        losses = all_reduce_mean(torch.stack([r["loss"] for r in pending])).tolist()
        entries, later_ms = [], 0.0
        step_ms = [timer.ms(*r["t"]) for r in pending]
        for i in reversed(range(len(pending))):  # train_time at each step: the read's, less the later steps
            r, dt = pending[i], step_ms[i] / 1000
            entry = {"step": r["step"], "train_loss": losses[i] / (accum * cfg.seq_len), "lr": r["lr"],
                     "step_ms": step_ms[i], "train_time_ms": 1000 * train_time - later_ms,
                     "tokens": r["step"] * cfg.batch_tokens, "tokens_per_s": cfg.batch_tokens / dt,
                     "tokens_per_s_per_rank": cfg.batch_tokens / dt / world_size, "window_blocks": r["window"]}
            later_ms += step_ms[i]
            entry.update(r.get("comm") or (grad_sync.timings() if i == len(pending) - 1 else {}))
            if "mem" in r:
                if r["window"] not in flops_per_step:
                    flops_per_step[r["window"]] = approx_flops_per_token(model, cfg, r["window"]) * cfg.batch_tokens
                entry["mfu"] = flops_per_step[r["window"]] / dt / (cfg.peak_tflops * 1e12 * world_size)
                entry["mem_alloc_mib"], entry["mem_reserved_mib"] = r["mem"]
            entries.append(entry)
        entries.reverse()
        recent_ms.extend(ms for r, ms in zip(pending, step_ms) if r["step"] > start_step + 1)  # not the first step
        pending = []
        bad = next((e for e in entries if not math.isfinite(e["train_loss"])), None)
        if bad is not None:
            log.write(*entries[:entries.index(bad)])
            return stop_non_finite(bad["step"], "train loss", bad["train_loss"])
        last = entries[-1]
        if is_val:
            final_window = window_blocks(step / cfg.num_steps, cfg.window_max_tokens, cfg.attn_block)
            val_loss = evaluate(run_model, cfg, val_stream, world_size, device, window_tensor(final_window))
            last["val_loss"] = val_loss
        log.write(*entries)

        line = record_line(step, cfg.num_steps, 1000 * train_time, step - timed_from, last.get("val_loss"))
        eta = (cfg.num_steps - step) * (sum(recent_ms) / len(recent_ms) if recent_ms else last["step_ms"]) / 1000
        line += (f" | loss {last['train_loss']:.4f} | {last['step_ms']:.0f} ms | "
                 f"{last['tokens_per_s_per_rank'] / 1000:.1f}k tok/s/{unit} | ETA {fmt_time(eta)}")
        if world_size > 1 and "comm_total_ms" in last:
            line += f" | comm {last['comm_exposed_ms']:.0f}/{last['comm_total_ms']:.0f} ms exposed"
        if "mfu" in last:
            line += (f" | MFU {100 * last['mfu']:.1f}% | mem {last['mem_alloc_mib']:.0f}/"
                     f"{last['mem_reserved_mib']:.0f} MiB")
        say(line)
        if is_val and not math.isfinite(val_loss):
            return stop_non_finite(step, "val loss", val_loss)

        if is_ckpt:
            checkpoint(step)
        if step == cfg.stop_after and step < cfg.num_steps:
            say(f"stopped after step {step} as asked (--stop_after); continue with  {resume_command(ckpt_path)}")
            return 0
        clock.start()

    if val_loss is None:
        say(f"nothing to do: the run is already at step {step} of {cfg.num_steps}; to train longer: "
            f" {resume_command(resume_path or ckpt_path, f' --steps {2 * step}')}")
        return 0
    train_time = clock.total
    timed = max(step - timed_from, 1)
    say(f"done: {step} steps, {fmt_time(train_time)} of training, final val loss {val_loss:.4f}, checkpoint {ckpt_path}")
    summary = (f"train_time {train_time:.1f} s, step_avg {1000 * train_time / timed:.2f} ms, "
               f"{cfg.batch_tokens * timed / train_time / world_size / 1000:.1f}k tokens/s per {unit}")
    if device.type == "cuda":
        summary += (f", peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
                    f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
    say(summary + " (the record: 178.6 s, 100.97 ms/step, ~487k tokens/s per GPU, 30724 MiB allocated)")
    if source:
        H = source["entropy_nats_per_token"]
        say(f"final val loss {val_loss:.4f} nats | source entropy {H:.4f} nats/token "
            f"(true model on these val tokens: {source['val_oracle_loss']:.4f}) | gap {val_loss - H:+.4f}")
    if master:
        where = f"log {log.path}"
        if cfg.plot:
            from speedrun import plot
            try:
                where += f", plot {plot.write_plot([out], out / 'plot.png')}"
            except plot.PlotError as e:
                where += f" (no plot: {e})"
        say(f"{where}; compare runs with: python -m speedrun.plot {out} OTHER_RUN_DIR ...")
    return 0


def record_exit(code: int, message: str) -> None:
    """Leave this worker's exit code and one-line message for speedrun.launch (multi-process run.sh)."""
    exit_dir = os.environ.get("SPEEDRUN_EXIT_DIR")
    if not exit_dir or code == 0:
        return
    path = Path(exit_dir) / f"rank{os.environ.get('RANK', '0')}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"code": code, "message": message, "time": time.time()}))
    os.replace(tmp, path)


def _distributed_reason(e: BaseException) -> str | None:
    """The first line of a failed collective or rendezvous (gloo raises a plain RuntimeError), else None."""
    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "nccl", "ProcessGroup"))):
        return None
    return re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(e).__name__)


def main(argv=None) -> int:
    def fail(msg: str, rank_prefix: bool = True) -> int:
        rank, world_size = world()
        prefix = f"[rank {rank}] " if world_size > 1 and rank_prefix else ""
        message = f"{prefix}error: {msg}"
        print(message, file=sys.stderr, flush=True)
        record_exit(2, message)
        return 2

    try:
        cfg, ckpt, resume_path, overwrite = parse_args(sys.argv[1:] if argv is None else argv)
        code = train(cfg, ckpt, resume_path, overwrite)
    except (SetupError, data.ShardError, ValueError, kernels.BackendUnavailable) as e:
        code = fail(str(e))
    except OSError as e:  # a full disk is a SetupError already; this is any other read or write failure
        code = fail(f"{e.filename}: {e.strerror}" if e.filename else str(e) or type(e).__name__)
    except RuntimeError as e:
        reason = _distributed_reason(e)
        if reason is None:
            raise  # a bug: the traceback is the useful message
        code = fail(f"rank {world()[0]}: {reason} (another rank probably stopped first: see its message)",
                    rank_prefix=False)
    finally:
        close_all()  # the run directory's lock
        close_grad_syncs()  # the gloo timer threads, before the process group goes
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
