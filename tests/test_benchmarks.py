"""The benchmark harness and the smoke run of every benchmark script (so they never rot).

The smoke run goes through ``python -m benchmarks.run_all --smoke`` in a
subprocess, on the CPU, into a temporary directory; the environment is
inherited, so under the interpreter (TRITON_INTERPRET=1, set by conftest on a
machine without a GPU) the Triton providers run too, at tiny shapes.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import child_env, harness, report

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_KERNELS = {"newton_schulz", "relu2_mlp", "fp8_head"}


# ---------------------------------------------------------------------------
# Harness units
# ---------------------------------------------------------------------------

def test_compare_accepts_close_and_rejects_far():
    ref = torch.randn(37, 11, dtype=torch.float64)
    metrics = harness.compare("y", ref * (1 + 1e-4), ref, rel_tol=1e-3, cos_min=0.999)
    assert metrics["y_rel_err"] == pytest.approx(1e-4, rel=1e-3)
    assert metrics["y_cos"] == pytest.approx(1.0)
    with pytest.raises(harness.ValidationError, match="relative error"):
        harness.compare("y", ref + 0.1 * torch.randn_like(ref), ref, rel_tol=1e-3)
    with pytest.raises(harness.ValidationError, match="cosine"):
        harness.compare("y", -ref, ref, cos_min=0.9)
    with pytest.raises(harness.ValidationError, match="shape"):
        harness.compare("y", ref[:-1], ref)


def test_compare_rejects_non_finite_where_oracle_is_finite():
    ref = torch.ones(5)
    out = ref.clone()
    out[3] = float("nan")
    with pytest.raises(harness.ValidationError, match="non-finite"):
        harness.compare("y", out, ref)


def test_ideal_time_is_the_slower_roof():
    ceilings = {"measured": {"bf16_tflops": 100.0, "fp8_tflops": 200.0, "hbm_gbps": 1000.0}, "datasheet": None}
    # 1e12 FLOP at 100 TFLOP/s = 10 ms; 1e9 bytes at 1 TB/s = 1 ms.
    assert harness.ideal_ms(1e12, 1e9, ceilings, "measured", "bf16") == pytest.approx(10.0)
    assert harness.ideal_ms(1e12, 1e9, ceilings, "measured", "fp8") == pytest.approx(5.0)
    assert harness.ideal_ms(1e9, 1e11, ceilings, "measured", "bf16") == pytest.approx(100.0)
    assert harness.ideal_ms(1e12, 1e9, ceilings, "datasheet", "bf16") is None


def test_datasheet_lookup():
    assert harness.datasheet_for("NVIDIA H100 80GB HBM3")["hbm_gbps"] == 3350.0
    assert harness.datasheet_for("NVIDIA H200")["hbm_gbps"] == 4800.0
    assert harness.datasheet_for("NVIDIA H100 PCIe")["bf16_tflops"] == 756.0
    assert harness.datasheet_for("NVIDIA GH200 480GB") is None
    assert harness.datasheet_for("NVIDIA A10G") is None


def test_cpu_timing_measures_the_call():
    timing = harness.time_fn(lambda: sum(range(20000)), torch.device("cpu"))
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert timing.n >= 1


def _ctx(tmp_path, budget_s=None):
    ceilings = {"device": "cpu", "measured": {"bf16_tflops": 1.0, "fp8_tflops": 2.0, "hbm_gbps": 10.0},
                "datasheet": None, "notes": []}
    return harness.BenchContext(device=torch.device("cpu"), smoke=True, full=False, ceilings=ceilings,
                                env={"device": "cpu"}, records_path=tmp_path / "r.jsonl", budget_s=budget_s)


def test_bench_records_ok_failed_and_skipped(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.declare_kernel("k", reference="ref", compiled="fast")
    shape = {"T": 3}
    ok = ctx.bench(kernel="k", shape=shape, provider="ref", mode="fwd", fn=lambda: torch.ones(3).sum(),
                   flops=6.0, bytes_moved=12.0)
    assert ok.status == "ok" and ok.median_ms > 0 and ok.tflops > 0 and ok.frac_measured_peak > 0

    def bad_check():
        raise harness.ValidationError("out: relative error 1 exceeds 0.01")

    failed = ctx.bench(kernel="k", shape=shape, provider="fast", mode="fwd", fn=lambda: None, flops=6.0,
                       bytes_moved=12.0, check=bad_check)
    assert failed.status == "failed" and "relative error" in failed.note and failed.median_ms is None

    def raises():
        raise RuntimeError("kernel exploded")

    crashed = ctx.bench(kernel="k", shape=shape, provider="other", mode="fwd", fn=raises, flops=None,
                        bytes_moved=None)
    assert crashed.status == "failed" and "kernel exploded" in crashed.note
    skipped = ctx.skip(kernel="k", shape=shape, provider="cuda", mode="fwd", note="no extension")
    assert skipped.status == "skipped"
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [l["type"] for l in lines] == ["kernel", "record", "record", "record", "record"]
    assert [l.get("status") for l in lines[1:]] == ["ok", "failed", "failed", "skipped"]


def test_bench_autograd_times_every_mode_and_validates_gradients(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.declare_kernel("sq", reference="ref", compiled=None)
    x = torch.randn(23, dtype=torch.float64, requires_grad=True)
    g = torch.randn(23, dtype=torch.float64)
    seen = {}

    def check(out, grads):
        seen["grad"] = grads[0]
        return harness.compare("dx", grads[0], 2 * x.detach() * g, rel_tol=1e-12)

    costs = {m: (23.0, 184.0) for m in harness.MODES}
    records = ctx.bench_autograd(kernel="sq", shape={"N": 23}, provider="ref", forward=lambda t: t * t,
                                 inputs=[x], grad_out=g, costs=costs, check=check)
    assert [r.mode for r in records] == list(harness.MODES)
    assert all(r.status == "ok" for r in records), [r.note for r in records]
    assert x.grad is None  # timing must not accumulate into .grad
    wrong = ctx.bench_autograd(kernel="sq", shape={"N": 23}, provider="wrong", forward=lambda t: t * t * t,
                               inputs=[x], grad_out=g, costs=costs, check=check)
    assert all(r.status == "failed" for r in wrong)


def test_time_budget_turns_cases_into_skips(tmp_path):
    ctx = _ctx(tmp_path, budget_s=1e-9)
    ctx.declare_kernel("k", reference="ref", compiled=None)
    rec = ctx.bench(kernel="k", shape={"T": 1}, provider="ref", mode="fwd", fn=lambda: None, flops=1.0,
                    bytes_moved=None)
    assert rec.status == "skipped" and "budget" in rec.note


def test_targets_and_report(tmp_path):
    shape = {"T": 4}
    kernels = {"k": {"reference": "ref", "compiled": "comp", "peak": "bf16", "description": "",
                     "targets": [
                         {"shape": shape, "mode": "fwd", "provider": "new", "kind": "speedup", "threshold": 1.5,
                          "baseline": "comp", "desc": ""},
                         {"shape": shape, "mode": "fwd", "provider": "new", "kind": "memory_ratio",
                          "threshold": 0.25, "baseline": "ref", "desc": ""},
                         {"shape": shape, "mode": "fwd", "provider": "new", "kind": "peak_fraction",
                          "threshold": 0.65, "baseline": None, "desc": ""},
                         {"shape": {"T": 9}, "mode": "fwd", "provider": "new", "kind": "speedup", "threshold": 1.0,
                          "baseline": "comp", "desc": ""}]}}

    def rec(provider, ms, mem, frac=None):
        return {"kernel": "k", "shape": harness.shape_label(shape), "dims": shape, "provider": provider,
                "mode": "fwd", "status": "ok", "note": "", "median_ms": ms, "tflops": 1.0, "gbps": None,
                "frac_measured_peak": frac, "frac_datasheet_peak": None, "peak_mem_mb": mem,
                "check": {"x": float("nan")}}

    records = [rec("ref", 4.0, 100.0), rec("comp", 3.0, 50.0), rec("new", 1.5, 30.0, 0.5)]
    rows = report.evaluate_targets(kernels, records)
    assert [r["verdict"] for r in rows] == ["pass", "FAIL", "FAIL", "not measured"]
    assert rows[0]["value"] == pytest.approx(2.0) and rows[1]["value"] == pytest.approx(0.3)
    env = {"device": "cpu"}
    ceilings = {"measured": {"bf16_tflops": 2.0}, "datasheet": None}
    paths = report.write_results(tmp_path, env, ceilings, kernels, records)
    payload = json.loads((tmp_path / "results.json").read_text())  # NaN became null: strict JSON
    assert payload["records"][0]["check"]["x"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| T=4 | new | 1.5000 |" in md and "2.67×" in md and "2.00×" in md
    assert (tmp_path / "k.png") in paths and (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------
# The smoke run of every script
# ---------------------------------------------------------------------------

def test_run_all_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    payload = json.loads((out / "results.json").read_text())
    assert payload["env"]["torch"] == torch.__version__ and payload["env"]["date"]
    assert payload["ceilings"]["measured"]["bf16_tflops"] > 0
    assert all(m["rc"] == 0 for m in payload["modules"]), payload["modules"]
    kernels = payload["kernels"]
    assert EXPECTED_KERNELS <= set(kernels)
    records = payload["records"]
    for name in EXPECTED_KERNELS:
        info = kernels[name]
        mine = [r for r in records if r["kernel"] == name]
        assert mine, name
        for baseline in (info["reference"], info["compiled"]):
            base = [r for r in mine if r["provider"] == baseline]
            assert base and all(r["status"] == "ok" for r in base), (name, baseline, [r["note"] for r in base])
            assert all(r["median_ms"] > 0 and math.isfinite(r["tflops"]) for r in base)
        for r in mine:
            assert r["status"] in ("ok", "skipped", "failed")
            assert r["status"] == "ok" or r["note"], r  # every non-ok record says why
            assert r["env"]["device"] == payload["env"]["device"]
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    for name in EXPECTED_KERNELS:
        assert f"## {name}" in md
