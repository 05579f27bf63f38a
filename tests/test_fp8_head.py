"""fp8_head_loss through the op and its reference backend: float64 checks of both roundings, every
reduction and ignore_index case, gradients, chunking, no-grad, the no-[T, V] property, bad input, opcheck.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fp8_head_oracle import LargestTensor, f64_fp8_head, rel
from kernels import SPEEDRUN_SCALES, fp8_head_loss, set_target_checks
from kernels import fp8_head as op
from kernels.fp8_head import _fp8_head_loss_backward_op, _fp8_head_loss_op, quantize


def make(T, D, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_(True)
    return x, weight, torch.randint(0, V, (T,), generator=g)


def upstream_for(loss, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=g) + 0.5  # not assumed to be 1


@pytest.fixture
def small_chunks(monkeypatch):
    """The reference walks T in chunks of 16 rows, so the test shapes span several."""
    monkeypatch.setattr(op, "REFERENCE_CHUNK_ROWS", 16)


# ---------------------------------------------------------------------------
# float64
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", ["fp32", "record"])
@pytest.mark.parametrize("scales", [None, (0.011, 0.0037, 1 / 448)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("T, D, V", [(1, 16, 7), (37, 48, 203)])
def test_loss_and_gradients_match_float64(small_chunks, rounding, scales, reduction, T, D, V):
    x, weight, targets = make(T, D, V, seed=T + V)
    targets[::4] = -100
    loss = fp8_head_loss(x, weight, targets, softcap=15.0, logit_scale=0.2, scales=scales, reduction=reduction,
                         rounding=rounding, backend="reference")
    grad_out = upstream_for(loss)
    dx, dw = torch.autograd.grad(loss, (x, weight), grad_out)
    want = f64_fp8_head(x.detach(), weight.detach(), targets, softcap=15.0, logit_scale=0.2, scales=scales,
                        reduction=reduction, rounding=rounding,
                        upstream=grad_out.double() if reduction == "none" else float(grad_out))
    if T == 1 and reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(want["loss"])  # the only target is ignored
        assert torch.all(dx == 0) and torch.all(dw == 0)
        return
    torch.testing.assert_close(loss.double(), want["loss"], rtol=1e-5, atol=1e-6)
    assert rel(dx, want["dx"]) < 1e-5 and rel(dw, want["dw"]) < 1e-5, (rel(dx, want["dx"]), rel(dw, want["dw"]))


def test_the_two_roundings_differ_where_the_record_rounds():
    x, weight, targets = make(64, 32, 96, seed=3)
    losses = {r: fp8_head_loss(x, weight, targets, logit_scale=0.4, rounding=r, backend="reference", reduction="none")
              for r in ("fp32", "record")}
    want = {r: f64_fp8_head(x.detach(), weight.detach(), targets, logit_scale=0.4, rounding=r, reduction="none")
            for r in ("fp32", "record")}
    for r in losses:
        torch.testing.assert_close(losses[r].double(), want[r]["loss"], rtol=1e-5, atol=1e-6)
    # bf16 logits move each row's loss by ~1e-3: far beyond the fp32 agreement above.
    assert (losses["fp32"] - losses["record"]).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_track_the_unquantised_float64_gradients(dtype, reduction):
    T, D, V = 64, 32, 96
    x, weight, targets = make(T, D, V, dtype)
    loss = fp8_head_loss(x, weight, targets, logit_scale=D ** -0.5, reduction=reduction)
    grad_out = upstream_for(loss)
    dx, dw = torch.autograd.grad(loss, (x, weight), grad_out)
    assert dx.dtype == dtype and dw.dtype == dtype
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    z = 15.0 * torch.tanh((x64 @ w64.T) * D ** -0.5 / 15.0)
    ref = F.cross_entropy(z, targets, reduction=reduction)
    dx64, dw64 = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    for got, want in ((dx, dx64), (dw, dw64)):
        cos = F.cosine_similarity(got.double().flatten(), want.flatten(), dim=0)
        assert cos > 0.99, cos  # fp8 operands and an e5m2 gradient: a few percent of noise
        assert rel(got, want) < 0.15


def test_static_speedrun_scales():
    x, weight, targets = make(50, 768, 300)
    loss = fp8_head_loss(x, weight, targets, logit_scale=768 ** -0.5, scales=SPEEDRUN_SCALES, reduction="sum")
    want = f64_fp8_head(x.detach(), weight.detach(), targets, logit_scale=768 ** -0.5, scales=SPEEDRUN_SCALES,
                        reduction="sum", upstream=1.0)
    torch.testing.assert_close(loss.double(), want["loss"], rtol=1e-5, atol=1e-5)
    loss.backward()
    assert rel(x.grad, want["dx"]) < 1e-5 and rel(weight.grad, want["dw"]) < 1e-5


# ---------------------------------------------------------------------------
# Reductions, ignore_index, gradient bookkeeping
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_get_no_gradient(reduction):
    x, weight, targets = make(10, 16, 20)
    targets[3] = -100
    loss = fp8_head_loss(x, weight, targets, reduction=reduction)
    if reduction == "none":
        assert loss[3] == 0
    (dx,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    assert dx[3].abs().max() == 0 and dx.abs().sum() > 0


@pytest.mark.parametrize("ignore_index", [5, -1, 2**40])
def test_ignore_index_values(ignore_index):
    x, weight, targets = make(20, 16, 30)
    targets[::3] = ignore_index
    loss = fp8_head_loss(x, weight, targets, reduction="none", ignore_index=ignore_index)
    want = f64_fp8_head(x.detach(), weight.detach(), targets, reduction="none", ignore_index=ignore_index)
    assert torch.all(loss[targets == ignore_index] == 0)
    torch.testing.assert_close(loss.double(), want["loss"], rtol=1e-5, atol=1e-6)


def test_mean_over_no_valid_target_is_nan_with_zero_gradients():
    x, weight, _ = make(6, 16, 20)
    loss = fp8_head_loss(x, weight, torch.full((6,), -100))
    assert torch.isnan(loss)
    dx, dw = torch.autograd.grad(loss, (x, weight))
    assert torch.all(dx == 0) and torch.all(dw == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_scales_the_gradients_kept_by_the_forward(reduction):
    x, weight, targets = make(30, 16, 40)
    loss = fp8_head_loss(x, weight, targets, reduction=reduction, scales=(0.01, 0.005, 1 / 448))
    g1 = torch.autograd.grad(loss, (x, weight), torch.tensor(1.0), retain_graph=True)
    g2 = torch.autograd.grad(loss, (x, weight), torch.tensor(-2.5), retain_graph=True)
    g3 = torch.autograd.grad(loss, (x, weight), torch.tensor(1.0))  # the stored gradients are not consumed
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(b, -2.5 * a)
        assert torch.equal(a, c)


def test_no_grad_runs_no_gradient_work(monkeypatch):
    calls = []
    real = op._reference_dl
    monkeypatch.setattr(op, "_reference_dl", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, weight, targets = make(12, 16, 20)
    with torch.no_grad():
        loss = fp8_head_loss(x, weight, targets, reduction="sum")
    assert not calls and not loss.requires_grad
    fp8_head_loss(x.detach(), weight.detach(), targets, reduction="sum")  # nothing requires grad
    assert not calls
    fp8_head_loss(x, weight, targets, reduction="sum")
    assert calls


def test_only_the_needed_gradient_is_computed():
    x, weight, targets = make(12, 16, 20)
    outputs = _fp8_head_loss_op(x, weight.detach(), targets, 15.0, 1.0, None, None, None, -100, "sum", True, False,
                                "fp32", "reference")
    assert outputs[2].shape == x.shape and outputs[3].numel() == 0
    loss = fp8_head_loss(x, weight.detach(), targets, reduction="sum")
    (dx,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0


def test_a_gradient_the_forward_did_not_keep_is_an_error():
    x, weight, targets = make(8, 16, 20)
    outputs = _fp8_head_loss_op(x, weight, targets, 15.0, 1.0, None, None, None, -100, "sum", False, True, "fp32",
                                "reference")
    with pytest.raises(RuntimeError, match="need_dx=False"):
        torch.autograd.grad(outputs[0], x)


@pytest.mark.parametrize("scales", [None, SPEEDRUN_SCALES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["reference", None])
def test_empty_batch(scales, reduction, backend):
    x = torch.zeros(0, 768, requires_grad=True)
    weight = torch.randn(50, 768, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    loss = fp8_head_loss(x, weight, targets, scales=scales, reduction=reduction, backend=backend)
    if reduction == "mean":
        assert torch.isnan(loss)
    elif reduction == "sum":
        assert loss == 0
    else:
        assert loss.shape == (0,)
    dx, dw = torch.autograd.grad(loss, (x, weight), torch.ones_like(loss))
    assert dx.shape == (0, 768) and torch.all(dw == 0)


# ---------------------------------------------------------------------------
# Non-finite values, quantisation, target checks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scales", [None, SPEEDRUN_SCALES])
@pytest.mark.parametrize("rounding", ["fp32", "record"])
def test_non_finite_input_gives_non_finite_loss(bad, scales, rounding):
    x, weight, targets = make(8, 16, 12)
    x = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        x[5, 3] = bad
    loss = fp8_head_loss(x, weight, targets, scales=scales, reduction="none", rounding=rounding)
    assert not torch.isfinite(loss[5])
    total = fp8_head_loss(x, weight, targets, scales=scales, rounding=rounding)
    assert not torch.isfinite(total)
    (dw,) = torch.autograd.grad(total, weight)
    assert not torch.isfinite(dw).all()


def test_quantize_saturates_finite_values():
    q = quantize(torch.tensor([1e6, -1e6, 3.0, float("inf")]), 1.0, torch.float8_e4m3fn).float()
    assert q[0] == 448 and q[1] == -448 and q[2] == 3 and math.isnan(q[3])


def test_quantize_record_rounds_to_bf16_first():
    # 1 + 2^-4 + 2^-12 is just above the e4m3 midpoint 1.0625 between 1.0 and 1.125, so it rounds up;
    # in bf16 it is 1.0625 itself, an e4m3 tie that rounds to even (1.0): a double-rounding witness.
    t = torch.tensor([1.0625 + 2.0**-12])
    assert float(quantize(t, 1.0, torch.float8_e4m3fn).float()) == 1.125
    assert float(quantize(t, 1.0, torch.float8_e4m3fn, round_bf16=True).float()) == 1.0


def test_padded_vocabulary_and_int32_targets():
    x, weight, targets = make(12, 16, 64)
    targets = targets % 50  # V = 64 > largest target
    torch.testing.assert_close(fp8_head_loss(x, weight, targets.int()), fp8_head_loss(x, weight, targets))


def test_target_out_of_range_with_checks_off_gives_nan():
    x, weight, targets = make(6, 16, 20)
    targets[2] = 25
    set_target_checks(False)
    try:
        loss = fp8_head_loss(x, weight, targets, reduction="none")
        total = fp8_head_loss(x, weight, targets, reduction="sum")
        (dx,) = torch.autograd.grad(total, x)
    finally:
        set_target_checks(True)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(dx[2]).all()


def test_target_check_can_be_switched_off_for_timed_runs():
    x, weight, targets = make(4, 16, 20)
    set_target_checks(False)
    try:
        assert torch.isfinite(fp8_head_loss(x, weight, targets))
    finally:
        set_target_checks(True)


# ---------------------------------------------------------------------------
# Memory: no [T, V] tensor
# ---------------------------------------------------------------------------

def run_backend_forward_backward(impl_forward, impl_backward, x, weight, targets, reduction):
    """The op's forward and (for "none") backward implementations, called directly: a dispatch mode sees
    the ops inside a custom op only this way."""
    loss, lse, dx, dw, x_f8, w_f8, used = impl_forward(x, weight, targets, 15.0, 0.5, None, None, None, -100,
                                                       reduction, True, True, "fp32")
    if reduction == "none":
        row_grad = torch.ones_like(loss)
        dx, dw = impl_backward(row_grad, x_f8, w_f8, targets, lse, used, 15.0, 0.5, None, -100, True, True,
                               x.dtype, weight.dtype, "fp32")
    return loss, dx, dw


def test_reference_never_allocates_t_by_v(small_chunks):
    # T·V = 52 KB as bytes; the largest legitimate tensor is a [16, 203] fp32 chunk (13 KB).
    T, D, V = 256, 8, 203
    x, weight, targets = (t.detach() for t in make(T, D, V))
    with LargestTensor() as watch:
        for reduction in ("sum", "none"):
            run_backend_forward_backward(op.reference_forward, op.reference_backward, x, weight, targets, reduction)
    assert watch.largest < T * V, f"a tensor of {watch.largest} bytes >= T·V = {T * V}"
    op.REFERENCE_CHUNK_ROWS = T  # the watch does see a [T, V] chunk
    with LargestTensor() as whole:
        run_backend_forward_backward(op.reference_forward, op.reference_backward, x, weight, targets, "sum")
    assert whole.largest >= T * V


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, exc, pattern", [
    (dict(x=torch.randn(2, 4, 16)), ValueError, r"x: expected a 2-D tensor, got shape \(2, 4, 16\)"),
    (dict(x=torch.randn(4, 8)), ValueError, r"weight: expected shape \[V, 8\]"),
    (dict(weight=torch.randn(0, 16)), ValueError, "weight: V must be at least 1"),
    (dict(x=torch.randn(4, 0), weight=torch.randn(20, 0)), ValueError, r"x: D \(the feature dim\) must be at least 1"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "x: dtype float64 is not supported"),
    (dict(weight=torch.ones(20, 16, dtype=torch.int8)), TypeError, "weight: dtype int8"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, r"targets: expected shape \[4\]"),
    (dict(targets=torch.zeros(4)), TypeError, "targets: dtype float32"),
    (dict(targets=torch.tensor([0, 20, 1, 2])), ValueError, r"targets: value 20 at index 1 is outside \[0, 20\)"),
    (dict(targets=torch.tensor([0, 1, -5, 2])), ValueError, "targets: value -5 at index 2"),
    (dict(x=torch.randn(4, 16).to_sparse()), TypeError, "x: layout sparse_coo is not supported"),
    (dict(weight=torch.randn(20, 16).to_sparse_csr()), TypeError, "weight: layout sparse_csr is not supported"),
    (dict(targets=torch.tensor([0, 1, 2, 3]).to_sparse()), TypeError, "targets: layout sparse_coo"),
    (dict(x=torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(2, 16)], layout=torch.jagged)), TypeError,
     "x: nested tensors are not supported"),
    (dict(softcap=-1.0), ValueError, "softcap: expected a finite value > 0, got -1.0"),
    (dict(softcap=1e300), ValueError, "softcap: 1e[+]300 is outside float32's normal range"),
    (dict(softcap=1e-39), ValueError, "softcap: .* is outside float32's normal range"),
    (dict(logit_scale=0), ValueError, "logit_scale: expected a finite value > 0"),
    (dict(logit_scale=1e-30, softcap=1e30), ValueError, "logit_scale: logit_scale / softcap = .* underflows"),
    (dict(logit_scale="1"), TypeError, "logit_scale: expected a float, got str"),
    (dict(scales=(1.0, 1.0)), ValueError, r"scales: expected None or a \(x_scale, w_scale, grad_scale\) tuple"),
    (dict(scales=(1.0, float("nan"), 1.0)), ValueError, r"scales\[1\] \(w_scale\): expected a finite value > 0, got nan"),
    (dict(scales=(1.0, 1.0, float("inf"))), ValueError, r"scales\[2\] \(grad_scale\)"),
    (dict(scales=(0.0, 1.0, 1.0)), ValueError, r"scales\[0\] \(x_scale\)"),
    (dict(scales=(1.0, True, 1.0)), TypeError, r"scales\[1\] \(w_scale\): expected a float, got bool"),
    (dict(scales=(1.0, 1.0, 1e-40)), ValueError, r"scales\[2\] \(grad_scale\): 1e-40 is outside float32's normal"),
    (dict(scales=(1e39, 1.0, 1.0)), ValueError, r"scales\[0\] \(x_scale\): 1e\+39 is outside float32's normal"),
    (dict(scales=(1e30, 1e30, 1e30)), ValueError, r"scales: x_scale·w_scale \(the logits' scale\) = 1e\+60"),
    (dict(scales=(1e-20, 1e-20, 1.0)), ValueError, r"scales: x_scale·w_scale \(the logits' scale\) = .* underflows"),
    (dict(scales=(1.0, 1e-30, 1e-10)), ValueError, r"scales: grad_scale·w_scale \(dx's scale\) = .* underflows"),
    (dict(scales=(1e-30, 1.0, 1e-10)), ValueError, r"scales: grad_scale·x_scale \(dW's scale\) = .* underflows"),
    (dict(scales=(1.0, 1e30, 1e10)), ValueError, r"scales: grad_scale·w_scale \(dx's scale\) = .* beyond float32"),
    (dict(reduction="mean "), ValueError, "reduction: expected one of"),
    (dict(rounding="bf16"), ValueError, "rounding: expected one of 'fp32', 'record', got 'bf16'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index: expected an int, got float"),
    (dict(ignore_index=2**63), ValueError, r"ignore_index: 9223372036854775808 does not fit in int64"),
    (dict(ignore_index=-2**63 - 1), ValueError, "ignore_index: -9223372036854775809 does not fit in int64"),
    (dict(backend="fast"), ValueError, "backend: unknown backend 'fast'"),
])
def test_bad_input(change, exc, pattern):
    args = dict(x=torch.randn(4, 16), weight=torch.randn(20, 16), targets=torch.tensor([0, 1, 2, 19]))
    args.update(change)
    with pytest.raises(exc, match=pattern):
        fp8_head_loss(**args)


# ---------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("reduction, need_dx, need_dw, rounding", [
    ("sum", True, True, "fp32"), ("mean", True, False, "record"), ("none", True, True, "fp32"),
    ("none", False, True, "record"), ("sum", False, False, "fp32")])
def test_opcheck(reduction, need_dx, need_dw, rounding):
    x, weight, targets = make(9, 16, 30)
    x, weight = x.detach().requires_grad_(need_dx), weight.detach().requires_grad_(need_dw)
    targets[2] = -100
    for scales in ((None, None, None), (0.01, 0.01, 0.002)):
        torch.library.opcheck(_fp8_head_loss_op, (x, weight, targets, 15.0, 0.25, *scales, -100, reduction, need_dx,
                                                  need_dw, rounding, "reference"))


def test_opcheck_backward():
    x, weight, targets = make(9, 16, 30)
    targets[2] = -100
    _loss, lse, _dx, _dw, x_bytes, w_bytes, used = _fp8_head_loss_op(x, weight, targets, 15.0, 0.25, None, None, None,
                                                                     -100, "none", True, True, "fp32", "reference")
    for need_dx, need_dw in ((True, True), (False, True)):
        torch.library.opcheck(_fp8_head_loss_backward_op, (torch.rand(9), x_bytes, w_bytes, targets, lse, used, 15.0,
                                                           0.25, None, -100, need_dx, need_dw, torch.float32,
                                                           torch.float32, "fp32", "reference"))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_aot_compiled_matches_eager(reduction):
    x, weight, targets = make(9, 16, 30)

    def head(x, weight, targets):
        return fp8_head_loss(x, weight, targets, 15.0, 0.25, None, reduction, rounding="record")

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    results = []
    for fn in (head, compiled):
        loss = fn(x, weight, targets)
        results.append((loss, *torch.autograd.grad(loss, (x, weight), torch.ones_like(loss))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_compiled_no_grad_evaluation():
    x, weight, targets = make(9, 16, 30)
    compiled = torch.compile(lambda x, w, t: fp8_head_loss(x, w, t, reduction="sum"), backend="aot_eager",
                             fullgraph=True)
    with torch.no_grad():
        got = compiled(x, weight, targets)
    torch.testing.assert_close(got, fp8_head_loss(x.detach(), weight.detach(), targets, reduction="sum"))
