"""Muon optimizer: batched implementation vs a plain per-parameter one, and checkpoint round trips."""

import copy

import pytest
import torch

import kernels.muon as muon_mod
from kernels.muon import Muon

QUINTIC = (3.4445, -4.7750, 2.0315)

# Two params share a shape (one batched group), one is tall, one wide, one 3-D (merged-QKV-like).
SHAPES = [(16, 24), (16, 24), (24, 16), (12, 40), (3, 8, 12)]


def _plain_newton_schulz(G, steps):
    """One matrix [rows, cols], written from the package contract, independent of kernels/."""
    X = (G.float() / (torch.linalg.vector_norm(G.float()) + 1e-7)).to(torch.bfloat16)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    a, b, c = QUINTIC
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return (X.T if tall else X).float()


class PlainMuon:
    """Per-parameter Muon written the textbook way (buf = m*buf + (1-m)*g)."""

    def __init__(self, params, lr, momentum, nesterov, ns_steps=5):
        self.params, self.lr, self.momentum, self.nesterov, self.ns_steps = params, lr, momentum, nesterov, ns_steps
        self.bufs = [torch.zeros(p.shape, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def step(self):
        m = self.momentum
        for p, buf in zip(self.params, self.bufs):
            g = p.grad.float()
            buf.mul_(m).add_(g, alpha=1 - m)
            u = (1 - m) * g + m * buf if self.nesterov else buf
            mats = u.reshape(-1, p.shape[-2], p.shape[-1])
            o = torch.stack([_plain_newton_schulz(mat, self.ns_steps) for mat in mats]).view(p.shape)
            p.add_(o.to(p.dtype), alpha=-self.lr * max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5)


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


def test_one_batched_call_per_shape(monkeypatch):
    calls = []
    real = muon_mod._newton_schulz

    def spy(G, steps, coefficients, backend):
        calls.append((tuple(G.shape), steps, coefficients, backend))
        return real(G, steps, coefficients, backend)

    monkeypatch.setattr(muon_mod, "_newton_schulz", spy)
    params = _make_params()
    opt = Muon(params, lr=0.02, ns_steps=3, backend="reference")
    _set_grads(params, torch.Generator().manual_seed(2))
    opt.step()
    assert sorted(calls) == sorted(
        [
            ((2, 16, 24), 3, "quintic", "reference"),  # the two same-shape params, stacked
            ((1, 24, 16), 3, "quintic", "reference"),
            ((1, 12, 40), 3, "quintic", "reference"),
            ((3, 8, 12), 3, "quintic", "reference"),  # 3-D param: a batch of its trailing matrices
        ]
    )


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


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="params"):
        Muon([torch.nn.Parameter(torch.zeros(5))], lr=0.02)
    with pytest.raises(ValueError, match="lr"):
        Muon(_make_params(), lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        Muon(_make_params(), lr=0.02, momentum=1.0)
    with pytest.raises(ValueError, match="ns_steps"):
        Muon(_make_params(), lr=0.02, ns_steps=0)
    opt = Muon(_make_params(), lr=0.02)
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
