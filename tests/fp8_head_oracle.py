"""Float64 oracles of fp8_head_loss (f64_fp8_head) and of its softcapped cross-entropy alone
(f64_softcap_ce), written from the op's documented math, independent of the package; LargestTensor,
the probe of the no-[T, V] tests; rel, the relative error the tests compare with.

Quantisation is done as the contract specifies it (the division in fp32, round-to-nearest-even
casts, finite values saturated, non-finite ones NaN); everything after it is float64: logits,
softcap, logsumexp, the logits' gradient (quantised to e5m2 the contract's way), dx and dW.
rounding="record" also rounds x / x_scale, the logits and the logits' gradient to bf16.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _q(t, scale, fp8_dtype, fp8_max, round_bf16=False):
    q = t / scale
    if round_bf16:
        q = q.to(torch.bfloat16).to(q.dtype)
    q = torch.where(torch.isfinite(q), q.clamp(-fp8_max, fp8_max), torch.full_like(q, float("nan")))
    return q.to(fp8_dtype).double()


def _scale(t, static):
    if static is not None:
        return torch.tensor(static, dtype=torch.float32, device=t.device)
    amax = t.abs().amax().float() if t.numel() else torch.zeros((), device=t.device)
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def f64_softcap_ce(logits, targets, softcap, logit_scale, ignore_index, row_grad=None):
    """-> (row_loss, lse, dlogits or None) in float64, for logits [R, V] and targets [R].

    row_grad: d(total)/d(row_loss), [R] or broadcastable to it; None: no gradient. Ignored rows have
    loss and gradient 0; rows with a non-finite logit, or a target outside [0, V) that is not
    ignore_index, NaN.
    """
    logits = logits.double()
    t = torch.tanh(logits * (logit_scale / softcap))
    t = torch.where(torch.isfinite(logits), t, float("nan"))
    z = softcap * t
    lse = torch.logsumexp(z, dim=1)
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < logits.shape[1])
    safe = torch.where(valid & in_range, targets, 0)
    row_loss = torch.where(valid, torch.where(in_range, lse - z.gather(1, safe[:, None]).squeeze(1), float("nan")),
                           0.0)
    if row_grad is None:
        return row_loss, lse, None
    p = torch.exp(z - lse[:, None])
    onehot = torch.zeros_like(p).scatter_(1, safe[:, None], 1.0)
    g = torch.as_tensor(row_grad, dtype=torch.float64, device=lse.device).expand_as(lse)
    g = torch.where(valid, torch.where(in_range, g, float("nan")), 0.0)
    dlogits = (p - onehot) * g[:, None] * logit_scale * (1 - t * t)
    return row_loss, lse, torch.where(valid[:, None], dlogits, 0.0)


def f64_fp8_head(x, w, targets, *, softcap=15.0, logit_scale=1.0, scales=None, reduction="sum", ignore_index=-100,
                 rounding="fp32", upstream=None, rows=None):
    """-> dict(loss, row_loss, lse, dl (e5m2 values, float64) or None, dx, dw) in float64.

    upstream: the gradient of the returned loss (a float for "sum"/"mean", [T] for "none"); None: no
    gradients. For "sum"/"mean" the logits' gradient is quantised for upstream 1 (row gradient
    g0 = 1 or 1/n_valid) and dx, dW are then multiplied by upstream, as the op documents.
    rows: compute in chunks of this many rows (the [T, V] float64 logits need not fit at once).
    """
    T = x.shape[0]
    xs_static, ws_static, gs_static = scales if scales is not None else (None, None, None)
    xs, ws = _scale(x, xs_static), _scale(w, ws_static)
    record = rounding == "record"
    x8 = _q(x.float(), xs, torch.float8_e4m3fn, E4M3_MAX, round_bf16=record)
    w8 = _q(w.float(), ws, torch.float8_e4m3fn, E4M3_MAX)
    valid = targets != ignore_index
    n_valid = int(valid.sum())
    grads = upstream is not None
    if grads:
        if reduction == "none":
            row_grad = torch.where(valid, torch.as_tensor(upstream, dtype=torch.float64, device=x.device), 0.0)
            factor = 1.0
        else:
            g0 = (1.0 if reduction == "sum" else 1.0 / n_valid) if n_valid else 0.0
            row_grad = torch.where(valid, g0, 0.0).double()
            factor = float(upstream)
        if gs_static is not None:
            gs = torch.tensor(gs_static, dtype=torch.float32, device=x.device).double()
        else:
            bound = float(row_grad.abs().max()) * logit_scale if T else 0.0
            gs = torch.tensor(bound / E5M2_MAX if bound > 0 else 1.0, dtype=torch.float32, device=x.device).double()
    rows = rows or max(T, 1)
    row_loss = torch.zeros(T, dtype=torch.float64, device=x.device)
    lse = torch.zeros(T, dtype=torch.float64, device=x.device)
    dx = torch.zeros(x.shape, dtype=torch.float64, device=x.device) if grads else None
    dw = torch.zeros(w.shape, dtype=torch.float64, device=x.device) if grads else None
    dls = []
    for c0 in range(0, T, rows):
        r = slice(c0, min(T, c0 + rows))
        logits = (x8[r] @ w8.T) * (xs.double() * ws.double())
        if record:
            logits = logits.to(torch.bfloat16).double()
        row_loss[r], lse[r], dlogits = f64_softcap_ce(logits, targets[r], softcap, logit_scale, ignore_index,
                                                      row_grad[r] if grads else None)
        if grads:
            if record:
                dlogits = dlogits.to(torch.bfloat16).double()
            dl = _q(dlogits, gs, torch.float8_e5m2, E5M2_MAX)
            dls.append(dl)
            dx[r] = (dl @ w8) * (gs * ws.double()) * factor
            dw += (dl.T @ x8[r]) * (gs * xs.double()) * factor
    if reduction == "none":
        loss = row_loss
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = row_loss.sum() / n_valid if n_valid else torch.tensor(float("nan"), dtype=torch.float64)
    return dict(loss=loss, row_loss=row_loss, lse=lse, dl=torch.cat(dls) if dls else None, dx=dx, dw=dw,
                x8=x8, w8=w8, xs=xs, ws=ws)


def rel(got, want):
    """||got - want|| / ||want|| in float64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


class LargestTensor(TorchDispatchMode):
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
