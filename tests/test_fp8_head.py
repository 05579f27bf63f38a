"""fp8_head_loss reference: the quantised computation in float64, gradients, NaN handling, bad input, opcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import SPEEDRUN_SCALES, fp8_head_loss, set_target_checks
from kernels.fp8_head import _fp8_head_loss_backward_op, _fp8_head_loss_op, quantize


def f64_quantised_loss(x, weight, targets, softcap, logit_scale, scales, reduction, ignore_index=-100):
    """The same quantised forward, with the arithmetic after quantisation in float64."""
    if scales is None:
        xs, ws = x.abs().max().double() / 448, weight.abs().max().double() / 448
    else:
        xs, ws = torch.tensor(scales[0], dtype=torch.float64), torch.tensor(scales[1], dtype=torch.float64)
    x8 = (x.double() / xs).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    w8 = (weight.double() / ws).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    z = softcap * torch.tanh(logit_scale * (x8 @ w8.T) * xs * ws / softcap)
    return F.cross_entropy(z, targets.long(), reduction=reduction, ignore_index=ignore_index)


def f64_unquantised(x, weight, targets, softcap, logit_scale, reduction):
    x, weight = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    z = softcap * torch.tanh(logit_scale * (x @ weight.T) / softcap)
    return F.cross_entropy(z, targets.long(), reduction=reduction), x, weight


def make(T, D, V, dtype=torch.float32):
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, D) * 0.5).to(dtype).requires_grad_(True)
    return x, weight, torch.randint(0, V, (T,))


@pytest.mark.parametrize("scales", [None, (0.01, 0.004, 1 / 448)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("T, D, V", [(1, 16, 7), (37, 48, 203)])
def test_loss_matches_float64_of_the_quantised_math(scales, reduction, T, D, V):
    x, weight, targets = make(T, D, V)
    targets[::4] = -100
    got = fp8_head_loss(x, weight, targets, softcap=15.0, logit_scale=0.2, scales=scales, reduction=reduction)
    want = f64_quantised_loss(x, weight, targets, 15.0, 0.2, scales, reduction)
    if T == 1 and reduction == "mean":
        assert torch.isnan(got) and torch.isnan(want)  # the only target is ignored
        return
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_track_the_unquantised_float64_gradients(dtype, reduction):
    T, D, V = 64, 32, 96
    x, weight, targets = make(T, D, V, dtype)
    loss = fp8_head_loss(x, weight, targets, logit_scale=D ** -0.5, reduction=reduction)
    grad_out = torch.rand_like(loss) + 0.5  # not assumed to be 1
    dx, dw = torch.autograd.grad(loss, (x, weight), grad_out)
    assert dx.dtype == dtype and dw.dtype == dtype
    ref, x64, w64 = f64_unquantised(x, weight, targets, 15.0, D ** -0.5, reduction)
    dx64, dw64 = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    for got, want in ((dx, dx64), (dw, dw64)):
        cos = F.cosine_similarity(got.double().flatten(), want.flatten(), dim=0)
        assert cos > 0.99, cos  # fp8 operands and an e5m2 gradient: a few percent of noise
        assert (got.double() - want).norm() / want.norm() < 0.15


def test_static_speedrun_scales():
    x, weight, targets = make(50, 768, 300)
    loss = fp8_head_loss(x, weight, targets, logit_scale=768 ** -0.5, scales=SPEEDRUN_SCALES, reduction="sum")
    want = f64_quantised_loss(x, weight, targets, 15.0, 768 ** -0.5, SPEEDRUN_SCALES, "sum")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()


def test_ignored_rows_get_no_gradient():
    x, weight, targets = make(10, 16, 20)
    targets[3] = -100
    loss = fp8_head_loss(x, weight, targets, reduction="none")
    assert loss[3] == 0
    (dx,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    assert dx[3].abs().max() == 0 and dx.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scales", [None, SPEEDRUN_SCALES])
def test_non_finite_input_gives_non_finite_loss(bad, scales):
    x, weight, targets = make(8, 16, 12)
    x = x.detach().clone()
    x[5, 3] = bad
    loss = fp8_head_loss(x, weight, targets, scales=scales, reduction="none")
    assert not torch.isfinite(loss[5])
    assert not torch.isfinite(fp8_head_loss(x, weight, targets, scales=scales))


def test_quantize_saturates_finite_values():
    q = quantize(torch.tensor([1e6, -1e6, 3.0, float("inf")]), 1.0, torch.float8_e4m3fn).float()
    assert q[0] == 448 and q[1] == -448 and q[2] == 3 and math.isnan(q[3])


def test_padded_vocabulary_and_int32_targets():
    x, weight, targets = make(12, 16, 64)
    targets = targets % 50  # V = 64 > largest target
    torch.testing.assert_close(fp8_head_loss(x, weight, targets.int()), fp8_head_loss(x, weight, targets))


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(x=torch.randn(2, 4, 16)), ValueError, r"x: expected a 2-D tensor, got shape \(2, 4, 16\)"),
    (dict(x=torch.randn(4, 8)), ValueError, r"weight: expected shape \[V, 8\]"),
    (dict(weight=torch.randn(0, 16)), ValueError, "weight: V must be at least 1"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "x: dtype float64 is not supported"),
    (dict(weight=torch.ones(20, 16, dtype=torch.int8)), TypeError, "weight: dtype int8"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, r"targets: expected shape \[4\]"),
    (dict(targets=torch.zeros(4)), TypeError, "targets: dtype float32"),
    (dict(targets=torch.tensor([0, 20, 1, 2])), ValueError, r"targets: value 20 at index 1 is outside \[0, 20\)"),
    (dict(targets=torch.tensor([0, 1, -5, 2])), ValueError, "targets: value -5 at index 2"),
    (dict(softcap=-1.0), ValueError, "softcap: expected a finite value > 0, got -1.0"),
    (dict(logit_scale=0), ValueError, "logit_scale: expected a finite value > 0"),
    (dict(scales=(1.0, 1.0)), ValueError, r"scales: expected None or a \(x_scale, w_scale, grad_scale\) tuple"),
    (dict(scales=(1.0, float("nan"), 1.0)), ValueError, r"scales\[1\] \(w_scale\): expected a finite value > 0, got nan"),
    (dict(scales=(1.0, 1.0, float("inf"))), ValueError, r"scales\[2\] \(grad_scale\)"),
    (dict(scales=(0.0, 1.0, 1.0)), ValueError, r"scales\[0\] \(x_scale\)"),
    (dict(reduction="mean "), ValueError, "reduction: expected one of"),
    (dict(backend="fast"), ValueError, "backend: unknown backend 'fast'"),
])
def test_bad_input(change, exc, pattern):
    args = dict(x=torch.randn(4, 16), weight=torch.randn(20, 16), targets=torch.tensor([0, 1, 2, 19]))
    args.update(change)
    with pytest.raises(exc, match=pattern):
        fp8_head_loss(**args)


def test_target_check_can_be_switched_off_for_timed_runs():
    x, weight, targets = make(4, 16, 20)
    set_target_checks(False)
    try:
        fp8_head_loss(x, weight, targets)
    finally:
        set_target_checks(True)


def test_opcheck():
    x, weight, targets = make(9, 16, 30)
    targets[2] = -100
    for scales in ((None, None, None), (0.01, 0.01, 0.002)):
        torch.library.opcheck(_fp8_head_loss_op, (x, weight, targets, 15.0, 0.25, *scales, -100, "reference"))
    row_loss, lse, x_bytes, w_bytes, used = _fp8_head_loss_op(x, weight, targets, 15.0, 0.25, None, None, None, -100,
                                                         "reference")
    torch.library.opcheck(_fp8_head_loss_backward_op, (torch.rand(9), x_bytes, w_bytes, targets, lse, used, 15.0, 0.25,
                                                       None, -100, torch.float32, torch.float32, "reference"))


def test_aot_compiled_matches_eager():
    x, weight, targets = make(9, 16, 30)
    def head(x, weight, targets):
        return fp8_head_loss(x, weight, targets, 15.0, 0.25, None, "sum")

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    for fn in (head, compiled):
        loss = fn(x, weight, targets)
        grads = torch.autograd.grad(loss, (x, weight))
        if fn is head:
            want = (loss, *grads)
    for got, w in zip((loss, *grads), want):
        torch.testing.assert_close(got, w)
