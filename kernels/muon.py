"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

The update rule is the speedrun's (record #23):

    buf    <- lerp(buf, g, 1 - momentum)                 (fp32 momentum buffer)
    u      <- lerp(g, buf, momentum) if nesterov else buf
    u      <- newton_schulz(u)                           (per [rows, cols] matrix)
    p      <- p - lr * max(1, rows / cols) ** 0.5 * u

Batching: a parameter with more than two dims (the merged QKV weight [3, H*hd, D]) is a
batch of its trailing [rows, cols] matrices, each orthogonalised on its own, as in the
speedrun. All matrices of the optimizer, across parameters and param groups, that share
a canonical shape (rows and cols in increasing order: a tall [r, c] matrix enters as its
transpose [c, r]), a device and the Newton-Schulz settings (ns_steps, coefficients,
backend) are stacked and orthogonalised by ONE batched ``kernels.newton_schulz`` call.
Since NS(Gᵀ) = NS(G)ᵀ (the iteration itself runs on the wide orientation), a tall
matrix's update is the transpose of its wide twin's; the transposition happens in the
stacking copy and in the final add, and the scale max(1, rows/cols)^0.5 is that of the
parameter as stored. For the speedrun's model that is two calls per step: 44 matrices of
768x768 (33 QKV slices, 11 output projections) and 24 of 768x3072 (12 fc weights
[3072, 768] transposed, 12 down projections [768, 3072]).

Single process: sharding the step across ranks belongs to the distributed trainer
(speedrun/sharded_optim.py), which applies the same rule through the helpers below.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from kernels.newton_schulz import MAX_STEPS, newton_schulz

__all__ = ["Muon"]


def _newton_schulz(G, steps, coefficients, backend):
    # The one place the optimizer calls the op (tests wrap it to count batched calls).
    return newton_schulz(G, steps=steps, coefficients=coefficients, backend=backend)


def check_hyper(lr, momentum, nesterov, ns_steps) -> None:
    """Raise when a group's hyperparameters are unusable (they may be edited between steps)."""
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"lr: expected a finite number >= 0, got {lr!r}")
    if isinstance(momentum, bool) or not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__} {nesterov!r}")
    if not (isinstance(ns_steps, int) and not isinstance(ns_steps, bool) and 1 <= ns_steps <= MAX_STEPS):
        raise ValueError(f"ns_steps: expected an int in [1, {MAX_STEPS}], got {ns_steps!r}")


def momentum_update(g: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Advance the fp32 momentum ``buf`` in place with gradient ``g``; the update to orthogonalise."""
    buf.lerp_(g, 1.0 - momentum)
    return torch.lerp(g, buf, momentum) if nesterov else buf


def update_scale(rows: int, cols: int) -> float:
    """The record's step-size factor for a [rows, cols] matrix: max(1, rows / cols) ** 0.5."""
    return max(1.0, rows / cols) ** 0.5


def batch_key(group: dict, rows: int, cols: int, device: torch.device) -> tuple:
    """Matrices with equal keys are orthogonalised in one newton_schulz call (the wide shape m <= n first)."""
    coefficients = group["coefficients"]
    if not isinstance(coefficients, str):
        coefficients = tuple(tuple(abc) for abc in coefficients)
    return min(rows, cols), max(rows, cols), device, group["ns_steps"], coefficients, group["backend"]


def as_wide(u: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[k, m, n] view of a batch of [rows, cols] matrices in the canonical orientation (transposed if tall)."""
    u = u.reshape(-1, rows, cols)
    return u.mT if rows > cols else u


def orthogonalize(updates: list[torch.Tensor], group: dict) -> tuple[torch.Tensor, ...]:
    """newton_schulz of one batch key's [k_i, m, n] updates (m <= n): ONE call on their stack, split back."""
    ortho = _newton_schulz(torch.cat(updates), group["ns_steps"], group["coefficients"], group["backend"])
    return ortho.split([u.size(0) for u in updates])


def add_update(target: torch.Tensor, ortho_wide: torch.Tensor, lr: float) -> None:
    """target (a [..., rows, cols] parameter or shard) -= lr·update_scale(rows, cols)·ortho.

    ortho_wide: [k, m, n], the canonical orientation (as_wide) of target's k matrices.
    """
    rows, cols = target.shape[-2:]
    o = (ortho_wide.mT if rows > cols else ortho_wide).to(target.dtype)
    alpha = -lr * update_scale(rows, cols)
    if target.is_contiguous():
        target.view(o.shape).add_(o, alpha=alpha)
    else:
        target.add_(o.reshape(target.shape), alpha=alpha)


class Muon(torch.optim.Optimizer):
    """Muon optimizer for >= 2-D weights.

    Args:
        params: parameters or param groups; every parameter must have >= 2 dims.
        lr: learning rate (group["lr"], may be changed between steps).
        momentum: momentum coefficient in [0, 1) (group["momentum"], may be changed between steps).
        nesterov: use the Nesterov form of the update (a bool).
        ns_steps: number of Newton-Schulz iterations, in [1, 100].
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
        check_hyper(lr, momentum, nesterov, ns_steps)
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
            check_hyper(group["lr"], group["momentum"], group["nesterov"], group["ns_steps"])
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(
                        f"params: Muon takes parameters with >= 2 dims, found one of shape {tuple(p.shape)}; "
                        "give 0-D/1-D parameters to another optimizer"
                    )
                if not p.is_floating_point():
                    raise TypeError(f"params: expected floating-point parameters, found dtype {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Momentum per parameter, then one batched orthogonalisation per key, in first-seen order.
        batches: dict[tuple, list] = {}
        for group in self.param_groups:
            check_hyper(group["lr"], group["momentum"], group["nesterov"], group["ns_steps"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("params: Muon does not support sparse gradients")
                g = p.grad.float()  # a view of p.grad when it is fp32: never written below
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                u = momentum_update(g, buf, group["momentum"], group["nesterov"])
                rows, cols = p.shape[-2:]
                batches.setdefault(batch_key(group, rows, cols, p.device), []).append(
                    (p, group, as_wide(u, rows, cols)))

        for items in batches.values():
            orthos = orthogonalize([w for *_, w in items], items[0][1])  # one call per key
            for (p, group, _), o in zip(items, orthos):
                add_update(p, o, group["lr"])
        return loss

    def load_state_dict(self, state_dict):
        # Checked before anything is loaded, so a bad checkpoint fails here (not at the next
        # step) and leaves the optimizer as it was. torch casts floating-point state to each
        # parameter's dtype on load; the momentum buffer must stay fp32 (a bf16 parameter
        # would otherwise get a bf16 buffer and resume with a different trajectory).
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if len(saved_groups) == len(self.param_groups):
            for group, saved_group in zip(self.param_groups, saved_groups):
                if len(group["params"]) != len(saved_group["params"]):
                    break  # torch's own check names the mismatch
                for p, idx in zip(group["params"], saved_group["params"]):
                    buf = saved_state.get(idx, {}).get("momentum_buffer")
                    if buf is None:
                        continue
                    if not isinstance(buf, torch.Tensor) or not buf.is_floating_point():
                        raise TypeError(f"state_dict: momentum_buffer of parameter {idx} must be a floating-point "
                                        f"tensor, got {type(buf).__name__}"
                                        f"{' of dtype ' + str(buf.dtype) if isinstance(buf, torch.Tensor) else ''}")
                    if tuple(buf.shape) != tuple(p.shape):
                        raise ValueError(f"state_dict: momentum_buffer of parameter {idx} has shape "
                                         f"{tuple(buf.shape)}, expected the parameter's {tuple(p.shape)}")
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, saved_groups):
            for p, idx in zip(group["params"], saved_group["params"]):
                buf = saved_state.get(idx, {}).get("momentum_buffer")
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=torch.float32, copy=True)
