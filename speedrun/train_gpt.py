"""The speedrun trainer: the record's GPT, Muon + Adam, evaluation, checkpoints.

    python -m speedrun.train_gpt --preset {record,cpu-demo,smoke} [--steps N] [--seed S] [--out DIR]
        [--backend {auto,reference,triton,cuda}] [--resume CKPT] [--overwrite] [--data DIR] [--<config field>=VALUE ...]

Single process, or one process per GPU under torchrun (see run.sh). Writes
DIR/log.jsonl (one JSON object per step) and DIR/checkpoint.pt (at the end and
every --checkpoint_every steps; the one before it is kept as checkpoint.prev.pt),
under DIR/run.lock (speedrun/checkpoint.py). Exit codes: 0 done, 2 bad input or
setup, 3 non-finite loss (the message names the checkpoint known to be good).
"""

from __future__ import annotations

import argparse
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
from speedrun.checkpoint import RunDir, SetupError, checkpoint_state, close_all, load_checkpoint, resume_command, \
    restore, write_text_durably
from speedrun.config import PRESETS, Config, build_config, check_device, parse_overrides
from speedrun.grad_sync import GradSync, all_reduce_mean, broadcast_parameters, world
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


def synthetic_spec(cfg) -> data.SyntheticSpec:
    return data.SyntheticSpec(seed=cfg.synth_seed, vocab=cfg.synth_vocab, order=cfg.synth_order,
                              branching=cfg.synth_branching,
                              mean_doc_len=cfg.synth_doc_len, train_tokens=cfg.synth_train_tokens,
                              val_tokens=cfg.synth_val_tokens)


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
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except ValueError:
                    continue
        write_text_durably(path, "".join(line + "\n" for line in kept))  # a crash here keeps the old log

    def write(self, entry: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def evaluate(model, cfg, val_files, rank: int, world_size: int, device, window: int) -> tuple[float, int]:
    """Mean loss over the first val_tokens validation tokens (rounded down to whole passes)."""
    per_pass = world_size * cfg.val_seq_len
    passes = cfg.val_tokens // per_pass
    stream = data.TokenStream(val_files, per_pass, rank, world_size, cfg.vocab_size, wrap=False)
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for _ in range(passes):
            inputs, targets = stream.next_batch(device)
            total += model(inputs, targets, window)
    model.train()
    return float(all_reduce_mean(total / passes)), passes * per_pass


def approx_flops_per_token(model: GPT, cfg, window: int) -> float:
    """6N for the matmuls plus attention (QKᵀ and PV, forward and backward) over ~half the window."""
    attn_layers = [i for i in range(cfg.num_layers) if i not in cfg.no_attention_layers]
    ctx = [min(cfg.seq_len, cfg.attn_block * (window if cfg.window_pattern[i] == "L" else max(1, window // 2))) / 2
           for i in attn_layers]
    return 6 * model.matmul_params() + sum(12 * c * cfg.num_heads * cfg.head_dim for c in ctx)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

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
    val_passes = cfg.val_tokens // (world_size * cfg.val_seq_len)
    if val_passes < 1:
        raise SetupError(f"--val_tokens={cfg.val_tokens} is less than one validation pass of "
                         f"world_size*val_seq_len = {world_size * cfg.val_seq_len} tokens")
    if data.count_tokens(val_files) < val_passes * world_size * cfg.val_seq_len + 1:
        raise SetupError(f"the validation shards in {cfg.data_dir} hold {data.count_tokens(val_files)} tokens, "
                         f"fewer than --val_tokens={cfg.val_tokens} (+1); lower --val_tokens")
    if device.type == "cuda":
        kernels.set_target_checks(False)  # token ids are checked per shard by the reader instead

    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    broadcast_parameters(model)
    optimizers, grad_sync = build_optimizers(model, cfg)
    stream = data.TokenStream(train_files, world_size * cfg.seq_len, rank, world_size, cfg.vocab_size)
    step = restore(ckpt, model, optimizers, stream, world_size, say, resume_path) if ckpt else 0
    run_model = torch.compile(model, dynamic=False) if cfg.compile else model
    log = JsonlLog(out / "log.jsonl", step, master)
    ckpt_path = run_dir.ckpt_path

    n_params = sum(p.numel() for p in model.parameters())
    say(f"speedrun {cfg.preset}: {n_params / 1e6:.1f}M parameters, {cfg.num_steps} steps of {cfg.batch_tokens} tokens "
        f"({world_size} process(es) x {accum} micro-step(s) x {cfg.seq_len}), device {device}, "
        f"kernels backend {cfg.backend}, attention {model.attention_kind(device)}, data {cfg.data_dir} "
        f"({len(train_files)} train shard(s)), out {out}" + (f", resumed at step {step}" if step else ""))
    if source:
        say(f"synthetic source: entropy {source['entropy_nats_per_token']:.4f} nats/token (the lowest reachable "
            f"val loss); {source.get('bigram_floor', float('nan')):.4f} without attending past the last token")

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

    val_loss = None
    if step == 0 and cfg.val_at_start:
        window = window_blocks(0.0, cfg.window_max_tokens, cfg.attn_block)
        val_loss, n_val = evaluate(run_model, cfg, val_files, rank, world_size, device, window)
        say(f"step {0:>{len(str(cfg.num_steps))}}/{cfg.num_steps} | val loss {val_loss:.4f} ({n_val} tokens)")
        log.write({"step": 0, "val_loss": val_loss, "tokens": 0})

    step_times, train_time = [], 0.0
    while step < cfg.num_steps:
        progress = step / cfg.num_steps
        window = window_blocks(progress, cfg.window_max_tokens, cfg.attn_block)
        lr_mult = lr_multiplier(progress, cfg.cooldown_frac, cfg.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
        for group in optimizers[1].param_groups:
            group["momentum"] = muon_momentum(step, cfg)

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        local_loss = torch.zeros((), device=device)
        for micro in range(accum):
            inputs, targets = stream.next_batch(device)
            if micro == accum - 1:
                grad_sync.arm()  # only the last micro-step's backward communicates
            loss = run_model(inputs, targets, window)
            if step + 1 == cfg.inject_nan_step:
                loss = loss * float("nan")
            (loss / accum).backward()  # the record's gradient scale: sum over tokens, mean over 8 passes
            local_loss += loss.detach()
        grad_sync.finish()  # launches what backward did not (all of it with --overlap_comm=false)
        train_loss = float(all_reduce_mean(local_loss)) / (accum * cfg.seq_len)
        step += 1
        if not math.isfinite(train_loss):
            return stop_non_finite(step, "train loss", train_loss)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        train_time += dt

        entry = {"step": step, "train_loss": train_loss, "lr": lr_mult, "step_ms": 1000 * dt,
                 "tokens": step * cfg.batch_tokens, "tokens_per_s": cfg.batch_tokens / dt, "window_blocks": window,
                 **grad_sync.timings()}
        if device.type == "cuda":
            flops = approx_flops_per_token(model, cfg, window) * cfg.batch_tokens
            entry["mfu"] = flops / dt / (cfg.peak_tflops * 1e12 * world_size)
            entry["mem_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
            entry["mem_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        if step % cfg.val_every == 0 or step == cfg.num_steps:
            final_window = window_blocks(step / cfg.num_steps, cfg.window_max_tokens, cfg.attn_block)
            val_loss, _ = evaluate(run_model, cfg, val_files, rank, world_size, device, final_window)
            entry["val_loss"] = val_loss
        log.write(entry)

        if master and (step % cfg.log_every == 0 or step == cfg.num_steps or "val_loss" in entry):
            recent = step_times[1:][-20:] or step_times  # the first step includes warm-up
            eta = (cfg.num_steps - step) * sum(recent) / len(recent)
            line = (f"step {step:>{len(str(cfg.num_steps))}}/{cfg.num_steps} | loss {train_loss:.4f} | "
                    f"{1000 * dt:.0f} ms | {cfg.batch_tokens / dt / 1000:.1f}k tok/s | ETA {fmt_time(eta)}")
            if "val_loss" in entry:
                line += f" | val loss {val_loss:.4f}"
            if world_size > 1:
                line += f" | comm {entry['comm_exposed_ms']:.0f}/{entry['comm_total_ms']:.0f} ms exposed"
            if "mfu" in entry:
                line += f" | MFU {100 * entry['mfu']:.1f}% | mem {entry['mem_alloc_mib']:.0f} MiB"
            say(line)
        if "val_loss" in entry and not math.isfinite(val_loss):
            return stop_non_finite(step, "val loss", val_loss)

        if step == cfg.num_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or \
                step == cfg.stop_after:
            checkpoint(step)
        if step == cfg.stop_after and step < cfg.num_steps:
            say(f"stopped after step {step} as asked (--stop_after); continue with  {resume_command(ckpt_path)}")
            return 0

    if val_loss is None:
        say(f"nothing to do: the run is already at step {step} of {cfg.num_steps}; to train longer: "
            f" {resume_command(resume_path or ckpt_path, f' --steps {2 * step}')}")
        return 0
    say(f"done: {step} steps, {fmt_time(train_time)} of training, final val loss {val_loss:.4f}, checkpoint {ckpt_path}")
    if source:
        H = source["entropy_nats_per_token"]
        say(f"final val loss {val_loss:.4f} nats | source entropy {H:.4f} nats/token "
            f"(true model on these val tokens: {source['val_oracle_loss']:.4f}) | gap {val_loss - H:+.4f}")
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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
