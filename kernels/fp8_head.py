"""The lm-head and its softcapped cross-entropy as one op, with FP8 operands, in row chunks.

Math. x [T, D] and weight [V, D] are quantised to float8_e4m3fn with per-tensor
scales; logits = x·Wᵀ (fp32 accumulation, times x_scale·w_scale) are softcapped,
z = softcap·tanh(logit_scale·logits / softcap), and reduced to one loss per row.
The logits' gradient dl is quantised to float8_e5m2 (scale grad_scale) and
multiplied back: dx = dl·W_f8, dW = dlᵀ·x_f8.

Quantisation q = t / scale saturates finite values at the format's largest value
and turns anything non-finite into NaN, so an Inf or NaN input always shows up in
the loss instead of being clamped into a finite answer.

Rounding (``rounding=``), the two sets of choices the op offers:
  "fp32" (default)  x / x_scale in fp32 -> e4m3; logits kept in fp32; the logits'
                    gradient in fp32 -> / grad_scale -> e5m2. Closest to an fp32 head
                    (4.7e-5 relative in the loss at the speedrun's shape, issue 16).
  "record"          the speedrun record's head: x / x_scale rounded to bf16 before the
                    e4m3 cast (its x is bf16 and it divides in bf16), logits rounded to
                    bf16 (torch._scaled_mm with a bf16 output), the logits' gradient
                    rounded to bf16 (the record's logits are bf16, so is their gradient)
                    before / grad_scale -> e5m2. The weight's quantisation is the same in
                    both (the record's head weight is fp32). Its compiled code may keep
                    x / x_scale in fp32 (inductor does not round intermediates unless
                    told to); this option follows the code as written. It is also the
                    cheaper one: bf16 logits halve the chunk's logit traffic and memory.

Gradients are computed in the forward. In training the loss is differentiated
right away, so for reduction "sum" / "mean" the forward also computes dx and dW
for the upstream gradient 1 (each valid row's loss gradient g0 = 1 for "sum",
1 / n_valid for "mean"; ignored rows 0), quantising dl with that g0, and the
backward only multiplies the stored dx and dW by the scalar upstream gradient.
With a static grad_scale this is the record's choice (its loss.backward() has
upstream 1, and the trainer's 1/accum is a power of two, exact in the multiply);
with a dynamic one (max|row gradient|·logit_scale / 57344) it equals quantising
with the upstream folded in. The public function decides whether gradients are
needed (grad mode on and x or weight requiring grad; under torch.compile that is
fixed at trace time): under torch.no_grad() (evaluation) the gradient GEMMs never
run. Cost of the choice: a forward whose loss is never differentiated does the
gradient work anyway. reduction "none" has a per-row upstream gradient, unknown
in the forward: its backward recomputes each chunk's logits (a slower, correct path).

Chunks. The fast backends walk T in chunks of C rows; per chunk:
    logits [C, V]  = x_f8[c] · W_f8ᵀ            FP8 GEMM, K = D (fast accumulation allowed)
    loss, lse, dl  = softcap-CE(logits)          one kernel, two passes over each row
    dlᵀ [V, C]     = transpose(dl)               fp8 bytes
    dx[c]          = dl · W_f8                   FP8 GEMM, K = V, full-precision accumulation
    dW            += dlᵀ · x_f8[c]               FP8 GEMM, K = C, full-precision accumulation, fp32
FP8 tensor cores need both operands K-major; dx contracts dl over V and dW over
the chunk's rows, so dl is needed in both layouts (no GEMM orientation avoids
it), and W_f8ᵀ, x_f8ᵀ are written once per call by the quantiser. No tensor with
a full-T × V extent is ever allocated. Per chunk: a logits buffer (4 or 2 bytes
per element), dl (1), and dlᵀ, which reuses the logits buffer once the CE kernel
has read it.

Chunk size (napkin math at the speedrun's T = 49152, D = 768, V = 50304):
the record's path materialises bf16 logits [T, V] (4.95 GB), and its backward
holds them while it writes the e5m2 gradient (2.47 GB), then that gradient and
its transposed copy: at least 7.4 GB of [T, V] tensors alive at once (9.9 GB
when the bf16 gradient is materialised too), plus ~0.4 GB of operands and
outputs, so 25 % of it is ~1.95 GB at least. This op's extra memory is
CHUNK_BYTES (default 1.25 GiB: 8192 rows in 6 chunks with bf16 logits, 4928
rows in 10 chunks with fp32 logits) plus ~0.54 GB of quantised operands, their
transposes, dx, the fp32 dW accumulator and one fp32 partial: ~1.8 GB, <= 23 %
of the record's. The price of chunking is the dW accumulation:
torch._scaled_mm cannot add into its output, so every chunk after the first
writes an fp32 partial (154.5 MB) and adds it (3 × 154.5 MB: 0.14 ms at
3.35 TB/s; 0.69 ms over 6 chunks, ~6 % of the op). Fewer, larger chunks trade
memory for that time (bench_fp8_head times 4 chunks too); the Triton FP8 GEMM
(kernels.triton_impl.fp8_head, config dw_gemm="triton") adds into the
accumulator in its epilogue instead (2 × 154.5 MB per chunk, no separate pass);
which is faster is for bench_fp8_head to measure.

Floors (H100 SXM datasheet; bench_fp8_head prints the table per stage): the
three GEMMs are 5.76 ms of FP8 FLOPs; rounding="record" adds the CE (2.96 ms of
special-function ops on the Triton backend, 2.37 ms on the cuda one), the dl
transpose (1.48 ms) and the dW adds (0.69 ms): 11.0 / 10.4 ms, against 11.2 ms
for the record's path at the same floors (its CE forward, CE backward + e5m2
cast and transposed copy are 5.5 ms). rounding="fp32" moves 4-byte logits:
13.4 ms. The issue's 1.1x over the record's path is therefore not in reach of
this design by the floors alone; what it does reach is the memory target.

Order: quantisation -> reference -> chunked driver (the fast backends' shared
loop) -> torch.library ops -> public function.
"""

import math

import torch

from kernels import softcap_cross_entropy as _ce
from kernels._checks import (FLOAT_DTYPES, FP32_MAX, FP32_TINY, INDEX_DTYPES, check_choice, check_int,
                             check_positive_fp32, check_tensor, check_target_values)
from kernels.backend import load_impl, resolve_backend

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
ROUNDINGS = ("fp32", "record")

# The speedrun's static scales for D = 768: (x, weight, logits' gradient).
SPEEDRUN_SCALES = (math.sqrt(768) / 448, 24 / 448, 1 / 448)

# Rows per chunk in the reference backend (plain PyTorch, fp32 logits [rows, V]).
REFERENCE_CHUNK_ROWS = 2048
# The fast backends' per-chunk buffers (logits, dl, dlᵀ) stay within this many bytes.
CHUNK_BYTES = 5 << 28  # 1.25 GiB


def _pad16(n: int) -> int:
    return (n + 15) // 16 * 16


# ---------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------

def amax_scale(t: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """The per-tensor scale mapping max|t| to the format's largest value (1.0 for an all-zero or empty t)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.float32, device=t.device)
    amax = t.abs().amax().float()
    return torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))


def quantize(t: torch.Tensor, scale, fp8_dtype: torch.dtype, round_bf16: bool = False) -> torch.Tensor:
    """t / scale cast to fp8_dtype, finite values saturated, non-finite ones NaN.

    round_bf16: round t / scale to bf16 first (the record's bf16 division).
    """
    fp8_max = torch.finfo(fp8_dtype).max
    q = t.float() / scale
    if round_bf16:
        q = q.to(torch.bfloat16).float()
    q = torch.where(torch.isfinite(q), q.clamp(-fp8_max, fp8_max), torch.full_like(q, float("nan")))
    return q.to(fp8_dtype)


def dynamic_grad_scale(row_grad: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """A scale for the logits' gradient that needs no pass over it.

    |dlogits| <= |row_grad|·logit_scale, since |softmax − onehot| <= 1 and the
    softcap's derivative is logit_scale·(1 − tanh²) <= logit_scale.
    """
    if row_grad.numel() == 0:
        return torch.ones((), dtype=torch.float32, device=row_grad.device)
    bound = row_grad.abs().amax().float() * logit_scale
    return torch.where(bound > 0, bound / E5M2_MAX, torch.ones_like(bound))


def unit_row_grad(targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """g0, d(loss)/d(row_loss) of a valid row for upstream gradient 1, as a 0-dim fp32 device tensor.

    1 for "sum", 1 / n_valid for "mean"; 0 when no row is valid (then every row's gradient is 0).
    """
    n_valid = (targets != ignore_index).sum()
    g0 = torch.ones((), dtype=torch.float32, device=targets.device)
    if reduction == "mean":
        g0 = g0 / n_valid.clamp(min=1).float()
    return torch.where(n_valid > 0, g0, torch.zeros_like(g0))


def grad_scale_tensor(grad_scale: float | None, row_grad: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The e5m2 scale of dl: the static grad_scale, or the dynamic bound from the row gradients (any shape)."""
    if grad_scale is not None:
        return torch.tensor(grad_scale, dtype=torch.float32, device=row_grad.device)
    return dynamic_grad_scale(row_grad, logit_scale)


def _empty(device) -> torch.Tensor:
    return torch.empty((0,), dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------
# Reference (plain PyTorch, fp32 arithmetic on the quantised values)
# ---------------------------------------------------------------------------

def _scale_tensor(t: torch.Tensor, scale: float | None) -> torch.Tensor:
    if scale is None:
        return amax_scale(t, E4M3_MAX)
    return torch.tensor(scale, dtype=torch.float32, device=t.device)


def _reference_logits(x8: torch.Tensor, w8f: torch.Tensor, scale: torch.Tensor, rounding: str) -> torch.Tensor:
    logits = (x8.float() @ w8f.T) * scale
    return logits.to(torch.bfloat16).float() if rounding == "record" else logits


def _reference_dl(row_grad, logits, targets, lse, gs, softcap, logit_scale, ignore_index, rounding):
    """The e5m2 logits' gradient (as fp32 values) of one chunk; ignored rows exactly 0."""
    dlogits = _ce.reference_backward(row_grad, logits, targets, lse, softcap, logit_scale, ignore_index)
    dlogits = torch.where((targets != ignore_index)[:, None], dlogits, 0.0)
    if rounding == "record":
        dlogits = dlogits.to(torch.bfloat16).float()
    return quantize(dlogits, gs, torch.float8_e5m2).float()


def _reference_chunks(x8, w8, xs, ws, targets, softcap, logit_scale, ignore_index, rounding, *, row_grad, gs,
                      lse_in, need_dx, need_dw, x_dtype, w_dtype):
    """The chunk loop: -> (row_loss, lse, dx in x_dtype, dw in w_dtype), dx / dw empty when not computed."""
    T, D = x8.shape
    w8f = w8.float()
    scale = xs * ws
    grads = row_grad is not None and (need_dx or need_dw)
    row_loss = torch.empty(T, dtype=torch.float32, device=x8.device) if lse_in is None else None
    lse = torch.empty(T, dtype=torch.float32, device=x8.device) if lse_in is None else lse_in
    dx = torch.empty((T, D), dtype=torch.float32, device=x8.device) if grads and need_dx else None
    dw = torch.zeros(w8.shape, dtype=torch.float32, device=x8.device) if grads and need_dw else None
    for c0 in range(0, T, REFERENCE_CHUNK_ROWS):
        rows = slice(c0, min(T, c0 + REFERENCE_CHUNK_ROWS))
        logits = _reference_logits(x8[rows], w8f, scale, rounding)
        if lse_in is None:
            row_loss[rows], lse[rows] = _ce.reference_forward(logits, targets[rows], softcap, logit_scale,
                                                              ignore_index)
        if grads:
            dl = _reference_dl(row_grad[rows], logits, targets[rows], lse[rows], gs, softcap, logit_scale,
                               ignore_index, rounding)
            if dx is not None:
                dx[rows] = dl @ w8f
            if dw is not None:
                dw += dl.T @ x8[rows].float()
    dx = (dx * (gs * ws)).to(x_dtype) if dx is not None else _empty(x8.device).to(x_dtype)
    dw = (dw * (gs * xs)).to(w_dtype) if dw is not None else _empty(x8.device).to(w_dtype)
    return row_loss, lse, dx, dw


def reference_forward(x, weight, targets, softcap, logit_scale, x_scale, w_scale, grad_scale, ignore_index,
                      reduction, need_dx, need_dw, rounding):
    """-> (loss, lse [T], dx, dw, x_f8, w_f8, used_scales [2]); see the op for which are empty."""
    xs, ws = _scale_tensor(x, x_scale), _scale_tensor(weight, w_scale)
    x8 = quantize(x, xs, torch.float8_e4m3fn, round_bf16=rounding == "record")
    w8 = quantize(weight, ws, torch.float8_e4m3fn)
    grads = reduction != "none" and (need_dx or need_dw)
    row_grad = gs = None
    if grads:
        g0 = unit_row_grad(targets, ignore_index, reduction)
        row_grad = torch.where(targets != ignore_index, g0, 0.0)
        gs = grad_scale_tensor(grad_scale, g0, logit_scale)
    row_loss, lse, dx, dw = _reference_chunks(x8, w8, xs, ws, targets, softcap, logit_scale, ignore_index, rounding,
                                              row_grad=row_grad, gs=gs, lse_in=None, need_dx=need_dx,
                                              need_dw=need_dw, x_dtype=x.dtype, w_dtype=weight.dtype)
    device = x.device
    keep = reduction == "none" and (need_dx or need_dw)
    x_f8 = x8 if keep else _empty(device).to(torch.float8_e4m3fn)
    w_f8 = w8 if keep else _empty(device).to(torch.float8_e4m3fn)
    return (_ce.reduce_rows(row_loss, targets, reduction, ignore_index), lse, dx, dw, x_f8, w_f8,
            torch.stack([xs, ws]))


def reference_backward(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale,
                       ignore_index, need_dx, need_dw, x_dtype, w_dtype, rounding):
    """reduction "none": -> (dx, dw) for per-row upstream gradients (0 at ignored rows), recomputing the logits."""
    xs, ws = used_scales[0], used_scales[1]
    gs = grad_scale_tensor(grad_scale, row_grad, logit_scale)
    _, _, dx, dw = _reference_chunks(x_f8, w_f8, xs, ws, targets, softcap, logit_scale, ignore_index, rounding,
                                     row_grad=row_grad, gs=gs, lse_in=lse, need_dx=need_dx, need_dw=need_dw,
                                     x_dtype=x_dtype, w_dtype=w_dtype)
    return dx, dw


# ---------------------------------------------------------------------------
# Chunked driver: the loop shared by the fast backends
# ---------------------------------------------------------------------------

class Stages:
    """What a fast backend provides to ``chunked_forward`` / ``chunked_backward``.

    Layout rules are cuBLAS's FP8 ones (torch._scaled_mm): ``mm``'s a is row-major, b
    column-major, both with K and b's N multiples of 16 and 16-byte aligned; the driver
    arranges every operand that way (zero padding where D, V or a chunk is not a
    multiple of 16), so an implementation may be torch._scaled_mm itself.
    """

    def alloc(self, shape, dtype, device) -> torch.Tensor:
        """Outputs and workspaces (tests replace it to poison them)."""
        return torch.empty(shape, dtype=dtype, device=device)

    def quantize(self, t, scale, padded_shape, transposed_shape, round_bf16):
        """t [R, C] -> (q [padded_shape] e4m3, qᵀ [transposed_shape] or None, used scale 0-dim fp32).

        Zero in the padding; scale None means amax / 448.
        """
        raise NotImplementedError

    def mm(self, a, b, scale_a, scale_b, out, *, role: str, fast_accum: bool, accumulate: bool) -> None:
        """out (+)= (a·b)·scale_a·scale_b with fp32 accumulation; role "logits", "dx" or "dw".

        fast_accum: the tensor core's reduced-precision accumulation is allowed (the driver sets it for
        the logits only, K = D). accumulate: add into out (fp32) instead of overwriting it.
        """
        raise NotImplementedError

    _partial = None  # overwrite_then_add's buffer, reused across chunks

    def overwrite_then_add(self, out, accumulate: bool, write) -> None:
        """out (+)= what write(target) stores into target, for a GEMM that can only overwrite its output.

        torch._scaled_mm cannot add into out: with accumulate, write fills an fp32 partial shaped like
        out (allocated once, reused by every chunk), which is then added.
        """
        if not accumulate:
            write(out)
            return
        if self._partial is None or self._partial.shape != out.shape:
            self._partial = self.alloc(tuple(out.shape), out.dtype, out.device)
        write(self._partial)
        out.add_(self._partial)

    def ce(self, logits, targets, row_loss, lse, *, dl, row_grad, g0, gs, lse_in: bool, round_dl_bf16: bool,
           softcap, logit_scale, ignore_index) -> None:
        """One chunk of softcapped cross-entropy over logits [n, V] (row stride >= V).

        Writes row_loss, lse [n] (unless lse_in: lse is read) and, when dl [n, >=V] e5m2 is given, the
        quantised gradient into its first V columns: (p - onehot)·g·logit_scale·(1 - t²) / gs, g =
        row_grad[r] (or g0 when row_grad is None) at valid rows, 0 at ignored ones, NaN at rows whose
        target is out of range.
        """
        raise NotImplementedError

    def transpose(self, src, dst) -> None:
        """dst [V, n16][:, :n] = src [n, V]ᵀ (e5m2 bytes), dst[:, n:] = 0."""
        raise NotImplementedError


def chunk_rows_for(T: int, bytes_per_row: int, budget: int) -> int:
    """Rows per chunk: within ``budget`` bytes, a multiple of 16, T split into equal chunks."""
    rows = max(16, budget // max(bytes_per_row, 1) // 16 * 16)
    n_chunks = max(1, -(-T // rows))
    return min(rows, _pad16(-(-T // n_chunks)))


def _padded_fp8(t: torch.Tensor, shape) -> torch.Tensor:
    """float8 t [R, C] into a zeroed [shape] buffer (t itself when no padding is needed)."""
    if tuple(t.shape) == tuple(shape):
        return t
    buf = torch.zeros(shape, dtype=torch.uint8, device=t.device)
    buf[:t.shape[0], :t.shape[1]] = t.view(torch.uint8)
    return buf.view(t.dtype)


def _padded_fp8_t(t: torch.Tensor, shape) -> torch.Tensor:
    """float8 tᵀ into a zeroed [shape] buffer."""
    buf = torch.zeros(shape, dtype=torch.uint8, device=t.device)
    buf[:t.shape[1], :t.shape[0]] = t.view(torch.uint8).t()
    return buf.view(t.dtype)


def _run_chunks(stages: Stages, x8, w8, x8t, w8t, xs, ws, targets, T, D, V, *, row_loss, lse, lse_in, row_grad, g0,
                gs, dx, dw_acc, rounding, softcap, logit_scale, ignore_index, chunk_rows, chunk_bytes):
    """The per-chunk loop; dx [T, D] and dw_acc [V, Dp] fp32 (or None) are written in place."""
    if T == 0:  # no chunk to run; dW over no rows is 0 (else the first chunk's dW GEMM overwrites dw_acc)
        if dw_acc is not None:
            dw_acc.zero_()
        return
    device = x8.device
    Vp, Dp = w8.shape
    logits_dtype = torch.bfloat16 if rounding == "record" else torch.float32
    grads = dx is not None or dw_acc is not None
    bytes_per_row = Vp * (torch.finfo(logits_dtype).bits // 8 + (1 if grads else 0))
    C = chunk_rows or chunk_rows_for(T, bytes_per_row, chunk_bytes)
    if C % 16:
        raise ValueError(f"chunk_rows: expected a multiple of 16, got {C}")
    C = min(C, _pad16(T))
    logits_buf = stages.alloc((C, Vp), logits_dtype, device)
    dl_buf = None
    if grads:
        dl_buf = stages.alloc((C, Vp), torch.float8_e5m2, device)
        dl_buf.view(torch.uint8)[:, V:].zero_()  # K padding of the dx GEMM; the CE stage writes [:, :V]
    # dlᵀ [V, C] lives in the logits buffer: the CE kernel has read the chunk's logits before it is written,
    # and the next chunk's logits GEMM runs after the dW GEMM has read it (one stream).
    dlt_buf = (logits_buf.view(torch.uint8).reshape(-1)[:V * C].view(V, C).view(torch.float8_e5m2)
               if dw_acc is not None else None)
    dx_tmp = stages.alloc((C, Dp), dx.dtype, device) if dx is not None and Dp != D else None
    for c0 in range(0, T, C):
        n = min(C, T - c0)
        rows = slice(c0, c0 + n)
        logits = logits_buf[:n]
        stages.mm(x8[rows], w8.t(), xs, ws, logits, role="logits", fast_accum=True, accumulate=False)
        stages.ce(logits[:, :V], targets[rows], None if row_loss is None else row_loss[rows], lse[rows],
                  dl=dl_buf[:n] if grads else None, row_grad=None if row_grad is None else row_grad[rows],
                  g0=g0, gs=gs, lse_in=lse_in, round_dl_bf16=rounding == "record", softcap=softcap,
                  logit_scale=logit_scale, ignore_index=ignore_index)
        if dx is not None:
            out = dx[rows] if dx_tmp is None else dx_tmp[:n]
            stages.mm(dl_buf[:n], w8t.t(), gs, ws, out, role="dx", fast_accum=False, accumulate=False)
            if dx_tmp is not None:
                dx[rows] = dx_tmp[:n, :D]
        if dw_acc is not None:
            n16 = _pad16(n)
            dlt = dlt_buf[:, :n16]
            stages.transpose(dl_buf[:n, :V], dlt)
            stages.mm(dlt, x8t[:, c0:c0 + n16].t(), gs, xs, dw_acc, role="dw", fast_accum=False, accumulate=c0 > 0)


def chunked_forward(stages: Stages, x, weight, targets, softcap, logit_scale, x_scale, w_scale, grad_scale,
                    ignore_index, reduction, need_dx, need_dw, rounding, *, chunk_rows=None,
                    chunk_bytes=CHUNK_BYTES):
    """The op's forward on a fast backend; same contract as ``reference_forward``."""
    T, D = x.shape
    V = weight.shape[0]
    device = x.device
    Dp, Vp, T16 = _pad16(D), _pad16(V), _pad16(T)
    grads = reduction != "none" and (need_dx or need_dw)
    x8, x8t, xs = stages.quantize(x, x_scale, (T, Dp), (Dp, T16) if grads and need_dw else None,
                                  rounding == "record")
    w8, w8t, ws = stages.quantize(weight, w_scale, (Vp, Dp), (Dp, Vp) if grads and need_dx else None, False)
    row_loss = stages.alloc((T,), torch.float32, device)
    lse = stages.alloc((T,), torch.float32, device)
    g0 = gs = None
    dx = dw_acc = None
    if grads:
        g0 = unit_row_grad(targets, ignore_index, reduction)
        gs = grad_scale_tensor(grad_scale, g0, logit_scale)
        if need_dx:
            dx = stages.alloc((T, D), x.dtype, device)
        if need_dw:
            dw_acc = stages.alloc((V, Dp), torch.float32, device)
    _run_chunks(stages, x8, w8, x8t, w8t, xs, ws, targets, T, D, V, row_loss=row_loss, lse=lse, lse_in=False,
                row_grad=None, g0=g0, gs=gs, dx=dx, dw_acc=dw_acc, rounding=rounding, softcap=softcap,
                logit_scale=logit_scale, ignore_index=ignore_index, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes)
    dw = _finish_dw(dw_acc, D, weight.dtype, device)
    keep = reduction == "none" and (need_dx or need_dw)
    x_f8 = (x8 if Dp == D else x8[:, :D].contiguous()) if keep else _empty(device).to(torch.float8_e4m3fn)
    w_f8 = (w8[:V, :D].contiguous() if (Vp, Dp) != (V, D) else w8) if keep else _empty(device).to(
        torch.float8_e4m3fn)
    return (_ce.reduce_rows(row_loss, targets, reduction, ignore_index), lse,
            dx if dx is not None else _empty(device).to(x.dtype), dw, x_f8, w_f8, torch.stack([xs, ws]))


def _finish_dw(dw_acc, D: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The fp32 dW accumulator [V, Dp] as the weight's gradient [V, D] (an empty tensor when none was asked)."""
    if dw_acc is None:
        return _empty(device).to(dtype)
    return dw_acc if dw_acc.shape[1] == D and dtype == torch.float32 else dw_acc[:, :D].to(dtype)


def chunked_backward(stages: Stages, row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale,
                     grad_scale, ignore_index, need_dx, need_dw, x_dtype, w_dtype, rounding, *, chunk_rows=None,
                     chunk_bytes=CHUNK_BYTES):
    """reduction "none" on a fast backend: recompute each chunk's logits, then as the forward's gradient part."""
    T, D = x_f8.shape
    V = w_f8.shape[0]
    device = x_f8.device
    Dp, Vp, T16 = _pad16(D), _pad16(V), _pad16(T)
    xs, ws = used_scales[0], used_scales[1]
    x8 = _padded_fp8(x_f8, (T, Dp))
    w8 = _padded_fp8(w_f8, (Vp, Dp))
    x8t = _padded_fp8_t(x_f8, (Dp, T16)) if need_dw else None
    w8t = _padded_fp8_t(w_f8, (Dp, Vp)) if need_dx else None
    gs = grad_scale_tensor(grad_scale, row_grad, logit_scale)
    dx = stages.alloc((T, D), x_dtype, device) if need_dx else None
    dw_acc = stages.alloc((V, Dp), torch.float32, device) if need_dw else None
    _run_chunks(stages, x8, w8, x8t, w8t, xs, ws, targets, T, D, V, row_loss=None, lse=lse, lse_in=True,
                row_grad=row_grad, g0=None, gs=gs, dx=dx, dw_acc=dw_acc, rounding=rounding, softcap=softcap,
                logit_scale=logit_scale, ignore_index=ignore_index, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes)
    dw = _finish_dw(dw_acc, D, w_dtype, device)
    return dx if dx is not None else _empty(device).to(x_dtype), dw


# ---------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------

def _impl(backend: str, name: str):
    if backend == "reference":
        return reference_forward if name == "forward" else reference_backward
    return getattr(load_impl(backend, "fp8_head"), name)


@torch.library.custom_op("kernels::fp8_head_loss", mutates_args=())
def _fp8_head_loss_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                      logit_scale: float, x_scale: float | None, w_scale: float | None, grad_scale: float | None,
                      ignore_index: int, reduction: str, need_dx: bool, need_dw: bool, rounding: str, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """-> (loss, lse [T], dx, dw, x_bytes, w_bytes, used_scales [2]).

    loss: 0-dim for "sum"/"mean", [T] for "none". dx [T, D] / dw [V, D] (x's / weight's dtype):
    the gradients for upstream 1, computed when reduction is "sum"/"mean" and need_dx / need_dw,
    else empty. x_bytes / w_bytes: the e4m3 operands as raw bytes, kept only for the recomputing
    backward of "none" (else empty): several torch utilities that handle op outputs (opcheck
    among them) have no float8 kernels.
    """
    check_target_values(targets, weight.size(0), ignore_index)
    loss, lse, dx, dw, x_f8, w_f8, used = _impl(backend, "forward")(
        x, weight, targets, softcap, logit_scale, x_scale, w_scale, grad_scale, ignore_index, reduction, need_dx,
        need_dw, rounding)
    return loss, lse, dx, dw, x_f8.view(torch.uint8), w_f8.view(torch.uint8), used


@_fp8_head_loss_op.register_fake
def _(x, weight, targets, softcap, logit_scale, x_scale, w_scale, grad_scale, ignore_index, reduction, need_dx,
      need_dw, rounding, backend):
    T, V = x.size(0), weight.size(0)
    grads = reduction != "none"
    keep = reduction == "none" and (need_dx or need_dw)
    loss = x.new_empty((T,) if reduction == "none" else (), dtype=torch.float32)
    return (loss, x.new_empty((T,), dtype=torch.float32),
            torch.empty_like(x) if grads and need_dx else x.new_empty((0,)),
            torch.empty_like(weight) if grads and need_dw else weight.new_empty((0,)),
            torch.empty_like(x, dtype=torch.uint8) if keep else x.new_empty((0,), dtype=torch.uint8),
            torch.empty_like(weight, dtype=torch.uint8) if keep else x.new_empty((0,), dtype=torch.uint8),
            x.new_empty((2,), dtype=torch.float32))


@torch.library.custom_op("kernels::fp8_head_loss_backward", mutates_args=())
def _fp8_head_loss_backward_op(row_grad: torch.Tensor, x_bytes: torch.Tensor, w_bytes: torch.Tensor,
                               targets: torch.Tensor, lse: torch.Tensor, used_scales: torch.Tensor, softcap: float,
                               logit_scale: float, grad_scale: float | None, ignore_index: int, need_dx: bool,
                               need_dw: bool, x_dtype: torch.dtype, w_dtype: torch.dtype, rounding: str,
                               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction "none": (dx, dw) for per-row upstream gradients, recomputing the logits chunk by chunk."""
    row_grad = torch.where(targets != ignore_index, row_grad.float(), 0.0)  # backends may assume this
    x_f8, w_f8 = x_bytes.view(torch.float8_e4m3fn), w_bytes.view(torch.float8_e4m3fn)
    return _impl(backend, "backward")(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale,
                                      grad_scale, ignore_index, need_dx, need_dw, x_dtype, w_dtype, rounding)


@_fp8_head_loss_backward_op.register_fake
def _(row_grad, x_bytes, w_bytes, targets, lse, used_scales, softcap, logit_scale, grad_scale, ignore_index, need_dx,
      need_dw, x_dtype, w_dtype, rounding, backend):
    return (torch.empty_like(x_bytes, dtype=x_dtype) if need_dx else x_bytes.new_empty((0,), dtype=x_dtype),
            torch.empty_like(w_bytes, dtype=w_dtype) if need_dw else w_bytes.new_empty((0,), dtype=w_dtype))


_INPUT_NAMES = ("x", "weight", "targets", "softcap", "logit_scale", "x_scale", "w_scale", "grad_scale",
                "ignore_index", "reduction", "need_dx", "need_dw", "rounding", "backend")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_INPUT_NAMES, inputs))
    _loss, lse, dx, dw, x_bytes, w_bytes, used = output
    ctx.mark_non_differentiable(lse, dx, dw, x_bytes, w_bytes, used)
    for name in ("softcap", "logit_scale", "grad_scale", "ignore_index", "reduction", "need_dx", "need_dw",
                 "rounding", "backend"):
        setattr(ctx, name, args[name])
    ctx.dtypes = (args["x"].dtype, args["weight"].dtype)
    if args["reduction"] == "none":
        ctx.save_for_backward(x_bytes, w_bytes, args["targets"], lse, used)
    else:
        ctx.save_for_backward(dx, dw)


def _missing_gradient(name: str):
    flag = "need_dx" if name == "x" else "need_dw"
    raise RuntimeError(f"fp8_head_loss: the forward ran with {flag}=False and kept no gradient for {name}; "
                       f"call it with {flag}=True (the public function does when {name} requires grad and grad "
                       "mode is on)")


def _backward(ctx, grad_loss, *_unused_grads):
    want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if (want_dx and not ctx.need_dx) or (want_dw and not ctx.need_dw):
        _missing_gradient("x" if want_dx and not ctx.need_dx else "weight")
    if ctx.reduction != "none":
        dx_unit, dw_unit = ctx.saved_tensors
        dx = dx_unit * grad_loss if want_dx else None  # a 0-dim fp32 factor keeps dx_unit's dtype
        dw = dw_unit * grad_loss if want_dw else None
    else:
        x_bytes, w_bytes, targets, lse, used = ctx.saved_tensors
        dx, dw = _fp8_head_loss_backward_op(grad_loss.contiguous(), x_bytes, w_bytes, targets, lse, used, ctx.softcap,
                                            ctx.logit_scale, ctx.grad_scale, ctx.ignore_index, ctx.need_dx,
                                            ctx.need_dw, *ctx.dtypes, ctx.rounding, ctx.backend)
        dx, dw = (dx if want_dx else None), (dw if want_dw else None)
    return (dx, dw) + (None,) * (len(_INPUT_NAMES) - 2)


_fp8_head_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------

def _check_scales(scales, T: int, D: int, V: int):
    """(x_scale, w_scale, grad_scale) floats, or Nones; each and the products the kernels form fit fp32."""
    if scales is None:
        return None, None, None
    if not isinstance(scales, (tuple, list)) or len(scales) != 3:
        raise ValueError(f"scales: expected None or a (x_scale, w_scale, grad_scale) tuple, got {scales!r}")
    xs, ws, gs = (check_positive_fp32(f"scales[{i}] ({name})", s)
                  for i, (name, s) in enumerate(zip(("x_scale", "w_scale", "grad_scale"), scales)))
    # The largest |logit| is D·448²·x_scale·w_scale; |dx| <= V·57344·448·grad_scale·w_scale, |dW| likewise over T.
    for what, low, high in (("x_scale·w_scale (the logits' scale)", xs * ws, D * E4M3_MAX**2 * xs * ws),
                            ("grad_scale·w_scale (dx's scale)", gs * ws, V * E5M2_MAX * E4M3_MAX * gs * ws),
                            ("grad_scale·x_scale (dW's scale)", gs * xs, max(T, 1) * E5M2_MAX * E4M3_MAX * gs * xs)):
        if low < FP32_TINY:
            raise ValueError(f"scales: {what} = {low:.4g} underflows float32")
        if high > FP32_MAX:
            raise ValueError(f"scales: {what} = {low:.4g} lets the results reach {high:.4g}, beyond float32's "
                             f"{FP32_MAX:.4g}")
    return xs, ws, gs


def fp8_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 15.0,
                  logit_scale: float = 1.0, scales=None, reduction: str = "mean", ignore_index: int = -100,
                  backend: str | None = None, rounding: str = "fp32") -> torch.Tensor:
    """Cross-entropy of softcapped FP8 logits x·weightᵀ, never holding all [T, V] logits.

    x [T, D] and weight [V, D] (fp32, bf16 or fp16; V may exceed the largest
    target, e.g. 50304 for 50257 tokens); targets [T] (int64/int32) in
    [0, V) or ignore_index. scales: (x_scale, w_scale, grad_scale) static
    per-tensor scales (the speedrun's: ``SPEEDRUN_SCALES``), or None for
    dynamic ones (amax/448 for x and weight, a bound of the gradient for the
    logits' gradient). reduction: "mean", "sum" or "none" as in
    softcap_cross_entropy. rounding: "fp32" or "record" (module docstring).
    Gradients flow to x and weight; for "sum" and "mean" they are computed in
    this call when grad mode is on and x or weight requires grad.
    """
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    check_tensor("targets", targets, INDEX_DTYPES, ndim=1)
    if x.size(1) == 0:
        raise ValueError(f"x: D (the feature dim) must be at least 1, got shape {tuple(x.shape)}")
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
    softcap, logit_scale = _ce.check_softcap_args(softcap, logit_scale)
    x_scale, w_scale, grad_scale = _check_scales(scales, x.size(0), x.size(1), weight.size(0))
    check_choice("reduction", reduction, _ce.REDUCTIONS)
    check_choice("rounding", rounding, ROUNDINGS)
    ignore_index = check_int("ignore_index", ignore_index)
    backend = resolve_backend("fp8_head", backend, x.device)
    if x.size(0) == 0:
        backend = "reference"  # nothing to launch; keeps empty batches out of the kernels
    grad_mode = torch.is_grad_enabled()
    outputs = _fp8_head_loss_op(x.contiguous(), weight.contiguous(), targets.long().contiguous(), softcap,
                                logit_scale, x_scale, w_scale, grad_scale, ignore_index, reduction,
                                grad_mode and x.requires_grad, grad_mode and weight.requires_grad, rounding,
                                backend)
    return outputs[0]
