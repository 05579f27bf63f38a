"""Sharded Muon and Adam over the buckets of ``speedrun.grad_sync.GradSync``.

Each rank updates only the slice of every bucket it owns after the
reduce-scatter, then an async ``all_gather_into_tensor`` rebuilds the whole
bucket of parameters on every rank:

- ``ShardedMuon``: a bucket is a bank of same-shape matrices padded to a
  multiple of the world size, so a rank's slice is whole matrices; the rank
  keeps their fp32 momentum and orthogonalises its matrices of every bucket
  that shares a canonical shape (``kernels.muon.batch_key``: tall matrices
  enter transposed) with ONE batched ``kernels.newton_schulz`` call, padding
  left out (the math of ``kernels.muon.Muon``).
- ``ShardedAdam``: elementwise, so a rank's slice is any contiguous range; the
  rank keeps the moments of its slice only (the math of ``torch.optim.Adam``'s
  single-tensor path).

``step`` walks the buckets in launch order and waits for each reduce-scatter
only when it reaches that bucket, so the first buckets' updates run while the
last ones are still in flight (Muon: the shape whose last bucket completes
first is orthogonalised first); the gathers of one bucket overlap the update
of the next. Padding (zero gradients, zero parameters) stays zero.

``state_dict`` gathers the shards into the unsharded layout of the plain
optimizers ({"state": {index: {...}}, "param_groups": [...]}), so a checkpoint
loads with any world size; it is a collective: call it on every rank.
"""

from __future__ import annotations

import torch

from kernels.muon import add_update, as_wide, batch_key, check_hyper, momentum_update, orthogonalize
from speedrun.grad_sync import GradSync, all_gather


class _Sharded(torch.optim.Optimizer):
    by_matrix = False

    def __init__(self, params, defaults, grad_sync: GradSync):
        super().__init__(params, defaults)
        self.grad_sync = grad_sync
        for gi, group in enumerate(self.param_groups):
            grad_sync.register(self, gi, group["params"], by_matrix=self.by_matrix)
        self._shard_state: dict[int, dict] = {}  # bucket index -> this rank's state tensors

    # The rank's slice of a bucket's parameters, and the way back.
    @torch.no_grad()
    def _param_shard(self, bucket) -> torch.Tensor:
        out = torch.zeros_like(bucket.shard)
        for p, a, b, at in bucket.pieces(bucket.shard_start, bucket.shard_start + bucket.shard_numel):
            out[at: at + b - a] = p.detach().reshape(-1)[a:b]
        return out

    @torch.no_grad()
    def _gather(self, bucket, shard: torch.Tensor):
        """Start rebuilding the bucket's parameters from every rank's updated shard."""
        if self.grad_sync.world_size == 1:
            return shard, None
        full = torch.empty(bucket.numel, dtype=shard.dtype, device=shard.device)
        return full, all_gather(full, shard, async_op=True)

    @torch.no_grad()
    def _scatter_back(self, bucket, full: torch.Tensor) -> None:
        for p, off in zip(bucket.params, bucket.offsets):
            p.copy_(full[off: off + p.numel()].view_as(p))

    def _update(self, bucket, group, grad: torch.Tensor, param: torch.Tensor) -> None:
        raise NotImplementedError

    def _update_buckets(self) -> list:
        """Update this rank's shard of every bucket in launch order; [(bucket, full, work)] of the gathers started."""
        gathers = []
        for bucket in self.grad_sync.buckets_of(self):
            grad = self.grad_sync.wait(bucket)
            param = self._param_shard(bucket)
            self._update(bucket, self.param_groups[bucket.group], grad, param)
            gathers.append((bucket, *self._gather(bucket, param)))
        return gathers

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathers = self._update_buckets()
        for bucket, full, work in gathers:
            if work is not None:
                work.wait()
            self._scatter_back(bucket, full)
        return loss

    # ------------------------------------------------------------ checkpoints
    def _state_names(self) -> list[str]:
        raise NotImplementedError

    def _full(self, shard: torch.Tensor) -> torch.Tensor:
        if self.grad_sync.world_size == 1:
            return shard
        full = torch.empty(shard.numel() * self.grad_sync.world_size, dtype=shard.dtype, device=shard.device)
        all_gather(full, shard.contiguous())
        return full

    def state_dict(self):
        """The unsharded state (a collective: every rank must call it)."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {}
        for bucket in self.grad_sync.buckets_of(self):
            mine = self._shard_state.get(bucket.index)
            for name in self._state_names():
                if name == "step":
                    continue
                if mine is None:  # never stepped: nothing to gather, on any rank
                    break
                full = self._full(mine[name].reshape(-1))
                for p, off in zip(bucket.params, bucket.offsets):
                    state.setdefault(index[p], {})[name] = full[off: off + p.numel()].view(p.shape).clone()
            if mine is not None and "step" in mine:
                for p in bucket.params:
                    state[index[p]]["step"] = mine["step"].clone()
        groups = []
        for g in self.param_groups:
            saved = {k: v for k, v in g.items() if k != "params"}
            saved["params"] = [index[p] for p in g["params"]]
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("state_dict: its param groups do not match this optimizer's")
        for g, saved in zip(self.param_groups, groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        params = [p for g in self.param_groups for p in g["params"]]
        for i, entry in saved_state.items():  # checked before anything is loaded
            for name in self._state_names():
                if name == "step" or i >= len(params) or name not in entry:
                    continue
                t = entry[name]
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"state_dict: {name} of parameter {i} must be a tensor, got {type(t).__name__}")
                if tuple(t.shape) != tuple(params[i].shape):
                    raise ValueError(f"state_dict: {name} of parameter {i} has shape {tuple(t.shape)}, expected "
                                     f"the parameter's {tuple(params[i].shape)}")
        self._shard_state = {}
        for bucket in self.grad_sync.buckets_of(self):
            if not any(index[p] in saved_state for p in bucket.params):
                continue
            mine = {}
            for name in self._state_names():
                if name == "step":
                    steps = [saved_state[index[p]]["step"] for p in bucket.params if index[p] in saved_state]
                    mine["step"] = torch.as_tensor(steps[0], dtype=torch.float32).clone()
                    continue
                full = torch.zeros(bucket.numel, dtype=self._state_dtype(bucket), device=bucket.grad.device)
                for p, off in zip(bucket.params, bucket.offsets):
                    if index[p] in saved_state and name in saved_state[index[p]]:
                        full[off: off + p.numel()] = saved_state[index[p]][name].reshape(-1).to(full.device)
                lo = bucket.shard_start
                mine[name] = self._shape_state(bucket, full[lo: lo + bucket.shard_numel].clone())
            self._shard_state[bucket.index] = mine

    def _state_dtype(self, bucket):
        return bucket.grad.dtype

    def _shape_state(self, bucket, flat):
        return flat


class ShardedAdam(_Sharded):
    """Adam (no weight decay) on this rank's slice of each bucket; same args as torch.optim.Adam."""

    def __init__(self, params, grad_sync: GradSync, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if not 0.0 <= lr:
            raise ValueError(f"lr: expected >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps), grad_sync)

    def _state_names(self):
        return ["step", "exp_avg", "exp_avg_sq"]

    def _update(self, bucket, group, grad, param):
        state = self._shard_state.get(bucket.index)
        if state is None:
            state = self._shard_state[bucket.index] = {
                "step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        # The operations of torch.optim.Adam's single-tensor path, in its order (same rounding).
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class ShardedMuon(_Sharded):
    """``kernels.muon.Muon`` on this rank's whole matrices of each bank bucket; same args."""

    by_matrix = True

    def __init__(self, params, grad_sync: GradSync, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, coefficients="quintic", backend: str | None = None):
        check_hyper(lr, momentum, nesterov, ns_steps)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, coefficients=coefficients,
                        backend=backend)
        super().__init__(params, defaults, grad_sync)
        for group in self.param_groups:
            check_hyper(group["lr"], group["momentum"], group["nesterov"], group["ns_steps"])
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"params: Muon takes parameters with >= 2 dims, found one of shape "
                                     f"{tuple(p.shape)}; give 0-D/1-D parameters to another optimizer")

    def _state_names(self):
        return ["momentum_buffer"]

    def _state_dtype(self, bucket):
        return torch.float32

    def _shape_state(self, bucket, flat):
        rows, cols = bucket.params[0].shape[-2:]
        return flat.view(-1, rows, cols)

    @staticmethod
    def _real_units(bucket) -> int:
        """Matrices of this rank's shard that hold parameters (the bucket's padding comes last)."""
        units = sum(p.numel() for p in bucket.params) // bucket.unit
        per_rank = bucket.shard_numel // bucket.unit
        return max(0, min(per_rank, units - bucket.shard_start // bucket.unit))

    def _update_buckets(self) -> list:
        # Buckets of one batch key share one newton_schulz call. The buckets are walked in launch
        # order, each waited for only when reached; a key is orthogonalised (and its buckets'
        # gathers started) as soon as its last bucket has been reached.
        buckets = self.grad_sync.buckets_of(self)
        keys = [batch_key(self.param_groups[b.group], *b.params[0].shape[-2:], b.grad.device) for b in buckets]
        last = {key: i for i, key in enumerate(keys)}
        pending: dict[tuple, list] = {}
        gathers = []
        for i, (bucket, key) in enumerate(zip(buckets, keys)):
            group = self.param_groups[bucket.group]
            check_hyper(group["lr"], group["momentum"], group["nesterov"], group["ns_steps"])
            rows, cols = bucket.params[0].shape[-2:]
            g = self.grad_sync.wait(bucket).view(-1, rows, cols).float()
            state = self._shard_state.get(bucket.index)
            if state is None:
                state = self._shard_state[bucket.index] = {"momentum_buffer": torch.zeros_like(g)}
            update = momentum_update(g, state["momentum_buffer"], group["momentum"], group["nesterov"])
            real = self._real_units(bucket)
            pending.setdefault(key, []).append((bucket, group, as_wide(update[:real], rows, cols)))
            if last[key] != i:
                continue
            members = pending.pop(key)
            wide = [w for *_, w in members]
            orthos = orthogonalize(wide, members[0][1]) if sum(w.size(0) for w in wide) else wide  # all empty
            for (member, group_m, w), o in zip(members, orthos):
                param = self._param_shard(member)
                if w.size(0):
                    add_update(param.view(-1, *member.params[0].shape[-2:])[:w.size(0)], o, group_m["lr"])
                gathers.append((member, *self._gather(member, param)))
        return gathers
