"""File one gpu_check run under benchmarks/results/ and point the README at it.

    python -m benchmarks.collect_results OUTDIR [--name NAME]

OUTDIR is what ``benchmarks/gpu_check.sh OUTDIR`` wrote (results.json,
results.md, summary.md, env.txt, bench.tar.gz, logs.tar.gz). The run lands in
``benchmarks/results/<date>_<device>/`` (or NAME): the two reports, the
summary, the environment and the plots taken out of bench.tar.gz; the logs
stay out of git. The README's "Newest" line then links to it. Commit the
folder and the README yourself.
"""

import argparse
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = RESULTS / "README.md"
NEWEST = re.compile(r"^Newest: .*$", re.MULTILINE)


def run_name(payload: dict) -> str:
    env = payload.get("env", {})
    date = (env.get("date") or "undated")[:10]
    device = re.sub(r"[^A-Za-z0-9]+", "-", env.get("device") or "unknown").strip("-")
    return f"{date}_{device}"


def collect(src: Path, name: str | None = None) -> Path:
    results_json = src / "results.json"
    if not results_json.is_file():
        raise SystemExit(f"{src}: no results.json (is this a gpu_check OUTDIR?)")
    payload = json.loads(results_json.read_text())
    dest = RESULTS / (name or run_name(payload))
    dest.mkdir(parents=True, exist_ok=True)
    for fname in ("results.json", "results.md", "summary.md", "env.txt"):
        if (src / fname).is_file():
            shutil.copy2(src / fname, dest / fname)
    bench_tar = src / "bench.tar.gz"
    if bench_tar.is_file():
        with tarfile.open(bench_tar) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".png"):
                    data = tar.extractfile(member)
                    (dest / Path(member.name).name).write_bytes(data.read())
    text = README.read_text()
    line = f"Newest: [{dest.name}]({dest.name}/results.md)"
    README.write_text(NEWEST.sub(line, text) if NEWEST.search(text) else text.rstrip() + "\n\n" + line + "\n")
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--name", default=None, help="folder name under benchmarks/results (default <date>_<device>)")
    args = p.parse_args(argv)
    dest = collect(args.outdir, args.name)
    print(f"filed under {dest}; now: git add {dest.relative_to(RESULTS.parent.parent)} {README.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
