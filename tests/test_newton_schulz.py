"""newton_schulz reference: float64 math, transposes, batching, coefficients, gradient, bad input, opcheck."""

import pytest
import torch

from kernels import newton_schulz
from kernels.newton_schulz import POLAR_EXPRESS, QUINTIC, _iterate, _newton_schulz_op
from oracles import f64_newton_schulz


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("shape", [(1, 64, 64), (3, 37, 101), (2, 101, 37), (48, 24), (2, 2, 16, 40)])
@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_matches_float64(shape, coefficients):
    G = torch.randn(shape)
    got = newton_schulz(G, coefficients=coefficients)
    per_step, scale = ([QUINTIC] * 5, 1.0) if coefficients == "quintic" else (list(POLAR_EXPRESS), 1.02)
    assert got.shape == G.shape and got.dtype == G.dtype
    # bf16 iteration vs float64: measured 2.5-6% over these shapes.
    assert rel_err(got, f64_newton_schulz(G, per_step, scale)) < 0.08


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_preserved(dtype):
    G = torch.randn(2, 24, 40).to(dtype)
    out = newton_schulz(G)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_tall_is_the_transpose_of_wide():
    G = torch.randn(3, 70, 30)
    # Only the memory order of the bf16 products differs: at most a couple of bf16 ulps near 1.
    torch.testing.assert_close(newton_schulz(G), newton_schulz(G.mT.contiguous()).mT, rtol=0, atol=2 ** -6)


def test_batch_equals_one_by_one():
    G = torch.randn(5, 32, 48)
    batched = newton_schulz(G)
    for i in range(5):
        torch.testing.assert_close(batched[i], newton_schulz(G[i]), rtol=0, atol=0)


def test_quintic_lands_in_the_speedrun_band():
    # Well conditioned: singular values spread over [0.1, 1] before normalisation.
    U, _ = torch.linalg.qr(torch.randn(4, 96, 96))
    V, _ = torch.linalg.qr(torch.randn(4, 160, 96))
    G = U @ torch.diag_embed(torch.linspace(0.1, 1.0, 96).expand(4, 96)) @ V.mT
    s = torch.linalg.svdvals(newton_schulz(G).double())
    assert s.min() > 0.5 and s.max() < 1.5


def test_explicit_coefficients():
    G = torch.randn(2, 20, 30)
    torch.testing.assert_close(newton_schulz(G, coefficients=[QUINTIC] * 3), newton_schulz(G, steps=3),
                               rtol=0, atol=0)
    want = _iterate(G, list(POLAR_EXPRESS[:2]), 1.02, 1e-7, torch.bfloat16).float()
    torch.testing.assert_close(newton_schulz(G, steps=2, coefficients="polar_express"), want, rtol=0, atol=0)


def test_norm_scale_of_polar_express():
    G = torch.randn(16, 24)
    want = _iterate(G[None], list(POLAR_EXPRESS), 1.02, 1e-7, torch.bfloat16)[0].float()
    torch.testing.assert_close(newton_schulz(G, coefficients="polar_express"), want, rtol=0, atol=0)


def test_gradient_is_the_fp32_iterations():
    G = torch.randn(2, 12, 20, requires_grad=True)
    grad_out = torch.randn(2, 12, 20)
    (got,) = torch.autograd.grad(newton_schulz(G, steps=3), G, grad_out)
    G64 = G.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(f64_newton_schulz(G64, [QUINTIC] * 3), G64, grad_out.double())
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37, 1e-30, 1e-41])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_finite_scale_is_normalised(scale, dtype):
    # ‖G‖² overflowed fp32 for ‖G‖ > 1.8e19 (all-zero output) and underflowed for tiny G.
    G = torch.randn(2, 24, 40)
    if dtype == torch.bfloat16 and scale < 1e-38:
        scale = 1e-30  # bf16 keeps fp32's exponent range, but not its subnormals in every op
    big = (G * scale).to(dtype)
    assert torch.isfinite(big).all() and (big != 0).any()
    out = newton_schulz(big, eps=0.0)
    # the same (rounded) values brought back to unit scale in float64: only the normalisation differs
    want = newton_schulz((big.double() / scale).float(), eps=0.0)
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, want.double()) < 1e-2


def test_huge_norm_gradient_is_finite_and_right():
    G = torch.randn(2, 12, 20)
    grad_out = torch.randn(2, 12, 20)
    for scale in (1.0, 1e25):
        Gs = (G * scale).requires_grad_(True)
        (got,) = torch.autograd.grad(newton_schulz(Gs, steps=3, eps=0.0), Gs, grad_out)
        G64 = (G.double() * scale).requires_grad_(True)
        (want,) = torch.autograd.grad(f64_newton_schulz(G64, [QUINTIC] * 3, eps=0.0), G64, grad_out.double())
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-4, scale


def test_non_finite_input_gives_non_finite_output():
    for bad in (float("nan"), float("inf")):
        G = torch.randn(2, 16, 24)
        G[1, 3, 5] = bad
        out = newton_schulz(G)
        assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).any()


def test_zero_matrix_and_empty_batch():
    assert torch.equal(newton_schulz(torch.zeros(8, 8)), torch.zeros(8, 8))
    assert newton_schulz(torch.zeros(0, 8, 8)).shape == (0, 8, 8)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(G=torch.randn(5)), ValueError, r"G: expected at least 2 dims, got shape \(5,\)"),
    (dict(G=torch.randn(4, 4, dtype=torch.float64)), TypeError, "G: dtype float64 is not supported"),
    (dict(G=torch.ones(4, 4, dtype=torch.int32)), TypeError, "G: dtype int32"),
    (dict(steps=0), ValueError, r"steps: expected an int in \[1, 100\], got 0"),
    (dict(steps=101), ValueError, r"steps: expected an int in \[1, 100\], got 101"),
    (dict(steps=10**8), ValueError, r"steps: expected an int in \[1, 100\], got 100000000"),
    (dict(coefficients=[QUINTIC] * 101), ValueError, "coefficients: 101 steps given, at most 100 are allowed"),
    (dict(steps=2.0), TypeError, "steps: expected an int"),
    (dict(steps=6, coefficients="polar_express"), ValueError, "steps: 'polar_express' defines 5 steps"),
    (dict(coefficients="cubic"), ValueError, "coefficients: unknown name 'cubic'"),
    (dict(coefficients=[]), ValueError, "coefficients: expected a name or a non-empty sequence"),
    (dict(coefficients=[(1.0, 2.0)]), ValueError, r"coefficients\[0\]: expected a tuple of 3 finite numbers"),
    (dict(coefficients=[QUINTIC, (1.0, float("nan"), 0.0)]), ValueError, r"coefficients\[1\]"),
    (dict(eps=-1.0), ValueError, "eps: expected a finite float >= 0, got -1.0"),
])
def test_bad_input(kwargs, exc, pattern):
    args = dict(G=torch.randn(4, 6))
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        newton_schulz(**args)


def test_opcheck():
    G = torch.randn(2, 10, 14, requires_grad=True)
    torch.library.opcheck(_newton_schulz_op, (G, list(QUINTIC) * 2, 1.0, 1e-7, "reference"))


@pytest.mark.parametrize("shape", [(9, 14), (2, 15, 7)])
def test_hand_written_vjp_matches_float64_autograd(shape):
    from kernels.newton_schulz import _iteration_vjp
    G = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    got = _iteration_vjp(G, grad, list(POLAR_EXPRESS[:3]), 1.02, 1e-7)
    G64 = G.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(f64_newton_schulz(G64, list(POLAR_EXPRESS[:3]), 1.02), G64, grad)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
