"""Muon optimizer: batched implementation vs a plain per-parameter one, and checkpoint round trips."""

import copy

import pytest
import torch

import kernels.muon as muon_mod
from kernels.muon import Muon
from oracles import PlainMuon

# Two params share a shape, one is tall (it batches with them, transposed), one wide, one 3-D (merged-QKV-like).
SHAPES = [(16, 24), (16, 24), (24, 16), (12, 40), (3, 8, 12)]


def _make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.1 * torch.randn(s, generator=gen)).to(dtype)) for s in SHAPES]


def _set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


# The two sides run the same bf16 arithmetic on the same matrices; only batched vs
# single-matrix matmul rounding and lerp vs mul/add can differ (on CPU they agree
# bit for bit). A wrong momentum form, scale (sqrt(1.5) for the tall param) or
# slicing changes a step's update by > 20%.
STEP_RTOL = 1e-2


def _assert_same_step(new, plain_new, old):
    for p, q, o in zip(new, plain_new, old):
        d, d_plain = (p.detach() - o).float(), (q.detach() - o).float()
        err = ((d - d_plain).norm() / d_plain.norm()).item()
        assert err <= STEP_RTOL, f"param {tuple(p.shape)}: step differs from the plain one by {err:.3g} (relative)"


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_plain_per_parameter_muon(nesterov):
    params = _make_params()
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Muon(params, lr=0.02, momentum=0.9, nesterov=nesterov)
    plain = PlainMuon(plain_params, lr=0.02, momentum=0.9, nesterov=nesterov)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        # The trainer rewrites lr and momentum in place each step (warm-up, cooldown).
        lr, mom = 0.02 * (1 - 0.1 * step), 0.85 + 0.03 * step
        for g in opt.param_groups:
            g["lr"], g["momentum"] = lr, mom
        plain.lr, plain.momentum = lr, mom
        _set_grads(params, gen)
        for p, q in zip(params, plain_params):
            q.data.copy_(p.detach())  # both sides start every step from the same point
            q.grad = p.grad.clone()
        old = [p.detach().clone() for p in params]
        opt.step()
        plain.step()
        _assert_same_step(params, plain_params, old)
        for p, buf in zip(params, plain.bufs):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, atol=1e-6, rtol=1e-6)


def _spy_calls(monkeypatch):
    calls = []
    real = muon_mod._newton_schulz

    def spy(G, steps, coefficients, backend):
        calls.append((tuple(G.shape), steps, coefficients, backend))
        return real(G, steps, coefficients, backend)

    monkeypatch.setattr(muon_mod, "_newton_schulz", spy)
    return calls


def test_one_batched_call_per_canonical_shape(monkeypatch):
    calls = _spy_calls(monkeypatch)
    params = _make_params()
    opt = Muon(params, lr=0.02, ns_steps=3, backend="reference")
    _set_grads(params, torch.Generator().manual_seed(2))
    opt.step()
    assert sorted(calls) == sorted(
        [
            ((3, 16, 24), 3, "quintic", "reference"),  # two [16, 24] params and the [24, 16] one, transposed
            ((1, 12, 40), 3, "quintic", "reference"),
            ((3, 8, 12), 3, "quintic", "reference"),  # 3-D param: a batch of its trailing matrices
        ]
    )


def test_speedrun_model_takes_two_calls_per_step(monkeypatch):
    # The record's Muon matrices at d = 8: per attention layer QKV [3, d, d] and the output projection
    # [d, d]; per MLP fc [4d, d] (tall) and proj [d, 4d]. Across two param groups (different lrs).
    calls = _spy_calls(monkeypatch)
    d, layers = 8, 3
    gen = torch.Generator().manual_seed(7)
    attn = [torch.nn.Parameter(torch.randn(s, generator=gen)) for _ in range(layers) for s in ((3, d, d), (d, d))]
    mlp = [torch.nn.Parameter(torch.randn(s, generator=gen)) for _ in range(layers) for s in ((4 * d, d), (d, 4 * d))]
    opt = Muon([dict(params=attn), dict(params=mlp, lr=0.03)], lr=0.02, backend="reference")
    _set_grads(attn + mlp, gen)
    opt.step()
    assert sorted(c[0] for c in calls) == [(2 * layers, d, 4 * d), (4 * layers, d, d)]


def test_groups_with_other_settings_are_not_merged(monkeypatch):
    calls = _spy_calls(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(6, 10)) for _ in range(3)]
    opt = Muon([dict(params=params[:2]), dict(params=params[2:], ns_steps=2)], lr=0.02, ns_steps=3,
               backend="reference")
    _set_grads(params, torch.Generator().manual_seed(8))
    opt.step()
    assert sorted((c[0], c[1]) for c in calls) == [((1, 6, 10), 2), ((2, 6, 10), 3)]


def test_tall_update_is_the_transpose_and_keeps_its_scale():
    # A tall matrix batched (transposed) with a wide one gets the update it gets alone, scale sqrt(24/16) included.
    gen = torch.Generator().manual_seed(9)
    tall = torch.nn.Parameter(torch.randn(24, 16, generator=gen))
    wide = torch.nn.Parameter(torch.randn(16, 24, generator=gen))
    alone = torch.nn.Parameter(tall.detach().clone())
    start = tall.detach().clone()
    g_tall, g_wide = torch.randn(24, 16, generator=gen), torch.randn(16, 24, generator=gen)
    tall.grad, wide.grad, alone.grad = g_tall.clone(), g_wide, g_tall.clone()
    Muon([tall, wide], lr=0.1, backend="reference").step()
    Muon([alone], lr=0.1, backend="reference").step()
    # alone goes through the op as [24, 16], which iterates on its transpose; batched it enters as [16, 24]:
    # the same bf16 iteration on the same values, up to the memory order of the products.
    d_batched, d_alone = tall.detach() - start, alone.detach() - start
    assert float((d_batched - d_alone).norm() / d_alone.norm()) < 1e-2
    # An orthogonalised [24, 16] update has 16 singular values near 1: ‖u‖_F ~ 4, times lr·sqrt(1.5).
    assert 0.6 * 0.1 * 1.5 ** 0.5 * 4 < float(d_batched.norm()) < 1.4 * 0.1 * 1.5 ** 0.5 * 4


def test_params_without_grad_are_skipped():
    params = _make_params()
    before = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.02)
    params[0].grad = torch.randn(params[0].shape)
    opt.step()
    assert not torch.equal(params[0], before[0])
    for p, b in zip(params[1:], before[1:]):
        assert torch.equal(p, b)
        assert p not in opt.state


def test_grad_is_not_modified():
    params = _make_params()
    opt = Muon(params, lr=0.02)
    _set_grads(params, torch.Generator().manual_seed(3))
    grads = [p.grad.clone() for p in params]
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def test_bf16_params_keep_fp32_momentum():
    params = _make_params(torch.bfloat16)
    opt = Muon(params, lr=0.02)
    _set_grads(params, torch.Generator().manual_seed(4))
    opt.step()
    for p in params:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    gen = torch.Generator().manual_seed(5)
    params = _make_params(dtype)
    opt = Muon(params, lr=0.02, momentum=0.95)
    for _ in range(2):
        _set_grads(params, gen)
        opt.step()
    opt.param_groups[0]["lr"] = 0.013
    saved = copy.deepcopy(opt.state_dict())

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = Muon(resumed_params, lr=1.0, momentum=0.5)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 0.013 and resumed.param_groups[0]["momentum"] == 0.95
    for p, q in zip(params, resumed_params):
        buf = resumed.state[q]["momentum_buffer"]
        assert buf.dtype == torch.float32  # not cast to the param's dtype
        assert torch.equal(buf, opt.state[p]["momentum_buffer"])

    _set_grads(params, gen)
    for p, q in zip(params, resumed_params):
        q.grad = p.grad.clone()
    opt.step()
    resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_zero_grad_leaves_params_finite():
    params = _make_params()
    opt = Muon(params, lr=0.02)
    for p in params:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(params=[torch.nn.Parameter(torch.zeros(5))]), ValueError, "params: Muon takes parameters with >= 2 dims"),
    (dict(params=[torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.int32), requires_grad=False)]), TypeError,
     "params: expected floating-point"),
    (dict(lr=-1.0), ValueError, "lr: expected a finite number >= 0"),
    (dict(lr=float("inf")), ValueError, "lr: expected a finite number >= 0"),
    (dict(momentum=1.0), ValueError, r"momentum: expected a number in \[0, 1\)"),
    (dict(nesterov=1), TypeError, "nesterov: expected a bool, got int"),
    (dict(nesterov="yes"), TypeError, "nesterov: expected a bool, got str"),
    (dict(ns_steps=0), ValueError, r"ns_steps: expected an int in \[1, 100\], got 0"),
    (dict(ns_steps=101), ValueError, r"ns_steps: expected an int in \[1, 100\], got 101"),
    (dict(ns_steps=10**8), ValueError, "ns_steps: expected an int in"),
    (dict(ns_steps=5.0), ValueError, "ns_steps: expected an int in"),
])
def test_rejects_bad_arguments(kwargs, exc, pattern):
    args = dict(params=_make_params(), lr=0.02)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        Muon(**args)


@pytest.mark.parametrize("key, value, exc, pattern", [
    ("momentum", 1.5, ValueError, "momentum"),
    ("nesterov", 0, TypeError, "nesterov: expected a bool"),
    ("ns_steps", 1000, ValueError, "ns_steps"),
    ("lr", float("nan"), ValueError, "lr"),
])
def test_group_edits_are_checked_at_step(key, value, exc, pattern):
    opt = Muon(_make_params(), lr=0.02)
    _set_grads(opt.param_groups[0]["params"], torch.Generator().manual_seed(10))
    opt.param_groups[0][key] = value
    with pytest.raises(exc, match=pattern):
        opt.step()


def _stepped_state():
    params = _make_params()
    opt = Muon(params, lr=0.02)
    _set_grads(params, torch.Generator().manual_seed(11))
    opt.step()
    return params, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("corrupt, exc, pattern", [
    (lambda st: st["state"][0].update(momentum_buffer=torch.zeros(24, 16)), ValueError,
     r"state_dict: momentum_buffer of parameter 0 has shape \(24, 16\), expected the parameter's \(16, 24\)"),
    (lambda st: st["state"][4].update(momentum_buffer=torch.zeros(8, 12)), ValueError,
     r"state_dict: momentum_buffer of parameter 4 has shape \(8, 12\), expected the parameter's \(3, 8, 12\)"),
    (lambda st: st["state"][1].update(momentum_buffer=[0.0] * 384), TypeError,
     "state_dict: momentum_buffer of parameter 1 must be a floating-point tensor, got list"),
    (lambda st: st["state"][1].update(momentum_buffer=torch.zeros(16, 24, dtype=torch.int64)), TypeError,
     "state_dict: momentum_buffer of parameter 1 must be a floating-point tensor, got Tensor of dtype torch.int64"),
])
def test_load_state_dict_rejects_bad_buffers_before_loading(corrupt, exc, pattern):
    params, saved = _stepped_state()
    fresh = Muon([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    corrupt(saved)
    with pytest.raises(exc, match=pattern):
        fresh.load_state_dict(saved)
    # nothing was loaded: the optimizer is as it was
    assert fresh.param_groups[0]["lr"] == 0.5 and len(fresh.state) == 0
