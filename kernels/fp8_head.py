"""The lm-head and its softcapped cross-entropy as one op, with FP8 operands.

Forward: x [T, D] and weight [V, D] are quantised to float8_e4m3fn with
per-tensor scales, logits = x·Wᵀ accumulate in fp32, are softcapped, and
reduced to one loss per row. Backward: the logits' gradient is quantised to
float8_e5m2 and multiplied back into dx = dl·W and dW = dlᵀ·x.

Quantisation q = t / scale saturates finite values at the format's largest
value and turns anything non-finite into NaN, so an Inf or NaN in the input
always shows up in the loss instead of being clamped into a finite answer.

The reference below materialises the [T, V] logits; the fast backends do not
need to. Order: quantisation → reference → torch.library op → public function.
"""

import math

import torch

from kernels import softcap_cross_entropy as _ce
from kernels._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_int, check_positive_finite,
                             check_tensor, check_target_values)
from kernels.backend import load_impl, resolve_backend

E4M3_MAX = 448.0
E5M2_MAX = 57344.0

# The speedrun's static scales for D = 768: (x, weight, logits' gradient).
SPEEDRUN_SCALES = (math.sqrt(768) / 448, 24 / 448, 1 / 448)


# ---------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------

def amax_scale(t: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """The per-tensor scale mapping max|t| to the format's largest value (1.0 for an all-zero t)."""
    amax = t.abs().amax().float()
    return torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))


def quantize(t: torch.Tensor, scale, fp8_dtype: torch.dtype) -> torch.Tensor:
    """t / scale cast to fp8_dtype, finite values saturated, non-finite ones NaN."""
    fp8_max = torch.finfo(fp8_dtype).max
    q = t.float() / scale
    q = torch.where(torch.isfinite(q), q.clamp(-fp8_max, fp8_max), torch.full_like(q, float("nan")))
    return q.to(fp8_dtype)


def dynamic_grad_scale(row_grad: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """A scale for the logits' gradient that needs no pass over it.

    |dlogits| <= |row_grad|·logit_scale, since |softmax − onehot| <= 1 and the
    softcap's derivative is logit_scale·(1 − tanh²) <= logit_scale.
    """
    bound = row_grad.abs().amax().float() * logit_scale if row_grad.numel() else row_grad.new_zeros((), dtype=torch.float32)
    return torch.where(bound > 0, bound / E5M2_MAX, torch.ones_like(bound))


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------

def _scale_tensor(t: torch.Tensor, scale: float | None) -> torch.Tensor:
    if scale is None:
        return amax_scale(t, E4M3_MAX)
    return torch.tensor(scale, dtype=torch.float32, device=t.device)


def _logits(x_f8, w_f8, used_scales):
    return (x_f8.float() @ w_f8.float().T) * (used_scales[0] * used_scales[1])


def reference_forward(x, weight, targets, softcap, logit_scale, x_scale, w_scale, ignore_index):
    """-> (row_loss [T] fp32, lse [T] fp32, x_f8 [T, D], w_f8 [V, D], used_scales [2] fp32)."""
    xs, ws = _scale_tensor(x, x_scale), _scale_tensor(weight, w_scale)
    x_f8 = quantize(x, xs, torch.float8_e4m3fn)
    w_f8 = quantize(weight, ws, torch.float8_e4m3fn)
    used_scales = torch.stack([xs, ws])
    row_loss, lse = _ce.reference_forward(_logits(x_f8, w_f8, used_scales), targets, softcap, logit_scale,
                                          ignore_index)
    return row_loss, lse, x_f8, w_f8, used_scales


def reference_backward(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale,
                       ignore_index, x_dtype, w_dtype):
    """-> (dx [T, D] in x_dtype, dw [V, D] in w_dtype), through an e5m2 logits' gradient."""
    logits = _logits(x_f8, w_f8, used_scales)
    dlogits = _ce.reference_backward(row_grad, logits, targets, lse, softcap, logit_scale, ignore_index)
    gs = (dynamic_grad_scale(row_grad, logit_scale) if grad_scale is None
          else torch.tensor(grad_scale, dtype=torch.float32, device=row_grad.device))
    dl = quantize(dlogits, gs, torch.float8_e5m2).float()
    dx = (dl @ w_f8.float()) * (gs * used_scales[1])
    dw = (dl.T @ x_f8.float()) * (gs * used_scales[0])
    return dx.to(x_dtype), dw.to(w_dtype)


# ---------------------------------------------------------------------------
# torch.library op
# ---------------------------------------------------------------------------

@torch.library.custom_op("kernels::fp8_head_loss", mutates_args=())
def _fp8_head_loss_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                      logit_scale: float, x_scale: float | None, w_scale: float | None,
                      grad_scale: float | None, ignore_index: int, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_target_values(targets, weight.size(0), ignore_index)
    impl = reference_forward if backend == "reference" else load_impl(backend, "fp8_head").forward
    row_loss, lse, x_f8, w_f8, used_scales = impl(x, weight, targets, softcap, logit_scale, x_scale, w_scale,
                                                  ignore_index)
    # float8 crosses the op boundary as raw bytes: several torch utilities that
    # handle op outputs (opcheck among them) have no float8 kernels.
    return row_loss, lse, x_f8.view(torch.uint8), w_f8.view(torch.uint8), used_scales


@_fp8_head_loss_op.register_fake
def _(x, weight, targets, softcap, logit_scale, x_scale, w_scale, grad_scale, ignore_index, backend):
    T, V = x.size(0), weight.size(0)
    row_loss = x.new_empty((T,), dtype=torch.float32)
    return (row_loss, torch.empty_like(row_loss), torch.empty_like(x, dtype=torch.uint8),
            torch.empty_like(weight, dtype=torch.uint8), x.new_empty((2,), dtype=torch.float32))


@torch.library.custom_op("kernels::fp8_head_loss_backward", mutates_args=())
def _fp8_head_loss_backward_op(row_grad: torch.Tensor, x_bytes: torch.Tensor, w_bytes: torch.Tensor,
                               targets: torch.Tensor, lse: torch.Tensor, used_scales: torch.Tensor,
                               softcap: float, logit_scale: float, grad_scale: float | None, ignore_index: int,
                               x_dtype: torch.dtype, w_dtype: torch.dtype, backend: str
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    # Backends may assume ignored rows carry no gradient.
    row_grad = torch.where(targets != ignore_index, row_grad.float(), 0.0)
    x_f8, w_f8 = x_bytes.view(torch.float8_e4m3fn), w_bytes.view(torch.float8_e4m3fn)
    impl = reference_backward if backend == "reference" else load_impl(backend, "fp8_head").backward
    return impl(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale, ignore_index,
                x_dtype, w_dtype)


@_fp8_head_loss_backward_op.register_fake
def _(row_grad, x_bytes, w_bytes, targets, lse, used_scales, softcap, logit_scale, grad_scale, ignore_index,
      x_dtype, w_dtype, backend):
    return torch.empty_like(x_bytes, dtype=x_dtype), torch.empty_like(w_bytes, dtype=w_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, targets, softcap, logit_scale, _xs, _ws, grad_scale, ignore_index, backend = inputs
    _row_loss, lse, x_bytes, w_bytes, used_scales = output
    ctx.save_for_backward(x_bytes, w_bytes, targets, lse, used_scales)
    ctx.mark_non_differentiable(lse, x_bytes, w_bytes, used_scales)
    ctx.softcap, ctx.logit_scale, ctx.grad_scale = softcap, logit_scale, grad_scale
    ctx.ignore_index, ctx.backend, ctx.dtypes = ignore_index, backend, (x.dtype, weight.dtype)


def _backward(ctx, row_grad, *_unused_grads):
    x_bytes, w_bytes, targets, lse, used_scales = ctx.saved_tensors
    dx, dw = _fp8_head_loss_backward_op(row_grad.contiguous(), x_bytes, w_bytes, targets, lse, used_scales, ctx.softcap,
                                        ctx.logit_scale, ctx.grad_scale, ctx.ignore_index, *ctx.dtypes,
                                        ctx.backend)
    return dx, dw, None, None, None, None, None, None, None, None


_fp8_head_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------

def _check_scales(scales):
    if scales is None:
        return None, None, None
    if not isinstance(scales, (tuple, list)) or len(scales) != 3:
        raise ValueError(f"scales: expected None or a (x_scale, w_scale, grad_scale) tuple, got {scales!r}")
    return tuple(check_positive_finite(f"scales[{i}] ({name})", s)
                 for i, (name, s) in enumerate(zip(("x_scale", "w_scale", "grad_scale"), scales)))


def fp8_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 15.0,
                  logit_scale: float = 1.0, scales=None, reduction: str = "mean", ignore_index: int = -100,
                  backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of softcapped FP8 logits x·weightᵀ, without needing the logits.

    x [T, D] and weight [V, D] (fp32, bf16 or fp16; V may exceed the largest
    target, e.g. 50304 for 50257 tokens); targets [T] (int64/int32) in
    [0, V) or ignore_index. scales: (x_scale, w_scale, grad_scale) static
    per-tensor scales (the speedrun's: ``SPEEDRUN_SCALES``), or None for
    dynamic ones (amax/448 for x and weight, a bound of the gradient for the
    logits' gradient). reduction: "mean", "sum" or "none" as in
    softcap_cross_entropy. Gradients flow to x and weight.
    """
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    check_tensor("targets", targets, INDEX_DTYPES, ndim=1)
    if weight.size(1) != x.size(1):
        raise ValueError(f"weight: expected shape [V, {x.size(1)}] to match x's D = {x.size(1)}, "
                         f"got {tuple(weight.shape)}")
    if weight.size(0) == 0:
        raise ValueError(f"weight: V must be at least 1, got shape {tuple(weight.shape)}")
    if targets.size(0) != x.size(0):
        raise ValueError(f"targets: expected shape [{x.size(0)}] to match x's T, got {tuple(targets.shape)}")
    for name, t in (("weight", weight), ("targets", targets)):
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
    softcap = check_positive_finite("softcap", softcap)
    logit_scale = check_positive_finite("logit_scale", logit_scale)
    x_scale, w_scale, grad_scale = _check_scales(scales)
    check_choice("reduction", reduction, _ce.REDUCTIONS)
    ignore_index = check_int("ignore_index", ignore_index)
    backend = resolve_backend("fp8_head", backend, x.device)
    if x.size(0) == 0:
        backend = "reference"  # nothing to launch; keeps empty batches out of the kernels
    row_loss, *_saved = _fp8_head_loss_op(x.contiguous(), weight.contiguous(), targets.long().contiguous(), softcap,
                                          logit_scale, x_scale, w_scale, grad_scale, ignore_index, backend)
    return _ce.reduce_rows(row_loss, targets, reduction, ignore_index)
