"""gpu_check: the most evidence one 10-minute call on a lent GPU can return, most valuable first.

    bash benchmarks/gpu_check.sh OUTDIR              # on the GPU machine (device tool: timeout_s 600)
    bash benchmarks/gpu_check.sh --dry-run OUTDIR    # on a CPU: every stage's plumbing at smoke size (CI)
    python -m benchmarks.collect_results OUTDIR      # afterwards, here: file the run under benchmarks/results/

A session is lent a GPU for 15 minutes of device time in all (start-up included) and 10 minutes per
command, so this is one command that returns what it measured even when it is killed at its limit:
every stage writes its results into OUTDIR as soon as it ends, and summary.md is rewritten after
each stage. OUTDIR never holds more than 7 files (the device tool returns at most 8, each at most
16 MiB, at most two folders deep; one spare for a temporary file a kill may leave):

    summary.md      stage table, build outcome, proof table and targets, tests per file, training lines
    env.txt         date, commit, nvidia-smi, versions, presence of nvcc / numpy / matplotlib / pybind11
    proof.jsonl     stage 3's measurements, one JSON line each, appended (and flushed) as they are taken
    tests.tar.gz    stage 4's junit XML and -v log per test file (repacked after each file)
    bench.tar.gz    stage 5's run_all output (results.md/json, plots, records)
    train.tar.gz    stage 6/7's trainer output (stdout and log.jsonl per run)
    logs.tar.gz     every stage's log and the stage status (repacked after each stage)

Stages, in order of value. Each runs in its own process group under a time limit: the smaller of
its cap (a fraction of GPU_CHECK_BUDGET_S, default 540 s) and what is left after reserving the
minimum of the later guaranteed stages (1-4), so stages 1-4 run even with a 300 s budget.

    stage   cap (of the budget)  what
    env       3 %   versions and presence checks; starts the CUDA extension build in the background
                    (pip install --no-build-isolation --no-deps -e ., KERNELS_CUDA_ARCH=90a)
    warm     15 %   every benchmark script with --proof --warm in parallel processes, and a one-step
                    trainer run: fills Triton's and Inductor's on-disk caches, so nothing timed later
                    pays a compile
    proof    28 %   waits for the build, then run_all --proof: one process per kernel family at the
                    speedrun shape, each validated against its oracle, then timed, package providers
                    first, one JSON line per measurement into OUTDIR/proof.jsonl
    tests    20 %   pytest -m gpu, one process, -v -rA and a junit file per test file, most valuable first
    bench    12 %   run_all over the benchmark scripts' shape sweeps (report, plots)
    train    20 %   the record preset, triton backend, a few steps on synthetic shards; validation
                    uses the training shape, so it reuses the training compile
    extra   rest    only if time is left: the tile tuner (kernels.triton_impl.tune --write --quick; its
                    table comes back in logs.tar.gz and collect_results freezes it into the repository),
                    the interpret tier (Triton on CUDA tensors), the trainer with the other backends

Environment: GPU_CHECK_BUDGET_S (default 540; 160 with --dry-run), GPU_CHECK_TRAIN_STEPS (default 10),
PYTHON (the interpreter for every stage; default: this one). pip runs offline (PIP_NO_INDEX=1).
Without a GPU and without --dry-run it stops at once (exit 2). Exit status: 0 when every stage that
ran passed, 1 otherwise (the files are written either way).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks import child_env

ROOT = Path(__file__).resolve().parent.parent
# (name, cap as a fraction of the budget, guaranteed minimum in seconds or 0 when not guaranteed)
STAGES = (("env", 0.03, 10), ("warm", 0.15, 30), ("proof", 0.28, 60), ("tests", 0.20, 45),
          ("bench", 0.12, 0), ("train", 0.20, 0), ("extra", 1.00, 0))
# Test files with GPU-tier tests, most valuable first; any other file with a gpu test follows.
TEST_ORDER = ("test_fp8_head_triton", "test_relu2_mlp_triton", "test_newton_schulz_triton", "test_cuda_ext",
              "test_speedrun_gpu", "test_muon")
# The record preset's training shape: one GPU accumulates 8 micro-steps of 48·1024 tokens.
RECORD_SEQ_LEN = 48 * 1024
RECORD_BATCH_TOKENS = 8 * RECORD_SEQ_LEN
OUT_FILES = ("summary.md", "env.txt", "proof.jsonl", "tests.tar.gz", "bench.tar.gz", "train.tar.gz",
             "logs.tar.gz")


class Check:
    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        self.out, self.dry_run, self.budget_s = out, dry_run, budget_s
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check."))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.status: list[dict] = []
        self.python = os.environ.get("PYTHON") or sys.executable
        # Offline pip: no index, and no self-version check (a network call) at the end of the build.
        self.env = child_env(PYTHONUNBUFFERED="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                             KERNELS_CUDA_ARCH=os.environ.get("KERNELS_CUDA_ARCH", "90a"))
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"  # CPU tensors through the interpreter
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            self.env.pop("TRITON_INTERPRET", None)  # the GPU tier runs Triton on CUDA tensors
        self.build: subprocess.Popen | None = None
        self.build_started = 0.0
        self.train_runs: list[str] = []

    # -- time ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def limit_for(self, name: str) -> float:
        """This stage's time limit: its cap, less what the later guaranteed stages are owed."""
        names = [s[0] for s in STAGES]
        i = names.index(name)
        cap = STAGES[i][1] * self.budget_s
        owed = sum(s[2] for s in STAGES[i + 1:])
        return max(0.0, min(cap, self.budget_s - self.elapsed() - owed))

    # -- processes -----------------------------------------------------------------------

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            # Own process group: a timeout kills the command and everything it started.
            return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    @staticmethod
    def wait(proc: subprocess.Popen, timeout: float) -> int | None:
        """The exit code, or None after killing the process group at the timeout.

        Descendants that moved to a session of their own (run_all starts each script with
        start_new_session=True) are not in the group: they are found through /proc first and
        killed too, so that no orphan keeps the GPU busy during the next stage.
        """
        try:
            return proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            stray = _descendants(proc.pid)
            for kill, target in ((os.killpg, proc.pid), *((os.kill, pid) for pid in stray)):
                try:
                    kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
            return None

    def run(self, cmd: list[str], log: Path, timeout: float) -> int | None:
        return self.wait(self.spawn(cmd, log), timeout)

    def py(self, *args: str) -> list[str]:
        return [self.python, *args]

    # -- OUTDIR --------------------------------------------------------------------------

    def publish(self, name: str, data: bytes | None = None, src: Path | None = None) -> None:
        """Write OUTDIR/name atomically (a kill leaves the old file or the new one, never half of one)."""
        assert name in OUT_FILES, name
        tmp = self.out / f".{name}.tmp"
        if src is not None:
            shutil.copyfile(src, tmp)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, self.out / name)

    def pack(self, name: str, paths: list[tuple[Path, str]]) -> None:
        archive = self.work / name
        with tarfile.open(archive, "w:gz") as tar:
            for path, arcname in paths:
                if path.exists():
                    tar.add(path, arcname=arcname)
        self.publish(name, src=archive)

    def pack_tests(self) -> None:
        """tests.tar.gz: the junit files and the pytest log of every test run so far."""
        self.pack("tests.tar.gz", [(self.work / "junit", "junit"),
                                   *((p, f"logs/{p.name}") for p in self.logs.glob("tests_*.log"))])

    def finish_stage(self, name: str, started: float, rc: int | None | str, note: str = "") -> None:
        """rc: an exit code, None for a timeout, or a status word."""
        word = rc if isinstance(rc, str) else _outcome(rc)
        self.status.append({"stage": name, "status": word, "seconds": round(time.monotonic() - started, 1),
                            "note": note})
        print(f"[gpu_check] {name}: {word} in {self.status[-1]['seconds']} s {note}".rstrip(), flush=True)
        (self.logs / "status.json").write_text(json.dumps(self.status, indent=1))
        self.pack("logs.tar.gz", [(self.logs, "logs")])
        self.publish("summary.md", self.summary().encode())

    def skip_stage(self, name: str, why: str) -> None:
        self.finish_stage(name, time.monotonic(), "skipped", why)

    # -- stages --------------------------------------------------------------------------

    def stage_env(self) -> None:
        started = time.monotonic()
        probe = r"""
import importlib, json, shutil, subprocess, sys
info = {"python": sys.version.split()[0]}
for mod in ("torch", "triton", "numpy", "matplotlib", "pybind11", "pytest"):
    try:
        info[mod] = importlib.import_module(mod).__version__
    except Exception as e:
        info[mod] = f"MISSING ({type(e).__name__}: {e})"
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if shutil.os.path.exists("/usr/local/cuda/bin/nvcc") else None)
info["nvcc"] = (subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
                if nvcc else "MISSING")
import torch
info["cuda"] = torch.version.cuda
info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "MISSING (no CUDA device)"
info["capability"] = ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None
print(json.dumps(info))
"""
        # A cold first import of torch plus CUDA initialisation can take longer than the stage's
        # cap (9 s at a 300 s budget): at least 30 s, and a timeout is a finding, not a crash.
        try:
            res = subprocess.run(self.py("-c", probe), cwd=ROOT, env=self.env, capture_output=True, text=True,
                                 timeout=max(30.0, self.limit_for("env")))
            try:
                info = json.loads(res.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                info = {"probe_error": res.stderr[-2000:]}
            probe_rc = res.returncode
        except subprocess.TimeoutExpired:
            info, probe_rc = {"probe_error": "the version probe timed out (import torch / CUDA init)"}, None
        self.info = info

        def text_of(cmd: list[str], **kw) -> str | None:
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw).stdout
            except (OSError, subprocess.SubprocessError) as e:
                return f"failed: {type(e).__name__}: {e}"

        smi = text_of(["nvidia-smi"]) if shutil.which("nvidia-smi") else None
        commit = (text_of(["git", "rev-parse", "HEAD"], cwd=ROOT) or "").strip()
        lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
                 f"commit: {commit or 'unknown'}", f"dry_run: {self.dry_run}", f"budget_s: {self.budget_s:.0f}",
                 *(f"{k}: {v}" for k, v in info.items()), "", "nvidia-smi:",
                 smi if smi is not None else "not found"]
        self.publish("env.txt", "\n".join(lines).encode())
        # The build runs behind the next stage; the proof stage waits for it.
        log = self.logs / "build.log"
        if self.dry_run:
            # The installed package stands in for the build: the plumbing, not nvcc (the CPU CI built it).
            cmd = self.py("-c", "import kernels; print('backends:', kernels.available_backends())")
        else:
            cmd = self.py("-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".")
        self.build, self.build_started = self.spawn(cmd, log), time.monotonic()
        missing = [k for k, v in info.items() if isinstance(v, str) and v.startswith("MISSING")]
        self.finish_stage("env", started, probe_rc, f"missing: {', '.join(missing)}" if missing else
                          (info["probe_error"][-200:] if "probe_error" in info else ""))

    def bench_scripts(self) -> list[str]:
        """The kernel families' benchmark scripts (a dry run takes the two quickest: it checks plumbing)."""
        if self.dry_run:
            return ["bench_newton_schulz", "bench_relu2_mlp"]
        # bench_grad_sync and bench_trainer time the trainer (the train stage covers it): not kernel families.
        return [p.stem for p in sorted((ROOT / "benchmarks").glob("bench_*.py"))
                if p.stem not in ("bench_grad_sync", "bench_trainer")]

    def size_args(self) -> list[str]:
        return ["--smoke", "--device", "cpu"] if self.dry_run else []

    def synthetic_data(self, deadline: float | None = None) -> Path:
        """Synthetic shards for the record preset's shapes (a few seconds), made once (by the deadline)."""
        data = self.work / "synthetic"
        if not (data / "synthetic_source.json").exists():  # written last: a killed run leaves none
            steps = int(os.environ.get("GPU_CHECK_TRAIN_STEPS", "10"))
            train_tokens = 4096 if self.dry_run else (steps + 4) * RECORD_BATCH_TOKENS
            val_tokens = 4096 if self.dry_run else 5 * RECORD_SEQ_LEN
            limit = 120.0 if deadline is None else min(120.0, max(1.0, deadline - time.monotonic()))
            self.run(self.py("-m", "speedrun.data", "synthetic", "--dir", str(data), "--train_tokens",
                             str(train_tokens), "--val_tokens", str(val_tokens)), self.logs / "synthetic.log", limit)
        return data

    def trainer_cmd(self, backend: str, steps: int, out: Path, data: Path | None = None) -> list[str]:
        data = data or self.synthetic_data()
        if self.dry_run:
            return self.py("-m", "speedrun.train_gpt", "--preset", "smoke", "--backend", "reference", "--steps",
                           str(steps), "--data", str(data), "--out", str(out))
        # Validation in training-sized passes: the same shapes, so it reuses the training compile.
        # A line (and log.jsonl entries) every step: a run killed at its limit still shows its steps.
        return self.py("-m", "speedrun.train_gpt", "--preset", "record", "--backend", backend, "--steps", str(steps),
                       "--data", str(data), "--out", str(out), f"--val_seq_len={RECORD_SEQ_LEN}",
                       f"--val_tokens={4 * RECORD_SEQ_LEN}", "--val_at_start=false", f"--val_every={steps}",
                       "--log_every=1")

    def stage_warm(self) -> None:
        started, limit = time.monotonic(), self.limit_for("warm")
        if limit < 5:
            return self.skip_stage("warm", "no time left")
        deadline = time.monotonic() + limit  # the synthetic data below is written inside the stage's limit
        ceilings = self.work / "warm_ceilings.json"  # skips the ceiling measurement: nothing is timed here
        ceilings.write_text(json.dumps({"device": "warm-up", "measured": {}, "datasheet": None, "notes": []}))
        procs = {name: self.spawn(self.py("-m", f"benchmarks.{name}", "--proof", "--warm", "--no-report",
                                          "--ceilings", str(ceilings), *self.size_args()),
                                  self.logs / f"warm_{name}.log") for name in self.bench_scripts()}
        # One warm-up step and one step: both compilations (and the validation's) without 10 untimed steps.
        cmd = self.trainer_cmd("triton", 1, self.work / "train_warm", self.synthetic_data(deadline))
        procs["trainer"] = self.spawn(cmd + ([] if self.dry_run else ["--warmup_steps=1"]),
                                      self.logs / "warm_trainer.log")
        codes = {name: self.wait(p, deadline - time.monotonic()) for name, p in procs.items()}
        bad = {n: c for n, c in codes.items() if c != 0}
        self.finish_stage("warm", started, 0 if not bad else (None if None in bad.values() else 1),
                          ", ".join(f"{n}: {_outcome(c)}" for n, c in bad.items()))

    def stage_proof(self) -> None:
        started, stage_limit = time.monotonic(), self.limit_for("proof")
        note = ""
        if self.build is not None:
            rc = self.wait(self.build, max(5.0, stage_limit / 3))
            note = f"build {'finished' if rc == 0 else ('killed at its limit' if rc is None else f'rc={rc}')} " \
                   f"after {time.monotonic() - self.build_started:.0f} s; "
            self.build = None
            record = ROOT / "kernels" / "_cuda_build.json"
            if record.exists():
                shutil.copyfile(record, self.logs / "_cuda_build.json")
        # The build wait is part of the stage's time, so the later stages keep theirs.
        limit = min(self.limit_for("proof"), stage_limit - (time.monotonic() - started))
        if limit < 10:
            return self.skip_stage("proof", note + "no time left")
        records = self.out / "proof.jsonl"
        records.touch()
        cmd = self.py("-m", "benchmarks.run_all", "--proof", "--only", ",".join(self.bench_scripts()),
                      "--records-into", str(records),
                      "--out", str(self.work / "proof"), "--budget-s", f"{max(5, limit - 10):.0f}", *self.size_args())
        rc = self.run(cmd, self.logs / "proof.log", limit)
        self.finish_stage("proof", started, rc, note.rstrip("; "))

    def test_files(self) -> list[str]:
        found = [p.stem for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]
        ordered = [n for n in TEST_ORDER if n in found] + [n for n in found if n not in TEST_ORDER]
        return ordered[:2] if self.dry_run else ordered

    def stage_tests(self) -> None:
        started, limit = time.monotonic(), self.limit_for("tests")
        if limit < 10:
            return self.skip_stage("tests", "no time left")
        junit = self.work / "junit"
        junit.mkdir(exist_ok=True)
        files, results = self.test_files(), []
        deadline = time.monotonic() + limit
        for i, name in enumerate(files):
            left = deadline - time.monotonic()
            if left < 5:
                results.append(f"{name}: not run (stage time used up)")
                continue
            # An equal share of what is left; what a file does not use flows to the next.
            share = left / (len(files) - i)
            rc = self.run(self.py("-m", "pytest", f"tests/{name}.py", "-m", "gpu", "-v", "-rA", "-p",
                                  "no:cacheprovider", f"--junitxml={junit / name}.xml"),
                          self.logs / f"tests_{name}.log", share)
            results.append(f"{name}: {'killed at its share' if rc is None else f'rc={rc}'}")
            self.pack_tests()
            self.publish("summary.md", self.summary().encode())
        failed = [r for r in results if not r.endswith(("rc=0", "rc=5"))]  # 5: no test collected
        self.finish_stage("tests", started, 0 if not failed else 1, "; ".join(failed))

    def stage_bench(self) -> None:
        started, limit = time.monotonic(), self.limit_for("bench")
        if limit < 10:
            return self.skip_stage("bench", "no time left")
        extra = ["--only", "newton_schulz"] if self.dry_run else []
        cmd = self.py("-m", "benchmarks.run_all", "--skip", "grad_sync", "--out", str(self.work / "bench"),
                      "--budget-s", f"{max(5, limit - 10):.0f}", *self.size_args(), *extra)
        rc = self.run(cmd, self.logs / "bench.log", limit)
        self.pack("bench.tar.gz", [(self.work / "bench", "bench")])
        self.finish_stage("bench", started, rc)

    def train(self, stage: str, backend: str, limit: float) -> int | None:
        steps = 2 if self.dry_run else int(os.environ.get("GPU_CHECK_TRAIN_STEPS", "10"))
        out = self.work / f"train_{backend}"
        log = self.logs / f"train_{backend}.log"
        rc = self.run(self.trainer_cmd(backend, steps, out), log, limit)
        self.train_runs.append(backend)
        self.pack("train.tar.gz", [item for b in self.train_runs for item in
                                   ((self.logs / f"train_{b}.log", f"train_{b}/stdout.log"),
                                    (self.work / f"train_{b}" / "log.jsonl", f"train_{b}/log.jsonl"))])
        return rc

    def stage_train(self) -> None:
        started, limit = time.monotonic(), self.limit_for("train")
        if limit < 10:
            return self.skip_stage("train", "no time left")
        what = "smoke preset, reference (dry run)" if self.dry_run else "record preset, triton"
        self.finish_stage("train", started, self.train("train", "triton", limit), what)

    def stage_extra(self) -> None:
        started = time.monotonic()
        ran, problems = [], []
        # First the tile tuner (GPU only): its table, frozen into the repository by collect_results, is
        # what every later run uses instead of the estimates. It writes the table when it is done.
        limit = min(240.0, self.limit_for("extra") - 60)
        if not self.dry_run and limit >= 60:
            table = ROOT / "kernels" / "triton_impl" / "tuned_configs.py"
            rc = self.run(self.py("-m", "kernels.triton_impl.tune", "--write", "--quick"), self.logs / "tune.log",
                          limit)
            ran.append("tuner")
            if rc != 0:
                problems.append(f"tuner {_outcome(rc)}")
            elif table.exists():
                shutil.copyfile(table, self.logs / "tuned_configs.py")  # into logs.tar.gz at the stage's end
        # The interpret tier runs its Triton kernels on CUDA tensors on a GPU machine.
        # On a GPU, the trainers below are worth a minute more than the rest of this tier.
        limit = self.limit_for("extra") - (0 if self.dry_run else 60)
        if limit >= 20:
            where = ["tests/test_newton_schulz_triton.py", "-k", "sym_xxt"] if self.dry_run else ["tests"]
            cmd = self.py("-m", "pytest", *where, "-m", "interpret", "-q", "-rfE", "-p", "no:cacheprovider",
                          f"--junitxml={self.work / 'junit' / 'interpret.xml'}")
            (self.work / "junit").mkdir(exist_ok=True)
            rc = self.run(cmd, self.logs / "tests_interpret.log", limit)
            ran.append("interpret tier")
            if rc not in (0, 5):
                problems.append(f"interpret tier {_outcome(rc)}")
            self.pack_tests()
        for backend in ("reference",) if self.dry_run else ("cuda", "reference"):
            limit = self.limit_for("extra")
            if limit < (10 if self.dry_run else 40):
                break
            rc = self.train("extra", backend, limit)
            ran.append(f"train {backend}")
            if rc != 0:
                problems.append(f"train {backend} {_outcome(rc)}")
        if not ran:
            return self.skip_stage("extra", "no time left")
        self.finish_stage("extra", started, 0 if not problems else 1,
                          f"ran: {', '.join(ran)}" + (f"; {'; '.join(problems)}" if problems else ""))

    # -- summary -------------------------------------------------------------------------

    def summary(self) -> str:
        try:
            return self._summary()
        except Exception as e:  # noqa: BLE001 - the stage table must reach OUTDIR whatever a section does
            return ("# gpu_check summary\n\n(summary failed: " + f"{type(e).__name__}: {e}"[:300] + ")\n\n"
                    + "\n".join(f"- {s['stage']}: {s['status']} in {s['seconds']} s {s['note']}" for s in self.status)
                    + "\n")

    def _summary(self) -> str:
        info = getattr(self, "info", {})
        lines = ["# gpu_check summary", "",
                 f"- device: {info.get('gpu', '?')} (capability {info.get('capability')}); torch {info.get('torch')}, "
                 f"CUDA {info.get('cuda')}, triton {info.get('triton')}, Python {info.get('python')}",
                 f"- {'dry run (CPU, smoke sizes): measures nothing about speed' if self.dry_run else 'GPU run'}; "
                 f"{self.elapsed():.0f} s of a {self.budget_s:.0f} s budget so far", "",
                 "| stage | status | seconds | note |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in self.status]
        build = self.logs / "_cuda_build.json"
        if build.exists():
            lines += ["", f"CUDA extension: `{build.read_text().strip()[:400]}`"]
        lines += self._proof_section() + self._tests_section() + self._train_section()
        return "\n".join(lines) + "\n"

    def _proof_section(self) -> list[str]:
        path = self.out / "proof.jsonl"
        if not path.exists():
            return []
        from benchmarks import report  # no torch: this process only orchestrates
        kernels, records = report.read_records(path)
        out = ["", "## Proof (speedrun shapes; medians; package providers first)", "",
               "| kernel | mode | provider | status | ms | TFLOP/s | GB/s | % datasheet roof | × reference | "
               "× compiled | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            info = kernels.get(r["kernel"], {})
            out.append(f"| {r['kernel']} | {r['mode']} | {r['provider']} | {r['status']} | "
                       f"{report._fmt(r.get('median_ms'), '.4f')} | {report._fmt(r.get('tflops'), '.1f')} | "
                       f"{report._fmt(r.get('gbps'), '.0f')} | "
                       f"{report._fmt(r.get('frac_datasheet_peak'), '.1f', 100, '%')} | "
                       f"{report._fmt(report._speedup(records, r, info.get('reference')), '.2f', suffix='×')} | "
                       f"{report._fmt(report._speedup(records, r, info.get('compiled')), '.2f', suffix='×')} | "
                       f"{(r.get('note') or '')[:120]} |")
        targets = report.evaluate_targets(kernels, records)
        if targets:
            out += ["", "Targets:", ""]
            out += [f"- {t['kernel']} {t['mode']} {t['provider']}: {t['desc'] or t['kind']}: **{t['verdict']}**"
                    + ("" if t["value"] is None else f" ({t['value']:.3g} against {t['threshold']:g})")
                    for t in targets]
        return out

    def _tests_section(self) -> list[str]:
        junit = self.work / "junit"
        if not junit.exists():
            return []
        out = ["", "## Tests (pytest -m gpu per file; interpret tier last)", "",
               "| file | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
        failures = []
        for xml in sorted(junit.glob("*.xml")):
            try:
                cases = ET.parse(xml).getroot().iter("testcase")
            except ET.ParseError:
                out.append(f"| {xml.stem} | (junit unreadable: killed while writing) | | | |")
                continue
            counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
            for case in cases:
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
                key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(kind, "passed")
                counts[key] += 1
                if kind in ("failure", "error"):
                    msg = (case.find(kind).get("message") or "").replace("\n", " ")[:200]
                    failures.append(f"- {xml.stem}::{case.get('name')}: {msg}")
            out.append(f"| {xml.stem} | {counts['passed']} | {counts['failed']} | {counts['errors']} | "
                       f"{counts['skipped']} |")
        for log in sorted(self.logs.glob("tests_*.log")):
            if not (junit / f"{log.stem[6:]}.xml").exists():
                passed = log.read_text(errors="replace").count(" PASSED")
                failed = log.read_text(errors="replace").count(" FAILED")
                out.append(f"| {log.stem[6:]} | {passed} | {failed} | (no junit: killed) | |")
        return out + ([""] + failures[:40] if failures else [])

    def _train_section(self) -> list[str]:
        out = []
        for backend in self.train_runs:
            log = self.logs / f"train_{backend}.log"
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            keep = [line for line in text if line.startswith(("speedrun", "step", "done", "error", "warning"))]
            tail = [line for line in text[-2:] if line not in keep[-14:]]  # e.g. a traceback's last line
            out += ["", f"## Trainer, --backend {backend}", "", "```", *keep[-14:], *tail, "```"]
        return out

    def main(self) -> int:
        print(f"[gpu_check] {'dry run, ' if self.dry_run else ''}budget {self.budget_s:.0f} s, out {self.out}, "
              f"work {self.work}", flush=True)
        for name in ("env", "warm", "proof", "tests", "bench", "train", "extra"):
            started = time.monotonic()
            try:
                getattr(self, f"stage_{name}")()
            except Exception as e:  # noqa: BLE001 - a bug here must not cost the later stages' evidence
                import traceback
                (self.logs / f"gpu_check_{name}_error.log").write_text(traceback.format_exc())
                print(f"[gpu_check] {name}: raised {type(e).__name__}: {e}", flush=True)
                if not any(s["stage"] == name for s in self.status):
                    try:
                        self.finish_stage(name, started, "error", f"gpu_check raised {type(e).__name__}: {e}"[:200])
                    except Exception:  # noqa: BLE001 - e.g. OUTDIR itself failing: the next stage tries again
                        pass
        if self.build is not None:  # never waited for (the proof stage was skipped)
            self.wait(self.build, 1)
        print(self.summary(), flush=True)
        print(f"[gpu_check] wrote {', '.join(sorted(p.name for p in self.out.iterdir()))} in {self.out} "
              f"after {self.elapsed():.0f} s", flush=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return 0 if all(s["status"] in ("ok", "skipped") for s in self.status) else 1


def _outcome(rc: int | None) -> str:
    """A stage command's exit code as a status word: ok, timeout (killed at its limit) or rc=N."""
    return "ok" if rc == 0 else ("timeout" if rc is None else f"rc={rc}")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (through /proc; [] where there is none), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def has_gpu(python: str) -> bool:
    res = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                         text=True)
    return res.stdout.strip().endswith("True")


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    rest = [a for a in argv if a != "--dry-run"]
    if len(rest) != 1 or rest[0].startswith("-"):
        print("usage: bash benchmarks/gpu_check.sh [--dry-run] OUTDIR", file=sys.stderr)
        return 2
    python = os.environ.get("PYTHON") or sys.executable
    if not dry_run and not has_gpu(python):
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was run. "
              "On a CPU, `bash benchmarks/gpu_check.sh --dry-run OUTDIR` checks the plumbing.", file=sys.stderr)
        return 2
    out = Path(rest[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "160" if dry_run else "540"))
    return Check(out, dry_run, budget).main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
