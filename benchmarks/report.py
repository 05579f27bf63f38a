"""Turn benchmark records into results.json, results.md and one PNG plot per kernel.

``write_results(out_dir, env, ceilings, kernels, records)`` is all there is;
the records are the dicts of ``harness.Record``, the kernels the dicts given
to ``ctx.declare_kernel``. Speed-ups are baseline time / provider time, so
above 1 means faster than the baseline.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SCHEMA_VERSION = 1


def read_records(path: Path) -> tuple[dict, list[dict]]:
    """(kernels, records) from a JSON-lines file the scripts append to; a line cut short by a kill is skipped."""
    kernels, records = {}, []
    if not path.exists():
        return kernels, records
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        kind = obj.pop("type", None)
        if kind == "kernel":
            kernels[obj.pop("name")] = obj
        elif kind == "record":
            records.append(obj)
    return kernels, records


def _ok(records, **match):
    for r in records:
        if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return format(value * scale, spec) + suffix


def _speedup(records, rec, baseline: str | None) -> float | None:
    if baseline is None or rec["status"] != "ok":
        return None
    base = _ok(records, kernel=rec["kernel"], shape=rec["shape"], mode=rec["mode"], provider=baseline)
    if base is None or not rec["median_ms"]:
        return None
    return base["median_ms"] / rec["median_ms"]


def evaluate_targets(kernels: dict, records: list[dict]) -> list[dict]:
    """One row per declared target: the measured value and pass / fail / "not measured"."""
    from benchmarks.harness import shape_label
    rows = []
    for name, info in kernels.items():
        for t in info.get("targets", []):
            label = shape_label(t["shape"])
            rec = _ok(records, kernel=name, shape=label, mode=t["mode"], provider=t["provider"])
            base = (_ok(records, kernel=name, shape=label, mode=t["mode"], provider=t["baseline"])
                    if t.get("baseline") else None)
            value = None
            if rec is not None:
                if t["kind"] == "speedup" and base is not None:
                    value = base["median_ms"] / rec["median_ms"]
                elif t["kind"] == "peak_fraction":
                    value = rec["frac_datasheet_peak"] if rec["frac_datasheet_peak"] is not None \
                        else rec["frac_measured_peak"]
                elif t["kind"] == "memory_ratio" and base is not None and rec["peak_mem_mb"] is not None \
                        and base["peak_mem_mb"]:
                    value = rec["peak_mem_mb"] / base["peak_mem_mb"]
            if value is None:
                verdict = "not measured"
            elif t["kind"] == "memory_ratio":
                verdict = "pass" if value <= t["threshold"] else "FAIL"
            else:
                verdict = "pass" if value >= t["threshold"] else "FAIL"
            rows.append({"kernel": name, "shape": label, "mode": t["mode"], "provider": t["provider"],
                         "kind": t["kind"], "baseline": t.get("baseline"), "threshold": t["threshold"],
                         "desc": t.get("desc", ""), "value": value, "verdict": verdict})
    return rows


def _markdown(env: dict, ceilings: dict, kernels: dict, records: list[dict], targets: list[dict],
              modules: list[dict]) -> str:
    lines = ["# Kernel benchmarks", ""]
    lines.append(f"- device: **{env.get('device')}** (capability {env.get('capability')})")
    lines.append(f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
                 f"python {env.get('python')}")
    lines.append(f"- date {env.get('date')}, commit {env.get('git_commit')}"
                 + (", TRITON_INTERPRET=1" if env.get("triton_interpret") else ""))
    lines += ["", "Times are medians (CUDA: `triton.testing.do_bench`, L2 flushed before each call). "
              "\"% roof\" is the roofline time max(FLOPs / compute peak, bytes / bandwidth) divided by the "
              "measured time, against the ceilings measured in this run and the datasheet's. "
              "\"× X\" is X's time / this provider's time (above 1: faster than X). "
              "Peak MiB: extra memory allocated during one call.", ""]

    if modules:
        lines += ["## Scripts", "", "| script | seconds | status |", "|---|---|---|"]
        lines += [f"| {m['module']} | {m['seconds']} | {m['note'] or 'ok'} |" for m in modules]
        lines.append("")

    m, s = ceilings.get("measured", {}), ceilings.get("datasheet") or {}
    lines += ["## Device ceilings", "", "| ceiling | measured | datasheet | measured / datasheet |", "|---|---|---|---|"]
    for key, label, unit in (("bf16_tflops", "bf16 matmul", "TFLOP/s"), ("fp8_tflops", "fp8 _scaled_mm", "TFLOP/s"),
                             ("hbm_gbps", "device copy", "GB/s")):
        value, sheet = m.get(key), s.get(key)
        ratio = f"{100 * value / sheet:.0f}%" if value and sheet else "–"
        lines.append(f"| {label} | {_fmt(value, '.1f', suffix=' ' + unit)} | "
                     f"{_fmt(sheet, 'g', suffix=' ' + unit)} | {ratio} |")
    if s.get("name"):
        lines.append(f"\nDatasheet: {s['name']}.")
    for note in ceilings.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")

    if targets:
        lines += ["## Targets", "", "| kernel | shape | mode | goal | measured | verdict |", "|---|---|---|---|---|---|"]
        for t in targets:
            if t["kind"] == "speedup":
                goal = f"{t['provider']} ≥ {t['threshold']:g}× {t['baseline']}"
                value = _fmt(t["value"], ".2f", suffix="×")
            elif t["kind"] == "peak_fraction":
                goal = f"{t['provider']} ≥ {100 * t['threshold']:.0f}% of peak"
                value = _fmt(t["value"], ".1f", 100, "%")
            else:
                goal = f"{t['provider']} memory ≤ {100 * t['threshold']:.0f}% of {t['baseline']}"
                value = _fmt(t["value"], ".1f", 100, "%")
            lines.append(f"| {t['kernel']} | {t['shape']} | {t['mode']} | {goal} | {value} | {t['verdict']} |")
        lines.append("")

    for name, info in kernels.items():
        recs = [r for r in records if r["kernel"] == name]
        lines += [f"## {name}", ""]
        if info.get("description"):
            lines += [info["description"], ""]
        ref, comp = info.get("reference"), info.get("compiled")
        lines.append(f"Peak kind: {info.get('peak')}; baselines: reference = `{ref}`, compiled = `{comp}`.")
        lines.append("")
        modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in recs)]
        for mode in modes:
            lines += [f"### {name} — {mode}", "",
                      f"| shape | provider | median ms | TFLOP/s | GB/s | % roof (measured) | % roof (datasheet) "
                      f"| × {ref} | × {comp} | peak MiB |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            notes = []
            for r in (r for r in recs if r["mode"] == mode):
                if r["status"] != "ok":
                    lines.append(f"| {r['shape']} | {r['provider']} | {r['status']} | | | | | | | |")
                    notes.append(f"- {r['shape']} / {r['provider']}: {r['status']}: {r['note']}")
                    continue
                lines.append(
                    f"| {r['shape']} | {r['provider']} | {r['median_ms']:.4f} | {_fmt(r['tflops'], '.1f')} "
                    f"| {_fmt(r['gbps'], '.0f')} | {_fmt(r['frac_measured_peak'], '.1f', 100, '%')} "
                    f"| {_fmt(r['frac_datasheet_peak'], '.1f', 100, '%')} "
                    f"| {_fmt(_speedup(records, r, ref), '.2f', suffix='×')} "
                    f"| {_fmt(_speedup(records, r, comp), '.2f', suffix='×')} | {_fmt(r['peak_mem_mb'], '.0f')} |")
                if r.get("note"):
                    notes.append(f"- {r['shape']} / {r['provider']}: {r['note']}")
            lines += [""] + sorted(set(notes), key=notes.index) + [""]
    return "\n".join(lines).rstrip() + "\n"


PLOTS_SKIPPED = ("plots skipped: matplotlib is not installed "
                 "(get them with: pip install -e '.[bench]', or pip install matplotlib)")


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(plt, path: Path, name: str, info: dict, ceilings: dict, records: list[dict]) -> bool:

    recs = [r for r in records if r["kernel"] == name and r["status"] == "ok"]
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in recs)]
    if not modes:
        return False
    use_tflops = all(r["tflops"] is not None for r in recs)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 + 3 * len(modes), 5), squeeze=False)
    peak = info.get("peak", "bf16")
    for ax, mode in zip(axes[0], modes):
        mrecs = [r for r in recs if r["mode"] == mode]
        shapes = list(dict.fromkeys(r["shape"] for r in mrecs))
        providers = list(dict.fromkeys(r["provider"] for r in mrecs))
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                r = next((r for r in mrecs if r["shape"] == shape and r["provider"] == prov), None)
                if r is not None:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(r["tflops"] if use_tflops else r["median_ms"])
            ax.bar(xs, ys, width=width, label=prov)
        if use_tflops:
            for which, style in (("measured", "--"), ("datasheet", ":")):
                value = (ceilings.get(which) or {}).get(f"{peak}_tflops")
                if value:
                    ax.axhline(value, linestyle=style, color="k", linewidth=1,
                               label=f"{peak} peak ({which}) {value:.3g}")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace(" ", "\n") for s in shapes], fontsize=7)
        ax.set_ylabel("TFLOP/s" if use_tflops else "median ms")
        ax.set_title(f"{name} — {mode}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _finite(obj):
    """NaN and infinities become None, so results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_results(out_dir: Path, env: dict, ceilings: dict, kernels: dict, records: list[dict],
                  modules: list[dict] | None = None) -> list[Path]:
    """Write results.json, results.md and <kernel>.png into ``out_dir``; returns the paths written.

    ``modules``: run_all's one entry per script (module, rc, seconds, note).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = evaluate_targets(kernels, records)
    records = _finite(records)
    payload = {"schema": SCHEMA_VERSION, "env": env, "ceilings": ceilings, "kernels": kernels,
               "targets": targets, "modules": modules or [], "records": records}
    paths = [out_dir / "results.json", out_dir / "results.md"]
    paths[0].write_text(json.dumps(_finite(payload), indent=1, allow_nan=False, default=str) + "\n")
    paths[1].write_text(_markdown(env, ceilings, kernels, records, targets, modules or []))
    plt = _pyplot() if kernels else None
    if kernels and plt is None:
        print(PLOTS_SKIPPED, file=sys.stderr, flush=True)
        return paths
    for name, info in kernels.items():
        png = out_dir / f"{name}.png"
        if _plot(plt, png, name, info, ceilings, records):
            paths.append(png)
    return paths
