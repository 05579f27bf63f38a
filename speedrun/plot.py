"""Pictures of training runs: loss against step and against training time, and throughput.

    python -m speedrun.plot RUN_DIR [RUN_DIR ...] [--out PNG] [--title TEXT]

A RUN_DIR is a trainer output directory (its log.jsonl); several are drawn over
each other (backends, a resumed run, two seeds). A text file instead of a
directory is read as a record-style log, lines ``step:N/M val_loss:X
train_time:Tms step_avg:Ams`` (the speedrun record's published log, or a run's
saved stdout), so a run can be drawn over the record. The PNG goes to --out,
by default RUN_DIR/plot.png for one run and compare.png beside the first run
for several. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


class PlotError(RuntimeError):
    """A run cannot be drawn (no log, an empty log) or matplotlib is missing; the message says which."""


RECORD_LINE = re.compile(r"step:(\d+)/(\d+)(?: val_loss:(\S+))? train_time:([\d.]+)ms")


def read_run(path) -> dict:
    """-> {"label", "train": [(step, time_s, loss)], "val": [(step, time_s, loss)], "rate": [(step, tok/s)]}."""
    path = Path(path)
    run = {"label": path.name if path.is_dir() else path.stem, "train": [], "val": [], "rate": []}
    if path.is_dir():
        log = path / "log.jsonl"
        if not log.is_file():
            raise PlotError(f"{path}: no log.jsonl in it (not a trainer output directory?)")
        summed_ms = 0.0  # logs from before train_time_ms: the sum of the step times stands in for it
        for line in log.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if not isinstance(e, dict) or "step" not in e:
                continue
            summed_ms += e.get("step_ms", 0.0) if isinstance(e.get("step_ms"), (int, float)) else 0.0
            t = e.get("train_time_ms", summed_ms)
            t = t / 1000 if isinstance(t, (int, float)) else None
            if isinstance(e.get("train_loss"), (int, float)):
                run["train"].append((e["step"], t, e["train_loss"]))
            if isinstance(e.get("val_loss"), (int, float)):
                run["val"].append((e["step"], t, e["val_loss"]))
            rate = e.get("tokens_per_s_per_rank", e.get("tokens_per_s"))
            if isinstance(rate, (int, float)):
                run["rate"].append((e["step"], rate))
    elif path.is_file():
        for m in RECORD_LINE.finditer(path.read_text(errors="replace")):
            step, t = int(m.group(1)), float(m.group(4)) / 1000
            if m.group(3) is not None:
                run["val"].append((step, t, float(m.group(3))))
    else:
        raise PlotError(f"{path}: no such run directory or log file")
    if not run["train"] and not run["val"]:
        raise PlotError(f"{path}: the log has no losses to draw")
    return run


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed (pip install -e '.[bench]', or pip install matplotlib); "
                        "the log itself is still there") from None
    return plt


def write_plot(runs, out, title: str | None = None) -> Path:
    """Draw the runs (directories or record-style logs) into the PNG ``out``; returns its path."""
    plt = _pyplot()
    data = [read_run(r) for r in runs]
    labels = [d["label"] for d in data]
    if len(set(labels)) < len(labels):  # same names in different places: use the paths
        for d, r in zip(data, runs):
            d["label"] = str(r)
    fig, (by_step, by_time, rate) = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, d in enumerate(data):
        color = f"C{i % 10}"
        if d["train"]:
            steps, times, losses = zip(*d["train"])
            by_step.plot(steps, losses, color=color, alpha=0.45, lw=0.8, label=f"{d['label']} train")
            timed = [(t, v) for t, v in zip(times, losses) if t is not None]
            if timed:
                by_time.plot(*zip(*timed), color=color, alpha=0.45, lw=0.8)
        if d["val"]:
            steps, times, losses = zip(*d["val"])
            by_step.plot(steps, losses, "o-", color=color, ms=3.5, lw=1.6, label=f"{d['label']} val")
            timed = [(t, v) for t, v in zip(times, losses) if t is not None]
            if timed:
                by_time.plot(*zip(*timed), "o-", color=color, ms=3.5, lw=1.6, label=f"{d['label']} val")
        if d["rate"]:
            steps, rates = zip(*d["rate"])
            rate.plot(steps, [r / 1000 for r in rates], color=color, lw=1.0, label=d["label"])
    plain = plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (by_step, by_time):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(True, which="both", alpha=0.3)
    by_step.set_xlabel("step")
    by_step.set_title("loss against step")
    by_step.legend(fontsize=7)
    by_time.set_xlabel("training time (s, validation excluded)")
    by_time.set_title("loss against training time")
    if by_time.has_data():
        by_time.legend(fontsize=7)
    rate.set_xlabel("step")
    rate.set_ylabel("thousand tokens/s per GPU (per process on CPU)")
    rate.set_title("throughput")
    rate.grid(True, alpha=0.3)
    if rate.has_data():
        rate.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def default_out(runs) -> Path:
    first = Path(runs[0])
    if len(runs) == 1 and first.is_dir():
        return first / "plot.png"
    return first.parent / "compare.png"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedrun.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="trainer output directory, or a record-style log")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN/plot.png, or compare.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        out = write_plot(args.runs, args.out or default_out(args.runs), args.title)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
