"""Batched Newton-Schulz orthogonalisation, the inner loop of Muon.

Each matrix G is scaled to unit Frobenius norm and pushed towards U·Vᵀ (from
G = U·S·Vᵀ) by the odd polynomial iteration

    A = X·Xᵀ;  B = b·A + c·A·A;  X = a·X + B·X

in bf16 with fp32 accumulation. Wide matrices keep Xᵀ·X-free products small;
tall ones (M > N) run on their transpose for the same reason, so NS(Gᵀ) = NS(G)ᵀ.

The norm never overflows: each matrix is first scaled by the power of two that
brings its largest |g| into [0.5, 1) (exact), so any finite G is normalised
correctly (a plain fp32 ‖G‖² overflows for ‖G‖ > 1.8e19 and gave all zeros).

Order of this file: coefficients → reference → torch.library op → public function.
"""

import math
from typing import Sequence

import torch

from kernels._checks import FLOAT_DTYPES, check_tensor
from kernels.backend import load_impl, resolve_backend

QUINTIC = (3.4445, -4.7750, 2.0315)

# Amsel et al. 2025 ("polar express"), one tuple per step, as the speedrun uses
# them; they assume the spectrum was scaled into [0, 1] with a 1.02 safety margin.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_NORM_SCALE = 1.02

# Far beyond any useful count (the iteration converges in 5-10); a cap keeps a typo from
# running for minutes or allocating gigabytes of coefficients.
MAX_STEPS = 100


def resolve_coefficients(coefficients, steps) -> tuple[list[tuple[float, float, float]], float]:
    """(per-step (a, b, c) list, norm scale) for a coefficients argument."""
    if isinstance(coefficients, str):
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps: expected an int in [1, {MAX_STEPS}], got {steps}")
        if coefficients == "quintic":
            return [QUINTIC] * steps, 1.0
        if coefficients == "polar_express":
            if steps > len(POLAR_EXPRESS):
                raise ValueError(f"steps: 'polar_express' defines {len(POLAR_EXPRESS)} steps, got steps={steps}")
            return list(POLAR_EXPRESS[:steps]), POLAR_EXPRESS_NORM_SCALE
        raise ValueError(f"coefficients: unknown name {coefficients!r}; expected 'quintic', "
                         "'polar_express' or a sequence of (a, b, c) tuples")
    if not isinstance(coefficients, Sequence) or len(coefficients) == 0:
        raise ValueError(f"coefficients: expected a name or a non-empty sequence of (a, b, c) tuples, "
                         f"got {coefficients!r}")
    if len(coefficients) > MAX_STEPS:
        raise ValueError(f"coefficients: {len(coefficients)} steps given, at most {MAX_STEPS} are allowed")
    resolved = []
    for i, abc in enumerate(coefficients):
        if (not isinstance(abc, Sequence) or len(abc) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in abc)):
            raise ValueError(f"coefficients[{i}]: expected a tuple of 3 finite numbers (a, b, c), got {abc!r}")
        resolved.append(tuple(float(v) for v in abc))
    return resolved, 1.0


# ---------------------------------------------------------------------------
# Normalisation without overflow
# ---------------------------------------------------------------------------

def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^e, exact, for integer e in dtype's normal exponent range (built from the exponent bits)."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def unit_scale(G: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per matrix [..., 1, 1]: the power of two p with max |G·p| in [0.5, 1), in dtype.

    p = 1 for a zero matrix and for one holding Inf or NaN (which must stay non-finite).
    """
    amax = G.abs().amax(dim=(-2, -1), keepdim=True).to(dtype)
    limit = 1022 if dtype == torch.float64 else 126
    e = torch.frexp(amax).exponent  # amax = mantissa·2^e, mantissa in [0.5, 1)
    e = torch.where(torch.isfinite(amax), e, torch.zeros_like(e)).clamp(-limit, limit)
    return _pow2(-e, dtype)


def normalize(G: torch.Tensor, norm_scale: float, eps: float, dtype: torch.dtype = torch.float32):
    """(X0, Gs, n, d, p): X0 = G / (norm_scale·‖G‖_F + eps) per matrix, computed in dtype as Gs / d.

    Gs = G·p, n = ‖Gs‖_F, d = norm_scale·n + eps·p with the power of two p of ``unit_scale``:
    the scaling is exact, and ‖Gs‖² <= numel cannot overflow.
    """
    p = unit_scale(G, dtype)
    Gs = G.to(dtype) * p
    n = torch.linalg.vector_norm(Gs, dim=(-2, -1), keepdim=True)
    d = norm_scale * n + eps * p
    return Gs / d, Gs, n, d, p


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------

def _iterate(G: torch.Tensor, coefficients, norm_scale: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    X = normalize(G, norm_scale, eps)[0].to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # [B, N, M]: the Gram matrix is then the smaller N x N
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def reference_forward(G: torch.Tensor, coefficients, norm_scale: float, eps: float) -> torch.Tensor:
    """G [B, M, N] -> orthogonalised [B, M, N] in G.dtype, iterated in bf16."""
    return _iterate(G, coefficients, norm_scale, eps, torch.bfloat16).to(G.dtype)


# ---------------------------------------------------------------------------
# torch.library op
# ---------------------------------------------------------------------------

def _unflatten(coefficients: list[float]) -> list[tuple[float, float, float]]:
    return [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]


@torch.library.custom_op("kernels::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, coefficients: list[float], norm_scale: float, eps: float,
                      backend: str) -> torch.Tensor:
    steps = _unflatten(coefficients)
    if backend == "reference":
        return reference_forward(G, steps, norm_scale, eps)
    return load_impl(backend, "newton_schulz").forward(G, steps, norm_scale, eps)


@_newton_schulz_op.register_fake
def _(G, coefficients, norm_scale, eps, backend):
    return torch.empty_like(G)


def _iteration_vjp(G: torch.Tensor, grad: torch.Tensor, coefficients, norm_scale: float, eps: float) -> torch.Tensor:
    """dL/dG for L = <grad, iteration(G)>, the iteration carried out in G.dtype (fp32 or float64).

    Written out by hand because autograd does not run inside a custom op.
    """
    tall = G.size(-2) > G.size(-1)
    if tall:
        G, grad = G.mT, grad.mT
    # X0 = G / (s·‖G‖ + eps) = Gs / d with Gs = p·G, d = p·(s·‖G‖ + eps) (see normalize).
    X, Gs, n, d, p = normalize(G, norm_scale, eps, G.dtype)
    saved = []
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        saved.append((X, A, B))
        X = a * X + B @ X
    dX = grad
    for (a, b, c), (X, A, B) in zip(reversed(coefficients), reversed(saved)):
        dB = dX @ X.mT
        dA = b * dB + c * (dB @ A + A @ dB)
        dX = a * dX + B.mT @ dX + (dA + dA.mT) @ X
    # dL/dG = dX/(s‖G‖ + eps) - s·<dX, G>/(s‖G‖ + eps)²·G/‖G‖, rewritten in the scaled
    # quantities (every factor O(1), nothing overflows): p·[dX/d - s·<dX, Gs>/d²·Gs/n].
    tiny = torch.finfo(G.dtype).tiny
    dot = (dX * Gs).sum(dim=(-2, -1), keepdim=True)
    dG = p * (dX / d - dot * norm_scale / d ** 2 * Gs / n.clamp_min(tiny))
    return dG.mT if tall else dG


@torch.library.custom_op("kernels::newton_schulz_backward", mutates_args=())
def _newton_schulz_backward_op(grad: torch.Tensor, G: torch.Tensor, coefficients: list[float],
                               norm_scale: float, eps: float) -> torch.Tensor:
    # The bf16 iteration has no useful derivative (rounding is piecewise
    # constant); the gradient is that of the same iteration carried out in fp32.
    dG = _iteration_vjp(G.float(), grad.float(), _unflatten(coefficients), norm_scale, eps)
    return dG.to(G.dtype)


@_newton_schulz_backward_op.register_fake
def _(grad, G, coefficients, norm_scale, eps):
    return torch.empty_like(G)


def _setup_context(ctx, inputs, output):
    G, coefficients, norm_scale, eps, _backend = inputs
    ctx.save_for_backward(G)
    ctx.coefficients, ctx.norm_scale, ctx.eps = coefficients, norm_scale, eps


def _backward(ctx, grad):
    (G,) = ctx.saved_tensors
    dG = _newton_schulz_backward_op(grad.contiguous(), G, ctx.coefficients, ctx.norm_scale, ctx.eps)
    return dG, None, None, None, None


_newton_schulz_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------

def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="quintic", eps: float = 1e-7,
                  backend: str | None = None) -> torch.Tensor:
    """Approximate U·Vᵀ of each matrix of G ``[..., M, N]``; same shape and dtype out.

    coefficients: "quintic" (Muon's (3.4445, -4.7750, 2.0315) at each of
    ``steps`` steps), "polar_express" (the first ``steps`` of its 5 per-step
    tuples, norm inflated by 1.02) or a sequence of (a, b, c) tuples, whose
    length is then the number of steps and ``steps`` is not used.
    Differentiable: the gradient is that of the iteration in fp32.
    """
    check_tensor("G", G, FLOAT_DTYPES, min_dim=2)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    per_step, norm_scale = resolve_coefficients(coefficients, steps)
    backend = resolve_backend("newton_schulz", backend, G.device)
    M, N = G.shape[-2:]
    if G.numel() == 0:
        return G.clone()
    flat = [v for abc in per_step for v in abc]
    X = _newton_schulz_op(G.reshape(-1, M, N).contiguous(), flat, float(norm_scale), float(eps), backend)
    return X.reshape(G.shape)
