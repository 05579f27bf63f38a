"""softcap_cross_entropy: reference vs float64 math, gradients, reductions, bad input, opcheck."""

import pytest
import torch
import torch.nn.functional as F

from kernels import set_target_checks, softcap_cross_entropy
from kernels.softcap_cross_entropy import _softcap_ce_op


def f64_loss(logits, targets, softcap, logit_scale, reduction, ignore_index=-100):
    z = softcap * torch.tanh(logit_scale * logits.double() / softcap)
    return F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1).long(), reduction=reduction,
                           ignore_index=ignore_index).reshape(targets.shape if reduction == "none" else ())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1, 7), (37, 101), (3, 5, 64)])
def test_matches_float64(reduction, shape):
    logits = torch.randn(shape) * 20
    targets = torch.randint(0, shape[-1], shape[:-1])
    targets.view(-1)[1::3] = -100
    got = softcap_cross_entropy(logits, targets, softcap=15.0, logit_scale=0.7, reduction=reduction)
    want = f64_loss(logits, targets, 15.0, 0.7, reduction)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_logits_are_upcast(dtype):
    logits = torch.randn(19, 53) * 4
    targets = torch.randint(0, 53, (19,))
    got = softcap_cross_entropy(logits.to(dtype), targets)
    want = f64_loss(logits.to(dtype), targets, 15.0, 1.0, "mean")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_matches_float64_autograd(reduction):
    logits = (torch.randn(13, 29, dtype=torch.float64) * 10).requires_grad_(True)
    targets = torch.randint(0, 29, (13,))
    targets[4] = -1
    grad_out = torch.rand(13, dtype=torch.float64) if reduction == "none" else torch.tensor(2.5, dtype=torch.float64)
    (g_got,) = torch.autograd.grad(softcap_cross_entropy(logits, targets, 5.0, 0.3, reduction, -1), logits, grad_out)
    (g_want,) = torch.autograd.grad(f64_loss(logits, targets, 5.0, 0.3, reduction, -1), logits, grad_out)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert g_got[4].abs().max() == 0  # ignored row


def test_gradcheck():
    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 10, 3, -100, 7, 7])
    assert torch.autograd.gradcheck(lambda l: softcap_cross_entropy(l, targets, 3.0, 2.0, "sum"), (logits,))


def test_bf16_gradient_dtype():
    logits = torch.randn(8, 40, dtype=torch.bfloat16, requires_grad=True)
    softcap_cross_entropy(logits, torch.randint(0, 40, (8,))).backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_mean_over_no_valid_target_is_nan():
    loss = softcap_cross_entropy(torch.randn(3, 5), torch.full((3,), -100))
    assert torch.isnan(loss)


def test_int32_targets():
    logits, targets = torch.randn(9, 17), torch.randint(0, 17, (9,))
    torch.testing.assert_close(softcap_cross_entropy(logits, targets.int()), softcap_cross_entropy(logits, targets))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(logits=torch.randint(0, 3, (4, 5))), TypeError, "logits: dtype int64 is not supported"),
    (dict(targets=torch.zeros(4)), TypeError, "targets: dtype float32 is not supported"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, r"targets: expected shape \(4,\)"),
    (dict(logits=torch.randn(4, 0), targets=torch.zeros(4, dtype=torch.long)), ValueError, "class dim is empty"),
    (dict(softcap=0.0), ValueError, "softcap: expected a finite value > 0, got 0.0"),
    (dict(softcap=float("nan")), ValueError, "softcap: expected a finite value > 0"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale: expected a finite value > 0"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of 'mean', 'sum', 'none', got 'avg'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index: expected an int"),
    (dict(targets=torch.tensor([0, 1, 5, 2])), ValueError, r"targets: value 5 at index 2 is outside \[0, 5\)"),
    (dict(targets=torch.tensor([0, -1, 2, 2])), ValueError, r"targets: value -1 at index 1 .*ignore_index=-100"),
    (dict(softcap=1e300), ValueError, "softcap: 1e[+]300 is outside float32's normal range"),
    (dict(logit_scale=1e-40), ValueError, "logit_scale: 1e-40 is outside float32's normal range"),
    (dict(logit_scale=1e-20, softcap=1e20), ValueError, "logit_scale: logit_scale / softcap = .* underflows float32"),
    (dict(ignore_index=2**64), ValueError, "ignore_index: 18446744073709551616 does not fit in int64"),
    (dict(logits=torch.randn(4, 5).to_sparse()), TypeError, "logits: layout sparse_coo is not supported"),
    (dict(targets=torch.tensor([0, 1, 2, 3]).to_sparse()), TypeError, "targets: layout sparse_coo is not supported"),
    (dict(logits=torch.nested.nested_tensor([torch.randn(2, 5), torch.randn(3, 5)], layout=torch.jagged)),
     TypeError, "logits: nested tensors are not supported"),
])
def test_bad_input(kwargs, exc, pattern):
    args = dict(logits=torch.randn(4, 5), targets=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        softcap_cross_entropy(**args)


def test_target_check_switch():
    set_target_checks(False)
    try:
        softcap_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))  # valid either way
    finally:
        set_target_checks(True)
    with pytest.raises(ValueError):
        softcap_cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_logits_give_a_non_finite_loss(bad):
    # tanh saturates at ±inf: without care an infinite logit would be the finite z = ±softcap.
    logits = torch.randn(4, 9, requires_grad=True)
    targets = torch.tensor([0, 3, 5, 8])
    with torch.no_grad():
        poisoned = logits.clone()
        poisoned[2, 4] = bad
    poisoned.requires_grad_(True)
    rows = softcap_cross_entropy(poisoned, targets, reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    assert torch.isnan(softcap_cross_entropy(poisoned, targets))
    (grad,) = torch.autograd.grad(rows.sum(), poisoned)
    assert torch.isnan(grad[2]).all() and torch.isfinite(grad[[0, 1, 3]]).all()


def test_out_of_range_target_with_checks_off_gives_nan():
    set_target_checks(False)
    try:
        rows = softcap_cross_entropy(torch.randn(3, 5), torch.tensor([0, 7, -3]), reduction="none")
    finally:
        set_target_checks(True)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1:]).all()


@pytest.mark.parametrize("call, pattern", [
    (lambda k: k.relu2_mlp(torch.randn(4, 8).to_sparse(), torch.randn(16, 8), torch.randn(8, 16)), "x: layout"),
    (lambda k: k.relu2_mlp(torch.randn(4, 8), torch.randn(16, 8).to_sparse(), torch.randn(8, 16)), "w_fc: layout"),
    (lambda k: k.newton_schulz(torch.randn(8, 8).to_sparse()), "G: layout sparse_coo"),
    (lambda k: k.newton_schulz(torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)],
                                                          layout=torch.jagged)), "G: nested tensors"),
])
def test_every_op_requires_a_dense_strided_layout(call, pattern):
    # The check lives in kernels._checks.check_tensor, which every op's wrapper runs first.
    import kernels
    with pytest.raises(TypeError, match=pattern):
        call(kernels)


def test_opcheck():
    logits = torch.randn(7, 13, requires_grad=True)
    targets = torch.tensor([0, 12, -100, 5, 5, 1, 2])
    torch.library.opcheck(_softcap_ce_op, (logits, targets, 15.0, 1.0, -100))
