"""Argument checks shared by the ops' public wrappers.

Every failure names the argument, what was found and what was expected. These
checks look only at metadata (type, layout, dtype, shape, device) and Python
scalars, so they are free and trace cleanly under torch.compile; value checks
of tensors live inside the ops.
"""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)

# float32's largest finite value and smallest normal one: a Python float outside
# [FP32_TINY, FP32_MAX] becomes inf, a subnormal or 0 once a kernel reads it as fp32.
FP32_MAX = float(torch.finfo(torch.float32).max)
FP32_TINY = float(torch.finfo(torch.float32).tiny)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, dtypes, min_dim: int | None = None, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    # The kernels read raw strided memory: sparse and nested tensors have none to read.
    if t.is_nested:
        raise TypeError(f"{name}: nested tensors are not supported; expected a dense strided tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: layout {str(t.layout).replace('torch.', '')} is not supported; "
                        "expected a dense strided tensor")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported; "
                        f"expected one of {_names(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name}: on {device}, but {first_name} is on {first}; "
                             "all tensors must be on one device")
    return first


def check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    return value


def check_positive_fp32(name: str, value) -> float:
    """A finite value > 0 that float32 holds as a normal number (what the kernels compute with)."""
    value = check_positive_finite(name, value)
    if not FP32_TINY <= value <= FP32_MAX:
        raise ValueError(f"{name}: {value} is outside float32's normal range [{FP32_TINY:.4g}, {FP32_MAX:.4g}]")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name}: {value} does not fit in int64 [{INT64_MIN}, {INT64_MAX}]")
    return value


def check_target_values(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise when a target is outside [0, num_classes) and is not ignore_index.

    Runs inside the ops (it reads values, so it syncs a GPU); switch it off for
    timed runs with ``kernels.set_target_checks(False)``.
    """
    if not target_checks_enabled() or targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0]) if bad.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        value = int(targets.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]])
        raise ValueError(f"targets: value {value} at index {first} is outside [0, {num_classes}) "
                         f"and is not ignore_index={ignore_index}")


_target_checks = [True]


def set_target_checks(enabled: bool) -> None:
    """Turn the per-call target range check on or off (it costs a host sync on a GPU)."""
    _target_checks[0] = bool(enabled)


def target_checks_enabled() -> bool:
    return _target_checks[0]
