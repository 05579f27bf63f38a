"""The "cuda" backend: hand-written CUDA kernels (csrc/, built into ``kernels._C``) plus torch matmuls.

- fp8_head:      float8 casts and the softcapped cross-entropy in CUDA, the matmuls through torch._scaled_mm
- newton_schulz: the symmetric X·Xᵀ on tensor cores in CUDA, the other two products through torch
- relu2_mlp:     the relu² activation (forward and backward) in CUDA, the matmuls through torch

``kernels._C`` is optional: setup.py builds it only when nvcc is found, and
records the outcome in ``kernels/_cuda_build.json``. ``extension_status()``
turns that record (and the import) into the reason the backend dispatch shows
when "cuda" cannot run. Whether a GPU exists is the dispatch's question, not
this module's: the extension imports and reports "no CUDA device" cleanly on a
CPU-only machine.
"""

import json
import os

_RECORD_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_cuda_build.json")


def _import_extension():
    try:
        from kernels import _C
    except ImportError as e:
        return None, e
    return _C, None


_C, _IMPORT_ERROR = _import_extension()


def build_record() -> dict | None:
    """The install-time build record written by setup.py, or None when there is none."""
    try:
        with open(_RECORD_PATH) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def extension_status() -> tuple[bool, str]:
    """(True, what was built) when ``kernels._C`` imports, else (False, why the "cuda" backend is missing)."""
    record = build_record()
    if _C is not None:
        if record is not None and record.get("status") == "built":
            return True, f"CUDA extension loaded: {record.get('message', 'built')}; {_C.runtime_info()}"
        # Loaded, but not from this install's build (e.g. an older in-place build found first on the path).
        note = f"the build record says: {record.get('message')}" if record else "no build record"
        return True, f"CUDA extension loaded from {getattr(_C, '__file__', '?')} ({note}); {_C.runtime_info()}"
    if record is None:
        return False, ("CUDA extension not built: no build record (install the package with `pip install -e .` "
                       "on a machine with nvcc)")
    status, message = record.get("status"), record.get("message", "")
    if status == "built":
        return False, f"CUDA extension was built but does not import: {_IMPORT_ERROR}"
    if status in ("nvcc_missing", "failed", "disabled"):
        return False, f"CUDA extension not built: {message}"
    return False, f"CUDA extension not built (build record status {status!r}: {message})"


def extension():
    """``kernels._C``, or RuntimeError with the reason it is unavailable."""
    if _C is None:
        raise RuntimeError(extension_status()[1])
    return _C
