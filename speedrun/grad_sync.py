"""All gradient communication of the trainer, in one place.

For now: after the whole backward, one blocking all-reduce per parameter,
averaging over ranks. No buckets, no overlap with backward. The overlapped
reduce-scatter with sharded optimizers (issue 9) replaces this module: the
trainer only calls ``broadcast_parameters`` once and ``GradSync.sync`` once
per optimizer step, after the last micro-step's backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (same seed gives the same init; this makes sure)."""
    if world()[1] == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


class GradSync:
    """Averages ``p.grad`` over ranks for the given parameters."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        _, self.world_size = world()
        # nccl averages in the collective; gloo has no AVG for all_reduce, so sum and scale.
        self.native_avg = self.world_size > 1 and dist.get_backend() == "nccl"

    @torch.no_grad()
    def sync(self) -> None:
        if self.world_size == 1:
            return
        for p in self.params:
            if p.grad is None:  # a rank that skipped a parameter still has to join the collective
                p.grad = torch.zeros_like(p)
            if self.native_avg:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            else:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (small) tensor over ranks; the tensor itself is left alone."""
    _, world_size = world()
    if world_size == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size
