"""Every import in the repository is satisfied by what setup.py declares, and optional ones degrade.

A package installed by hand on one machine once hid a missing dependency (matplotlib) behind a green
CI run. These tests read every Python file's imports and check each third-party name against
setup.py's install_requires and extras, import every module of the three packages in a fresh
interpreter, and run the benchmark report with matplotlib made unimportable.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "speedrun", "benchmarks")
SCANNED = (*PACKAGES, "tests")
# pytest puts tests/ on sys.path, so its helper modules (oracles.py, ...) import by their bare names.
FIRST_PARTY = {*PACKAGES, "tests", "setup", *(p.stem for p in (ROOT / "tests").glob("*.py"))}
# Distribution name -> the module name it is imported as, where they differ.
IMPORT_NAME = {"pybind11": "pybind11"}
# Imported only by setup.py's build, provided by the build requirements in pyproject.toml.
BUILD_ONLY = {"setuptools", "pybind11"}


def _declared() -> dict[str, set[str]]:
    """{"install": {...}, "<extra>": {...}} of module names, read from setup.py's literals."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    consts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}

    def names(node) -> set[str]:
        if isinstance(node, ast.Name):
            node = consts[node.id]
        out = set()
        for elt in node.elts:
            if isinstance(elt, ast.Starred):
                out |= names(consts[elt.value.id])
            else:
                dist = ast.literal_eval(elt).split(";")[0].strip()
                for sep in "<>=!~[ ":
                    dist = dist.split(sep)[0]
                out.add(IMPORT_NAME.get(dist, dist.replace("-", "_")))
        return out

    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    declared = {"install": names(kw["install_requires"])}
    for key, value in zip(kw["extras_require"].keys, kw["extras_require"].values):
        declared[ast.literal_eval(key)] = names(value)
    return declared


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, guarded by `except ImportError`) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) in guarded) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in guarded))
    return found


def _python_files():
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))


def test_every_import_is_declared_in_setup_py():
    declared = _declared()
    runtime, test_extra = declared["install"], declared["install"] | declared["test"]
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for path in _python_files():
        rel = path.relative_to(ROOT)
        allowed = test_extra if rel.parts[0] == "tests" else runtime
        for name, guarded in _imports(path):
            if name in stdlib or name in FIRST_PARTY or name.startswith("_"):
                continue
            if name in allowed:
                continue
            # An optional import (behind `except ImportError`) must still be installable: in an extra.
            if guarded and any(name in mods for extra, mods in declared.items() if extra != "install"):
                continue
            problems.append(f"{rel}: imports {name!r}" + (" (optional, but in no extra)" if guarded else ""))
    assert not problems, "imports not declared in setup.py:\n" + "\n".join(problems)


def test_setup_py_itself_needs_only_build_requirements():
    build = set(BUILD_ONLY)
    for name, _guarded in _imports(ROOT / "setup.py"):
        assert name in set(sys.stdlib_module_names) | build, f"setup.py imports {name!r}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in BUILD_ONLY:
        assert f'"{name}' in pyproject, f"pyproject.toml's build requirements lack {name}"


def test_every_module_imports_in_a_fresh_interpreter():
    # Fresh, so that nothing an earlier test imported or patched can help; the interpreter flag as on CI.
    script = f"""
import importlib, json, pkgutil, sys
sys.path.insert(0, {str(ROOT)!r})
failed = {{}}
for top in {PACKAGES!r}:
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        try:
            importlib.import_module(info.name)
        except Exception as e:
            failed[info.name] = f"{{type(e).__name__}}: {{e}}"
print(json.dumps(failed))
"""
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, failed


def test_benchmark_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    from benchmarks import report
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    kernels = {"toy": {"peak": "bf16"}}
    records = [{"kernel": "toy", "mode": "fwd", "shape": "n=1", "provider": "reference", "status": "ok",
                "median_ms": 1.0, "tflops": None, "gbps": None, "frac_measured_peak": None,
                "frac_datasheet_peak": None, "peak_mem_mb": None}]
    paths = report.write_results(tmp_path, {}, {}, kernels, records)
    assert [p.name for p in paths] == ["results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text())["records"][0]["provider"] == "reference"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [report.PLOTS_SKIPPED] and "pip install" in err[0]


@pytest.mark.slow
def test_run_all_smoke_without_matplotlib(tmp_path):
    # A meta-path hook that refuses matplotlib, for the whole run_all process.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _NoMatplotlib:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
        "            raise ImportError('matplotlib is blocked by the test')\n"
        "sys.meta_path.insert(0, _NoMatplotlib())\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin",
           "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--smoke", "--only", "newton_schulz",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert not list(out.glob("*.png"))
    from benchmarks.report import PLOTS_SKIPPED
    assert res.stderr.count(PLOTS_SKIPPED) == 1
