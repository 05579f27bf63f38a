"""Tile scheduling and launch-configuration lookup shared by the Triton GEMM kernels.

Device side: ``grouped_tile`` (the L2-friendly order of output tiles) and
``upper_triangle_tile`` (the tiles on and above the diagonal of a symmetric product).
Host side: the SM count, the interpreter switch, and ``tuned_config``, which reads
the committed per-shape table ``kernels/triton_impl/tuned_configs.py``.
"""

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order.

    GROUP_M consecutive row blocks walk the column blocks together, so the
    column tiles of the right operand they share are read from L2 rather than
    HBM (the Triton matmul tutorial's ordering).
    """
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def upper_triangle_tile(t):
    """(row, col), row <= col, of the t-th tile on or above the diagonal, column by column.

    Column c holds tiles t in [c(c+1)/2, (c+1)(c+2)/2). fp32 sqrt is exact enough
    for t < 2^22; the two corrections absorb its last-bit rounding.
    """
    c = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    c = tl.where(c * (c + 1) // 2 > t, c - 1, c)
    c = tl.where((c + 1) * (c + 2) // 2 <= t, c + 1, c)
    return t - c * (c + 1) // 2, c


def triangle(t: int) -> int:
    """Tiles on and above the diagonal of a t x t tile grid."""
    return t * (t + 1) // 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM and an H200)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def tuned_config(kernel: str, key: str) -> dict | None:
    """The committed launch configuration of ``kernel`` for ``key``, or None when the table has none.

    The table (tuned_configs.TABLE) is written by ``python -m kernels.triton_impl.tune --write`` on a
    GPU; until then it holds estimates (tuned_configs.MEASURED is False).
    """
    from kernels.triton_impl import tuned_configs
    entry = tuned_configs.TABLE.get(kernel, {}).get(key)
    return dict(entry) if entry is not None else None
