"""All gradient communication of the trainer, in one place.

Gradients travel in flat buckets. Each optimizer registers its parameters
(``GradSync.register``) in units it wants to own whole: single elements for
Adam, [rows, cols] matrices for Muon. ``build`` packs the parameters of each
(optimizer, param group, dtype, unit shape) into buckets of about
``bucket_bytes``, padded so that every rank owns the same number of whole
units, and orders the buckets by when backward should complete them.

During the backward of the LAST micro-step (``GradSync.arm``), a
post-accumulate-grad hook per parameter copies the parameter's summed
gradient into its bucket; the moment a bucket holds all of its parameters,
an async ``reduce_scatter_tensor`` (average) starts on it, so the
communication runs while backward goes on. Buckets launch in index order on
every rank (a bucket that completes early waits for the ones before it), so
all ranks issue the collectives in the same order. ``finish`` (after
backward) launches whatever is left, counting a parameter without a gradient
as zeros, so an unused parameter never hangs the step. The sharded
optimizers then ``wait`` for one bucket at a time, just before they need it.
A parameter's ``.grad`` is released once its bucket holds it: after the last
backward of a step the gradients live in the buckets only.

``overlap=False`` runs the same step with the hooks silent: every bucket is
filled and reduced after backward, and ``finish`` waits for all of them. The
difference in ``comm_exposed_ms`` between the two is what overlap buys.

World size 1 uses the same buckets with no collective: the shard is the whole
bucket, so the single-process run goes through the same code.
"""

from __future__ import annotations

import queue
import threading
import weakref
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 25 * 2**20

# torch 2.13 renamed the tensor collectives; the GPU machines' torch 2.11 has only the old names.
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (small) tensor over ranks; the tensor itself is left alone."""
    _, world_size = world()
    if world_size == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size


@dataclass(eq=False)
class Bucket:
    """A flat gradient buffer of parameters that share an owner, a param group, a dtype and a unit.

    ``grad`` is [numel] (numel a multiple of world_size * unit); rank r owns the
    elements [r * shard_numel, (r + 1) * shard_numel) and, after the reduce-scatter,
    holds their average over ranks in ``shard``.
    """

    index: int
    owner: object
    group: int
    unit: int                          # elements per owned unit (rows*cols for Muon, 1 for Adam)
    params: list                       # in layout order
    offsets: list                      # start element of each parameter in ``grad``
    numel: int                         # padded size
    grad: torch.Tensor
    shard: torch.Tensor
    shard_start: int
    filled: list = field(default_factory=list)   # per parameter: copied this step
    pending: int = 0                   # parameters still to be copied
    work: object = None
    launched: bool = False
    t_launch: object = None
    t_done: object = None

    @property
    def shard_numel(self) -> int:
        return self.shard.numel()

    def pieces(self, lo: int, hi: int):
        """(param, param_lo, param_hi, flat_lo) for each parameter overlapping elements [lo, hi)."""
        for p, off in zip(self.params, self.offsets):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                yield p, a - off, b - off, a - lo


_LIVE: "weakref.WeakSet[GradSync]" = weakref.WeakSet()


def close_all() -> None:
    """GradSync.close() on every live instance (the trainer's exit path, before destroy_process_group)."""
    for sync in list(_LIVE):
        sync.close()


class GradSync:
    """Bucketed, overlapped gradient reduce-scatter for the sharded optimizers.

    Args:
        bucket_bytes: target bucket size (a bucket holds at least one parameter).
        overlap: launch each bucket from the backward hooks (True) or after backward (False).
    """

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True):
        if not (isinstance(bucket_bytes, int) and bucket_bytes >= 1):
            raise ValueError(f"bucket_bytes: expected an int >= 1, got {bucket_bytes!r}")
        self.rank, self.world_size = world()
        self.bucket_bytes, self.overlap = bucket_bytes, overlap
        _LIVE.add(self)
        self._requests: list[tuple] = []     # (owner, group, params, by_matrix)
        self.buckets: list[Bucket] = []
        self._where: dict[torch.nn.Parameter, tuple[Bucket, int]] = {}
        self._hooks = []
        self.armed = False
        self._next_launch = 0
        self.launch_log: list[list[int]] = []   # per step: id() of every parameter reduced (tests)
        self.t_backward_end = None
        self.timing_stream = None
        self._waiter = self._waiter_queue = None

    # ------------------------------------------------------------------ layout
    def register(self, owner, group: int, params, by_matrix: bool) -> None:
        """Parameters the optimizer ``owner`` updates from param group ``group``; Muon owns whole matrices."""
        if self.buckets:
            raise RuntimeError("GradSync.register: the buckets are already built")
        self._requests.append((owner, group, list(params), by_matrix))

    def build(self, order=None) -> None:
        """Pack the registered parameters into buckets and install the hooks.

        ``order``: the parameters in registration order (model.parameters()); backward
        produces gradients roughly in reverse, so buckets fill in that reverse order.
        """
        seen = set()
        for _, _, params, _ in self._requests:
            for p in params:
                if p in seen:
                    raise ValueError("params: a parameter is registered twice (two optimizers or groups)")
                seen.add(p)
        order = list(order) if order is not None else [p for r in self._requests for p in r[2]]
        rank_of = {p: i for i, p in enumerate(reversed(order))}
        late = len(rank_of)
        open_buckets: dict[tuple, list] = {}
        closed: list[tuple] = []  # (key, params)
        all_params = sorted((p for r in self._requests for p in r[2]), key=lambda p: rank_of.get(p, late))
        request_of = {p: r for r in self._requests for p in r[2]}
        for p in all_params:
            owner, group, _, by_matrix = request_of[p]
            unit_shape = tuple(p.shape[-2:]) if by_matrix else ()
            key = (id(owner), group, p.dtype, p.device, unit_shape)
            members = open_buckets.setdefault(key, [])
            members.append(p)
            if sum(q.numel() for q in members) * p.element_size() >= self.bucket_bytes:
                closed.append((key, open_buckets.pop(key)))
        closed.extend(open_buckets.items())
        # Launch order: when backward should complete each bucket (its last parameter's gradient).
        closed.sort(key=lambda kv: max(rank_of.get(p, late) for p in kv[1]))
        for index, (key, params) in enumerate(closed):
            owner, group, _, by_matrix = request_of[params[0]]
            self.buckets.append(self._make_bucket(index, owner, group, params, by_matrix))
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                self._where[p] = (bucket, i)
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))
        self._reset()

    def _make_bucket(self, index, owner, group, params, by_matrix) -> Bucket:
        unit = params[0].shape[-2] * params[0].shape[-1] if by_matrix else 1
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        units = -(-total // unit)
        numel = -(-units // self.world_size) * self.world_size * unit
        ref = params[0]
        grad = torch.zeros(numel, dtype=ref.dtype, device=ref.device)
        shard_numel = numel // self.world_size
        shard = grad if self.world_size == 1 else torch.zeros(shard_numel, dtype=ref.dtype, device=ref.device)
        return Bucket(index=index, owner=owner, group=group, unit=unit, params=params, offsets=offsets, numel=numel,
                      grad=grad, shard=shard, shard_start=self.rank * shard_numel)

    def buckets_of(self, owner) -> list[Bucket]:
        return [b for b in self.buckets if b.owner is owner]

    # ------------------------------------------------------------------ per step
    def _reset(self) -> None:
        for b in self.buckets:
            b.filled = [False] * len(b.params)
            b.pending, b.work, b.launched, b.t_launch, b.t_done = len(b.params), None, False, None, None
        self._next_launch = 0
        self.t_backward_end = None

    def arm(self) -> None:
        """Call before the backward of the last micro-step: its hooks fill and launch the buckets."""
        self._reset()
        self.armed = True
        self.launch_log.append([])

    def _hook(self, p: torch.nn.Parameter) -> None:
        if self.armed and self.overlap:
            self._fill(p)
            self._launch_ready()

    @torch.no_grad()
    def _fill(self, p) -> None:
        bucket, i = self._where[p]
        if bucket.filled[i]:
            raise RuntimeError(f"GradSync: the gradient of a parameter of shape {tuple(p.shape)} arrived twice in "
                               "one step (a second backward after arm()?)")
        view = bucket.grad[bucket.offsets[i]: bucket.offsets[i] + p.numel()]
        if p.grad is None:
            view.zero_()  # unused on this rank: contributes zeros to the average
        else:
            view.copy_(p.grad.reshape(-1))
            p.grad = None  # the bucket holds it now; the optimizers read the bucket (saves a model's worth)
        bucket.filled[i] = True
        bucket.pending -= 1

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _now(self, device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _launch(self, bucket: Bucket) -> None:
        self.launch_log[-1].extend(id(p) for p in bucket.params)
        bucket.launched = True
        bucket.t_launch = self._now(bucket.grad.device)
        if self.world_size == 1:
            bucket.t_done = bucket.t_launch
            return
        bucket.work = reduce_scatter(bucket.shard, bucket.grad, op=dist.ReduceOp.AVG, async_op=True)
        if bucket.grad.is_cuda:
            # The completion event: a side stream waits for the NCCL work, then records.
            if self.timing_stream is None:
                self.timing_stream = torch.cuda.Stream()
            with torch.cuda.stream(self.timing_stream):
                bucket.work.wait()
                bucket.t_done = self._now(bucket.grad.device)
        else:
            # gloo's Work has no future: a thread blocks on each work in launch order and notes the time.
            if self._waiter is None:
                self._waiter_queue = queue.SimpleQueue()
                self._waiter = threading.Thread(target=self._wait_loop, name="grad-sync-timer", daemon=True)
                self._waiter.start()
            self._waiter_queue.put((bucket, bucket.work))

    def _wait_loop(self) -> None:
        while True:
            item = self._waiter_queue.get()
            if item is None:  # close()
                return
            bucket, work = item
            try:
                work.wait()
            except Exception:  # noqa: BLE001 - the main thread's wait() reports the failure
                continue
            bucket.t_done = time.perf_counter()

    def finish(self) -> None:
        """After the last backward: fill what the hooks did not (unused parameters, overlap off) and launch it."""
        if not self.armed:
            raise RuntimeError("GradSync.finish without arm() before the last micro-step's backward")
        self.armed = False
        device = self.buckets[0].grad.device if self.buckets else torch.device("cpu")
        self.t_backward_end = self._now(device)
        for b in self.buckets[self._next_launch:]:
            for i, p in enumerate(b.params):
                if not b.filled[i]:
                    self._fill(p)
        self._launch_ready()
        if not self.overlap:
            for b in self.buckets:
                self.wait(b)

    def wait(self, bucket: Bucket) -> torch.Tensor:
        """This rank's averaged shard of ``bucket``'s gradient (blocks until its reduce-scatter is done)."""
        if not bucket.launched:
            raise RuntimeError(f"GradSync.wait: bucket {bucket.index} was never launched (finish() not called?)")
        if bucket.work is not None:
            bucket.work.wait()
            bucket.work = None
        return bucket.shard

    def timings(self) -> dict:
        """{'comm_total_ms', 'comm_exposed_ms'} of the last step; call after the optimizer step (and a CUDA sync).

        total: the union of the reduce-scatter intervals (launch to completion);
        exposed: end of backward to the completion of the last reduction (0 if it finished first).
        """
        if self._waiter is not None:  # the timer thread notes a completion a moment after wait() returns
            deadline = time.perf_counter() + 1.0
            while any(b.launched and b.t_done is None for b in self.buckets) and time.perf_counter() < deadline:
                time.sleep(1e-4)
        buckets = [b for b in self.buckets if b.t_launch is not None and b.t_done is not None]
        if not buckets or self.t_backward_end is None or self.world_size == 1:
            return {"comm_total_ms": 0.0, "comm_exposed_ms": 0.0}
        if buckets[0].grad.is_cuda:
            origin = buckets[0].t_launch
            to_ms = lambda ev: origin.elapsed_time(ev)  # noqa: E731
        else:
            to_ms = lambda t: 1000.0 * t  # noqa: E731
        spans = sorted((to_ms(b.t_launch), to_ms(b.t_done)) for b in buckets)
        total, cur_lo, cur_hi = 0.0, None, None
        for lo, hi in spans:
            if cur_hi is None or lo > cur_hi:
                total += 0.0 if cur_hi is None else cur_hi - cur_lo
                cur_lo, cur_hi = lo, hi
            else:
                cur_hi = max(cur_hi, hi)
        total += cur_hi - cur_lo
        exposed = max(0.0, max(hi for _, hi in spans) - to_ms(self.t_backward_end))
        return {"comm_total_ms": total, "comm_exposed_ms": exposed}

    def close(self) -> None:
        """Stop the timer thread (gloo) after the works it waits on; call before destroying the process group.

        A thread still inside a collective's wait when the interpreter shuts down can abort the
        process at exit ("terminate called without an active exception"), after all its work is done.
        """
        if self._waiter is not None:
            self._waiter_queue.put(None)
            self._waiter.join(timeout=60)
            self._waiter = None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
