"""FP8 head + softcapped cross-entropy on the "cuda" backend: the chunked design of kernels/fp8_head.py.

Stages (kernels.fp8_head.Stages; the loop is kernels.fp8_head.chunked_forward):
    quantise   csrc/fp8_cast.cu: amax on the device when the scale is dynamic, then one tiled
               pass that writes q and, for the gradient GEMMs, qᵀ (x_f8ᵀ, W_f8ᵀ)
    GEMMs      torch._scaled_mm (cuBLAS): fast accumulation for the logits (K = D), full
               precision for dx and dW; before sm_89 (no FP8 matmul) the same float8 values
               multiplied in fp32 (exact products)
    CE         csrc/softcap_ce.cu: one block per row, tanh cached in shared memory as fp16
               between the two passes: 4 special-function ops per logit (3 in pass 1: ex2 +
               rcp for the tanh, ex2; 1 in pass 2), one read of the logits from HBM
    transpose  csrc/fp8_cast.cu's transposed cast of the e5m2 dl (scale 1, exact)

torch._scaled_mm wants K and N multiples of 16: the driver pads D, V and each
chunk with zeros (zero rows and columns add nothing); the speedrun's shapes
(D 768, V 50304, T a multiple of 1024) need none.
"""

import torch

from kernels import fp8_head as _op
from kernels.cuda_impl import ops

E4M3, E5M2 = ops.E4M3, ops.E5M2

# tanh.approx in the CE kernel's first pass too: one fewer special-function op per logit, z
# within ~7e-3 (the loss by as much). Off: the loss is what the trainer reports.
FAST_TANH = False


def _fp8_matmul_supported(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


class CudaStages(_op.Stages):
    def __init__(self, device: torch.device):
        self.fp8_mm = _fp8_matmul_supported(device)

    def alloc(self, shape, dtype, device):
        return ops._alloc(shape, dtype, device)

    def quantize(self, t, scale, padded_shape, transposed_shape, round_bf16):
        R, C = t.shape
        padded_shape = tuple(padded_shape)
        buf = (ops._alloc if padded_shape == (R, C) else ops._zeros)(padded_shape, E4M3, t.device)
        buf_t = None
        if transposed_shape is not None:
            transposed_shape = tuple(transposed_shape)
            buf_t = (ops._alloc if transposed_shape == (C, R) else ops._zeros)(transposed_shape, E4M3, t.device)
        _, _, used = ops.fp8_cast(t, E4M3, scale, transpose=buf_t is not None, out=buf[:R, :C],
                                  out_t=buf_t[:C, :R] if buf_t is not None else None, round_bf16=round_bf16)
        return buf, buf_t, used

    def mm(self, a, b, scale_a, scale_b, out, *, role, fast_accum, accumulate):
        def write(target):
            if self.fp8_mm:
                torch._scaled_mm(a, b, scale_a=scale_a.reshape(()), scale_b=scale_b.reshape(()), out_dtype=out.dtype,
                                 use_fast_accum=fast_accum, out=target)
            else:
                # float8 values have at most 4 significant bits, so fp32 products are exact.
                target.copy_((a.float() @ b.float()) * (scale_a * scale_b))

        self.overwrite_then_add(out, accumulate, write)

    def ce(self, logits, targets, row_loss, lse, *, dl, row_grad, g0, gs, lse_in, round_dl_bf16, softcap,
           logit_scale, ignore_index):
        V = logits.size(1)
        grad = row_grad if row_grad is not None else g0
        if lse_in:
            ops.softcap_ce_backward(logits, targets, lse, softcap, logit_scale, ignore_index, grad=grad,
                                    dlogits_dtype=E5M2, dl_scale=gs, out=dl[:, :V], round_bf16=round_dl_bf16)
            return
        ops.softcap_ce_forward(logits, targets, softcap, logit_scale, ignore_index,
                               grad=grad if dl is not None else None, dlogits_dtype=E5M2 if dl is not None else None,
                               dl_scale=gs if dl is not None else 1.0, out=dl[:, :V] if dl is not None else None,
                               fast_tanh=FAST_TANH, round_bf16=round_dl_bf16, loss_out=row_loss, lse_out=lse)

    def transpose(self, src, dst):
        n = src.size(0)
        ops.fp8_cast(src, E5M2, 1.0, write=False, transpose=True, out_t=dst[:, :n])
        if dst.size(1) > n:
            dst.view(torch.uint8)[:, n:].zero_()  # the dW GEMM's K padding


def forward(x, weight, targets, softcap, logit_scale, x_scale, w_scale, grad_scale, ignore_index, reduction,
            need_dx, need_dw, rounding, *, chunk_rows=None, chunk_bytes=_op.CHUNK_BYTES):
    """-> (loss, lse, dx, dw, x_f8, w_f8, used_scales), the op's forward contract; no [T, V] tensor."""
    return _op.chunked_forward(CudaStages(x.device), x, weight, targets, float(softcap), float(logit_scale), x_scale,
                               w_scale, grad_scale, int(ignore_index), reduction, bool(need_dx), bool(need_dw),
                               rounding, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes)


def backward(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale, ignore_index,
             need_dx, need_dw, x_dtype, w_dtype, rounding, *, chunk_rows=None, chunk_bytes=_op.CHUNK_BYTES):
    """reduction "none": -> (dx, dw), recomputing each chunk's logits. row_grad must be 0 at ignored rows."""
    return _op.chunked_backward(CudaStages(x_f8.device), row_grad, x_f8, w_f8, targets, lse, used_scales,
                                float(softcap), float(logit_scale), grad_scale, int(ignore_index), bool(need_dx),
                                bool(need_dw), x_dtype, w_dtype, rounding, chunk_rows=chunk_rows,
                                chunk_bytes=chunk_bytes)
