"""Tensor-level wrappers of the ``kernels._C`` kernels.

Each wrapper checks its tensors (device, dtype, shape, layout), allocates the
outputs, and passes raw device addresses, sizes, strides, dtype codes and
torch's current stream to the extension. Kernels run on the current stream of
the tensors' device, ordered with the surrounding torch work.

Outputs come from ``_alloc`` (tests replace it to poison buffers with NaN).
Float8 scales may be Python floats or 1-element fp32 device tensors; a tensor
scale is read by the kernel, so dynamic scaling never waits for the host.
"""

import torch

from kernels.cuda_impl import extension

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}

# Must match enum DType in csrc/kernels_api.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, E4M3: 3, E5M2: 4}


def _alloc(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros(shape, dtype, device) -> torch.Tensor:
    """Zero-filled buffers whose padding must read as 0 (float8 zero is the all-zero byte)."""
    return torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype) if dtype in FP8_DTYPES \
        else torch.zeros(shape, dtype=dtype, device=device)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check(name: str, t, dtypes=None, ndim=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: the CUDA kernels need a CUDA tensor, got one on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} like the other inputs")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {_name(t.dtype)} is not supported; expected one of "
                        f"{', '.join(_name(d) for d in dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_rows(name: str, t: torch.Tensor) -> None:
    """2-D with unit column stride: rows may be padded (any row stride >= the row length)."""
    if (t.size(1) > 1 and t.stride(1) != 1) or (t.size(0) > 1 and t.stride(0) < t.size(1)):
        raise ValueError(f"{name}: expected rows with unit column stride, got strides {tuple(t.stride())} "
                         f"for shape {tuple(t.shape)}")


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.size(0) > 1 else max(t.size(1), 1)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _scale_args(name: str, scale, device) -> tuple[float, int, torch.Tensor | None]:
    """(host value, device address, keep-alive tensor) for a float or a 1-element fp32 device tensor."""
    if isinstance(scale, torch.Tensor):
        _check(name, scale, (torch.float32,), device=device)
        if scale.numel() != 1:
            raise ValueError(f"{name}: expected a 1-element tensor, got shape {tuple(scale.shape)}")
        return 1.0, scale.data_ptr(), scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: expected a float or a 1-element fp32 CUDA tensor, got {type(scale).__name__}")
    return float(scale), 0, None


# ---------------------------------------------------------------------------
# Softcapped cross-entropy
# ---------------------------------------------------------------------------

def _ce_common(logits, targets):
    _check("logits", logits, FLOAT_DTYPES, ndim=2)
    _check_rows("logits", logits)
    _check("targets", targets, (torch.int64,), ndim=1, device=logits.device)
    if targets.size(0) != logits.size(0):
        raise ValueError(f"targets: expected shape [{logits.size(0)}] to match logits' rows, got {tuple(targets.shape)}")
    if not targets.is_contiguous():
        raise ValueError("targets: expected a contiguous tensor")
    if logits.size(1) == 0:
        raise ValueError(f"logits: the class dim is empty, shape {tuple(logits.shape)}")


def _grad_args(grad, rows, device):
    """(address, stride, multiplier, keep-alive) for grad = None | float | 0-dim / [rows] fp32 tensor."""
    if grad is None:
        return 0, 0, 1.0, None
    if isinstance(grad, torch.Tensor):
        _check("grad", grad, (torch.float32,), device=device)
        if grad.numel() == 1:
            return grad.data_ptr(), 0, 1.0, grad
        if grad.dim() != 1 or grad.size(0) != rows:
            raise ValueError(f"grad: expected a scalar or shape [{rows}], got {tuple(grad.shape)}")
        return grad.data_ptr(), grad.stride(0), 1.0, grad
    if isinstance(grad, bool) or not isinstance(grad, (int, float)):
        raise TypeError(f"grad: expected None, a float or an fp32 CUDA tensor, got {type(grad).__name__}")
    return 0, 0, float(grad), None


def _dlogits_out(out, rows, cols, dtype, device):
    if dtype not in FLOAT_DTYPES + FP8_DTYPES:
        raise TypeError(f"dlogits_dtype: {_name(dtype)} is not supported; expected one of "
                        f"{', '.join(_name(d) for d in FLOAT_DTYPES + FP8_DTYPES)}")
    if out is None:
        return _alloc((rows, cols), dtype, device)
    _check("out", out, (dtype,), ndim=2, device=device)
    _check_rows("out", out)
    if tuple(out.shape) != (rows, cols):
        raise ValueError(f"out: expected shape {(rows, cols)}, got {tuple(out.shape)}")
    return out


def _row_out(name, out, rows, device):
    """A given fp32 [rows] destination (checked), or a new one."""
    if out is None:
        return _alloc((rows,), torch.float32, device)
    _check(name, out, (torch.float32,), ndim=1, device=device)
    if out.size(0) != rows or (rows > 1 and out.stride(0) != 1):
        raise ValueError(f"{name}: expected a contiguous [{rows}] tensor, got shape {tuple(out.shape)}")
    return out


def softcap_ce_forward(logits, targets, softcap: float, logit_scale: float, ignore_index: int = -100, *,
                       grad=None, dlogits_dtype=None, dl_scale=1.0, out=None, fast_tanh: bool = False,
                       round_bf16: bool = False, loss_out=None, lse_out=None):
    """Per-row loss and lse of softcapped logits; with ``dlogits_dtype`` also their gradient, in the same pass.

    logits [R, V] (fp32 / fp16 / bf16, unit column stride, any row stride),
    targets [R] int64. grad: d(total)/d(row_loss) as None (1), a float, a
    1-element or an [R] fp32 tensor. The gradient is written as
    dlogits_dtype (bf16, fp16, fp32, e4m3, e5m2) after division by dl_scale
    (a float or a 1-element fp32 tensor), into ``out`` when given; with
    round_bf16 it is rounded to bf16 before that division (the record's
    bf16 logits' gradient). fast_tanh: pass 1 with tanh.approx.f32 (relative
    error 2^-11, up to ~7e-3 on z at softcap 15) instead of the ~1e-7
    exp2-based tanh; pass 2 uses the fp16-cached tanh of pass 1 (or
    tanh.approx when the row does not fit in shared memory).
    loss_out / lse_out: fp32 [R] destinations (e.g. slices of a larger buffer).
    Returns (loss [R] fp32, lse [R] fp32, dlogits or None).
    """
    _ce_common(logits, targets)
    rows, cols = logits.shape
    device = logits.device
    grad_ptr, grad_stride, grad_mult, _keep_g = _grad_args(grad, rows, device)
    dl = None
    dl_host, dl_ptr, _keep_s = 1.0, 0, None
    if dlogits_dtype is not None:
        dl = _dlogits_out(out, rows, cols, dlogits_dtype, device)
        dl_host, dl_ptr, _keep_s = _scale_args("dl_scale", dl_scale, device)
    loss = _row_out("loss_out", loss_out, rows, device)
    lse = _row_out("lse_out", lse_out, rows, device)
    if rows:
        extension().softcap_ce(
            device=device.index, stream=_stream(device),
            logits=logits.data_ptr(), logits_dtype=DTYPE_CODES[logits.dtype], ld_logits=_row_stride(logits),
            targets=targets.data_ptr(), rows=rows, cols=cols, softcap=float(softcap),
            logit_scale=float(logit_scale), ignore_index=int(ignore_index),
            loss=loss.data_ptr(), lse_out=lse.data_ptr(),
            grad=grad_ptr, grad_stride=grad_stride, grad_mult=grad_mult,
            dlogits=dl.data_ptr() if dl is not None else 0,
            dlogits_dtype=DTYPE_CODES[dl.dtype] if dl is not None else 2,
            ld_dlogits=_row_stride(dl) if dl is not None else 0,
            dl_scale_ptr=dl_ptr, dl_scale=dl_host, fast_tanh=bool(fast_tanh), round_bf16=bool(round_bf16))
    return loss, lse, dl


def softcap_ce_backward(logits, targets, lse, softcap: float, logit_scale: float, ignore_index: int = -100, *,
                        grad=None, dlogits_dtype=torch.bfloat16, dl_scale=1.0, out=None, fast_tanh: bool = False,
                        round_bf16: bool = False):
    """The logits' gradient from a saved lse in one read of the logits (no log-sum-exp pass).

    Same arguments as ``softcap_ce_forward``, plus lse [R] fp32 from it. The
    tanh is tanh.approx here (fast_tanh is accepted for symmetry).
    Returns dlogits [R, V] in dlogits_dtype (or ``out``).
    """
    _ce_common(logits, targets)
    rows, cols = logits.shape
    device = logits.device
    _check("lse", lse, (torch.float32,), ndim=1, device=device)
    if lse.size(0) != rows or (rows > 1 and lse.stride(0) != 1):
        raise ValueError(f"lse: expected a contiguous [{rows}] tensor, got shape {tuple(lse.shape)}")
    grad_ptr, grad_stride, grad_mult, _keep_g = _grad_args(grad, rows, device)
    dl = _dlogits_out(out, rows, cols, dlogits_dtype, device)
    dl_host, dl_ptr, _keep_s = _scale_args("dl_scale", dl_scale, device)
    if rows:
        extension().softcap_ce(
            device=device.index, stream=_stream(device),
            logits=logits.data_ptr(), logits_dtype=DTYPE_CODES[logits.dtype], ld_logits=_row_stride(logits),
            targets=targets.data_ptr(), rows=rows, cols=cols, softcap=float(softcap),
            logit_scale=float(logit_scale), ignore_index=int(ignore_index), lse_in=lse.data_ptr(),
            grad=grad_ptr, grad_stride=grad_stride, grad_mult=grad_mult,
            dlogits=dl.data_ptr(), dlogits_dtype=DTYPE_CODES[dl.dtype], ld_dlogits=_row_stride(dl),
            dl_scale_ptr=dl_ptr, dl_scale=dl_host, fast_tanh=bool(fast_tanh), round_bf16=bool(round_bf16))
    return dl


# ---------------------------------------------------------------------------
# Float8 quantisation
# ---------------------------------------------------------------------------

def fp8_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim fp32 tensor (NaN when x holds a NaN); x contiguous fp32 / fp16 / bf16."""
    _check("x", x, FLOAT_DTYPES)
    if not x.is_contiguous():
        raise ValueError("x: expected a contiguous tensor")
    amax = _alloc((), torch.float32, x.device)
    extension().fp8_amax(device=x.device.index, stream=_stream(x.device), x=x.data_ptr(),
                         dtype=DTYPE_CODES[x.dtype], n=x.numel(), amax=amax.data_ptr())
    return amax


def fp8_cast(x: torch.Tensor, dtype=E4M3, scale=None, *, write=True, transpose=False, out=None, out_t=None,
             round_bf16: bool = False):
    """q = x / scale as ``dtype`` (finite values saturated, non-finite NaN), optionally also transposed.

    x: fp32 / fp16 / bf16 / float8, 2-D with unit column stride (any
    contiguous tensor when transpose is False). scale: None (dynamic:
    amax / max_finite, 1 when amax is 0 or NaN), a float, or a 1-element fp32
    tensor. write / transpose choose the outputs: q like x, q_t [cols, rows].
    out / out_t: 2-D destinations with unit column stride (row-padded views of
    zeroed buffers, e.g. for torch._scaled_mm's multiples of 16).
    round_bf16: round x / scale to bf16 before the cast (the record's bf16 division).
    Returns (q or None, q_t or None, scale used as a 0-dim fp32 tensor).
    """
    _check("x", x, FLOAT_DTYPES + FP8_DTYPES)
    if dtype not in FP8_DTYPES:
        raise TypeError(f"dtype: expected float8_e4m3fn or float8_e5m2, got {dtype}")
    device = x.device
    if x.dim() == 2:
        _check_rows("x", x)
        rows, cols = x.shape
        ld_x = _row_stride(x)
    elif transpose:
        raise ValueError(f"x: the transposed cast needs a 2-D tensor, got shape {tuple(x.shape)}")
    elif not x.is_contiguous():
        raise ValueError("x: expected a contiguous tensor (or a 2-D one with unit column stride)")
    else:
        rows, cols, ld_x = 1, x.numel(), max(x.numel(), 1)
    q = q_t = None
    if write:
        if out is None:
            q = _alloc(tuple(x.shape), dtype, device)
        else:
            _check("out", out, (dtype,), ndim=2, device=device)
            _check_rows("out", out)
            if tuple(out.shape) != (rows, cols):
                raise ValueError(f"out: expected shape {(rows, cols)}, got {tuple(out.shape)}")
            q = out
    if transpose:
        if out_t is None:
            q_t = _alloc((cols, rows), dtype, device)
        else:
            _check("out_t", out_t, (dtype,), ndim=2, device=device)
            _check_rows("out_t", out_t)
            if tuple(out_t.shape) != (cols, rows):
                raise ValueError(f"out_t: expected shape {(cols, rows)}, got {tuple(out_t.shape)}")
            q_t = out_t
    used = _alloc((), torch.float32, device)
    amax = None
    host, ptr, _keep = 1.0, 0, None
    if scale is None:
        if x.dtype in FP8_DTYPES:
            raise ValueError("scale: a dynamic scale needs a fp32 / fp16 / bf16 x; pass scale=1.0 to re-cast float8")
        amax = fp8_amax(x if x.is_contiguous() else x.contiguous())
    else:
        host, ptr, _keep = _scale_args("scale", scale, device)
    extension().fp8_cast(
        device=device.index, stream=_stream(device), x=x.data_ptr(), x_dtype=DTYPE_CODES[x.dtype],
        rows=rows, cols=cols, ld_x=ld_x,
        out=q.data_ptr() if q is not None else 0, ld_out=(_row_stride(q) if q is not None and q.dim() == 2 else cols),
        out_t=q_t.data_ptr() if q_t is not None else 0, ld_out_t=_row_stride(q_t) if q_t is not None else 0,
        out_dtype=DTYPE_CODES[dtype], scale=host, scale_ptr=ptr,
        amax_ptr=amax.data_ptr() if amax is not None else 0, scale_out=used.data_ptr(), round_bf16=bool(round_bf16))
    return q, q_t, used


# ---------------------------------------------------------------------------
# relu²
# ---------------------------------------------------------------------------

def _f8_out(f8_dtype, shape, device):
    if f8_dtype is None:
        return None
    if f8_dtype not in FP8_DTYPES:
        raise TypeError(f"f8_dtype: expected None, float8_e4m3fn or float8_e5m2, got {f8_dtype}")
    return _alloc(shape, f8_dtype, device)


def relu2_forward(pre: torch.Tensor, *, write_out=True, f8_dtype=None, f8_scale=1.0):
    """post = relu(pre)² in pre's dtype, and (f8_dtype) post / f8_scale as float8. Returns (post, post_f8)."""
    _check("pre", pre, FLOAT_DTYPES)
    if not pre.is_contiguous():
        raise ValueError("pre: expected a contiguous tensor")
    device = pre.device
    post = _alloc(tuple(pre.shape), pre.dtype, device) if write_out else None
    f8 = _f8_out(f8_dtype, tuple(pre.shape), device)
    host, ptr, _keep = _scale_args("f8_scale", f8_scale, device)
    extension().relu2_forward(
        device=device.index, stream=_stream(device), pre=pre.data_ptr(), dtype=DTYPE_CODES[pre.dtype],
        n=pre.numel(), out=post.data_ptr() if post is not None else 0, f8_out=f8.data_ptr() if f8 is not None else 0,
        f8_dtype=DTYPE_CODES[f8_dtype] if f8 is not None else 3, scale=host, scale_ptr=ptr)
    return post, f8


def relu2_backward(dpost: torch.Tensor, post: torch.Tensor, *, f8_dtype=None, f8_scale=1.0):
    """dpre = dpost · 2·sqrt(post) in their dtype, and (f8_dtype) dpre / f8_scale as float8. Returns (dpre, dpre_f8)."""
    _check("dpost", dpost, FLOAT_DTYPES)
    _check("post", post, (dpost.dtype,), device=dpost.device)
    if post.shape != dpost.shape:
        raise ValueError(f"post: expected shape {tuple(dpost.shape)} like dpost, got {tuple(post.shape)}")
    for name, t in (("dpost", dpost), ("post", post)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    device = dpost.device
    dpre = _alloc(tuple(dpost.shape), dpost.dtype, device)
    f8 = _f8_out(f8_dtype, tuple(dpost.shape), device)
    host, ptr, _keep = _scale_args("f8_scale", f8_scale, device)
    extension().relu2_backward(
        device=device.index, stream=_stream(device), dpost=dpost.data_ptr(), post=post.data_ptr(),
        dtype=DTYPE_CODES[dpost.dtype], n=dpost.numel(), out=dpre.data_ptr(),
        f8_out=f8.data_ptr() if f8 is not None else 0, f8_dtype=DTYPE_CODES[f8_dtype] if f8 is not None else 4,
        scale=host, scale_ptr=ptr)
    return dpre, f8


# ---------------------------------------------------------------------------
# Symmetric X·Xᵀ
# ---------------------------------------------------------------------------

def sym_xxt(x: torch.Tensor, out_dtype=torch.bfloat16, *, tile: int = 0) -> torch.Tensor:
    """x [B, M, K] (or [M, K]) bf16 -> x·xᵀ [B, M, M] in out_dtype (bf16 or fp32), fp32 accumulation.

    The kernel reads 16-byte aligned rows; other layouts (K not a multiple of
    8, strided rows) are first copied into a zero-padded buffer, which leaves
    x·xᵀ unchanged. tile: 64 or 128, or 0 to choose by problem size.
    """
    _check("x", x, (torch.bfloat16,))
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected [M, K] or [B, M, K], got shape {tuple(x.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"out_dtype: expected bfloat16 or float32, got {out_dtype}")
    if tile not in (0, 64, 128):
        raise ValueError(f"tile: expected 0, 64 or 128, got {tile}")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    B, M, K = x3.shape
    if B > 65535:
        raise ValueError(f"x: at most 65535 matrices per call, got {B}")
    aligned = (x3.stride(2) == 1 and x3.stride(1) % 8 == 0 and (B == 1 or x3.stride(0) % 8 == 0)
               and K % 8 == 0 and x3.data_ptr() % 16 == 0 and x3.stride(1) >= K)
    if not aligned:
        padded = torch.zeros((B, M, (K + 7) // 8 * 8), dtype=x.dtype, device=x.device)
        padded[:, :, :K] = x3
        x3 = padded
    Kp = x3.size(2)
    out = _alloc((B, M, M), out_dtype, x.device)
    if K == 0:
        out.zero_()  # an empty sum; keeps a possibly null address out of the kernel
    elif out.numel():
        extension().sym_xxt(
            device=x.device.index, stream=_stream(x.device), x=x3.data_ptr(), batch=B, m=M, k=Kp,
            sbx=x3.stride(0) if B > 1 else M * x3.stride(1), ldx=x3.stride(1) if M > 1 else Kp,
            out=out.data_ptr(), out_dtype=DTYPE_CODES[out_dtype], sbo=M * M, ldo=M, tile=tile)
    return out[0] if squeeze else out
