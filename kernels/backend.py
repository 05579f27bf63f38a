"""Backend selection: which implementation of an op runs for a given call.

A backend implements an op by providing the module ``kernels.<backend>_impl.<op>``
with ``forward`` (and ``backward`` for differentiable ops) taking the same
arguments as the op's ``reference_forward`` / ``reference_backward``. The
"reference" backend is the plain-PyTorch code in the op's own file.

Resolution happens in the public Python wrapper, before the ``torch.library``
op is called, so the op receives a concrete backend name. The wrapper runs at
trace time under ``torch.compile``; nothing here is data dependent.
"""

import importlib
import importlib.util
import os

import torch

BACKENDS = ("reference", "triton", "cuda")

# Preference order when the caller asks for none and the inputs live on a GPU.
_AUTO_ORDER_CUDA = ("triton", "cuda", "reference")

ENV_VAR = "KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend exists but cannot run this call; the message says why."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_extension_status() -> tuple[bool, str]:
    try:
        from kernels.cuda_impl import extension_status
    except ImportError:
        return False, "CUDA extension not built: this install has no kernels.cuda_impl package"
    return extension_status()


def _has_module(backend: str, op: str) -> bool:
    return importlib.util.find_spec(f"kernels.{backend}_impl.{op}") is not None


def why_unavailable(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """None when ``backend`` can run ``op`` on tensors of ``device``, else the reason."""
    if backend == "reference":
        return None
    if op is not None and not _has_module(backend, op):
        return f"backend {backend!r} has no implementation of {op}"
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device.type == "cpu":
            if not _interpreting():
                return ("triton on CPU tensors runs only through the Triton interpreter: "
                        "set TRITON_INTERPRET=1 before importing kernels")
            return None
        if device.type != "cuda":
            return f"triton needs CUDA tensors, got tensors on {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    if backend == "cuda":
        ok, reason = _cuda_extension_status()
        if not ok:
            return reason
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got tensors on {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return f"unknown backend {backend!r}"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run at least one op on ``device`` in this process.

    ``device`` defaults to "cuda" when a GPU is visible, else "cpu".
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """The concrete backend for one call of ``op`` on tensors of ``device``.

    ``backend`` None (or "auto") means ``$KERNELS_BACKEND`` when set, else the
    best one that can run here. A named backend that cannot run raises
    BackendUnavailable with the reason; an unknown name raises ValueError.
    """
    if backend is None:
        backend = os.environ.get(ENV_VAR) or "auto"
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if not isinstance(backend, str):
        raise TypeError(f"{source}: expected a str or None, got {type(backend).__name__}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        for candidate in _AUTO_ORDER_CUDA:
            if why_unavailable(candidate, device, op) is None:
                return candidate
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {backend!r}; expected one of "
                         f"{', '.join(repr(b) for b in BACKENDS)} or 'auto'")
    reason = why_unavailable(backend, device, op)
    if reason is not None:
        raise BackendUnavailable(f"{source}={backend!r} cannot run {op} here: {reason}")
    return backend


def load_impl(backend: str, op: str):
    """The module holding ``backend``'s ``forward``/``backward`` for ``op``."""
    return importlib.import_module(f"kernels.{backend}_impl.{op}")
