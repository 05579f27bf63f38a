"""The record preset's training step on this machine's GPUs: compiled against eager.

    python -m benchmarks.bench_trainer [--steps 20] [--modes compiled,eager] [--nproc N] [--backend auto]
        [--data DIR] [--out DIR] [-- EXTRA TRAINER FLAGS]

Runs speedrun.train_gpt (record preset, the record's 393,216-token step, gradient
accumulation on fewer than 8 GPUs) once per mode, each after its untimed warm-up,
and reads the per-step figures from its log.jsonl: median step time, tokens/s
per GPU, MFU and peak memory, beside the record's (8xH100: 100.97 ms per step,
~487K tokens/s per GPU, 30,724 MiB allocated) and the napkin-math floor (the
step's FLOPs at the datasheet bf16 peak). The targets (issue 16): tokens/s per
GPU >= 487K on one H100/H200, and compiled >= 1.3x eager.

Data: FineWeb shards in --data if given, else the embedded synthetic corpus with
enough tokens for the steps. Each mode costs its compilation (about a minute
compiled) plus warm-up, steps and one short validation.

Under ``python -m benchmarks.run_all`` it skips itself on a CPU, under --smoke and
with less than 7 minutes of budget left (run it directly for the figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import child_env

ROOT = Path(__file__).resolve().parent.parent
RECORD = {"step_ms_8gpu": 100.97, "tokens_per_s_per_gpu": 487e3, "mem_alloc_mib": 30724}
TARGET_TOKENS_PER_S, TARGET_SPEEDUP = 487e3, 1.3
STEP_TOKENS = 8 * 48 * 1024


def trainer_command(mode: str, steps: int, nproc: int, backend: str, data_dir: Path, synthetic: bool,
                    out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "speedrun.train_gpt", "--preset", "record", "--steps", str(steps), "--backend", backend,
            "--data", str(data_dir), f"--synthetic={'true' if synthetic else 'false'}", "--out", str(out),
            f"--compile={'true' if mode == 'compiled' else 'false'}", "--warmup_steps=10" if mode == "compiled"
            else "--warmup_steps=3", "--val_at_start=false", f"--val_every={10 * steps}", "--val_tokens=262144",
            "--log_every=5", "--plot=false", *extra]


def summarize(log_path: Path, nproc: int) -> dict:
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    steps = [e for e in entries if "step_ms" in e][1:]  # the first timed step refills the pipeline
    med = lambda key: statistics.median(e[key] for e in steps if key in e)  # noqa: E731
    out = {"steps": len(steps), "step_ms": med("step_ms"), "tokens_per_s_per_gpu": STEP_TOKENS / nproc /
           (med("step_ms") / 1000), "final_train_time_ms": entries[-1].get("train_time_ms")}
    if any("mfu" in e for e in steps):
        out["mfu"] = med("mfu")
        out["mem_alloc_mib"] = max(e["mem_alloc_mib"] for e in steps)
        out["mem_reserved_mib"] = max(e["mem_reserved_mib"] for e in steps)
    return out


def napkin_floor_ms(nproc: int, peak_tflops: float = 989.0) -> float:
    """The step's matmul + attention FLOPs (the trainer's estimate at the mean window) at the bf16 peak."""
    from speedrun.config import build_config
    from speedrun.train_gpt import approx_flops_per_token, window_blocks
    import torch
    from speedrun.model import GPT
    cfg = build_config("record", {})
    with torch.device("meta"):
        model = GPT(cfg)
    windows = [window_blocks(s / cfg.num_steps, cfg.window_max_tokens, cfg.attn_block) for s in range(cfg.num_steps)]
    flops = statistics.mean(approx_flops_per_token(model, cfg, w) for w in windows) * STEP_TOKENS
    return 1000 * flops / (peak_tflops * 1e12 * nproc)


def measure(modes, steps: int, nproc: int, backend: str, data_dir: str | None, workdir: Path,
            extra: list[str]) -> list[dict]:
    env = child_env()
    synthetic = data_dir is None
    if synthetic:
        data_dir = workdir / "synthetic"
        # The trainer writes the corpus for its spec; give it enough tokens for the steps (+ one spare).
        extra = [f"--synth_train_tokens={(steps + 2) * STEP_TOKENS}", "--synth_val_tokens=524288", *extra]
    rows = []
    for mode in modes:
        out = workdir / mode
        cmd = trainer_command(mode, steps, nproc, backend, Path(data_dir), synthetic, out, extra)
        print(f"$ {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("speedrun", "warm-up",
                                                                                       "step:", "train_time"))))
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
            rows.append({"mode": mode, "error": f"trainer exited with {proc.returncode}"})
            continue
        rows.append({"mode": mode, "nproc": nproc, "backend": backend, **summarize(out / "log.jsonl", nproc)})
    return rows


def report(rows: list[dict], nproc: int) -> None:
    floor = napkin_floor_ms(nproc)
    print(f"napkin floor: {floor:.1f} ms per {STEP_TOKENS}-token step on {nproc} GPU(s) at 989 TFLOP/s bf16 "
          f"({STEP_TOKENS / nproc / floor * 1000 / 1e3:.0f}K tokens/s per GPU); the record: "
          f"{RECORD['step_ms_8gpu']} ms on 8 GPUs, {RECORD['tokens_per_s_per_gpu'] / 1e3:.0f}K tokens/s per GPU, "
          f"{RECORD['mem_alloc_mib']} MiB allocated")
    by_mode = {r["mode"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:>8}: {r['error']}")
            continue
        line = (f"{r['mode']:>8}: step {r['step_ms']:.1f} ms (median of {r['steps']}) | "
                f"{r['tokens_per_s_per_gpu'] / 1e3:.1f}K tokens/s per GPU "
                f"({r['tokens_per_s_per_gpu'] / TARGET_TOKENS_PER_S:.2f}x the record's, target >= 1) | "
                f"floor {floor / r['step_ms']:.0%} of the step")
        if "mfu" in r:
            line += f" | MFU {100 * r['mfu']:.1f}% | mem {r['mem_alloc_mib']:.0f}/{r['mem_reserved_mib']:.0f} MiB"
        print(line)
    if "compiled" in by_mode and "eager" in by_mode:
        speedup = by_mode["eager"]["step_ms"] / by_mode["compiled"]["step_ms"]
        print(f"compiled / eager: {speedup:.2f}x (target >= {TARGET_SPEEDUP})")


def run(ctx) -> None:
    """Entry point for benchmarks.run_all (the whole trainer, not one kernel)."""
    if ctx.smoke or ctx.device.type != "cuda":
        print("  bench_trainer: skipped under --smoke / on CPU (the record preset needs a GPU); "
              "run `python -m benchmarks.bench_trainer` on one", flush=True)
        return
    left = ctx.time_left()
    if left is not None and left < 420:
        print(f"  bench_trainer: skipped: {left:.0f} s of budget left, about 420 s needed; "
              "run `python -m benchmarks.bench_trainer` directly", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(["compiled", "eager"], 10, 1, "auto", None, Path(tmp), [])
    report(rows, 1)
    print(json.dumps(rows, indent=1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--records" in argv:  # started by benchmarks.run_all: the shared harness CLI
        from benchmarks import harness
        return harness.main(run, argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (after the warm-up)")
    p.add_argument("--modes", default="compiled,eager")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (processes); the step stays 393,216 tokens")
    p.add_argument("--backend", default="auto", help="kernels backend")
    p.add_argument("--data", default=None, help="FineWeb shards (default: the synthetic corpus)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench_trainer")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_trainer: needs a CUDA GPU (the record preset's shapes); nothing measured", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.modes.split(","), args.steps, args.nproc, args.backend, args.data, args.out, extra)
    report(rows, args.nproc)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
