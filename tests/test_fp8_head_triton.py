"""Triton backend of fp8_head_loss (fused and materialised paths) against float64 math.

The oracle is the SAME quantised computation as the contract: the kernels' e4m3 operands are
first checked bit for bit against kernels.fp8_head.quantize, then everything after quantisation is
redone in float64 (the logits' gradient is quantised to e5m2 the contract's way, from fp32).

tier 0: launch-table and argument checks (no kernel runs).
tier 1 (interpret): small odd shapes (not multiples of any block), on CPU tensors through the
    Triton interpreter or on CUDA tensors on a GPU; every buffer the backend allocates starts as
    NaN, and the fused path is watched for any tensor of T·V elements.
tier 2 (gpu): the speedrun's shapes, D 768/1024/1536, V 1000/50257/50304, T up to 64K, and the
    peak memory of the fused path.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import fp8_head as ref  # noqa: E402
from kernels.triton_impl import fp8_head as impl  # noqa: E402

SOFTCAP = 15.0
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _inputs(T, D, V, dtype, device, seed, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    if ignore_every:
        targets[1::ignore_every] = -100
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), targets.to(device)


def _row_grad(targets, seed, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    rg = (torch.rand(targets.shape[0], generator=g) + 0.5).to(targets.device)  # not 1
    return torch.where(targets != ignore_index, rg, 0.0)


def _f64_forward(x_f8, w_f8, used_scales, targets, logit_scale, ignore_index=-100, logits_dtype=None):
    """(row_loss, lse, logits) in float64 from the quantised operands; logits_dtype rounds the logits first."""
    logits = (x_f8.double() @ w_f8.double().T) * (used_scales[0].double() * used_scales[1].double())
    if logits_dtype is not None:
        logits = logits.to(logits_dtype).double()
    z = SOFTCAP * torch.tanh(logits * (logit_scale / SOFTCAP))
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    zt = z.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return torch.where(valid, lse - zt, 0.0), lse, logits


def _grads64(row_grad, x_f8, w_f8, logits, targets, lse, used_scales, logit_scale, grad_scale):
    """(dx, dw, dl) in float64 from float64 logits, dlogits quantised to e5m2 the contract's way."""
    t = torch.tanh(logits * (logit_scale / SOFTCAP))
    p = torch.exp(SOFTCAP * t - lse[:, None])
    onehot = F.one_hot(targets.clamp(min=0), logits.shape[1]).double() * (targets >= 0).double()[:, None]
    dlogits = (p - onehot) * row_grad.double()[:, None] * logit_scale * (1 - t * t)
    gs = (ref.dynamic_grad_scale(row_grad, logit_scale) if grad_scale is None
          else torch.tensor(grad_scale, dtype=torch.float32, device=row_grad.device))
    dl = ref.quantize(dlogits, gs, torch.float8_e5m2).double()
    scales = used_scales.double()
    return (dl @ w_f8.double()) * (gs.double() * scales[1]), (dl.T @ x_f8.double()) * (gs.double() * scales[0]), dl


def _assert_rel(name, got, want, tol):
    got, want = got.double(), want.double()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    assert err <= tol, f"{name}: max error {err:.3e} of max|want|, tolerance {tol:.0e}"


def _assert_grad(name, got, want, cos_min=0.999, rel_max=5e-2):
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite (unwritten?)"
    got, want = got.double().flatten(), want.double().flatten()
    cos = float(F.cosine_similarity(got, want, dim=0))
    rel = float((got - want).norm() / want.norm())
    assert cos >= cos_min and rel <= rel_max, \
        f"{name}: cosine {cos:.6f} (want >= {cos_min}), rel err {rel:.2e} (want <= {rel_max})"


def _same_fp8(got, want):
    """Bitwise equal, except that any NaN code matches any NaN code."""
    gb, wb = got.view(torch.uint8), want.view(torch.uint8)
    nan_g, nan_w = torch.isnan(got.float()), torch.isnan(want.float())
    return bool(((gb == wb) | (nan_g & nan_w)).all()) and bool((nan_g == nan_w).all())


def _poison(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    if dtype in _FP8:
        t.view(torch.uint8).fill_(0x7F)  # NaN in both formats
    elif dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the backend allocates with _alloc (outputs, split partials, dl) starts as NaN."""
    monkeypatch.setattr(impl, "_alloc", _poison)


class _LargestTensor(TorchDispatchMode):
    """The largest size in bytes among the outputs of every torch op run inside (allocations included).

    Bytes, not elements: the interpreter copies arguments through untyped (uint8) storages.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


# ---------------------------------------------------------------------------
# tier 0: configuration and argument checks
# ---------------------------------------------------------------------------

def test_config_overrides_merge_and_validate():
    cfg = impl.get_config(torch.device("cpu"), {"dx": {"NUM_ACC": 3}, "split_programs": 7})
    assert cfg["dx"]["NUM_ACC"] == 3 and cfg["split_programs"] == 7 and cfg["dw"]["NUM_ACC"] == 2
    assert impl.get_config(torch.device("cpu"))["dx"]["NUM_ACC"] == 2  # the table itself is untouched
    with pytest.raises(ValueError, match="config: unknown key 'bwd'"):
        impl.get_config(torch.device("cpu"), {"bwd": {}})
    with pytest.raises(ValueError, match=r"config\['dx'\]: unknown keys \['BLOCK_X'\]"):
        impl.get_config(torch.device("cpu"), {"dx": {"BLOCK_X": 1}})
    with pytest.raises(ValueError, match=r"config\['dw'\]\['BLOCK_T'\]: expected a power of two >= 32, got 48"):
        impl.get_config(torch.device("cpu"), {"dw": {"BLOCK_T": 48}})
    with pytest.raises(ValueError, match=r"config\['dx'\]\['BLOCK_V'\]: expected a power of two >= 32, got 16"):
        impl.get_config(torch.device("cpu"), {"dx": {"BLOCK_V": 16}})
    assert impl.get_config(torch.device("cpu"), {"dx": {"BLOCK_V": 16, "DOT_FP16": True}})["dx"]["BLOCK_V"] == 16
    with pytest.raises(ValueError, match=r"config\['dx'\]\['NUM_ACC'\]: expected 1, 2, 3 or 4, got 5"):
        impl.get_config(torch.device("cpu"), {"dx": {"NUM_ACC": 5}})


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "x: dtype torch.float64 is not supported"),
    (dict(weight=torch.randn(20, 8)), ValueError, r"weight: expected shape \[\*, 16\], got \[20, 8\]"),
    (dict(targets=torch.zeros(4, dtype=torch.int32)), TypeError, "targets: dtype torch.int32"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, r"targets: expected shape \[4\], got \[5\]"),
    (dict(x=torch.randn(16, 4).t()), ValueError, "x: expected a contiguous tensor"),
    (dict(weight=torch.randn(0, 16)), ValueError, r"weight: expected V >= 1 and D >= 1, got shape \[0, 16\]"),
])
def test_forward_rejects_bad_arguments(change, exc, pattern):
    args = dict(x=torch.randn(4, 16), weight=torch.randn(20, 16), targets=torch.tensor([0, 1, 2, 19]))
    args.update(change)
    for fn in (impl.forward, impl.forward_materialized):
        with pytest.raises(exc, match=pattern):
            fn(args["x"], args["weight"], args["targets"], SOFTCAP, 1.0, None, None, -100)


def test_backward_rejects_bad_arguments():
    x_f8 = torch.zeros(4, 16, dtype=torch.float8_e4m3fn)
    w_f8 = torch.zeros(20, 16, dtype=torch.float8_e4m3fn)
    good = (torch.zeros(4), x_f8, w_f8, torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.ones(2))
    for i, bad, pattern in ((0, torch.zeros(4, dtype=torch.float16), "row_grad: dtype torch.float16"),
                            (1, torch.zeros(4, 16), "x_f8: dtype torch.float32"),
                            (2, torch.zeros(20, 8, dtype=torch.float8_e4m3fn), r"w_f8: expected shape \[\*, 16\]"),
                            (4, torch.zeros(5), r"lse: expected shape \[4\]"),
                            (5, torch.ones(3), r"used_scales: expected shape \[2\]")):
        args = list(good)
        args[i] = bad
        with pytest.raises((TypeError, ValueError), match=pattern):
            impl.backward(*args, SOFTCAP, 1.0, None, -100, torch.float32, torch.float32)


# ---------------------------------------------------------------------------
# tier 1: quantisation
# ---------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scales", [(None, None), (0.011, 0.0037)])
def test_quantisation_is_bitwise_the_reference(triton_device, poisoned, dtype, scales):
    x, w, _ = _inputs(29, 40, 67, dtype, triton_device, seed=1)
    x = x * 3
    # Saturation (beyond 448·scale with the static scales), values on rounding ties, subnormals, zeros.
    x[0, :8] = torch.tensor([1e4, -1e4, 0.0, -0.0, 1.0625, 17.0, 2.0**-10, -(2.0**-8) * 1.5], dtype=dtype)
    x_f8, w_f8, used = impl.quantize_operands(x, w, *scales)
    xs = ref._scale_tensor(x, scales[0])
    ws = ref._scale_tensor(w, scales[1])
    assert torch.equal(used.cpu(), torch.stack([xs, ws]).cpu())
    assert _same_fp8(x_f8, ref.quantize(x, xs, torch.float8_e4m3fn))
    assert _same_fp8(w_f8, ref.quantize(w, ws, torch.float8_e4m3fn))


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy math
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scales", [(None, None), (0.011, 0.0037)])
def test_quantisation_of_non_finite_values(triton_device, poisoned, bad, scales):
    x, w, _ = _inputs(9, 24, 30, torch.float32, triton_device, seed=2)
    x[4, 7] = bad
    x_f8, _w_f8, used = impl.quantize_operands(x, w, *scales)
    xs = ref._scale_tensor(x, scales[0])
    assert torch.equal(used[0].cpu(), xs.cpu())  # NaN amax -> 1.0 in the reference; inf amax -> inf
    assert _same_fp8(x_f8, ref.quantize(x, xs, torch.float8_e4m3fn))
    assert torch.isnan(x_f8[4, 7].float())


# ---------------------------------------------------------------------------
# tier 1: fused forward
# ---------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("T, D, V", [(37, 48, 203), (1, 40, 97), (70, 16, 33)])
@pytest.mark.parametrize("scales", [(None, None), (0.011, 0.0037)])
def test_fused_forward_matches_float64(triton_device, poisoned, T, D, V, scales):
    logit_scale = D ** -0.5 * 4
    x, w, targets = _inputs(T, D, V, torch.float32, triton_device, seed=T + V)
    row_loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, logit_scale, *scales, -100)
    assert row_loss.dtype == lse.dtype == used.dtype == torch.float32
    assert x_f8.dtype == w_f8.dtype == torch.float8_e4m3fn
    ref_loss, ref_lse, ref_x8, ref_w8, ref_used = ref.reference_forward(x, w, targets, SOFTCAP, logit_scale, *scales,
                                                                        -100)
    assert _same_fp8(x_f8, ref_x8) and _same_fp8(w_f8, ref_w8) and torch.equal(used, ref_used)
    loss64, lse64, _ = _f64_forward(x_f8, w_f8, used, targets, logit_scale)
    _assert_rel("row_loss", row_loss, loss64, 1e-3)
    _assert_rel("lse", lse, lse64, 1e-3)
    assert torch.all(row_loss[targets == -100] == 0)
    if (targets != -100).any():
        total, total64 = row_loss.double().sum(), loss64.sum()
        assert abs(float(total - total64)) <= 1e-3 * abs(float(total64))


@pytest.mark.interpret
def test_fused_forward_split_count_does_not_change_the_result(triton_device):
    x, w, targets = _inputs(37, 48, 203, torch.float32, triton_device, seed=3)
    outs = [impl.forward(x, w, targets, SOFTCAP, 0.3, None, None, -100, config={"split_programs": n})
            for n in (1, 5, 100)]  # 1, 3 and all 7 column tiles per split
    for row_loss, lse, *_ in outs[1:]:
        torch.testing.assert_close(row_loss, outs[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-6, atol=1e-6)


@pytest.mark.interpret
def test_empty_batch(triton_device, poisoned):
    x, w, targets = _inputs(0, 24, 50, torch.float32, triton_device, seed=17, ignore_every=0)
    row_loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, 0.3, None, None, -100)
    assert row_loss.shape == lse.shape == (0,) and x_f8.shape == (0, 24) and w_f8.shape == (50, 24)
    assert float(used[0]) == 1.0  # amax of nothing is 0: scale 1
    dx, dw = impl.backward(row_loss, x_f8, w_f8, targets, lse, used, SOFTCAP, 0.3, None, -100,
                           torch.float32, torch.bfloat16)
    assert dx.shape == (0, 24) and dw.dtype == torch.bfloat16 and torch.all(dw == 0)


@pytest.mark.interpret
def test_ignore_index_inside_the_vocabulary(triton_device, poisoned):
    x, w, targets = _inputs(20, 24, 50, torch.float32, triton_device, seed=4, ignore_every=0)
    targets[::3] = 5
    row_loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, 0.3, None, None, 5)
    loss64, lse64, _ = _f64_forward(x_f8, w_f8, used, targets, 0.3, ignore_index=5)
    assert torch.all(row_loss[targets == 5] == 0)
    _assert_rel("row_loss", row_loss, loss64, 1e-3)
    _assert_rel("lse", lse, lse64, 1e-3)


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy math
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scales", [(None, None), (0.011, 0.0037)])
def test_non_finite_x_gives_non_finite_loss(triton_device, poisoned, bad, scales):
    x, w, targets = _inputs(9, 24, 30, torch.float32, triton_device, seed=5, ignore_every=0)
    x[4, 7] = bad
    for fwd in (impl.forward, impl.forward_materialized):
        row_loss, *_ = fwd(x, w, targets, SOFTCAP, 0.3, *scales, -100)
        assert not torch.isfinite(row_loss[4]), fwd.__name__
        assert not torch.isfinite(row_loss.sum()), fwd.__name__


# ---------------------------------------------------------------------------
# tier 1: fused backward
# ---------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_scale", [None, 1 / 448])
def test_fused_backward_matches_float64(triton_device, poisoned, dtype, grad_scale):
    T, D, V = 37, 48, 203
    logit_scale = 0.5
    x, w, targets = _inputs(T, D, V, dtype, triton_device, seed=6)
    row_loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, logit_scale, None, None, -100)
    rg = _row_grad(targets, seed=7) * 30  # large enough that dlogits use e5m2's normal range at 1/448
    dx, dw = impl.backward(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, logit_scale, grad_scale, -100, dtype, dtype)
    assert dx.dtype == dw.dtype == dtype and dx.shape == x.shape and dw.shape == w.shape
    _loss64, lse64, logits64 = _f64_forward(x_f8, w_f8, used, targets, logit_scale)
    dx64, dw64, dl64 = _grads64(rg, x_f8, w_f8, logits64, targets, lse64, used, logit_scale, grad_scale)
    assert (dl64 != 0).float().mean() > 0.5  # the check below is not about a mostly-zero gradient
    _assert_grad("dx", dx, dx64)
    _assert_grad("dw", dw, dw64)
    assert torch.all(dx[targets == -100] == 0)  # ignored rows get no gradient
    # The contract's fp32 reference makes the same e5m2 choices: much closer than the tolerance above.
    rdx, rdw = ref.reference_backward(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, logit_scale, grad_scale, -100,
                                      torch.float32, torch.float32)
    _assert_grad("dx vs fp32 reference", dx, rdx, cos_min=0.99999, rel_max=1e-2)
    _assert_grad("dw vs fp32 reference", dw, rdw, cos_min=0.99999, rel_max=1e-2)


@pytest.mark.interpret
@pytest.mark.parametrize("override", [
    {"dx": {"NUM_ACC": 1}, "dw": {"NUM_ACC": 1}},                    # 3 D groups per kernel
    {"dx": {"NUM_ACC": 3}, "dw": {"NUM_ACC": 4, "BLOCK_D": 32}},    # one D group, padded
    {"dx": {"DOT_FP16": True}, "dw": {"DOT_FP16": True, "BLOCK_T": 16}},
])
def test_fused_backward_tile_variants(triton_device, poisoned, override):
    T, D, V = 37, 48, 203
    x, w, targets = _inputs(T, D, V, torch.float32, triton_device, seed=8)
    _loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, 0.5, None, None, -100)
    rg = _row_grad(targets, seed=9)
    base = impl.backward(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, 0.5, None, -100, torch.float32, torch.float32)
    got = impl.backward(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, 0.5, None, -100, torch.float32, torch.float32,
                        config=override)
    for g, b in zip(got, base):
        torch.testing.assert_close(g, b, rtol=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_fused_path_never_allocates_t_by_v(triton_device):
    # A [T, V] tensor takes at least T·V = 12992 bytes (fp8), more than any legitimate buffer
    # (the largest is the fp32 weight, V·D·4 = 6496 bytes); the materialised path, run under the
    # same watch, shows that the watch does see [T, V] tensors.
    T, D, V = 64, 8, 203
    x, w, targets = _inputs(T, D, V, torch.float32, triton_device, seed=10)
    rg = _row_grad(targets, seed=11)
    with _LargestTensor() as fused:
        _loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, 0.5, None, None, -100)
        impl.backward(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, 0.5, None, -100, torch.float32, torch.float32)
    assert fused.largest < T * V, f"the fused path made a tensor of {fused.largest} bytes >= T·V = {T * V}"
    with _LargestTensor() as materialised:
        impl.forward_materialized(x, w, targets, SOFTCAP, 0.5, None, None, -100)
    assert materialised.largest >= T * V


# ---------------------------------------------------------------------------
# tier 1: materialised path
# ---------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("grad_scale", [None, 1 / 448])
def test_materialised_path_matches_float64_with_bf16_logits(triton_device, poisoned, grad_scale):
    T, D, V = 37, 48, 203
    x, w, targets = _inputs(T, D, V, torch.bfloat16, triton_device, seed=12)
    row_loss, lse, x_f8, w_f8, used = impl.forward_materialized(x, w, targets, SOFTCAP, 0.5, None, None, -100)
    loss64, lse64, logits64 = _f64_forward(x_f8, w_f8, used, targets, 0.5, logits_dtype=torch.bfloat16)
    _assert_rel("row_loss", row_loss, loss64, 1e-3)
    _assert_rel("lse", lse, lse64, 1e-3)
    assert torch.all(row_loss[targets == -100] == 0)
    # The fused path differs only by the bf16 rounding of the logits.
    fused_loss = impl.forward(x, w, targets, SOFTCAP, 0.5, None, None, -100)[0]
    _assert_rel("fused vs materialised", row_loss, fused_loss, 2e-2)

    rg = _row_grad(targets, seed=13) * 30
    dx, dw = impl.backward_materialized(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, 0.5, grad_scale, -100,
                                        torch.bfloat16, torch.float32)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    dx64, dw64, dl64 = _grads64(rg, x_f8, w_f8, logits64, targets, lse64, used, 0.5, grad_scale)
    _assert_grad("dx", dx, dx64)
    _assert_grad("dw", dw, dw64)

    # One launch for loss and e5m2 dlogits: the same loss, and the dlogits the backward used.
    logits = impl.fp8_matmul(x_f8, w_f8.t(), used[0:1], used[1:2], torch.bfloat16)
    torch.testing.assert_close(logits.double(), logits64, rtol=2**-8, atol=0)  # at most a bf16 ulp apart
    loss1, lse1, dl, gs = impl.softcap_ce_fwd_bwd_materialized(logits, targets, rg, SOFTCAP, 0.5, grad_scale, -100)
    torch.testing.assert_close(loss1, row_loss, rtol=0, atol=0)
    torch.testing.assert_close(lse1, lse, rtol=0, atol=0)
    assert dl.dtype == torch.float8_e5m2 and dl.shape == (T, V)
    _assert_grad("dl", dl.double(), dl64, cos_min=0.9999, rel_max=1e-2)
    want_gs = ref.dynamic_grad_scale(rg, 0.5) if grad_scale is None else torch.tensor(grad_scale)
    assert float(gs) == float(want_gs)


@pytest.mark.interpret
@pytest.mark.parametrize("M, N, K", [(37, 29, 48), (5, 70, 33)])
def test_fp8_matmul_strided_operands(triton_device, poisoned, M, N, K):
    g = torch.Generator().manual_seed(M + N)
    a = (torch.randn(K, M, generator=g) * 8).to(torch.float8_e5m2).to(triton_device).t()  # a transposed view
    b = (torch.randn(K, N, generator=g) * 8).to(torch.float8_e4m3fn).to(triton_device)
    sa = torch.tensor([0.25], device=triton_device)
    sb = torch.tensor([3.0], device=triton_device)
    for out_dtype in (torch.float32, torch.bfloat16):
        c = impl.fp8_matmul(a, b, sa, sb, out_dtype)
        want = (a.double() @ b.double()) * 0.75
        assert c.dtype == out_dtype
        torch.testing.assert_close(c.double(), want.to(out_dtype).double(), rtol=1e-5 if out_dtype == torch.float32
                                   else 2**-8, atol=1e-5)


# ---------------------------------------------------------------------------
# tier 1: through the public op
# ---------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scales", [None, (0.011, 0.0037, 1 / 448)])
def test_public_op_triton_matches_reference_backend(triton_device, reduction, scales):
    x0, w0, targets = _inputs(37, 48, 203, torch.float32, triton_device, seed=14)
    results = []
    for backend in ("reference", "triton"):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss = kernels.fp8_head_loss(x, w, targets, logit_scale=0.5, scales=scales, reduction=reduction,
                                     backend=backend)
        grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(15)).to(loss.device) + 0.5
        loss.backward(grad_out)
        results.append((loss.detach(), x.grad, w.grad))
    (loss_r, dx_r, dw_r), (loss_t, dx_t, dw_t) = results
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
    _assert_grad("dx", dx_t, dx_r, cos_min=0.99999, rel_max=1e-2)
    _assert_grad("dw", dw_t, dw_r, cos_min=0.99999, rel_max=1e-2)


@pytest.mark.interpret
def test_public_op_triton_rejects_out_of_range_targets(triton_device):
    x, w, targets = _inputs(6, 16, 20, torch.float32, triton_device, seed=16)
    targets[2] = 20
    with pytest.raises(ValueError, match=r"targets: value 20 at index 2 is outside \[0, 20\)"):
        kernels.fp8_head_loss(x, w, targets, backend="triton")


# ---------------------------------------------------------------------------
# tier 2: GPU, full shapes
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("D", [768, 1024, 1536])
@pytest.mark.parametrize("V", [1000, 50257, 50304])
def test_gpu_full_vocab_against_the_reference(cuda_device, D, V):
    T = 2048
    logit_scale = D ** -0.5
    g = torch.Generator(device=cuda_device).manual_seed(D + V)
    x = torch.randn(T, D, device=cuda_device, generator=g, dtype=torch.bfloat16)
    w = (torch.randn(V, D, device=cuda_device, generator=g) * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, V, (T,), device=cuda_device, generator=g)
    targets[::7] = -100
    scales = (math.sqrt(D) / 448, 24 / 448)
    row_loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, logit_scale, *scales, -100)
    ref_loss, ref_lse, ref_x8, ref_w8, _ = ref.reference_forward(x, w, targets, SOFTCAP, logit_scale, *scales, -100)
    assert _same_fp8(x_f8, ref_x8) and _same_fp8(w_f8, ref_w8)
    _assert_rel("row_loss", row_loss, ref_loss, 1e-3)
    _assert_rel("lse", lse, ref_lse, 1e-3)
    rg = torch.where(targets != -100, 1.0, 0.0)  # the speedrun's summed loss
    dx, dw = impl.backward(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, logit_scale, 1 / 448, -100,
                           torch.bfloat16, torch.bfloat16)
    rdx, rdw = ref.reference_backward(rg, x_f8, w_f8, targets, ref_lse, used, SOFTCAP, logit_scale, 1 / 448, -100,
                                      torch.float32, torch.float32)
    _assert_grad("dx", dx, rdx)
    _assert_grad("dw", dw, rdw)
    m_loss, m_lse, *_ = impl.forward_materialized(x, w, targets, SOFTCAP, logit_scale, *scales, -100)
    _assert_rel("materialised row_loss", m_loss, ref_loss, 2e-2)
    mdx, mdw = impl.backward_materialized(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, logit_scale, 1 / 448, -100,
                                          torch.bfloat16, torch.bfloat16)
    _assert_grad("materialised dx", mdx, rdx, cos_min=0.99, rel_max=0.15)
    _assert_grad("materialised dw", mdw, rdw, cos_min=0.99, rel_max=0.15)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 48 * 1024, 64 * 1024])
def test_gpu_speedrun_shape_and_peak_memory(cuda_device, T):
    D, V = 768, 50304
    g = torch.Generator(device=cuda_device).manual_seed(T)
    x = torch.randn(T, D, device=cuda_device, generator=g, dtype=torch.bfloat16)
    w = (torch.randn(V, D, device=cuda_device, generator=g) * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, 50257, (T,), device=cuda_device, generator=g)
    rg = torch.ones(T, device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    row_loss, lse, x_f8, w_f8, used = impl.forward(x, w, targets, SOFTCAP, D ** -0.5, *ref.SPEEDRUN_SCALES[:2], -100)
    dx, dw = impl.backward(rg, x_f8, w_f8, targets, lse, used, SOFTCAP, D ** -0.5, ref.SPEEDRUN_SCALES[2], -100,
                           torch.bfloat16, torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    outputs = sum(t.numel() * t.element_size() for t in (row_loss, lse, x_f8, w_f8, used, dx, dw))
    assert extra <= outputs + (64 << 20), \
        f"peak extra {extra / 2**20:.0f} MiB beyond {outputs / 2**20:.0f} MiB of outputs"
    assert torch.isfinite(row_loss).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    # Spot-check rows against the fp32 reference on a slice (all of it would need T·V fp32 logits).
    rows = slice(0, min(T, 1024))
    ref_loss, _ref_lse = ref._ce.reference_forward(ref._logits(x_f8[rows], w_f8, used), targets[rows], SOFTCAP,
                                                   D ** -0.5, -100)
    _assert_rel("row_loss", row_loss[rows], ref_loss, 1e-3)
