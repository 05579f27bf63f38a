"""The shared benchmark harness: timing, memory, device ceilings, records, CLI.

A benchmark script is a module ``benchmarks/bench_<name>.py`` with a function
``run(ctx)`` that ends with ``raise SystemExit(harness.main(run))`` under
``if __name__ == "__main__"``. ``python -m benchmarks.run_all`` finds every such
module; on CUDA it runs each in its own process, so one crashing kernel (a CUDA
fault is sticky) cannot take the others down. A minimal script::

    from benchmarks import harness

    def run(ctx):
        ctx.declare_kernel("axpy", reference="reference", compiled="compiled", peak="bf16")
        n = 1000 if ctx.smoke else 1 << 28
        x = torch.randn(n, device=ctx.device)
        ref = 2 * x + 1
        for name, f in {"reference": lambda: 2 * x + 1, "compiled": ctx.compile(lambda: 2 * x + 1)}.items():
            ctx.bench(kernel="axpy", shape={"N": n}, provider=name, mode="fwd", fn=f, flops=2 * n,
                      bytes_moved=8 * n, check=lambda f=f: harness.compare("y", f(), ref, rel_tol=1e-6))

    if __name__ == "__main__":
        raise SystemExit(harness.main(run))

API used by the scripts (everything else here is internal)::

    ctx.device, ctx.smoke, ctx.full        # where and how big (--smoke: tiny shapes on CPU)
    ctx.proof                               # --proof: only the speedrun shape (gpu_check's proof stage)
    ctx.ordered(providers) -> [(name, fn)]  # the package's providers first, then the baselines
    ctx.declare_kernel(name, reference=, compiled=, peak="bf16"|"fp8", description=, targets=[Target])
    ctx.compile(fn)                         # torch.compile with this run's settings
    ctx.unavailable(op, backend) -> str|None  # why a kernels backend cannot run here (None: it can)
    ctx.provider_unavailable(op, provider)    # the same for the backend a triton*/cuda* provider runs on
    ctx.bench(kernel=, shape={...}, provider=, mode=, fn=, flops=, bytes_moved=, check=None, note="")
    ctx.bench_autograd(kernel=, shape=, provider=, forward=, inputs=[...], grad_out=, costs={mode: (flops, bytes)},
                       check=None, modes=MODES)
    ctx.skip(kernel=, shape=, provider=, mode=, note=)
    compare(name, out, ref, rel_tol=, cos_min=) -> {metrics}; raises ValidationError on a mismatch
    Target(shape=, mode=, provider=, kind="speedup"|"peak_fraction"|"memory_ratio", threshold=, baseline=, desc=)

``--warm`` runs every case once without timing or records: gpu_check runs the
scripts that way in parallel processes first, so that Triton's and Inductor's
on-disk caches hold every kernel before anything is timed.

``bench`` validates first (``check()`` runs the provider and compares it with an
oracle, llm.c style), then times ``fn`` and measures its peak memory, and prints
one line with the napkin math of the case (FLOPs, bytes, the ideal time at the
measured ceilings). A provider that raises, mismatches or is unavailable becomes
a record with status "failed" or "skipped" and a note; the run goes on.

Timing: on CUDA ``triton.testing.do_bench`` (it zeroes a 256 MB buffer before
every timed call, so L2 starts cold; warm-up first; CUDA events), median and
20/80th percentiles. On a CPU (``--smoke``) a perf_counter loop, only to keep
the scripts working. Peak memory: ``torch.cuda.max_memory_allocated`` during
one call minus what was allocated before it (extra memory of the call).

Ceilings: a large bf16 matmul, an FP8 ``torch._scaled_mm`` and a large device
copy, timed in the same run, next to the datasheet peaks for the device found.
Every record gets the ideal time max(flops / compute peak, bytes / bandwidth)
for both, and the fractions ideal / measured ("fraction of peak").

Records carry kernel, shape, provider, mode ("fwd", "bwd", "fwd+bwd"),
median_ms, tflops, gbps, the two peak fractions, peak_mem_mb, and the
environment (device, torch, triton, CUDA, date).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
# Providers that are this package's own kernels: timed before the baselines, so a run cut short by
# its time budget loses baseline numbers rather than the package's.
PACKAGE_PROVIDER_PREFIXES = ("triton", "cuda")
PEAK_KINDS = ("bf16", "fp8")

# Dense datasheet peaks (no sparsity): TFLOP/s and HBM TB/s. Checked in order on
# the lowercased device name, so the specific names come before "h100".
DATASHEET = (
    ("gh200", None),  # several memory configurations: no single datasheet figure
    ("h200", {"name": "H200 SXM", "bf16_tflops": 989.0, "fp8_tflops": 1979.0, "hbm_gbps": 4800.0}),
    ("h100 pcie", {"name": "H100 PCIe", "bf16_tflops": 756.0, "fp8_tflops": 1513.0, "hbm_gbps": 2000.0}),
    ("h100 nvl", {"name": "H100 NVL", "bf16_tflops": 835.0, "fp8_tflops": 1671.0, "hbm_gbps": 3900.0}),
    ("h100", {"name": "H100 SXM", "bf16_tflops": 989.0, "fp8_tflops": 1979.0, "hbm_gbps": 3350.0}),
)


class ValidationError(AssertionError):
    """A provider's output does not match the oracle."""


# ---------------------------------------------------------------------------
# Environment and ceilings
# ---------------------------------------------------------------------------

def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Device name, library versions and date: copied into every record."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"{major}.{minor}"
    else:
        name, capability = (platform.processor() or platform.machine() or "cpu") + " (CPU)", None
    return {
        "device": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def datasheet_for(device_name: str) -> dict | None:
    lowered = device_name.lower()
    for key, sheet in DATASHEET:
        if key in lowered:
            return dict(sheet) if sheet else None
    return None


def _fp8_matmul(a8: torch.Tensor, b8_colmajor: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    try:
        return torch._scaled_mm(a8, b8_colmajor, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                use_fast_accum=True)
    except (RuntimeError, TypeError):
        # Some builds (CPU) reject the fast-accumulation flag.
        return torch._scaled_mm(a8, b8_colmajor, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def measure_ceilings(device: torch.device, smoke: bool = False) -> dict:
    """Measured bf16 / fp8 matmul TFLOP/s and copy bandwidth, plus the datasheet figures.

    Sizes are the ones that reach the roof on an H100 (8192³ matmuls, a 1 GiB
    copy); under --smoke they shrink to keep the CPU run short.
    """
    big = device.type == "cuda" and not smoke
    n = 8192 if big else 128
    copy_numel = (1 << 29) if big else (1 << 22)  # bf16 elements: 1 GiB / 8 MiB
    measured, notes = {}, []
    gen = torch.Generator(device=device).manual_seed(0)

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    t = time_fn(lambda: a @ b, device)
    measured["bf16_tflops"] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    notes.append(f"bf16 matmul {n}x{n}x{n}: {t.median_ms:.3f} ms")

    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).T  # column-major, as _scaled_mm wants its second operand
        one = torch.ones((), device=device, dtype=torch.float32)
        t = time_fn(lambda: _fp8_matmul(a8, b8, one), device)
        measured["fp8_tflops"] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
        notes.append(f"fp8 e4m3 _scaled_mm {n}x{n}x{n}: {t.median_ms:.3f} ms")
        del a8, b8
    except Exception as exc:  # noqa: BLE001 - a missing FP8 path is a finding, not a crash
        measured["fp8_tflops"] = None
        notes.append(f"fp8 _scaled_mm unavailable: {_one_line(exc)}")
    del a, b

    src = torch.empty(copy_numel, device=device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    measured["hbm_gbps"] = 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9
    notes.append(f"copy {src.numel() * src.element_size() / 2**20:.0f} MiB: {t.median_ms:.3f} ms (read + write)")
    del src, dst
    _free(device)

    name = environment(device)["device"]
    return {"device": name, "measured": measured, "datasheet": datasheet_for(name) if device.type == "cuda" else None,
            "notes": notes}


def _peak_pair(ceilings: dict, which: str, peak: str) -> tuple[float | None, float | None]:
    """(FLOP/s, bytes/s) of the measured or datasheet ceilings for a peak kind."""
    sheet = ceilings.get(which)
    if not sheet:
        return None, None
    flops = sheet.get(f"{peak}_tflops")
    bw = sheet.get("hbm_gbps")
    return (flops * 1e12 if flops else None), (bw * 1e9 if bw else None)


def ideal_ms(flops: float | None, bytes_moved: float | None, ceilings: dict, which: str, peak: str) -> float | None:
    """Roofline time: the slower of computing ``flops`` and moving ``bytes_moved`` at the ceilings."""
    peak_flops, peak_bw = _peak_pair(ceilings, which, peak)
    times = []
    if flops and peak_flops:
        times.append(flops / peak_flops)
    if bytes_moved and peak_bw:
        times.append(bytes_moved / peak_bw)
    return max(times) * 1e3 if times else None


# ---------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _cuda_event_timing(fn, warmup_ms, rep_ms, grad_to_none) -> list[float]:
    # Fallback when triton's do_bench is unusable: the same protocol by hand.
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(5, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        for t in grad_to_none or ():
            t.grad = None
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            grad_to_none: Iterable[torch.Tensor] | None = None, cpu_budget_s: float = 0.2) -> Timing:
    """Median (and 20/80th percentile) milliseconds of one call of ``fn``.

    CUDA: triton.testing.do_bench with an L2 flush before each timed call.
    CPU: one warm-up call, then as many calls as fit in ``cpu_budget_s`` (at least one).
    """
    if device.type == "cuda":
        try:
            import triton.testing
            p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                    quantiles=[0.5, 0.2, 0.8])
            return Timing(float(p50), float(p20), float(p80), -1)
        except (ImportError, AttributeError, TypeError):
            times = sorted(_cuda_event_timing(fn, warmup_ms, rep_ms, grad_to_none))
            return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), len(times))
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first >= cpu_budget_s:
        # Slow (the Triton interpreter): the warm-up call is the only sample worth its time.
        ms = first * 1e3
        return Timing(ms, ms, ms, 1)
    n = max(1, min(50, int(cpu_budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), n)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Extra memory (MiB) one call of ``fn`` allocates at its peak, above what was allocated before; None on CPU."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def compare(name: str, out: torch.Tensor, ref: torch.Tensor, *, rel_tol: float | None = None,
            cos_min: float | None = None) -> dict:
    """Relative Frobenius error and cosine similarity of ``out`` against ``ref``.

    Raises ValidationError when the shapes differ, when ``out`` has a
    non-finite value where ``ref`` has none, or when a tolerance is missed.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise ValidationError(f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    o, r = out.detach().double(), ref.detach().double()
    bad = ~torch.isfinite(o) & torch.isfinite(r)
    if bool(bad.any()):
        raise ValidationError(f"{name}: {int(bad.sum())} non-finite values where the oracle is finite")
    diff = torch.linalg.vector_norm(o - r).item()
    ref_norm = torch.linalg.vector_norm(r).item()
    out_norm = torch.linalg.vector_norm(o).item()
    rel = diff / ref_norm if ref_norm > 0 else diff
    cos = (o.flatten() @ r.flatten()).item() / (out_norm * ref_norm) if out_norm > 0 and ref_norm > 0 else (
        1.0 if out_norm == ref_norm else 0.0)
    if rel_tol is not None and not rel <= rel_tol:
        raise ValidationError(f"{name}: relative error {rel:.3g} exceeds {rel_tol:g}")
    if cos_min is not None and not cos >= cos_min:
        raise ValidationError(f"{name}: cosine similarity {cos:.6f} below {cos_min:g}")
    return {f"{name}_rel_err": rel, f"{name}_cos": cos}


# ---------------------------------------------------------------------------
# Records and targets
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """A goal from an issue, checked in the report (never a test).

    kind "speedup": baseline's median / provider's median >= threshold.
    kind "peak_fraction": provider's fraction of the datasheet peak (measured when no datasheet) >= threshold.
    kind "memory_ratio": provider's peak memory / baseline's <= threshold.
    """
    shape: dict
    mode: str
    provider: str
    kind: str
    threshold: float
    baseline: str | None = None
    desc: str = ""


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:400]


@dataclasses.dataclass
class Record:
    kernel: str
    shape: str
    dims: dict
    provider: str
    mode: str
    status: str  # "ok", "skipped" or "failed"
    note: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    flops: float | None = None
    bytes: float | None = None
    peak: str = "bf16"
    tflops: float | None = None
    gbps: float | None = None
    ideal_ms_measured: float | None = None
    ideal_ms_datasheet: float | None = None
    frac_measured_peak: float | None = None
    frac_datasheet_peak: float | None = None
    peak_mem_mb: float | None = None
    check: dict = dataclasses.field(default_factory=dict)
    env: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# The context handed to each script's run(ctx)
# ---------------------------------------------------------------------------

class BenchContext:
    def __init__(self, *, device: torch.device, smoke: bool, full: bool, ceilings: dict, env: dict,
                 records_path: Path | None = None, budget_s: float | None = None,
                 providers: set[str] | None = None, compile_backend: str = "inductor",
                 warmup_ms: float = 25.0, rep_ms: float = 100.0, proof: bool = False, warm_only: bool = False):
        self.device, self.smoke, self.full = device, smoke, full
        self.proof, self.warm_only = proof, warm_only
        self.ceilings, self.env = ceilings, env
        self.records: list[Record] = []
        self.kernels: dict[str, dict] = {}
        self.providers = providers
        self.compile_backend = compile_backend
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self._deadline = time.monotonic() + budget_s if budget_s else None
        self._records_path = records_path
        self._napkin_seen: set = set()
        self._configure_compile()

    # -- setup ---------------------------------------------------------------

    @staticmethod
    def _configure_compile() -> None:
        import torch._dynamo.config as dynamo_config
        # One compiled function per provider sees every shape of its script.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 64)
        try:
            import torch._functorch.config as functorch_config
            # Donated buffers forbid retain_graph=True, which the backward-only timing needs.
            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
        except ImportError:
            pass

    def declare_kernel(self, name: str, *, reference: str, compiled: str | None, peak: str = "bf16",
                       description: str = "", targets: Iterable[Target] = ()) -> None:
        """Names the baselines the report divides by, and the peak kind (bf16 or fp8) of the kernel."""
        if peak not in PEAK_KINDS:
            raise ValueError(f"peak: expected one of {PEAK_KINDS}, got {peak!r}")
        self.kernels[name] = {"reference": reference, "compiled": compiled, "peak": peak,
                              "description": description,
                              "targets": [dataclasses.asdict(t) for t in targets]}
        self._emit({"type": "kernel", "name": name, **self.kernels[name]})

    def compile(self, fn: Callable, **kwargs) -> Callable:
        kwargs.setdefault("backend", self.compile_backend)
        kwargs.setdefault("dynamic", False)
        return torch.compile(fn, **kwargs)

    def unavailable(self, op: str, backend: str) -> str | None:
        """Why ``kernels`` backend ``backend`` cannot run ``op`` on this run's device (None when it can)."""
        try:
            from kernels.backend import why_unavailable
        except ImportError as exc:
            return f"kernels package not importable: {_one_line(exc)}"
        return why_unavailable(backend, self.device, op)

    def provider_unavailable(self, op: str, provider: str) -> str | None:
        """``unavailable`` for the backend a provider named triton* or cuda* runs on ("triton[modded]": triton);
        None for every other provider (the baselines)."""
        backend = next((b for b in PACKAGE_PROVIDER_PREFIXES if provider.startswith(b)), None)
        return None if backend is None else self.unavailable(op, backend)

    def time_left(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def wants(self, provider: str) -> bool:
        return self.providers is None or provider in self.providers

    @staticmethod
    def ordered(providers: dict) -> list[tuple[str, object]]:
        """The items of ``providers`` with the package's own (triton*, cuda*) first, otherwise in order."""
        def is_baseline(item):
            return not item[0].split("-")[0].split("_")[0] in PACKAGE_PROVIDER_PREFIXES
        return sorted(providers.items(), key=is_baseline)

    # -- records -------------------------------------------------------------

    def _emit(self, obj: dict) -> None:
        if self._records_path is not None:
            with open(self._records_path, "a") as f:
                f.write(json.dumps(obj) + "\n")

    def _add(self, record: Record) -> Record:
        record.env = dict(self.env)
        self.records.append(record)
        self._emit({"type": "record", **dataclasses.asdict(record)})
        return record

    def skip(self, *, kernel: str, shape: dict, provider: str, mode: str, note: str) -> Record:
        print(f"  {kernel:16s} {mode:8s} {provider:22s} skipped: {note}", flush=True)
        return self._add(Record(kernel, shape_label(shape), dict(shape), provider, mode, "skipped", note,
                                peak=self.kernels.get(kernel, {}).get("peak", "bf16")))

    def _fail(self, kernel, shape, provider, mode, exc: BaseException, check=None) -> Record:
        status = "skipped" if type(exc).__name__ == "BackendUnavailable" else "failed"
        note = _one_line(exc)
        print(f"  {kernel:16s} {mode:8s} {provider:22s} {status.upper()}: {note}", flush=True)
        if status == "failed" and not isinstance(exc, ValidationError):
            traceback.print_exception(exc, limit=6)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            _free(self.device)
        return self._add(Record(kernel, shape_label(shape), dict(shape), provider, mode, status, note,
                                peak=self.kernels.get(kernel, {}).get("peak", "bf16"), check=check or {}))

    def _napkin(self, kernel, shape, mode, flops, bytes_moved, peak) -> None:
        key = (kernel, shape_label(shape), mode)
        if key in self._napkin_seen:
            return
        self._napkin_seen.add(key)
        ideal = ideal_ms(flops, bytes_moved, self.ceilings, "measured", peak)
        sheet = ideal_ms(flops, bytes_moved, self.ceilings, "datasheet", peak)
        parts = [f"{kernel} {mode} [{shape_label(shape)}]:"]
        if flops:
            parts.append(f"{flops / 1e9:.4g} GFLOP")
        if bytes_moved:
            parts.append(f"{bytes_moved / 1e6:.4g} MB")
        if ideal is not None:
            parts.append(f"-> ideal {ideal:.4g} ms at the measured {peak}/HBM ceilings")
        if sheet is not None:
            parts.append(f"({sheet:.4g} ms at the datasheet's)")
        print("napkin: " + " ".join(parts), flush=True)

    # -- benchmarking --------------------------------------------------------

    def bench(self, *, kernel: str, shape: dict, provider: str, mode: str, fn: Callable[[], object],
              flops: float | None, bytes_moved: float | None, check: Callable[[], dict | None] | None = None,
              note: str = "", grad_to_none: Iterable[torch.Tensor] | None = None) -> Record:
        """Validate (``check()``), then time ``fn()`` and measure its extra peak memory."""
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if kernel not in self.kernels:
            raise ValueError(f"kernel: {kernel!r} was not declared with ctx.declare_kernel")
        if not self.wants(provider):
            return self.skip(kernel=kernel, shape=shape, provider=provider, mode=mode, note="not selected (--providers)")
        left = self.time_left()
        if left is not None and left <= 0:
            return self.skip(kernel=kernel, shape=shape, provider=provider, mode=mode, note="time budget exhausted")
        peak = self.kernels[kernel]["peak"]
        self._napkin(kernel, shape, mode, flops, bytes_moved, peak)
        metrics = {}
        if self.warm_only:
            try:
                if check is not None:
                    check()
                fn()
            except Exception as exc:  # noqa: BLE001
                return self._fail(kernel, shape, provider, mode, exc)
            print(f"  {kernel:16s} {mode:8s} {provider:22s} warmed", flush=True)
            return Record(kernel, shape_label(shape), dict(shape), provider, mode, "skipped", "warm-up only")
        try:
            if check is not None:
                metrics = check() or {}
            timing = time_fn(fn, self.device, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms, grad_to_none=grad_to_none)
            mem = peak_memory_mb(fn, self.device)
        except Exception as exc:  # noqa: BLE001 - every provider failure becomes a record
            return self._fail(kernel, shape, provider, mode, exc, metrics)
        return self._finish(kernel, shape, provider, mode, timing, mem, flops, bytes_moved, peak, metrics, note)

    def _finish(self, kernel, shape, provider, mode, timing, mem, flops, bytes_moved, peak, metrics, note) -> Record:
        seconds = timing.median_ms * 1e-3
        rec = Record(kernel, shape_label(shape), dict(shape), provider, mode, "ok", note,
                     median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                     flops=flops, bytes=bytes_moved, peak=peak,
                     tflops=flops / seconds / 1e12 if flops else None,
                     gbps=bytes_moved / seconds / 1e9 if bytes_moved else None,
                     peak_mem_mb=mem, check=metrics)
        rec.ideal_ms_measured = ideal_ms(flops, bytes_moved, self.ceilings, "measured", peak)
        rec.ideal_ms_datasheet = ideal_ms(flops, bytes_moved, self.ceilings, "datasheet", peak)
        if rec.ideal_ms_measured is not None:
            rec.frac_measured_peak = rec.ideal_ms_measured / timing.median_ms
        if rec.ideal_ms_datasheet is not None:
            rec.frac_datasheet_peak = rec.ideal_ms_datasheet / timing.median_ms
        line = f"  {kernel:16s} {mode:8s} {provider:22s} {timing.median_ms:10.4f} ms"
        if rec.tflops is not None:
            line += f" {rec.tflops:9.2f} TFLOP/s"
        if rec.frac_measured_peak is not None:
            line += f" {100 * rec.frac_measured_peak:5.1f}% of measured roof"
        if mem is not None:
            line += f" {mem:9.1f} MiB"
        print(line, flush=True)
        return self._add(rec)

    def bench_autograd(self, *, kernel: str, shape: dict, provider: str, forward: Callable[..., torch.Tensor],
                       inputs: list[torch.Tensor], grad_out: torch.Tensor, costs: dict,
                       check: Callable[[torch.Tensor, tuple], dict | None] | None = None,
                       modes: Iterable[str] = MODES, note: str = "") -> list[Record]:
        """Time ``forward(*inputs)`` (inputs require grad) in the modes asked for.

        fwd: the training forward (autograd graph built). bwd: backward alone,
        through one retained graph. fwd+bwd: both. ``check(out, grads)``
        validates the provider's output and gradients first; ``costs`` maps
        each mode to (flops, bytes).
        """
        modes = [m for m in modes if m in costs]
        if self.proof:  # the targets are on fwd+bwd: measure it first
            modes.sort(key=lambda m: m != "fwd+bwd")
        if not self.wants(provider):
            return [self.skip(kernel=kernel, shape=shape, provider=provider, mode=m,
                              note="not selected (--providers)") for m in modes]
        left = self.time_left()
        if left is not None and left <= 0:
            return [self.skip(kernel=kernel, shape=shape, provider=provider, mode=m, note="time budget exhausted")
                    for m in modes]
        metrics = {}
        try:
            out = forward(*inputs)
            grads = torch.autograd.grad(out, inputs, grad_out)
            if check is not None:
                metrics = check(out, grads) or {}
            del out, grads
        except Exception as exc:  # noqa: BLE001
            return [self._fail(kernel, shape, provider, m, exc, metrics) for m in modes]

        def fwd():
            return forward(*inputs)

        def fwd_bwd():
            return torch.autograd.grad(forward(*inputs), inputs, grad_out)

        records = []
        for mode in modes:
            if mode == "bwd":
                try:
                    graph_out = forward(*inputs)
                except Exception as exc:  # noqa: BLE001
                    records.append(self._fail(kernel, shape, provider, mode, exc, metrics))
                    continue

                def fn(graph_out=graph_out):
                    return torch.autograd.grad(graph_out, inputs, grad_out, retain_graph=True)
            else:
                fn = fwd if mode == "fwd" else fwd_bwd
            flops, bytes_moved = costs[mode]
            records.append(self.bench(kernel=kernel, shape=shape, provider=provider, mode=mode, fn=fn, flops=flops,
                                      bytes_moved=bytes_moved, check=lambda: metrics, note=note))
            fn = graph_out = None
        _free(self.device)
        return records

    def cleanup(self) -> None:
        _free(self.device)


# ---------------------------------------------------------------------------
# Command line shared by every script
# ---------------------------------------------------------------------------

def parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks that the scripts work")
    p.add_argument("--full", action="store_true", help="the longer shape sweeps")
    p.add_argument("--out", type=Path, default=None, help="write results.json / results.md / plots here")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cpu with --smoke, else cuda")
    p.add_argument("--providers", default=None, help="comma-separated providers to run (default: all)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the compiled baselines "
                        "(default: inductor on CUDA, aot_eager on the CPU; or $BENCH_COMPILE_BACKEND)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--ceilings", type=Path, default=None, help="read measured ceilings from this JSON file")
    p.add_argument("--records", type=Path, default=None, help="append JSON lines of records here (for run_all)")
    p.add_argument("--no-report", action="store_true", help="skip results.json / results.md / plots")
    p.add_argument("--proof", action="store_true",
                   help="only the speedrun shape of each kernel, fwd+bwd first (gpu_check's proof stage)")
    p.add_argument("--warm", action="store_true",
                   help="run every case once, untimed and unrecorded, to fill the compile caches")
    return p


def resolve_device(args) -> torch.device:
    name = args.device or ("cpu" if args.smoke else "cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: full-size benchmarks need a GPU; use --smoke for the CPU check")
    return torch.device(name)


def load_or_measure_ceilings(args, device: torch.device) -> dict:
    if args.ceilings is not None and args.ceilings.exists():
        return json.loads(args.ceilings.read_text())
    ceilings = measure_ceilings(device, smoke=args.smoke)
    print_ceilings(ceilings)
    return ceilings


def print_ceilings(ceilings: dict) -> None:
    m, s = ceilings["measured"], ceilings.get("datasheet") or {}
    print(f"ceilings on {ceilings['device']}:")
    for key, unit in (("bf16_tflops", "TFLOP/s"), ("fp8_tflops", "TFLOP/s"), ("hbm_gbps", "GB/s")):
        value, sheet = m.get(key), s.get(key)
        text = f"{value:.1f} {unit}" if value else "n/a"
        if sheet:
            text += f" (datasheet {sheet:g}" + (f", {100 * value / sheet:.0f}%)" if value else ")")
        print(f"  {key:12s} {text}")
    for note in ceilings.get("notes", []):
        print(f"  - {note}")


def make_context(args, device: torch.device, ceilings: dict) -> BenchContext:
    # Inductor's C++ path takes minutes on a small CPU box: the CPU smoke run checks
    # the compiled baselines' plumbing (dynamo + AOT autograd) with aot_eager instead.
    compile_backend = (args.compile_backend or os.environ.get("BENCH_COMPILE_BACKEND")
                       or ("inductor" if device.type == "cuda" else "aot_eager"))
    providers = set(args.providers.split(",")) if args.providers else None
    rep_ms, warmup_ms = args.rep_ms, args.warmup_ms
    return BenchContext(device=device, smoke=args.smoke, full=args.full, ceilings=ceilings, env=environment(device),
                        records_path=args.records, budget_s=args.budget_s, providers=providers,
                        compile_backend=compile_backend, warmup_ms=warmup_ms, rep_ms=rep_ms,
                        proof=args.proof, warm_only=args.warm)


def main(run: Callable[[BenchContext], None], argv: list[str] | None = None) -> int:
    """CLI of one script: ``python -m benchmarks.bench_x [--smoke] [--out DIR] ...``."""
    args = parser(run.__module__).parse_args(argv)
    device = resolve_device(args)
    torch.manual_seed(0)
    ceilings = load_or_measure_ceilings(args, device)
    ctx = make_context(args, device, ceilings)
    print(f"env: {json.dumps(ctx.env)}", flush=True)
    run(ctx)
    if args.out is not None and not args.no_report:
        from benchmarks import report
        paths = report.write_results(args.out, ctx.env, ceilings, ctx.kernels, [dataclasses.asdict(r)
                                                                               for r in ctx.records])
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit("harness is a library: run a benchmarks.bench_* module or benchmarks.run_all")
