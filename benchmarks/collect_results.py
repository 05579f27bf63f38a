"""File one gpu_check run, whole or cut short, under benchmarks/results/ and point the READMEs at it.

    python -m benchmarks.collect_results OUTDIR [--name NAME]

OUTDIR is what ``bash benchmarks/gpu_check.sh OUTDIR`` left (see benchmarks/gpu_check.py): any
subset of summary.md, env.txt, proof.jsonl, tests.tar.gz, bench.tar.gz, train.tar.gz and
logs.tar.gz, since a run killed at its limit keeps what its finished stages wrote. The run lands in
``benchmarks/results/<date>_<device>/`` (or NAME):

    summary.md, env.txt     as written by gpu_check
    proof.md, proof.json    the report of the proof stage's measurements (benchmarks.report)
    bench.md, bench.json    the report of the bench stage, and its plots (<kernel>.png)
    train_<backend>.jsonl   each trainer run's log.jsonl

A tile table the tuner measured on the GPU (logs.tar.gz's tuned_configs.py, MEASURED = True)
replaces kernels/triton_impl/tuned_configs.py. The logs and junit files stay out of git (they are
in OUTDIR's tarballs). The "Newest:" lines of
benchmarks/results/README.md and of the top-level README.md then link to the run's summary.
Commit the folder and both READMEs yourself.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tarfile
from pathlib import Path

from benchmarks import report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
NEWEST = re.compile(r"^Newest( GPU run)?: .*$", re.MULTILINE)


def _env_txt(src: Path) -> dict:
    env = {}
    path = src / "env.txt"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(": ")
            if sep and key and " " not in key:
                env.setdefault(key, value.strip())
    return env


def run_name(src: Path) -> str:
    env = _env_txt(src)
    date = (env.get("date") or "undated")[:10]
    device = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu") or "unknown-device").strip("-")
    return f"{date}_{device}"


def _members(archive: Path):
    if archive.is_file():
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        yield member.name, tar.extractfile(member).read()
        except (tarfile.TarError, EOFError):
            return  # cut short while it was written: gpu_check replaces it atomically, so this is rare


def _report(dest: Path, stem: str, kernels: dict, records: list[dict]) -> list[str]:
    """Write <stem>.md / <stem>.json from records; the environment and ceilings ride on the records."""
    if not records:
        return []
    scratch = dest / f".{stem}"
    paths = report.write_results(scratch, records[0].get("env", {}), {}, kernels, records)
    written = []
    for path in paths:
        if path.suffix in (".md", ".json"):
            target = dest / f"{stem}{path.suffix}"
            path.replace(target)
            written.append(target.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return written


def _point_readme(readme: Path, line: str) -> None:
    text = readme.read_text()
    readme.write_text(NEWEST.sub(line, text) if NEWEST.search(text) else text.rstrip() + "\n\n" + line + "\n")


TUNED_TABLE = REPO / "kernels" / "triton_impl" / "tuned_configs.py"


def collect(src: Path, name: str | None = None, results: Path = RESULTS, top_readme: Path | None = None,
            freeze_table: Path | None = TUNED_TABLE) -> Path:
    src = Path(src)
    present = [p.name for p in src.iterdir()] if src.is_dir() else []
    if not any(n in present for n in ("summary.md", "env.txt", "proof.jsonl")):
        raise SystemExit(f"{src}: no summary.md, env.txt or proof.jsonl: is this a gpu_check OUTDIR?")
    dest = results / (name or run_name(src))
    dest.mkdir(parents=True, exist_ok=True)
    filed = []
    for fname in ("summary.md", "env.txt"):
        if (src / fname).is_file():
            shutil.copy2(src / fname, dest / fname)
            filed.append(fname)
    kernels, records = report.read_records(src / "proof.jsonl")
    filed += _report(dest, "proof", kernels, records)
    for member, data in _members(src / "bench.tar.gz"):
        base = Path(member).name
        if base == "results.md":
            (dest / "bench.md").write_bytes(data)
            filed.append("bench.md")
        elif base == "results.json":
            (dest / "bench.json").write_bytes(data)
            filed.append("bench.json")
        elif base.endswith(".png"):
            (dest / base).write_bytes(data)
            filed.append(base)
    for member, data in _members(src / "train.tar.gz"):
        parts = Path(member).parts
        if len(parts) == 2 and parts[1] == "log.jsonl":
            (dest / f"{parts[0]}.jsonl").write_bytes(data)
            filed.append(f"{parts[0]}.jsonl")
    for member, data in _members(src / "logs.tar.gz"):
        # The tuner's table from a GPU: frozen into the repository, so no later run pays for autotuning.
        if Path(member).name == "tuned_configs.py" and b"MEASURED = True" in data and freeze_table is not None:
            freeze_table.write_bytes(data)
            filed.append(f"{freeze_table.relative_to(REPO) if freeze_table.is_relative_to(REPO) else freeze_table}")
    entry = "summary.md" if (dest / "summary.md").exists() else (filed[0] if filed else "")
    _point_readme(results / "README.md", f"Newest: [{dest.name}]({dest.name}/{entry})")
    top = top_readme if top_readme is not None else REPO / "README.md"
    if top.is_file():
        rel = dest.relative_to(top.parent) if dest.is_relative_to(top.parent) else dest
        _point_readme(top, f"Newest GPU run: [{dest.name}]({rel.as_posix()}/{entry})")
    print(f"filed {', '.join(filed) or 'nothing'} under {dest}")
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--name", default=None, help="folder name under benchmarks/results (default <date>_<device>)")
    args = p.parse_args(argv)
    dest = collect(args.outdir, args.name)
    print(f"now: git add {dest.relative_to(REPO)} benchmarks/results/README.md README.md "
          f"{TUNED_TABLE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
