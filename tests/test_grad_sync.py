"""Bucketed reduce-scatter + sharded Muon/Adam (speedrun.grad_sync, speedrun.sharded_optim).

The multi-process tests spawn 2 or 4 CPU processes with gloo and a FileStore
rendezvous (no port), train a tiny model whose shapes are not multiples of the
world size, and compare the parameters with a single-process run of the plain
optimizers (torch.optim.Adam + kernels.muon.Muon) on the same global batch.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.distributed as dist

import kernels.muon as muon_mod
from kernels.muon import Muon
from oracles import PlainMuon
from speedrun import grad_sync
from speedrun.grad_sync import GradSync
from speedrun.sharded_optim import ShardedAdam, ShardedMuon

STEPS, ACCUM, BATCH, DIM = 3, 2, 8, 7  # BATCH: samples per micro-step across all ranks


class Tiny(torch.nn.Module):
    """Odd shapes: three [5, 7] banks (one 3-D), a [7, 5] matrix, an embedding, scalars, and unused parameters."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=g) * 0.3)  # noqa: E731
        self.emb = r(11, DIM)
        self.w1, self.w2 = r(5, DIM), r(5, DIM)
        self.w3 = r(3, 5, DIM)
        self.w4 = r(DIM, 5)
        self.scale = r(3)
        self.unused_mat = r(5, DIM)   # never in the graph: no gradient on any rank
        self.unused_vec = r(6)

    def forward(self, idx, x, y):
        h = self.emb[idx] + x
        a = torch.relu(h @ self.w1.T) * self.scale[0] + torch.tanh(h @ self.w2.T) * self.scale[1]
        a = a + (h @ self.w3.transpose(1, 2)).sum(0) * self.scale[2]
        out = a @ self.w4.T
        return ((out - y) ** 2).mean()

    def groups(self):
        muon = [self.w1, self.w2, self.w3, self.w4, self.unused_mat]
        return muon, [self.emb], [self.scale, self.unused_vec]


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS * ACCUM):
        yield (torch.randint(0, 11, (BATCH,), generator=g), torch.randn(BATCH, DIM, generator=g),
               torch.randn(BATCH, DIM, generator=g))


def plain_run():
    model = Tiny()
    muon, emb, scal = model.groups()
    adam = torch.optim.Adam([dict(params=emb, lr=0.05), dict(params=scal, lr=0.02)], betas=(0.8, 0.95), eps=1e-10)
    mu = Muon(muon, lr=0.05, momentum=0.9)
    data = list(batches())
    for s in range(STEPS):
        for m in range(ACCUM):
            (model(*data[s * ACCUM + m]) / ACCUM).backward()
        adam.step()
        mu.step()
        model.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def sharded_run(rank, world_size, bucket_bytes, overlap):
    model = Tiny()
    muon, emb, scal = model.groups()
    sync = GradSync(bucket_bytes=bucket_bytes, overlap=overlap)
    adam = ShardedAdam([dict(params=emb, lr=0.05), dict(params=scal, lr=0.02)], sync, betas=(0.8, 0.95), eps=1e-10)
    mu = ShardedMuon(muon, sync, lr=0.05, momentum=0.9)
    sync.build(model.parameters())
    data = list(batches())
    per = BATCH // world_size
    for s in range(STEPS):
        for m in range(ACCUM):
            idx, x, y = (t[rank * per:(rank + 1) * per] for t in data[s * ACCUM + m])
            if m == ACCUM - 1:
                sync.arm()
            (model(idx, x, y) / ACCUM).backward()
        sync.finish()
        adam.step()
        mu.step()
        model.zero_grad(set_to_none=True)
    return model, sync, [adam, mu]


def _worker(rank, world_size, store_path, out_dir, mode, bucket_bytes, overlap):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=3 if mode == "stall" else 20))
    try:
        if mode in ("die", "stall"):
            model, sync, opts = sharded_run(rank, world_size, bucket_bytes, overlap)
            if rank == world_size - 1:
                if mode == "stall":
                    time.sleep(30)  # alive but stuck (the parent kills it): only the timeout can help
                os._exit(7)  # a crash: no goodbye to the others
            t0 = time.monotonic()
            try:
                sharded_run(rank, world_size, bucket_bytes, overlap)
                result = {"error": None}
            except Exception as e:  # noqa: BLE001 - any collective error is the expected outcome
                result = {"error": f"{type(e).__name__}: {e}"[:300]}
            result["seconds"] = time.monotonic() - t0
            torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
            os._exit(3 if result["error"] else 0)
        model, sync, opts = sharded_run(rank, world_size, bucket_bytes, overlap)
        states = [opt.state_dict() for opt in opts]
        name_of = {id(p): n for n, p in model.named_parameters()}
        result = {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                  "launch_log": [[name_of[i] for i in step] for step in sync.launch_log],
                  "n_buckets": len(sync.buckets), "states": states, "timings": sync.timings()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        grad_sync.close_all()
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(world_size, tmp_path, mode="train", bucket_bytes=64, overlap=True, timeout=90, wait_for=None):
    ctx = mp.get_context("spawn")
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, store, str(tmp_path), mode, bucket_bytes, overlap))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs if wait_for is None else [procs[r] for r in wait_for]:
        p.join(max(0.1, deadline - time.monotonic()))
    if wait_for is not None:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"{len(alive)} process(es) still running after {timeout} s (a hang)"
    return [p.exitcode for p in procs], [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=False) if (tmp_path / f"rank{r}.pt").exists() else None
        for r in range(world_size)]


# ---------------------------------------------------------------------------
# Single process
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bucket_bytes", [1, 200, 1 << 20])
@pytest.mark.parametrize("overlap", [True, False])
def test_single_process_matches_plain_optimizers_exactly(bucket_bytes, overlap):
    ref = plain_run()
    model, sync, _ = sharded_run(0, 1, bucket_bytes, overlap)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[name]), name
    assert not torch.equal(ref["w1"], Tiny().w1.detach())  # the run did move the weights


def test_every_parameter_is_reduced_once_per_step():
    model, sync, _ = sharded_run(0, 1, 100, True)
    ids = sorted(id(p) for p in model.parameters())
    assert len(sync.launch_log) == STEPS
    for step in sync.launch_log:
        assert sorted(step) == ids


def test_buckets_respect_size_units_and_padding():
    model = Tiny()
    muon, emb, scal = model.groups()
    sync = GradSync(bucket_bytes=1)
    ShardedAdam([dict(params=emb), dict(params=scal)], sync)
    muon_opt = ShardedMuon(muon, sync, lr=0.1)
    sync.world_size = 4  # layout only: no collective is issued below
    sync.build(model.parameters())
    assert len(sync.buckets) == len(list(model.parameters()))  # 1 byte: one parameter per bucket
    for b in sync.buckets:
        assert b.numel % (4 * b.unit) == 0 and b.numel >= sum(p.numel() for p in b.params)
        assert b.unit == (1 if b.owner is not muon_opt else b.params[0].shape[-2] * b.params[0].shape[-1])
    w3 = next(b for b in sync.buckets if b.params[0] is model.w3)
    assert w3.unit == 35 and w3.numel == 4 * 35  # 3 matrices padded to 4: one per rank


def _speedrun_like(d=8, layers=3, seed=0):
    """The record's Muon matrices at model dim d: QKV [3, d, d], out proj [d, d], fc [4d, d] (tall), proj [d, 4d]."""
    g = torch.Generator().manual_seed(seed)
    shapes = [s for _ in range(layers) for s in ((3, d, d), (d, d), (4 * d, d), (d, 4 * d))]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.3) for s in shapes]


def _sharded_muon_steps(params, bucket_bytes, steps=2, seed=1):
    sync = GradSync(bucket_bytes=bucket_bytes)
    opt = ShardedMuon(params, sync, lr=0.05, momentum=0.9)
    sync.build(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sync.arm()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
            sync._fill(p)
        sync.finish()
        opt.step()
    return opt, sync


@pytest.mark.parametrize("bucket_bytes", [1, 1000, 1 << 20])
def test_sharded_muon_matches_the_per_parameter_reference(bucket_bytes):
    # After the regrouping (one call per canonical shape across buckets, fc transposed into the
    # wide batch), every parameter's update is still the record's per-parameter rule.
    params = _speedrun_like()
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = PlainMuon(plain, lr=0.05, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in plain:
            p.grad = torch.randn(p.shape, generator=g)
        ref.step()
    _sharded_muon_steps(params, bucket_bytes)
    start = _speedrun_like()
    for p, q, s0 in zip(params, plain, start):
        d, d_ref = (p.detach() - s0.detach()), (q.detach() - s0.detach())
        err = float((d - d_ref).norm() / d_ref.norm())
        assert err < 2e-2, f"{tuple(p.shape)}: update differs from the per-parameter reference by {err:.3g}"


def test_sharded_muon_one_call_per_shape_across_buckets(monkeypatch):
    calls = []
    real = muon_mod._newton_schulz
    monkeypatch.setattr(muon_mod, "_newton_schulz",
                        lambda G, *a: calls.append(tuple(G.shape)) or real(G, *a))
    params = _speedrun_like()
    opt, sync = _sharded_muon_steps(params, bucket_bytes=1, steps=1)  # one parameter per bucket
    assert len(sync.buckets) == len(params)
    assert sorted(calls) == [(6, 8, 32), (12, 8, 8)]  # 3·3 QKV + 3 out proj; 3 fc (transposed) + 3 proj


def test_sharded_muon_leaves_padding_out_of_the_batch():
    params = _speedrun_like(layers=1)
    sync = GradSync(bucket_bytes=1 << 20)
    opt = ShardedMuon(params, sync, lr=0.1)
    sync.world_size, sync.rank = 4, 3  # layout only: no collective is issued
    sync.build(params)
    real = {tuple(b.params[0].shape[-2:]): opt._real_units(b) for b in sync.buckets}
    # [8, 8] bank: 3 QKV slices + 1 out proj = 4 matrices, one per rank; [32, 8] and [8, 32]: 1 each,
    # padded to 4, so rank 3 holds only padding there.
    assert real == {(8, 8): 1, (32, 8): 0, (8, 32): 0}


def test_sharded_muon_load_state_dict_checks_shapes():
    params = _speedrun_like(layers=1)
    opt, _ = _sharded_muon_steps(params, bucket_bytes=1 << 20, steps=1)
    saved = opt.state_dict()
    saved["state"][2]["momentum_buffer"] = saved["state"][2]["momentum_buffer"].mT.contiguous()  # fc [32, 8]
    fresh, _ = _sharded_muon_steps(_speedrun_like(layers=1), bucket_bytes=1 << 20, steps=0)
    with pytest.raises(ValueError, match=r"state_dict: momentum_buffer of parameter 2 has shape \(8, 32\), "
                                         r"expected the parameter's \(32, 8\)"):
        fresh.load_state_dict(saved)


def test_second_backward_in_one_step_is_an_error():
    model = Tiny()
    muon, emb, scal = model.groups()
    sync = GradSync(bucket_bytes=1 << 20)
    ShardedAdam([dict(params=emb + scal)], sync)
    ShardedMuon(muon, sync, lr=0.1)
    sync.build(model.parameters())
    idx, x, y = next(batches())
    sync.arm()
    model(idx, x, y).backward()
    with pytest.raises(RuntimeError, match="arrived twice"):
        model(idx, x, y).backward()


def test_register_twice_is_an_error():
    model = Tiny()
    sync = GradSync()
    ShardedAdam([model.scale], sync)
    ShardedAdam([model.scale], sync)
    with pytest.raises(ValueError, match="registered twice"):
        sync.build()


# ---------------------------------------------------------------------------
# Several processes (gloo)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,bucket_bytes,overlap", [(2, 64, True), (2, 1 << 20, False), (4, 200, True)])
def test_sharded_run_matches_single_process(tmp_path, world_size, bucket_bytes, overlap):
    ref = plain_run()
    codes, results = launch(world_size, tmp_path, bucket_bytes=bucket_bytes, overlap=overlap)
    assert codes == [0] * world_size
    names = [n for n, _ in Tiny().named_parameters()]
    for res in results:
        for name in names:
            torch.testing.assert_close(res["params"][name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
        # every parameter reduced exactly once per step, in the same order on every rank
        assert len(res["launch_log"]) == STEPS
        for step in res["launch_log"]:
            assert sorted(step) == sorted(names)
        assert res["launch_log"] == results[0]["launch_log"]
    # the gathered optimizer state is the same everywhere and unsharded
    for a, b in zip(results[0]["states"], results[-1]["states"]):
        for idx in a["state"]:
            for key, t in a["state"][idx].items():
                assert torch.equal(t, b["state"][idx][key])
    assert results[0]["timings"]["comm_total_ms"] > 0


def test_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    codes, results = launch(2, tmp_path, mode="die", timeout=60)
    assert codes[1] == 7
    assert codes[0] == 3, codes
    assert results[0]["error"] and results[0]["seconds"] < 30, results[0]


def test_stuck_rank_makes_the_others_fail_after_the_timeout(tmp_path):
    # rank 1 stays alive but never joins the next collective: rank 0 errors after the 3 s timeout
    codes, results = launch(2, tmp_path, mode="stall", timeout=60, wait_for=[0])
    assert codes[0] == 3, codes
    assert results[0]["error"] and 2.5 < results[0]["seconds"] < 25, results[0]


# ---------------------------------------------------------------------------
# The trainer with 2 processes
# ---------------------------------------------------------------------------

def _trainer(tmp_path, out, *extra, timeout=240):
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "speedrun.train_gpt", "--preset", "smoke", "--data", str(tmp_path / "data"), "--synthetic=true",
           "--out", str(tmp_path / out),
           "--bucket_mb=0.01", "--dist_timeout_s=60", *extra]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_trainer_overlap_switch_and_sharded_resume(tmp_path):
    # Overlap changes when the reductions run, not what they compute: the same losses bit for bit.
    # The checkpoint holds the gathered (unsharded) optimizer state; resuming re-shards it.
    overlapped = _trainer(tmp_path, "a", "--overlap_comm=true")
    _trainer(tmp_path, "b", "--overlap_comm=false", "--stop_after=2")
    resumed = _trainer(tmp_path, "b", "--overlap_comm=false", "--resume", str(tmp_path / "b" / "checkpoint.pt"))
    steps = [e for e in overlapped if "train_loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["train_loss"] for e in steps] == [e["train_loss"] for e in resumed if "train_loss" in e]
    assert all(e["comm_total_ms"] > 0 and e["comm_exposed_ms"] >= 0 for e in steps)


def test_finish_without_arm_is_an_error():
    model = Tiny()
    sync = GradSync()
    ShardedAdam(list(model.parameters()), sync)
    sync.build(model.parameters())
    with pytest.raises(RuntimeError, match="without arm"):
        sync.finish()
