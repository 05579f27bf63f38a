"""relu2_mlp reference: float64 math, gradients, saved activations, bad input, opcheck."""

import os

import pytest
import torch

from kernels import relu2_mlp
from kernels.relu2_mlp import _relu2_mlp_op


def f64_mlp(x, w_fc, w_proj):
    return torch.relu(x.double() @ w_fc.double().T).pow(2) @ w_proj.double().T


def make(T, D, H, dtype=torch.float32, lead=()):
    x = torch.randn(*lead, T, D, dtype=dtype)
    w_fc = (torch.randn(H, D) * D ** -0.5).to(dtype)
    w_proj = (torch.randn(D, H) * H ** -0.5).to(dtype)
    return [t.requires_grad_(True) for t in (x, w_fc, w_proj)]


@pytest.mark.parametrize("T, D, H, lead", [(1, 8, 32, ()), (37, 40, 72, ()), (5, 16, 64, (2, 3))])
def test_matches_float64_with_gradients(T, D, H, lead):
    x, w_fc, w_proj = make(T, D, H, lead=lead)
    out = relu2_mlp(x, w_fc, w_proj)
    want = f64_mlp(x, w_fc, w_proj)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w_fc, w_proj), dy)
    want_grads = torch.autograd.grad(want, (x, w_fc, w_proj), dy.double())
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4)


def test_gradcheck():
    x, w_fc, w_proj = (t.detach().double().requires_grad_(True) for t in make(6, 5, 12))
    assert torch.autograd.gradcheck(relu2_mlp, (x, w_fc, w_proj))


def test_bf16():
    x, w_fc, w_proj = make(33, 64, 256, torch.bfloat16)
    out = relu2_mlp(x, w_fc, w_proj)
    want = f64_mlp(x, w_fc, w_proj)
    assert ((out.double() - want).norm() / want.norm()) < 2e-2
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w_fc.grad.dtype == torch.bfloat16


def test_saves_one_hidden_activation():
    T, D, H = 11, 8, 32
    x, w_fc, w_proj = make(T, D, H)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        relu2_mlp(x, w_fc, w_proj)
    assert saved.count((T, H)) == 1
    assert sorted(saved) == sorted([(T, D), (H, D), (D, H), (T, H)])


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(x=torch.randn(4, 7)), ValueError, r"w_fc: expected shape \[H, 7\]"),
    (dict(w_proj=torch.randn(8, 16)), ValueError, r"w_proj: expected shape \[8, 32\]"),
    (dict(w_fc=torch.randn(32, 8, 1)), ValueError, "w_fc: expected a 2-D tensor"),
    (dict(w_fc=torch.randn(32, 8).bfloat16()), TypeError, "w_fc: dtype torch.bfloat16 differs from x's torch.float32"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x: dtype int64 is not supported"),
    (dict(x=torch.randn(())), ValueError, "x: expected at least 1 dims"),
    (dict(x=torch.randn(4, 0), w_fc=torch.randn(32, 0), w_proj=torch.randn(0, 32)), ValueError,
     r"x: last dim D = 0 in shape \(4, 0\); expected D >= 1"),
    (dict(w_fc=torch.randn(0, 8), w_proj=torch.randn(8, 0)), ValueError,
     r"w_fc: H = 0 rows in shape \(0, 8\); expected a \[H, D\] weight with H >= 1"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input(change, exc, pattern, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton needs the interpreter or a GPU")
    args = dict(x=torch.randn(4, 8), w_fc=torch.randn(32, 8), w_proj=torch.randn(8, 32))
    args.update(change)
    with pytest.raises(exc, match=pattern):
        relu2_mlp(**args, backend=backend)


def test_empty_batch():
    x, w_fc, w_proj = make(0, 8, 16)
    out = relu2_mlp(x, w_fc, w_proj)
    out.sum().backward()
    assert out.shape == (0, 8) and w_fc.grad.abs().sum() == 0


def test_opcheck():
    x, w_fc, w_proj = make(9, 8, 24)
    torch.library.opcheck(_relu2_mlp_op, (x, w_fc, w_proj, "reference"))


def test_opcheck_transposed_weights():
    x, w_fc, w_proj = make(9, 8, 24)
    w_fc_t = w_fc.detach().t().contiguous().t().requires_grad_(True)     # [H, D] view of a [D, H] buffer
    w_proj_t = w_proj.detach().t().contiguous().t().requires_grad_(True)
    torch.library.opcheck(_relu2_mlp_op, (x, w_fc_t, w_proj_t, "reference"))


def test_fc_stored_wide_matches_the_record_layout():
    # The same weights stored [H, D] (the record) or [D, H] and passed transposed: the same forward,
    # and the same gradient (transposed), computed without copying the weight.
    x, w_fc, w_proj = make(29, 24, 96, dtype=torch.float64)
    fc_wide = w_fc.detach().t().contiguous().requires_grad_(True)  # [D, H]
    dy = torch.randn(29, 24, dtype=torch.float64)
    out_record = relu2_mlp(x, w_fc, w_proj)
    out_wide = relu2_mlp(x, fc_wide.t(), w_proj)
    torch.testing.assert_close(out_wide, out_record, rtol=1e-12, atol=1e-12)
    g_record = torch.autograd.grad(out_record, (x, w_fc, w_proj), dy)
    g_wide = torch.autograd.grad(out_wide, (x, fc_wide, w_proj), dy)
    assert g_wide[1].shape == (24, 96) and g_wide[1].is_contiguous()  # in the parameter's layout, no copy
    torch.testing.assert_close(g_wide[0], g_record[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_wide[1].t(), g_record[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_wide[2], g_record[2], rtol=1e-12, atol=1e-12)


def test_non_finite_input_gives_non_finite_output():
    x, w_fc, w_proj = make(6, 8, 32)
    x = x.detach().clone()
    x[2, 1] = float("nan")
    out = relu2_mlp(x, w_fc, w_proj)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
