"""Tile scheduling shared by the Triton GEMM kernels."""

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
