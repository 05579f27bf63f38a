"""FP8 head + softcapped cross-entropy on the "cuda" backend: the materialised path.

forward:  x, W -> e4m3 (CUDA cast, amax on the device when the scale is
          dynamic); logits = torch._scaled_mm(x_f8, W_f8ᵀ) as bf16 [T, V];
          per-row loss and lse by the CUDA cross-entropy kernel.
backward: logits recomputed the same way; the CUDA kernel turns them and the
          saved lse into the e5m2 gradient dl in one read; dx = dl·W_f8 and
          dW = dlᵀ·x_f8 through torch._scaled_mm, whose second operand must
          be column-major and whose reduction dim must be contiguous: the
          CUDA transposed cast provides W_f8ᵀ, x_f8ᵀ and dlᵀ.

torch._scaled_mm needs the reduction and output column counts to be
multiples of 16. Other shapes run through zero-padded buffers (zero rows and
columns add nothing to any product); the speedrun's (D 768, V 50304, T a
multiple of 1024) need none. GPUs without FP8 matmuls (before sm_89) multiply
the same float8 values in fp32 instead.
"""

import torch

from kernels.cuda_impl import ops

E4M3, E5M2 = ops.E4M3, ops.E5M2

# Logits dtype between the matmul and the loss kernel: bf16 halves the
# traffic of the [T, V] round trip; fp32 is closer to the reference.
LOGITS_DTYPE = torch.bfloat16
# _scaled_mm's fast accumulation trades accuracy for speed on Hopper; the
# contract asks for fp32 accumulation.
USE_FAST_ACCUM = False
# tanh.approx in the loss kernel: fewer special-function operations, z within ~7e-3.
FAST_TANH = False


def _pad16(n: int) -> int:
    return (n + 15) // 16 * 16


def _fp8_matmul_supported(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm(a: torch.Tensor, b_colmajor: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """(a · b) · scale_a · scale_b with fp32 accumulation; a row-major, b column-major, dims padded to 16."""
    if _fp8_matmul_supported(a.device):
        return torch._scaled_mm(a, b_colmajor, scale_a=scale_a.reshape(()), scale_b=scale_b.reshape(()),
                                out_dtype=out_dtype, use_fast_accum=USE_FAST_ACCUM)
    # float8 values have at most 4 significant bits, so fp32 (even TF32) products are exact.
    return ((a.float() @ b_colmajor.float()) * (scale_a * scale_b)).to(out_dtype)


def _padded_rows_view(rows: int, cols: int, padded_rows: int, padded_cols: int, dtype, device):
    """A [rows, cols] view into a [padded_rows, padded_cols] buffer (zeroed only when it has padding)."""
    if padded_rows == rows and padded_cols == cols:
        buf = ops._alloc((rows, cols), dtype, device)
    else:
        buf = ops._zeros((padded_rows, padded_cols), dtype, device)
    return buf, buf[:rows, :cols]


def _quantise_padded(t: torch.Tensor, scale, padded_rows: int, padded_cols: int):
    """t [R, C] -> (e4m3 buffer [padded_rows, padded_cols], used scale); scale None = dynamic."""
    R, C = t.shape
    buf, view = _padded_rows_view(R, C, padded_rows, padded_cols, E4M3, t.device)
    _, _, used = ops.fp8_cast(t, E4M3, scale, out=view)
    return buf, used


def _logits(x_buf: torch.Tensor, w_buf: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, T: int, V: int):
    """Logits [T, V] (a view with row stride V padded to 16) from padded e4m3 operands."""
    return _scaled_mm(x_buf, w_buf.t(), xs, ws, LOGITS_DTYPE)[:T, :V]


def forward(x, weight, targets, softcap, logit_scale, x_scale, w_scale, ignore_index):
    """-> (row_loss [T] fp32, lse [T] fp32, x_f8 [T, D], w_f8 [V, D], used_scales [2] fp32)."""
    T, D = x.shape
    V = weight.size(0)
    Dp, Vp = _pad16(D), _pad16(V)
    x_buf, xs = _quantise_padded(x, x_scale, T, Dp)
    w_buf, ws = _quantise_padded(weight, w_scale, Vp, Dp)
    logits = _logits(x_buf, w_buf, xs, ws, T, V)
    row_loss, lse, _ = ops.softcap_ce_forward(logits, targets, softcap, logit_scale, ignore_index,
                                              fast_tanh=FAST_TANH)
    x_f8 = x_buf if Dp == D else x_buf[:, :D].contiguous()
    w_f8 = w_buf if (Dp, Vp) == (D, V) else w_buf[:V, :D].contiguous()
    return row_loss, lse, x_f8, w_f8, torch.stack([xs, ws])


def _transpose_padded(t: torch.Tensor, padded_rows: int, padded_cols: int) -> torch.Tensor:
    """float8 t [R, C] -> tᵀ in a [padded_rows, padded_cols] buffer (zero padding), same format."""
    R, C = t.shape
    buf, view = _padded_rows_view(C, R, padded_rows, padded_cols, t.dtype, t.device)
    ops.fp8_cast(t, t.dtype, 1.0, write=False, transpose=True, out_t=view)
    return buf


def _pad_fp8(t: torch.Tensor, padded_rows: int, padded_cols: int) -> torch.Tensor:
    R, C = t.shape
    if (R, C) == (padded_rows, padded_cols):
        return t
    buf = ops._zeros((padded_rows, padded_cols), t.dtype, t.device)
    buf.view(torch.uint8)[:R, :C] = t.view(torch.uint8)
    return buf


def backward(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale, ignore_index,
             x_dtype, w_dtype):
    """-> (dx [T, D] in x_dtype, dw [V, D] in w_dtype), through an e5m2 logits' gradient."""
    T, D = x_f8.shape
    V = w_f8.size(0)
    Tp, Dp, Vp = _pad16(T), _pad16(D), _pad16(V)
    device = x_f8.device
    xs, ws = used_scales[0], used_scales[1]
    x_buf, w_buf = _pad_fp8(x_f8, T, Dp), _pad_fp8(w_f8, Vp, Dp)
    logits = _logits(x_buf, w_buf, xs, ws, T, V)

    if grad_scale is None:
        # The op's bound max|row_grad|·logit_scale of |dlogits|, kept on the device.
        bound = row_grad.abs().amax() * logit_scale
        gs = torch.where(bound > 0, bound / ops.FP8_MAX[E5M2], torch.ones_like(bound))
    else:
        gs = torch.tensor(float(grad_scale), dtype=torch.float32, device=device)

    dl_buf, dl = _padded_rows_view(T, V, T, Vp, E5M2, device)
    ops.softcap_ce_backward(logits, targets, lse, softcap, logit_scale, ignore_index, grad=row_grad,
                            dlogits_dtype=E5M2, dl_scale=gs, out=dl, fast_tanh=FAST_TANH)
    del logits

    # dx [T, D] = dl [T, V] · W_f8 [V, D]: W_f8 column-major is W_f8ᵀ row-major.
    w_t = _transpose_padded(w_f8, Dp, Vp)
    dx = _scaled_mm(dl_buf, w_t.t(), gs, ws, x_dtype)[:, :D]
    # dW [V, D] = dlᵀ [V, T] · x_f8 [T, D]: both with T contiguous.
    dl_t = _transpose_padded(dl, V, Tp)
    del dl_buf, dl
    x_t = _transpose_padded(x_f8, Dp, Tp)
    dw = _scaled_mm(dl_t, x_t.t(), gs, xs, w_dtype)[:, :D]
    return dx.contiguous(), dw.contiguous()
