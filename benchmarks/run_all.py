"""Run every benchmark script and write one report.

    python -m benchmarks.run_all [--smoke] [--full] [--out DIR] [--budget-s S] [--only NAMES] [--skip NAMES]

Finds ``benchmarks/bench_*.py`` (scripts added later are picked up), measures
the device ceilings once, runs each script in its own process with those
ceilings (a CUDA fault is sticky, so isolation keeps the other kernels'
numbers), merges the JSON-lines records they append, and writes
results.json, results.md and one PNG per kernel into --out. The other flags
(--device, --providers, --compile-backend, --warmup-ms, --rep-ms) go to every
script. Exit status 1 when a script exits non-zero or runs out of time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import child_env, harness, report
from benchmarks.report import read_records

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "out" / "benchmarks"
GRACE_S = 15.0  # kept back from the budget to write the report (at most a fifth of a small budget)


def discover() -> list[str]:
    return sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def _names(text: str | None) -> set[str]:
    if not text:
        return set()
    return {n if n.startswith("bench_") else f"bench_{n}" for n in text.split(",") if n}


def _passthrough(args) -> list[str]:
    out = []
    for flag in ("smoke", "full", "proof", "warm"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    for flag in ("device", "providers", "compile_backend"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    out += ["--warmup-ms", str(args.warmup_ms), "--rep-ms", str(args.rep_ms)]
    return out


def _share(deadline: float | None, scripts_left: int) -> float | None:
    """This script's soft budget: an equal share of what is left (unused time flows to the next)."""
    if deadline is None:
        return None
    return (deadline - time.monotonic()) / max(1, scripts_left)


def run_module(name: str, args, ceilings_path: Path, records_path: Path, deadline: float | None,
               scripts_left: int = 1) -> dict:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--records", str(records_path), "--ceilings",
           str(ceilings_path), "--no-report", *_passthrough(args)]
    timeout = None
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            return {"module": name, "rc": None, "seconds": 0.0, "note": "not run: time budget exhausted"}
        cmd += ["--budget-s", f"{max(1.0, _share(deadline, scripts_left)):.0f}"]
        timeout = left + 5  # the script stops starting cases at its share; this is the hard stop
    env = child_env()
    print(f"\n=== {name} ===", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc, note = proc.wait(timeout=timeout), ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc, note = None, "killed: ran past the time budget (records written before that are kept)"
    seconds = time.monotonic() - start
    if rc not in (0, None):
        note = f"exited with status {rc}"
    print(f"=== {name}: {note or 'ok'} in {seconds:.1f} s ===", flush=True)
    return {"module": name, "rc": rc, "seconds": round(seconds, 1), "note": note}


def run_module_inprocess(name: str, args, ceilings: dict, records_path: Path, deadline: float | None,
                         scripts_left: int = 1) -> dict:
    """The CPU smoke path: no process per script, so torch is imported once."""
    import importlib
    import traceback
    if deadline is not None and deadline - time.monotonic() <= 0:
        return {"module": name, "rc": None, "seconds": 0.0, "note": "not run: time budget exhausted"}
    print(f"\n=== {name} (in process) ===", flush=True)
    start = time.monotonic()
    rc, note = 0, ""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        if not hasattr(module, "run"):
            raise AttributeError(f"benchmarks.{name} has no run(ctx)")
        budget = _share(deadline, scripts_left)
        ctx = harness.make_context(args, harness.resolve_device(args), ceilings)
        ctx._records_path, ctx._deadline = records_path, (None if budget is None else time.monotonic() + budget)
        module.run(ctx)
    except Exception as exc:  # noqa: BLE001 - one broken script must not hide the others
        traceback.print_exc()
        rc, note = 1, f"raised {type(exc).__name__}: {exc}"[:300]
    seconds = time.monotonic() - start
    print(f"=== {name}: {note or 'ok'} in {seconds:.1f} s ===", flush=True)
    return {"module": name, "rc": rc, "seconds": round(seconds, 1), "note": note}


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated scripts to run (e.g. relu2_mlp,fp8_head)")
    p.add_argument("--skip", default=None, help="comma-separated scripts to leave out")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one process per script (auto: yes on CUDA, no on the CPU)")
    p.add_argument("--records-into", type=Path, default=None,
                   help="append every script's records to this one file as they are measured (gpu_check), "
                        "instead of per-script files under OUT/records")
    args = p.parse_args(argv)
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    # The scripts' deadline: the budget less the time kept back for the report.
    deadline = time.monotonic() + args.budget_s - min(GRACE_S, 0.2 * args.budget_s) if args.budget_s else None

    device = harness.resolve_device(args)
    ceilings = harness.load_or_measure_ceilings(args, device)
    ceilings_path = out / "ceilings.json"
    ceilings_path.write_text(json.dumps(ceilings, indent=1) + "\n")
    env = harness.environment(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    only, skip = _names(args.only), _names(args.skip)
    names = [n for n in discover() if (not only or n in only) and n not in skip]
    if only - set(discover()):
        raise SystemExit(f"--only: no such script(s): {', '.join(sorted(only - set(discover())))}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda")
    records_dir = out / "records"
    records_dir.mkdir(exist_ok=True)
    modules, kernels, records = [], {}, []
    for i, name in enumerate(names):
        if args.records_into is not None:
            records_path = args.records_into
        else:
            records_path = records_dir / f"{name}.jsonl"
            records_path.unlink(missing_ok=True)
        if isolate:
            modules.append(run_module(name, args, ceilings_path, records_path, deadline, len(names) - i))
        else:
            modules.append(run_module_inprocess(name, args, ceilings, records_path, deadline, len(names) - i))
        if args.records_into is None:
            k, r = read_records(records_path)
            kernels.update(k)
            records += r
    if args.records_into is not None:
        kernels, records = read_records(args.records_into)

    paths = report.write_results(out, env, ceilings, kernels, records, modules=modules)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    bad = [m for m in modules if m["rc"] != 0]
    for m in bad:
        print(f"problem: {m['module']}: {m['note']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
