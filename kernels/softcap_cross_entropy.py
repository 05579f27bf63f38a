"""Cross-entropy of softcapped logits, z = softcap·tanh(logit_scale·logits/softcap).

The softcap bounds |z| by ``softcap`` (Gemma 2; the speedrun uses 15), so the
exponentials stay tame; ``logit_scale`` folds in the head's 1/sqrt(d) factor.
Plain PyTorch only: under torch.compile inductor fuses it, and the fused
GPU variants live inside ``fp8_head_loss``.

The op works on rows: it returns each row's loss and logsumexp, and the
public wrapper reduces them with ordinary tensor ops, so autograd hands the
backward one gradient per row whatever the reduction.
"""

import torch

from kernels._checks import (FP32_TINY, INDEX_DTYPES, check_choice, check_int, check_positive_fp32, check_tensor,
                             check_target_values)

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------
# Reference (also the oracle of fp8_head_loss)
# ---------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _target_parts(targets: torch.Tensor, num_classes: int, ignore_index: int):
    """(valid, in_range, safe_targets): rows that count, rows whose target is a class, gatherable indices."""
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < num_classes)
    return valid, in_range, torch.where(valid & in_range, targets, 0).long()


def softcapped(logits: torch.Tensor, softcap: float, logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, t) with t = tanh(logit_scale·logits/softcap), z = softcap·t."""
    t = torch.tanh(logits * (logit_scale / softcap))
    return softcap * t, t


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows holding ±inf, in one read pass (no [N, V] temporary).

    tanh saturates at ±inf, which would turn an infinite logit into the finite z = ±softcap: a
    non-finite input must give a non-finite loss. NaN needs no check (it survives tanh).
    """
    lo, hi = torch.aminmax(logits, dim=-1)
    return (hi == float("inf")) | (lo == float("-inf"))


def reference_forward(logits: torch.Tensor, targets: torch.Tensor, softcap: float, logit_scale: float,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V], targets [N] -> (row_loss [N], lse [N]) in fp32 (float64 for float64 logits).

    row_loss is 0 where the target is ignore_index, NaN where it is neither that nor a class
    (possible only with the target check switched off).
    """
    z, _t = softcapped(logits.to(_compute_dtype(logits.dtype)), softcap, logit_scale)
    # A row with an infinite logit gets a NaN lse, so its loss and (through exp(z - lse)) its gradient are NaN.
    lse = torch.where(nonfinite_rows(logits), float("nan"), torch.logsumexp(z, dim=-1))
    valid, in_range, safe_targets = _target_parts(targets, logits.size(-1), ignore_index)
    target_z = z.gather(-1, safe_targets[:, None]).squeeze(-1)
    row_loss = torch.where(valid, torch.where(in_range, lse - target_z, float("nan")), 0.0)
    return row_loss, lse


def reference_backward(row_grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       softcap: float, logit_scale: float, ignore_index: int) -> torch.Tensor:
    """d(sum_r row_grad[r]·row_loss[r]) / d(logits), in the compute dtype (fp32 or float64).

    Rows with a NaN loss (a non-finite logit, whose lse the forward made NaN, an out-of-range target)
    get a NaN gradient.
    """
    z, t = softcapped(logits.to(lse.dtype), softcap, logit_scale)
    valid, in_range, safe_targets = _target_parts(targets, logits.size(-1), ignore_index)
    dz = torch.exp(z - lse[:, None])
    dz.scatter_add_(-1, safe_targets[:, None], -torch.ones_like(lse)[:, None])
    coef = torch.where(valid, torch.where(in_range, row_grad.to(dz.dtype), float("nan")), 0.0)
    return dz * coef[:, None] * (logit_scale * (1.0 - t * t))


# ---------------------------------------------------------------------------
# torch.library op
# ---------------------------------------------------------------------------

@torch.library.custom_op("kernels::softcap_cross_entropy", mutates_args=())
def _softcap_ce_op(logits: torch.Tensor, targets: torch.Tensor, softcap: float, logit_scale: float,
                   ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_target_values(targets, logits.size(-1), ignore_index)
    return reference_forward(logits, targets, softcap, logit_scale, ignore_index)


@_softcap_ce_op.register_fake
def _(logits, targets, softcap, logit_scale, ignore_index):
    row = logits.new_empty(logits.shape[:-1], dtype=_compute_dtype(logits.dtype))
    return row, torch.empty_like(row)


@torch.library.custom_op("kernels::softcap_cross_entropy_backward", mutates_args=())
def _softcap_ce_backward_op(row_grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                            lse: torch.Tensor, softcap: float, logit_scale: float,
                            ignore_index: int) -> torch.Tensor:
    return reference_backward(row_grad, logits, targets, lse, softcap, logit_scale, ignore_index).to(logits.dtype)


@_softcap_ce_backward_op.register_fake
def _(row_grad, logits, targets, lse, softcap, logit_scale, ignore_index):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, softcap, logit_scale, ignore_index = inputs
    _row_loss, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.softcap, ctx.logit_scale, ctx.ignore_index = softcap, logit_scale, ignore_index
    ctx.mark_non_differentiable(lse)


def _backward(ctx, row_grad, _lse_grad):
    logits, targets, lse = ctx.saved_tensors
    dlogits = _softcap_ce_backward_op(row_grad.contiguous(), logits, targets, lse, ctx.softcap, ctx.logit_scale,
                                      ctx.ignore_index)
    return dlogits, None, None, None, None


_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------

def check_softcap_args(softcap, logit_scale) -> tuple[float, float]:
    """softcap and logit_scale as floats, each and their ratio (the tanh argument's scale) normal in fp32."""
    softcap = check_positive_fp32("softcap", softcap)
    logit_scale = check_positive_fp32("logit_scale", logit_scale)
    if logit_scale / softcap < FP32_TINY:
        raise ValueError(f"logit_scale: logit_scale / softcap = {logit_scale / softcap:.4g} underflows float32 "
                         f"(logit_scale={logit_scale}, softcap={softcap})")
    return softcap, logit_scale


def reduce_rows(row_loss: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses; "mean" divides by the non-ignored count (NaN when none)."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float = 15.0,
                          logit_scale: float = 1.0, reduction: str = "mean",
                          ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of softcap·tanh(logit_scale·logits/softcap), computed in fp32.

    logits [..., V] (fp32, bf16, fp16 or float64), targets [...] (int64/int32)
    in [0, V) or ignore_index. reduction: "mean" (over non-ignored targets),
    "sum" or "none" (shape [...], 0 at ignored targets). The loss is fp32
    (float64 for float64 logits).
    """
    check_tensor("logits", logits, LOGIT_DTYPES, min_dim=1)
    check_tensor("targets", targets, INDEX_DTYPES)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (logits' shape without the class dim), "
                         f"got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets: on {targets.device}, but logits is on {logits.device}")
    if logits.size(-1) == 0:
        raise ValueError(f"logits: the class dim is empty, shape {tuple(logits.shape)}")
    softcap, logit_scale = check_softcap_args(softcap, logit_scale)
    check_choice("reduction", reduction, REDUCTIONS)
    ignore_index = check_int("ignore_index", ignore_index)
    V = logits.size(-1)
    flat_targets = targets.reshape(-1)
    row_loss, _lse = _softcap_ce_op(logits.reshape(-1, V).contiguous(), flat_targets.contiguous(),
                                    softcap, logit_scale, ignore_index)
    if reduction == "none":
        return row_loss.reshape(targets.shape)
    return reduce_rows(row_loss, flat_targets, reduction, ignore_index)
