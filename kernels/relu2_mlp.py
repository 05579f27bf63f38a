"""The ReLU² MLP block: relu(x·W_fcᵀ)²·W_projᵀ.

Only post = relu(pre)² is kept for backward: relu(pre) = sqrt(post), so the
derivative 2·relu(pre) is recovered without storing the pre-activation, and
the op saves one [T, H] activation instead of two.

The weights may be strided views (e.g. w_fc stored as [D, H] and passed as its
transpose): no backend copies them, and each weight's gradient comes back in
that weight's own layout, so it reaches a transposed parameter without a copy.

Order: reference → torch.library op → public function.
"""

import torch

from kernels._checks import check_same_device, check_tensor
from kernels.backend import load_impl, resolve_backend

MLP_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------

def reference_forward(x, w_fc, w_proj):
    """x [T, D], w_fc [H, D], w_proj [D, H] -> (out [T, D], post [T, H])."""
    post = torch.relu(x @ w_fc.T).square()
    return post @ w_proj.T, post


def matmul_in_layout(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor, alloc=None) -> torch.Tensor:
    """a·b [m, n] in a buffer laid out like ``like`` (column-major when ``like`` is a transposed view).

    alloc(shape, dtype, device) makes the buffer (default torch.empty); the product is torch.mm.
    """
    alloc = alloc or (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    if like.dim() == 2 and not like.is_contiguous() and like.t().is_contiguous():
        return torch.mm(b.t(), a.t(), out=alloc((b.shape[1], a.shape[0]), a.dtype, a.device)).t()
    return torch.mm(a, b, out=alloc((a.shape[0], b.shape[1]), a.dtype, a.device))


def reference_backward(dy, x, w_fc, w_proj, post):
    """-> (dx [T, D], dw_fc [H, D], dw_proj [D, H]), each weight gradient in its weight's layout."""
    dpre = (dy @ w_proj) * (2 * post.sqrt())
    return dpre @ w_fc, matmul_in_layout(dpre.T, x, w_fc), matmul_in_layout(dy.T, post, w_proj)


# ---------------------------------------------------------------------------
# torch.library op
# ---------------------------------------------------------------------------

@torch.library.custom_op("kernels::relu2_mlp", mutates_args=())
def _relu2_mlp_op(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = reference_forward if backend == "reference" else load_impl(backend, "relu2_mlp").forward
    return impl(x, w_fc, w_proj)


@_relu2_mlp_op.register_fake
def _(x, w_fc, w_proj, backend):
    return x.new_empty((x.size(0), w_proj.size(0))), x.new_empty((x.size(0), w_fc.size(0)))


@torch.library.custom_op("kernels::relu2_mlp_backward", mutates_args=())
def _relu2_mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                           post: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = reference_backward if backend == "reference" else load_impl(backend, "relu2_mlp").backward
    return impl(dy, x, w_fc, w_proj, post)


@_relu2_mlp_backward_op.register_fake
def _(dy, x, w_fc, w_proj, post, backend):
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _setup_context(ctx, inputs, output):
    x, w_fc, w_proj, backend = inputs
    _out, post = output
    ctx.save_for_backward(x, w_fc, w_proj, post)
    ctx.mark_non_differentiable(post)
    ctx.backend = backend


def _backward(ctx, dy, _post_grad):
    x, w_fc, w_proj, post = ctx.saved_tensors
    dx, dw_fc, dw_proj = _relu2_mlp_backward_op(dy.contiguous(), x, w_fc, w_proj, post, ctx.backend)
    return dx, dw_fc, dw_proj, None


_relu2_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------

def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """relu(x·w_fcᵀ)²·w_projᵀ for x [..., D], w_fc [H, D], w_proj [D, H].

    All three share one dtype (bf16, fp16, fp32; float64 on the reference
    backend) and device; differentiable in all three. The weights may be
    strided views; D and H must be >= 1.
    """
    check_tensor("x", x, MLP_DTYPES, min_dim=1)
    check_tensor("w_fc", w_fc, MLP_DTYPES, ndim=2)
    check_tensor("w_proj", w_proj, MLP_DTYPES, ndim=2)
    D, H = x.size(-1), w_fc.size(0)
    if D == 0:
        raise ValueError(f"x: last dim D = 0 in shape {tuple(x.shape)}; expected D >= 1 features")
    if H == 0:
        raise ValueError(f"w_fc: H = 0 rows in shape {tuple(w_fc.shape)}; expected a [H, D] weight with H >= 1")
    if w_fc.size(1) != D:
        raise ValueError(f"w_fc: expected shape [H, {D}] to match x's last dim D = {D}, got {tuple(w_fc.shape)}")
    if tuple(w_proj.shape) != (D, H):
        raise ValueError(f"w_proj: expected shape [{D}, {H}] (D, H from x and w_fc), got {tuple(w_proj.shape)}")
    for name, w in (("w_fc", w_fc), ("w_proj", w_proj)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {w.dtype} differs from x's {x.dtype}; cast the weights "
                            "(e.g. w.type_as(x)) so all three match")
    check_same_device(x=x, w_fc=w_fc, w_proj=w_proj)
    backend = resolve_backend("relu2_mlp", backend, x.device)
    if x.dtype == torch.float64 and backend != "reference":
        raise TypeError(f"x: dtype float64 is supported by the reference backend only, got backend={backend!r}")
    x2d = x.reshape(-1, D)  # [..., D] -> [T, D]
    if x2d.size(0) == 0:
        backend = "reference"
    # The weights go in as they are (any strides); x is made row-major, a no-op for activations.
    out, _post = _relu2_mlp_op(x2d.contiguous(), w_fc, w_proj, backend)
    return out.reshape(x.shape)
