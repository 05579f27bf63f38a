"""Build of the `kernels` package and its optional CUDA extension `kernels._C`.

The extension is the csrc/ kernels compiled by nvcc plus a pybind11 binding
file compiled by the host compiler, with cudart linked statically: it imports
on machines without a CUDA runtime, and it needs nothing from torch's C++/CUDA
libraries (a CPU torch could not provide them).

It is built only when nvcc is found. An install never fails because of it:
without nvcc, or when the build fails, the pure-Python package installs and
kernels/_cuda_build.json records why, which kernels.cuda_impl.extension_status()
reports.

Environment:
  KERNELS_CUDA_ARCH    targets, e.g. "90a;80" (the default), "90a", "80+PTX", "sm_89"
                       ("+PTX" also embeds PTX for newer GPUs)
  KERNELS_NVCC         path of nvcc to use (a path that does not exist counts as "not found")
  KERNELS_NO_CUDA_EXT  "1": do not build the extension
  CUDA_HOME / CUDA_PATH  where the toolkit is (else next to nvcc, else /usr/local/cuda)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
RECORD_NAME = "_cuda_build.json"
DEFAULT_ARCH = "90a;80"
EXT_NAME = "kernels._C"
BENCH_REQUIRES = ["matplotlib"]


def _log(msg: str) -> None:
    print(f"[kernels setup] {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    """nvcc from KERNELS_NVCC, CUDA_HOME/CUDA_PATH, PATH or /usr/local/cuda, else None."""
    explicit = os.environ.get("KERNELS_NVCC")
    if explicit is not None:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    candidates = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(on_path)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _toolkit_root(nvcc: str) -> str | None:
    """The CUDA toolkit directory holding include/cuda_runtime.h and the static cudart."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc); a dry run shows its real TOP.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            candidates.append(os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")) and _static_cudart(c):
            return os.path.normpath(c)
    return None


def _static_cudart(root: str) -> str | None:
    for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        path = os.path.join(root, lib, "libcudart_static.a")
        if os.path.isfile(path):
            return path
    return None


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def gencode_flags(spec: str) -> tuple[list[str], list[str]]:
    """('-gencode=...' flags, target names) for a KERNELS_CUDA_ARCH value; ValueError when malformed."""
    flags, names = [], []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})([af]?)(\+PTX)?", token, re.IGNORECASE)
        if not m:
            raise ValueError(f"KERNELS_CUDA_ARCH: cannot read target {token!r}; expected e.g. '90a', '80', "
                             "'sm_89' or '80+PTX'")
        arch = m.group(1) + m.group(2).lower()
        codes = [f"sm_{arch}"] + ([f"compute_{arch}"] if m.group(3) else [])
        # The explicit -gencode form: Hopper-only (sm_90a) code needs it.
        flags.append(f"-gencode=arch=compute_{arch},code=[{','.join(codes)}]")
        names.append(f"sm_{arch}" + ("+PTX" if m.group(3) else ""))
    if not flags:
        raise ValueError("KERNELS_CUDA_ARCH: no targets given")
    return flags, names


class BuildExtOptionalCuda(build_ext):
    """build_ext that compiles csrc/*.cu with nvcc, and drops the extension instead of failing."""

    def run(self):
        self._record = {"status": "not_built", "message": ""}
        started = time.time()
        nvcc = find_nvcc()
        if os.environ.get("KERNELS_NO_CUDA_EXT") == "1":
            self._skip("disabled", "KERNELS_NO_CUDA_EXT=1 was set at install time")
        elif nvcc is None:
            where = (f"KERNELS_NVCC={os.environ['KERNELS_NVCC']!r} is not an executable"
                     if os.environ.get("KERNELS_NVCC") is not None
                     else "looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH and /usr/local/cuda/bin")
            self._skip("nvcc_missing", f"nvcc was not found at install time ({where})")
        else:
            self._nvcc = nvcc
        super().run()
        self._record["seconds"] = round(time.time() - started, 1)
        self._write_record()

    def _skip(self, status: str, message: str) -> None:
        _log(f"not building the CUDA extension: {message}; installing the pure-Python package "
             "(the 'cuda' backend will be unavailable)")
        self._record = {"status": status, "message": message}
        self.extensions = [e for e in self.extensions if e.name != EXT_NAME]
        self._remove_stale_extension()

    def _remove_stale_extension(self) -> None:
        """An earlier build's module left in the build tree (or in place) would be packaged as if just built."""
        path = self.get_ext_fullpath(EXT_NAME)
        if os.path.exists(path):
            _log(f"removing the stale {path}")
            os.remove(path)

    def build_extensions(self):
        built = []
        for ext in self.extensions:
            if ext.name != EXT_NAME:
                self.build_extension(ext)
                built.append(ext)
                continue
            try:
                self._build_cuda_extension(ext)
                built.append(ext)
            except Exception as e:  # noqa: BLE001 - any failure must leave a working install
                message = str(e).strip()
                _log(f"building the CUDA extension failed; installing the pure-Python package "
                     f"(the 'cuda' backend will be unavailable):\n{message}")
                short = message.splitlines()[0] if message else type(e).__name__
                self._record.update(status="failed", message=f"the nvcc build failed at install time: {short}",
                                    log=message[-4000:])
                self._remove_stale_extension()
        # Later steps (copying in-place, listing outputs) only see what exists.
        self.extensions = built

    def _build_cuda_extension(self, ext: Extension) -> None:
        nvcc = self._nvcc
        root = _toolkit_root(nvcc)
        if root is None:
            raise RuntimeError(f"found nvcc at {nvcc}, but no CUDA toolkit with include/cuda_runtime.h and "
                               "libcudart_static.a (set CUDA_HOME)")
        flags, names = gencode_flags(os.environ.get("KERNELS_CUDA_ARCH", DEFAULT_ARCH))
        version = _nvcc_version(nvcc)
        _log(f"building the CUDA extension with {nvcc} (CUDA {version}) for {', '.join(names)}")

        # Outside pip's per-install temporary build tree, so that a reinstall recompiles only what changed.
        obj_dir = os.path.join(ROOT, "build", "cuda_objects")
        os.makedirs(obj_dir, exist_ok=True)
        sources = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
        headers = [os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith((".cuh", ".h"))]
        # Flags are part of the object's identity: a changed target list rebuilds.
        tag = re.sub(r"[^A-Za-z0-9]+", "_", "_".join(names))
        # Hidden visibility: nothing but PyInit__C leaves the module (pybind11 hides its own symbols).
        base_cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-I", CSRC, *flags]

        def compile_one(src: str) -> str:
            src_path = os.path.join(CSRC, src)
            obj = os.path.join(obj_dir, f"{os.path.splitext(src)[0]}.{tag}.o")
            newest_input = max(os.path.getmtime(p) for p in [src_path, *headers])
            if not self.force and os.path.exists(obj) and os.path.getmtime(obj) >= newest_input:
                return obj
            cmd = [*base_cmd, "-c", src_path, "-o", obj]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src} (exit {proc.returncode}): {' '.join(cmd)}\n"
                                   f"{proc.stdout}{proc.stderr}")
            return obj

        started = time.time()
        jobs = max(1, min(len(sources), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, sources))
        _log(f"nvcc compiled {len(sources)} files in {time.time() - started:.1f} s ({jobs} parallel jobs)")

        cudart = _static_cudart(root)
        ext.include_dirs = [*ext.include_dirs, CSRC]
        ext.extra_objects = [*ext.extra_objects, *objects]
        # Static cudart, then the system libraries it needs. --exclude-libs keeps
        # cudart's symbols local, so a libcudart that torch loaded globally
        # cannot interpose on this module's own copy (or the other way round).
        ext.extra_link_args = [*ext.extra_link_args, cudart, "-lrt", "-lpthread", "-ldl",
                               "-Wl,--exclude-libs,ALL"]
        self.build_extension(ext)
        self._record.update(status="built", message=f"built with nvcc {version} for {', '.join(names)}",
                            nvcc=nvcc, cuda_home=root, cuda_version=version, archs=names)

    def _write_record(self) -> None:
        # In place (editable installs) the record sits next to the sources;
        # otherwise in the build tree that becomes the wheel.
        if self.inplace:
            target = os.path.join(ROOT, "kernels")
        else:
            target = os.path.join(self.build_lib, "kernels")
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, RECORD_NAME), "w") as f:
            json.dump(self._record, f, indent=1)
            f.write("\n")
        _log(f"CUDA extension: {self._record['status']} ({self._record['message']})")


def _extensions() -> list[Extension]:
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        _log("pybind11 is not importable: the CUDA extension cannot be built "
             "(pip installs it for the build; with --no-build-isolation install pybind11 first)")
        return []
    return [Pybind11Extension(EXT_NAME, sources=["csrc/bindings.cpp"], cxx_std=17)]


setup(
    name="speedrun-kernels",
    version="0.1.0",
    description="Hand-written Triton and CUDA kernels for NanoGPT-speedrun training, with PyTorch references",
    packages=find_packages(include=["kernels", "kernels.*", "speedrun", "speedrun.*", "benchmarks", "benchmarks.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "triton", "numpy", "huggingface_hub", "tqdm"],
    # bench: plots of benchmark results and training runs (without it they are skipped, with a message).
    # test: pybind11 too, for the tests that run setup.py's extension build (install never fails).
    extras_require={"bench": BENCH_REQUIRES, "test": ["pytest", "pybind11>=2.10", *BENCH_REQUIRES]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtOptionalCuda},
    zip_safe=False,
)
