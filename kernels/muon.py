"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

The update rule is the speedrun's (record #23):

    buf    <- lerp(buf, g, 1 - momentum)                 (fp32 momentum buffer)
    u      <- lerp(g, buf, momentum) if nesterov else buf
    u      <- newton_schulz(u)                           (per [rows, cols] matrix)
    p      <- p - lr * max(1, rows / cols) ** 0.5 * u

Parameters of the same shape inside a param group are stacked and orthogonalised
by ONE batched ``kernels.newton_schulz`` call, so the Newton-Schulz kernels see a
batch of matrices instead of many tiny launches. A parameter with more than two
dims (the merged QKV weight [3, H*hd, D]) is a batch of its trailing [rows, cols]
matrices: each slice is orthogonalised on its own, as in the speedrun.

Single process: sharding the step across ranks belongs to the distributed trainer.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from kernels.newton_schulz import newton_schulz

__all__ = ["Muon"]


def _newton_schulz(G, steps, coefficients, backend):
    # The one place the optimizer calls the op (tests wrap it to count batched calls).
    return newton_schulz(G, steps=steps, coefficients=coefficients, backend=backend)


def momentum_update(g: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Advance the fp32 momentum ``buf`` in place with gradient ``g``; the update to orthogonalise."""
    buf.lerp_(g, 1.0 - momentum)
    return torch.lerp(g, buf, momentum) if nesterov else buf


def orthogonal_step(updates: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
    """(orthogonalised updates, step size) for a batch ``[B, rows, cols]``: add ortho·size to the weights.

    Shared by this optimizer and the sharded one of the trainer, so both apply one rule.
    """
    rows, cols = updates.shape[-2:]
    ortho = _newton_schulz(updates, group["ns_steps"], group["coefficients"], group["backend"])
    return ortho, -group["lr"] * max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon optimizer for >= 2-D weights.

    Args:
        params: parameters or param groups; every parameter must have >= 2 dims.
        lr: learning rate (group["lr"], may be changed between steps).
        momentum: momentum coefficient in [0, 1) (group["momentum"], may be changed between steps).
        nesterov: use the Nesterov form of the update.
        ns_steps: number of Newton-Schulz iterations (>= 1).
        coefficients: Newton-Schulz coefficient set, passed to ``kernels.newton_schulz``.
        backend: kernel backend for ``kernels.newton_schulz`` (None: automatic).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        coefficients="quintic",
        backend: str | None = None,
    ):
        self._check_hyper(lr, momentum, ns_steps)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            coefficients=coefficients,
            backend=backend,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_hyper(group["lr"], group["momentum"], group["ns_steps"])
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(
                        f"params: Muon takes parameters with >= 2 dims, found one of shape {tuple(p.shape)}; "
                        "give 0-D/1-D parameters to another optimizer"
                    )
                if not p.is_floating_point():
                    raise TypeError(f"params: expected floating-point parameters, found dtype {p.dtype}")

    @staticmethod
    def _check_hyper(lr, momentum, ns_steps):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"lr: expected a finite number >= 0, got {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        if not (isinstance(ns_steps, int) and not isinstance(ns_steps, bool) and ns_steps >= 1):
            raise ValueError(f"ns_steps: expected an int >= 1, got {ns_steps!r}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            self._check_hyper(lr, momentum, group["ns_steps"])

            # Group by (shape, device) in first-seen order so each group is one batched call.
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("params: Muon does not support sparse gradients")
                by_shape.setdefault((tuple(p.shape), p.device), []).append(p)

            for (shape, _device), params in by_shape.items():
                updates = []
                for p in params:
                    g = p.grad.float()  # a view of p.grad when it is fp32: never written below
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                    updates.append(momentum_update(g, buf, momentum, group["nesterov"]))

                stack = torch.stack(updates).view(-1, shape[-2], shape[-1])  # [n·slices, rows, cols]
                ortho, scale = orthogonal_step(stack, group)
                for p, u in zip(params, ortho.view(len(params), *shape)):
                    p.add_(u.to(p.dtype), alpha=scale)
        return loss

    def load_state_dict(self, state_dict):
        # torch casts floating-point state to each parameter's dtype on load; the
        # momentum buffer must stay fp32 (a bf16 parameter would otherwise get a
        # bf16 buffer and resume with a different trajectory).
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, saved_groups):
            for p, idx in zip(group["params"], saved_group["params"]):
                buf = saved_state.get(idx, {}).get("momentum_buffer")
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=torch.float32, copy=True)
