"""Triton backend of fp8_head_loss: FP8 lm-head + softcapped cross-entropy, logits never materialised.

Fused path (``forward`` / ``backward``, what backend="triton" runs):

    quantise  x, W -> e4m3            static scale, or amax/448 (an atomic-max pass, then a cast pass;
                                      the cast reads the amax on the device: no host sync)
    forward   grid (row blocks, V splits). Each program walks its V range in [BLOCK_T, BLOCK_V]
              logit tiles (FP8 tl.dot, fp32 accumulation over D), softcaps each tile and folds it
              into a per-row running max, sum of exp(z - max) and the target's z. A combine kernel
              merges the splits into lse and the row loss. The split over V keeps the GPU busy
              when T is small (T = 1 still gives S programs); with T = 48K it is 1.
    backward  two kernels, each recomputing the logit tiles:
                dx kernel, grid (row blocks, D groups): loops over all V, forms the e5m2 dlogits
                    tile in registers and accumulates dl·W[:, D group] in registers;
                dW kernel, grid (V blocks, D groups): loops over all T, accumulates dlᵀ·x.
              A D group is NUM_ACC chunks of BLOCK_D columns, each its own register accumulator.

Why two recomputing kernels and not atomics: every program owns its output tile, so there is no
[T, V] buffer, no fp32 scratch for dx/dW, no atomics (deterministic results), and the outputs are
written once, already scaled and cast. The alternative, one kernel per (row block, V block) tile
adding dl·W and dlᵀ·x into fp32 dx/dW with atomics, recomputes the logits once instead of twice
but issues T·V·D·(1/BLOCK_V + 1/BLOCK_T) fp32 atomic adds (3e10, 120 GB, at T = 48K, V = 50304,
D = 768 and 128² tiles): far more L2 traffic than the extra recompute. The price here is the
recompute: the logits are recomputed once per D group in each kernel, so the backward costs
(2·ceil(D / (NUM_ACC·BLOCK_D)) + 2) logit-GEMM equivalents; covering D with one group (NUM_ACC·
BLOCK_D >= D) makes it 4, at the cost of NUM_ACC·BLOCK_D fp32 accumulators per row of the tile.
The GPU block sizes below are untested guesses: measure before trusting them.

Materialised path (``forward_materialized`` / ``backward_materialized``, for comparison): FP8
matmul to bf16 logits [T, V] (torch._scaled_mm on CUDA when its shape rules allow, else the
Triton FP8 matmul below), then one pass per row over the logits: lse and loss in the forward;
in the backward (which recomputes the logits, since the contract saves only lse and the
quantised operands) one pass that writes the e5m2 dlogits, then two FP8 matmuls for dx and dW.
``softcap_ce_fwd_bwd_materialized`` does loss and e5m2 dlogits in one launch when the row
gradient is known up front.

Numerics follow kernels/fp8_head.py (reference_forward / reference_backward):
  * q = t / scale (IEEE division), finite values saturated to ±448 (e4m3) / ±57344 (e5m2),
    non-finite -> NaN, round to nearest even (the hardware cast, cvt.rn.satfinite, on a GPU).
  * Interpreter workarounds (constexpr INTERPRET, set for CPU tensors; none of it is compiled for
    a GPU): its fp32->fp8 and fp32->bf16 casts do not round to nearest even (fp8 double-rounds,
    bf16 truncates), so values are first rounded onto the target grid here; its fp8 decoding
    turns e4m3fn NaN into 480 (and e5m2 NaN/Inf into finite values), which would make a NaN
    input vanish in tl.dot, so fp8 operands are decoded to fp32 with the special codes fixed and
    multiplied in fp32 (exact there), and the e5m2 dlogits stay fp32 values on the e5m2 grid.
  * dynamic scales: amax(|t|)/448, 1.0 unless amax > 0 (so a NaN amax also gives 1.0, as in the
    reference); the dynamic gradient scale is max|row_grad|·logit_scale/57344.
  * dlogits are multiplied by 1/grad_scale instead of divided by grad_scale (one division per
    program instead of one per element); the two can differ in the last fp32 bit, which moves a
    value across an e5m2 rounding boundary only rarely.
  * tanh(u) = sign(u)·(1 - e)/(1 + e), e = exp(-2|u|) (no libdevice in the interpreter, no
    overflow for large |u|), and 1 - tanh² = 4e/(1 + e)², exact near |tanh| = 1.

Order: device helpers -> kernels -> launchers -> backend entry points.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.triton_impl._tiles import grouped_tile

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------

@triton.jit
def _round_to_fp8_grid(q, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    # Round fp32 q (|q| within the format's range) to the nearest value of an fp8 format with
    # MANT_BITS mantissa bits and smallest normal exponent MIN_EXP, ties to even, staying in fp32.
    # The spacing of the format around q is 2^(max(exponent(q), MIN_EXP) - MANT_BITS).
    e = ((q.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_EXP) - MANT_BITS
    quantum = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - e) << 23).to(tl.float32, bitcast=True)
    y = q * inv_quantum  # exact (a power of two); |y| < 2^(MANT_BITS + 1)
    # Adding 1.5·2²³ leaves no fractional bits, so fp32 rounds y to an integer, ties to even.
    r = ((y + 12582912.0) - 12582912.0) * quantum
    return tl.where(r == 0.0, q * 0.0, r)  # q·0 keeps the sign of zero


@triton.jit
def _round_to_bf16_grid(x):
    # fp32 -> nearest bf16 value (ties to even), still fp32: the interpreter's bf16 cast truncates.
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 = 0xFFFF0000: NaN and ±inf survive
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp8_as_f32(t):
    # Interpreter only: it decodes e4m3fn's NaN as 480 and e5m2's NaN / Inf as large finite values,
    # so a NaN operand would vanish from the dot. Decode to fp32 with the special codes fixed.
    code = t.to(tl.uint8, bitcast=True) & 0x7F
    if t.dtype == tl.float8e4nv:
        special = code == 0x7F
        special_value = float("nan")
    else:
        special = code >= 0x7C
        special_value = tl.where(code == 0x7C, float("inf"), float("nan"))
    value = t.to(tl.float32)
    magnitude = tl.where(special, special_value, tl.abs(value))
    return tl.where((t.to(tl.uint8, bitcast=True) & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _saturate_round(q, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
                    INTERPRET: tl.constexpr):
    # The contract's quantisation before the cast: finite values clamped to ±FP8_MAX, anything
    # else NaN (abs(NaN) < inf is False).
    finite = tl.abs(q) < float("inf")
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    if INTERPRET:
        q = _round_to_fp8_grid(q, MANT_BITS, MIN_EXP)
    return tl.where(finite, q, float("nan"))


@triton.jit
def _tanh_parts(u):
    # (tanh(u), e = exp(-2|u|)); e ∈ (0, 1] never overflows and gives 1 - tanh² = 4e/(1 + e)².
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t), e


@triton.jit
def _grad_scale_value(rg_amax_ptr, grad_scale, logit_scale, DYNAMIC_GS: tl.constexpr):
    # The e5m2 scale of the logits' gradient: static, or max|row_grad|·logit_scale/57344
    # (an upper bound of |dlogits| that needs no pass over them), 1.0 unless that is > 0.
    if DYNAMIC_GS:
        bound = tl.load(rg_amax_ptr) * logit_scale
        gs = tl.where(bound > 0.0, tl.math.div_rn(bound, tl.full((), 57344.0, tl.float32)), 1.0)
    else:
        gs = grad_scale
    return gs


@triton.jit
def _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 INTERPRET: tl.constexpr):
    # x_f8[rows, :] · w_f8[cols, :]ᵀ as [BLOCK_T, BLOCK_V] fp32, unscaled. Both operands are read
    # K-major, the layout FP8 wgmma wants.
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < D - k
            a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if INTERPRET:
            a = _fp8_as_f32(a)
            b = _fp8_as_f32(b)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _dlogits_e5m2(logits, cols, tgt, lse, rg, valid, softcap, u_scale, logit_scale, inv_gs,
                  INTERPRET: tl.constexpr):
    # dlogits = row_grad·(softmax(z) - onehot)·logit_scale·(1 - tanh²), quantised: ·(1/grad_scale),
    # saturated and cast to e5m2. `valid` zeroes padding rows and columns.
    t, e = _tanh_parts(logits * u_scale)
    p = tl.exp(softcap * t - lse[:, None])
    dz = tl.where(cols[None, :] == tgt[:, None], p - 1.0, p) * rg[:, None]
    one_plus_e = 1.0 + e
    dl = dz * (logit_scale * (4.0 * e / (one_plus_e * one_plus_e)))
    q = tl.where(valid, _saturate_round(dl * inv_gs, 57344.0, 2, -14, INTERPRET), 0.0)
    if not INTERPRET:
        q = q.to(tl.float8e5)
    return q  # interpreter: fp32 values on the e5m2 grid, so NaN survives the dot


@triton.jit
def _accumulate(acc, a, b_ptr, b_rows, b_row_mask, d_start, D, stride_b,
                BLOCK_D: tl.constexpr, DOT_FP16: tl.constexpr, INTERPRET: tl.constexpr):
    # acc += a · b[b_rows, d_start : d_start + BLOCK_D], a the e5m2 dlogits tile from _dlogits_e5m2.
    offs_d = d_start + tl.arange(0, BLOCK_D)
    b = tl.load(b_ptr + b_rows.to(tl.int64)[:, None] * stride_b + offs_d[None, :],
                mask=b_row_mask[:, None] & (offs_d < D)[None, :], other=0.0)
    if INTERPRET:
        acc = tl.dot(a, _fp8_as_f32(b), acc)
    elif DOT_FP16:
        # Both fp8 formats are exact in fp16; for GPUs whose FP8 MMA wants K-major B.
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _store_chunk(out_ptr, acc, out_rows, out_row_mask, d_start, D, stride_out, BLOCK_D: tl.constexpr,
                 ROUND_BF16: tl.constexpr):
    offs_d = d_start + tl.arange(0, BLOCK_D)
    if ROUND_BF16:
        acc = _round_to_bf16_grid(acc)
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * stride_out + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_row_mask[:, None] & (offs_d < D)[None, :])


# ---------------------------------------------------------------------------
# Kernels: quantisation
# ---------------------------------------------------------------------------

@triton.jit
def _absmax_kernel(
    # amax_ptr[0] = max(amax_ptr[0], max|src|); amax_ptr starts at 0
    src_ptr, amax_ptr,
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a = tl.abs(tl.load(src_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32))
    # A NaN must win (the reference's amax is NaN then): the block max may drop it, the
    # float atomic max (an integer max on the bit pattern for values >= 0) keeps it.
    has_nan = tl.max((a != a).to(tl.int32), axis=0)
    block_max = tl.max(tl.where(a != a, 0.0, a), axis=0)
    block_max = tl.where(has_nan > 0, float("nan"), block_max)
    tl.atomic_max(amax_ptr, block_max)


@triton.jit
def _quantize_e4m3_kernel(
    # dst = e4m3(src / scale) as raw codes; used_scale_ptr[0] = the scale
    src_ptr, dst_ptr,  # dst: the uint8 view of a float8_e4m3fn tensor
    amax_ptr, used_scale_ptr,
    static_scale,      # used when not DYNAMIC
    numel,
    DYNAMIC: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if DYNAMIC:
        amax = tl.load(amax_ptr)
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, tl.full((), 448.0, tl.float32)), 1.0)
    else:
        scale = static_scale
    if pid == 0:
        tl.store(used_scale_ptr, scale)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    t = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = _saturate_round(tl.math.div_rn(t, tl.broadcast_to(scale, (BLOCK,))), 448.0, 3, -6, INTERPRET)
    code = q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    code = tl.where(q != q, 0x7F, code)  # e4m3fn's NaN; the interpreter's cast gives 384 instead
    tl.store(dst_ptr + offs, code, mask=mask)


# ---------------------------------------------------------------------------
# Kernels: fused forward
# ---------------------------------------------------------------------------

@triton.jit
def _fwd_partial_kernel(
    # operands: x_f8 [T, D], w_f8 [V, D] (e4m3, rows contiguous), targets [T] int64, scales [2] fp32
    x_ptr, w_ptr, tgt_ptr, scales_ptr,
    # outputs [num_splits, T] fp32: running max of z, sum of exp(z - max), target z (0 outside the split)
    m_ptr, s_ptr, zt_ptr,
    T, V, D,
    stride_x, stride_w,
    cols_per_split,     # a multiple of BLOCK_V
    softcap, u_scale,   # z = softcap·tanh(u_scale·logits), u_scale = logit_scale/softcap
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    scale = tl.load(scales_ptr) * tl.load(scales_ptr + 1)

    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    zt = tl.zeros((BLOCK_T,), tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, V)
    for v in range(col_start, col_end, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < col_end
        logits = _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                              BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, INTERPRET) * scale
        t, _e = _tanh_parts(logits * u_scale)
        z = tl.where(col_mask[None, :], softcap * t, float("-inf"))
        # Online logsumexp. Every tile has a valid column, so m_new is finite unless z is NaN,
        # and a NaN z reaches s either way.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)

    offs = pid_s * T + rows
    tl.store(m_ptr + offs, m, mask=row_mask)
    tl.store(s_ptr + offs, s, mask=row_mask)
    tl.store(zt_ptr + offs, zt, mask=row_mask)


@triton.jit
def _fwd_combine_kernel(
    # merge the V splits: lse = logsumexp over splits, row_loss = lse - z[target] (0 if ignored)
    m_ptr, s_ptr, zt_ptr, tgt_ptr,
    lse_ptr, loss_ptr,
    T, num_splits, ignore_index,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < T
    big_m = tl.full((BLOCK,), float("-inf"), tl.float32)
    big_s = tl.zeros((BLOCK,), tl.float32)
    zt = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, num_splits):
        m_i = tl.load(m_ptr + i * T + rows, mask=mask, other=0.0)
        s_i = tl.load(s_ptr + i * T + rows, mask=mask, other=1.0)
        m_new = tl.maximum(big_m, m_i)
        big_s = big_s * tl.exp(big_m - m_new) + s_i * tl.exp(m_i - m_new)
        big_m = m_new
        zt += tl.load(zt_ptr + i * T + rows, mask=mask, other=0.0)
    lse = big_m + tl.log(big_s)
    tgt = tl.load(tgt_ptr + rows, mask=mask, other=ignore_index)
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(loss_ptr + rows, tl.where(tgt != ignore_index, lse - zt, 0.0), mask=mask)


# ---------------------------------------------------------------------------
# Kernels: fused backward
# ---------------------------------------------------------------------------

@triton.jit
def _bwd_dx_kernel(
    # operands: x_f8 [T, D], w_f8 [V, D] (e4m3), targets [T], lse [T], row_grad [T] (0 at ignored rows),
    # scales [2] = (x_scale, w_scale), rg_amax [1] = max|row_grad| (read when DYNAMIC_GS)
    x_ptr, w_ptr, tgt_ptr, lse_ptr, rg_ptr, scales_ptr, rg_amax_ptr,
    # output: dx [T, D] in x's dtype
    dx_ptr,
    T, V, D,
    stride_x, stride_w, stride_dx,
    softcap, u_scale, logit_scale, grad_scale,
    DYNAMIC_GS: tl.constexpr, INTERPRET: tl.constexpr, DOT_FP16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_ACC: tl.constexpr,  # this program's dx columns: NUM_ACC chunks of BLOCK_D
    ROUND_BF16: tl.constexpr,  # interpreter with a bf16 output: round to nearest even before the cast
):
    pid_t = tl.program_id(0)
    d0 = tl.program_id(1) * (NUM_ACC * BLOCK_D)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    rg = tl.load(rg_ptr + rows, mask=row_mask, other=0.0)
    x_scale = tl.load(scales_ptr)
    w_scale = tl.load(scales_ptr + 1)
    gs = _grad_scale_value(rg_amax_ptr, grad_scale, logit_scale, DYNAMIC_GS)
    inv_gs = tl.math.div_rn(tl.full((), 1.0, tl.float32), gs)

    acc0 = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    acc1 = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    acc2 = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    acc3 = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for v in range(0, V, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logits = _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                              BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, INTERPRET) * (x_scale * w_scale)
        dl = _dlogits_e5m2(logits, cols, tgt, lse, rg, row_mask[:, None] & col_mask[None, :],
                           softcap, u_scale, logit_scale, inv_gs, INTERPRET)
        acc0 = _accumulate(acc0, dl, w_ptr, cols, col_mask, d0, D, stride_w, BLOCK_D, DOT_FP16, INTERPRET)
        if NUM_ACC > 1:
            acc1 = _accumulate(acc1, dl, w_ptr, cols, col_mask, d0 + BLOCK_D, D, stride_w, BLOCK_D, DOT_FP16, INTERPRET)
        if NUM_ACC > 2:
            acc2 = _accumulate(acc2, dl, w_ptr, cols, col_mask, d0 + 2 * BLOCK_D, D, stride_w,
                               BLOCK_D, DOT_FP16, INTERPRET)
        if NUM_ACC > 3:
            acc3 = _accumulate(acc3, dl, w_ptr, cols, col_mask, d0 + 3 * BLOCK_D, D, stride_w,
                               BLOCK_D, DOT_FP16, INTERPRET)

    out_scale = gs * w_scale
    _store_chunk(dx_ptr, acc0 * out_scale, rows, row_mask, d0, D, stride_dx, BLOCK_D, ROUND_BF16)
    if NUM_ACC > 1:
        _store_chunk(dx_ptr, acc1 * out_scale, rows, row_mask, d0 + BLOCK_D, D, stride_dx, BLOCK_D, ROUND_BF16)
    if NUM_ACC > 2:
        _store_chunk(dx_ptr, acc2 * out_scale, rows, row_mask, d0 + 2 * BLOCK_D, D, stride_dx, BLOCK_D, ROUND_BF16)
    if NUM_ACC > 3:
        _store_chunk(dx_ptr, acc3 * out_scale, rows, row_mask, d0 + 3 * BLOCK_D, D, stride_dx, BLOCK_D, ROUND_BF16)


@triton.jit
def _bwd_dw_kernel(
    # operands as in _bwd_dx_kernel
    x_ptr, w_ptr, tgt_ptr, lse_ptr, rg_ptr, scales_ptr, rg_amax_ptr,
    # output: dw [V, D] in weight's dtype
    dw_ptr,
    T, V, D,
    stride_x, stride_w, stride_dw,
    softcap, u_scale, logit_scale, grad_scale,
    DYNAMIC_GS: tl.constexpr, INTERPRET: tl.constexpr, DOT_FP16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_ACC: tl.constexpr,  # this program's dw columns: NUM_ACC chunks of BLOCK_D
    ROUND_BF16: tl.constexpr,  # interpreter with a bf16 output: round to nearest even before the cast
):
    pid_v = tl.program_id(0)
    d0 = tl.program_id(1) * (NUM_ACC * BLOCK_D)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    x_scale = tl.load(scales_ptr)
    w_scale = tl.load(scales_ptr + 1)
    gs = _grad_scale_value(rg_amax_ptr, grad_scale, logit_scale, DYNAMIC_GS)
    inv_gs = tl.math.div_rn(tl.full((), 1.0, tl.float32), gs)

    acc0 = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    acc1 = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    acc2 = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    acc3 = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        rg = tl.load(rg_ptr + rows, mask=row_mask, other=0.0)
        logits = _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                              BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, INTERPRET) * (x_scale * w_scale)
        dl = _dlogits_e5m2(logits, cols, tgt, lse, rg, row_mask[:, None] & col_mask[None, :],
                           softcap, u_scale, logit_scale, inv_gs, INTERPRET)
        dl_t = tl.trans(dl)
        acc0 = _accumulate(acc0, dl_t, x_ptr, rows, row_mask, d0, D, stride_x, BLOCK_D, DOT_FP16, INTERPRET)
        if NUM_ACC > 1:
            acc1 = _accumulate(acc1, dl_t, x_ptr, rows, row_mask, d0 + BLOCK_D, D, stride_x,
                               BLOCK_D, DOT_FP16, INTERPRET)
        if NUM_ACC > 2:
            acc2 = _accumulate(acc2, dl_t, x_ptr, rows, row_mask, d0 + 2 * BLOCK_D, D, stride_x,
                               BLOCK_D, DOT_FP16, INTERPRET)
        if NUM_ACC > 3:
            acc3 = _accumulate(acc3, dl_t, x_ptr, rows, row_mask, d0 + 3 * BLOCK_D, D, stride_x,
                               BLOCK_D, DOT_FP16, INTERPRET)

    out_scale = gs * x_scale
    _store_chunk(dw_ptr, acc0 * out_scale, cols, col_mask, d0, D, stride_dw, BLOCK_D, ROUND_BF16)
    if NUM_ACC > 1:
        _store_chunk(dw_ptr, acc1 * out_scale, cols, col_mask, d0 + BLOCK_D, D, stride_dw, BLOCK_D, ROUND_BF16)
    if NUM_ACC > 2:
        _store_chunk(dw_ptr, acc2 * out_scale, cols, col_mask, d0 + 2 * BLOCK_D, D, stride_dw, BLOCK_D, ROUND_BF16)
    if NUM_ACC > 3:
        _store_chunk(dw_ptr, acc3 * out_scale, cols, col_mask, d0 + 3 * BLOCK_D, D, stride_dw, BLOCK_D, ROUND_BF16)


# ---------------------------------------------------------------------------
# Kernels: materialised path
# ---------------------------------------------------------------------------

@triton.jit
def _fp8_matmul_kernel(
    # C[M, N] = (A[M, K]·B[K, N])·scale_a·scale_b, fp8 operands (any strides), fp32 accumulation
    a_ptr, b_ptr, c_ptr,
    scale_a_ptr, scale_b_ptr,  # fp32 scalars on the device
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # interpreter with a bf16 output: round to nearest even before the cast
    INTERPRET: tl.constexpr,   # decode the fp8 operands to fp32 (NaN codes fixed) before the dot
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
        if INTERPRET:
            a = _fp8_as_f32(a)
            b = _fp8_as_f32(b)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = acc * (tl.load(scale_a_ptr) * tl.load(scale_b_ptr))
    if ROUND_BF16:
        acc = _round_to_bf16_grid(acc)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _ce_rows_kernel(
    # one program per row of materialised logits [T, V] (any float dtype)
    logits_ptr, tgt_ptr, rg_ptr, rg_amax_ptr,
    # outputs: lse [T], row_loss [T] (COMPUTE_LSE; else lse is read), dl [T, V] e5m2, gs [1] (WRITE_GRAD)
    lse_ptr, loss_ptr, dl_ptr, gs_out_ptr,
    V, stride_l, stride_dl,
    ignore_index, softcap, u_scale, logit_scale, grad_scale,
    COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, DYNAMIC_GS: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_logits = logits_ptr + row.to(tl.int64) * stride_l
    tgt = tl.load(tgt_ptr + row)
    if COMPUTE_LSE:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for v in range(0, V, BLOCK_V):
            cols = v + tl.arange(0, BLOCK_V)
            logits = tl.load(row_logits + cols, mask=cols < V, other=0.0).to(tl.float32)
            t, _e = _tanh_parts(logits * u_scale)
            z = tl.where(cols < V, softcap * t, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = tgt != ignore_index
        t_tgt, _e = _tanh_parts(tl.load(row_logits + tl.where(valid, tgt, 0)).to(tl.float32) * u_scale)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(valid, lse - softcap * t_tgt, 0.0))
    else:
        lse = tl.load(lse_ptr + row)
    if WRITE_GRAD:
        gs = _grad_scale_value(rg_amax_ptr, grad_scale, logit_scale, DYNAMIC_GS)
        if row == 0:
            tl.store(gs_out_ptr, gs)
        inv_gs = tl.math.div_rn(tl.full((), 1.0, tl.float32), gs)
        tgt_1 = tl.zeros((1,), tl.int64) + tgt
        lse_1 = tl.zeros((1,), tl.float32) + lse
        rg_1 = tl.zeros((1,), tl.float32) + tl.load(rg_ptr + row)
        row_dl = dl_ptr + row.to(tl.int64) * stride_dl
        for v in range(0, V, BLOCK_V):
            cols = v + tl.arange(0, BLOCK_V)
            logits = tl.load(row_logits + cols, mask=cols < V, other=0.0).to(tl.float32)
            # as a [1, BLOCK_V] tile, the shape the shared helper works on
            dl = _dlogits_e5m2(logits[None, :], cols, tgt_1, lse_1, rg_1, (cols < V)[None, :],
                               softcap, u_scale, logit_scale, inv_gs, INTERPRET)
            tl.store(row_dl + cols[None, :], dl.to(dl_ptr.dtype.element_ty), mask=(cols < V)[None, :])


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# GPU guesses, not measured (no GPU in the session that wrote them). FP8 tl.dot needs every K
# extent (BLOCK_K for the logits, BLOCK_V in dx, BLOCK_T in dW) >= 32. Register budget of the
# backward accumulators: NUM_ACC·BLOCK_D fp32 per tile row, e.g. 64 rows x 3 x 128 = 96 KiB,
# 96 registers per thread at 8 warps.
_CONFIGS_GPU = {
    "forward": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_K=128, num_warps=8, num_stages=3),
    "dx": dict(BLOCK_T=64, BLOCK_V=64, BLOCK_K=128, BLOCK_D=128, NUM_ACC=3, DOT_FP16=False,
               num_warps=8, num_stages=2),
    "dw": dict(BLOCK_T=64, BLOCK_V=64, BLOCK_K=128, BLOCK_D=128, NUM_ACC=3, DOT_FP16=False,
               num_warps=8, num_stages=2),
    "matmul": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    "rows": dict(BLOCK_V=2048, num_warps=8),
    "quantize": dict(BLOCK=4096, num_warps=8),
    # The forward splits V until it has this many programs (None: SMs x split_programs_per_sm).
    "split_programs": None,
    "split_programs_per_sm": 2,
}
# Interpreter: small tiles so that odd test shapes span several tiles, D chunks and V splits.
_CONFIGS_INTERPRET = {
    "forward": dict(BLOCK_T=32, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "dx": dict(BLOCK_T=32, BLOCK_V=32, BLOCK_K=32, BLOCK_D=16, NUM_ACC=2, DOT_FP16=False,
               num_warps=4, num_stages=1),
    "dw": dict(BLOCK_T=32, BLOCK_V=32, BLOCK_K=32, BLOCK_D=16, NUM_ACC=2, DOT_FP16=False,
               num_warps=4, num_stages=1),
    "matmul": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
    "rows": dict(BLOCK_V=64, num_warps=4),
    "quantize": dict(BLOCK=256, num_warps=4),
    "split_programs": 4,
    "split_programs_per_sm": 2,
}

# The materialised path multiplies with torch._scaled_mm on CUDA when the shapes allow it.
USE_SCALED_MM = True


def get_config(device: torch.device, overrides: dict | None = None) -> dict:
    """The launch table for ``device``, with ``overrides`` ({"dx": {"NUM_ACC": 1}, ...}) merged in."""
    base = _CONFIGS_INTERPRET if device.type == "cpu" else _CONFIGS_GPU
    config = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in (overrides or {}).items():
        if key not in config:
            raise ValueError(f"config: unknown key {key!r}; expected one of {', '.join(sorted(config))}")
        if isinstance(config[key], dict):
            if not isinstance(value, dict):
                raise TypeError(f"config[{key!r}]: expected a dict, got {type(value).__name__}")
            unknown = set(value) - set(config[key])
            if unknown:
                raise ValueError(f"config[{key!r}]: unknown keys {sorted(unknown)}; "
                                 f"expected some of {sorted(config[key])}")
            config[key].update(value)
        else:
            config[key] = value
    # Dot extents along K: FP8 tl.dot needs >= 32 on a GPU, fp16 (DOT_FP16) >= 16.
    for kernel, k_dims in (("forward", ("BLOCK_K",)), ("dx", ("BLOCK_K", "BLOCK_V")), ("dw", ("BLOCK_K", "BLOCK_T"))):
        for dim in k_dims:
            smallest = 16 if dim != "BLOCK_K" and config[kernel].get("DOT_FP16") else 32
            value = config[kernel][dim]
            if value < smallest or value & (value - 1):
                raise ValueError(f"config[{kernel!r}][{dim!r}]: expected a power of two >= {smallest}, got {value}")
    for kernel in ("dx", "dw"):
        if config[kernel]["NUM_ACC"] not in (1, 2, 3, 4):
            raise ValueError(f"config[{kernel!r}]['NUM_ACC']: expected 1, 2, 3 or 4, got {config[kernel]['NUM_ACC']}")
    return config


def _alloc(shape, dtype, device):
    # Every output and workspace comes from here (zeroed ones from _zeros), so tests can hand out
    # poisoned buffers and list what was allocated.
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


def _interpret_workarounds(device: torch.device) -> bool:
    # CPU tensors mean the interpreter, whose fp32 -> fp8 / bf16 casts do not round to nearest even.
    return device.type == "cpu"


def _round_bf16(out: torch.Tensor) -> bool:
    return _interpret_workarounds(out.device) and out.dtype == torch.bfloat16


def _launch_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def _absmax(t: torch.Tensor, out: torch.Tensor, config: dict) -> None:
    """out[0] = max(out[0], max|t|) (out zeroed by the caller); NaN wins."""
    block = config["quantize"]["BLOCK"]
    if t.numel() == 0:
        return
    _absmax_kernel[(triton.cdiv(t.numel(), block),)](t, out, t.numel(), BLOCK=block,
                                                      num_warps=config["quantize"]["num_warps"])


def quantize_operands(x: torch.Tensor, weight: torch.Tensor, x_scale, w_scale, config: dict | None = None):
    """-> (x_f8 [T, D], w_f8 [V, D] float8_e4m3fn, used_scales [2] fp32); a None scale means amax/448."""
    config = config if config is not None and "quantize" in config else get_config(x.device, config)
    used_scales = _alloc((2,), torch.float32, x.device)
    amax = _zeros((2,), torch.float32, x.device) if (x_scale is None or w_scale is None) else used_scales
    outs = []
    block = config["quantize"]["BLOCK"]
    for i, (t, scale) in enumerate(((x, x_scale), (weight, w_scale))):
        out = _alloc(tuple(t.shape), torch.float8_e4m3fn, t.device)
        if scale is None:
            _absmax(t, amax[i:], config)
        grid = (max(1, triton.cdiv(t.numel(), block)),)  # one program at least: it writes the scale
        _quantize_e4m3_kernel[grid](
            t, out.view(torch.uint8), amax[i:], used_scales[i:],
            1.0 if scale is None else float(scale), t.numel(),
            DYNAMIC=scale is None, INTERPRET=_interpret_workarounds(t.device),
            BLOCK=block, num_warps=config["quantize"]["num_warps"],
        )
        outs.append(out)
    return outs[0], outs[1], used_scales


def _fused_lse_loss(x_f8, w_f8, targets, used_scales, softcap, logit_scale, ignore_index, config):
    T, D = x_f8.shape
    V = w_f8.shape[0]
    cfg = config["forward"]
    block_t, block_v = cfg["BLOCK_T"], cfg["BLOCK_V"]
    row_blocks = triton.cdiv(T, block_t)
    v_tiles = triton.cdiv(V, block_v)
    target_programs = config["split_programs"]
    if target_programs is None:
        index = x_f8.device.index if x_f8.device.index is not None else torch.cuda.current_device()
        target_programs = _num_sms(index) * config["split_programs_per_sm"]
    splits = max(1, min(v_tiles, triton.cdiv(target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split

    m = _alloc((splits, T), torch.float32, x_f8.device)
    s = _alloc((splits, T), torch.float32, x_f8.device)
    zt = _alloc((splits, T), torch.float32, x_f8.device)
    _fwd_partial_kernel[(row_blocks, splits)](
        x_f8, w_f8, targets, used_scales,
        m, s, zt,
        T, V, D,
        x_f8.stride(0), w_f8.stride(0),
        tiles_per_split * block_v,
        softcap, logit_scale / softcap,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=cfg["BLOCK_K"], EVEN_K=D % cfg["BLOCK_K"] == 0,
        INTERPRET=_interpret_workarounds(x_f8.device), **_launch_kwargs(cfg),
    )
    lse = _alloc((T,), torch.float32, x_f8.device)
    row_loss = _alloc((T,), torch.float32, x_f8.device)
    block = 256
    _fwd_combine_kernel[(triton.cdiv(T, block),)](
        m, s, zt, targets, lse, row_loss, T, splits, ignore_index, BLOCK=block, num_warps=4,
    )
    return row_loss, lse


def _grad_scale_args(row_grad, grad_scale, config):
    """(rg_amax buffer, static scale, DYNAMIC_GS) for the backward kernels."""
    if grad_scale is None:
        rg_amax = _zeros((1,), torch.float32, row_grad.device)
        _absmax(row_grad, rg_amax, config)
        return rg_amax, 1.0, True
    return row_grad, float(grad_scale), False  # the buffer is never read


def _fused_backward(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale,
                    x_dtype, w_dtype, config):
    T, D = x_f8.shape
    V = w_f8.shape[0]
    device = x_f8.device
    dx = _alloc((T, D), x_dtype, device)
    dw = _alloc((V, D), w_dtype, device)
    rg_amax, gs_static, dynamic_gs = _grad_scale_args(row_grad, grad_scale, config)
    common = (x_f8, w_f8, targets, lse, row_grad, used_scales, rg_amax)
    for name, out, grid_rows in (("dx", dx, triton.cdiv(T, config["dx"]["BLOCK_T"])),
                                 ("dw", dw, triton.cdiv(V, config["dw"]["BLOCK_V"]))):
        cfg = config[name]
        d_groups = triton.cdiv(D, cfg["NUM_ACC"] * cfg["BLOCK_D"])
        kernel = _bwd_dx_kernel if name == "dx" else _bwd_dw_kernel
        kernel[(grid_rows, d_groups)](
            *common, out,
            T, V, D,
            x_f8.stride(0), w_f8.stride(0), out.stride(0),
            softcap, logit_scale / softcap, logit_scale, gs_static,
            DYNAMIC_GS=dynamic_gs, INTERPRET=_interpret_workarounds(device), DOT_FP16=cfg["DOT_FP16"],
            BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
            EVEN_K=D % cfg["BLOCK_K"] == 0, BLOCK_D=cfg["BLOCK_D"], NUM_ACC=cfg["NUM_ACC"],
            ROUND_BF16=_round_bf16(out),
            **_launch_kwargs(cfg),
        )
    return dx, dw


def _scaled_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch._scaled_mm: CUDA, a row-major, b column-major, K and N multiples of 16.
    return (USE_SCALED_MM and a.device.type == "cuda" and a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
            and hasattr(torch, "_scaled_mm"))


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """(a [M, K] · b [K, N])·scale_a·scale_b in out_dtype; a, b fp8 (any strides), scales fp32 [1] on the device."""
    M, K = a.shape
    if b.shape[0] != K:
        raise ValueError(f"b: expected shape [{K}, N] to chain with a {tuple(a.shape)}, got {tuple(b.shape)}")
    N = b.shape[1]
    if _scaled_mm_ok(a, b):
        a_rm = a if a.stride(1) == 1 else a.contiguous()
        b_cm = b if b.stride(0) == 1 else b.t().contiguous().t()
        return torch._scaled_mm(a_rm, b_cm, scale_a=scale_a.reshape(()), scale_b=scale_b.reshape(()),
                                out_dtype=out_dtype)
    config = config if config is not None and "matmul" in config else get_config(a.device, config)
    cfg = config["matmul"]
    c = _alloc((M, N), out_dtype, a.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _fp8_matmul_kernel[grid](
        a, b, c, scale_a, scale_b, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        ROUND_BF16=_round_bf16(c), INTERPRET=_interpret_workarounds(a.device), **_launch_kwargs(cfg),
    )
    return c


def _ce_rows(logits, targets, softcap, logit_scale, ignore_index, config, *, lse=None, row_grad=None,
             grad_scale=None):
    """One pass over each row of logits: (row_loss, lse) when lse is None, and the e5m2 dlogits
    (with the grad scale used, fp32 [1]) when row_grad is given. Returns (row_loss, lse, dl, gs)."""
    T, V = logits.shape
    device = logits.device
    compute_lse = lse is None
    write_grad = row_grad is not None
    row_loss = _alloc((T,), torch.float32, device) if compute_lse else None
    if compute_lse:
        lse = _alloc((T,), torch.float32, device)
    dl = gs = None
    rg_amax, gs_static, dynamic_gs = logits, 1.0, False
    if write_grad:
        dl = _alloc((T, V), torch.float8_e5m2, device)
        gs = _alloc((1,), torch.float32, device)
        rg_amax, gs_static, dynamic_gs = _grad_scale_args(row_grad, grad_scale, config)
    cfg = config["rows"]
    _ce_rows_kernel[(T,)](
        logits, targets, row_grad if write_grad else lse, rg_amax,
        lse, row_loss if compute_lse else lse, dl if write_grad else logits, gs if write_grad else lse,
        V, logits.stride(0), dl.stride(0) if write_grad else 0,
        ignore_index, softcap, logit_scale / softcap, logit_scale, gs_static,
        COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, DYNAMIC_GS=dynamic_gs,
        INTERPRET=_interpret_workarounds(device), BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )
    return row_loss, lse, dl, gs


# ---------------------------------------------------------------------------
# Backend entry points
# ---------------------------------------------------------------------------

def _check_tensor(name, t, dtypes, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported here; expected one of "
                        f"{', '.join(str(d) for d in dtypes)}")
    if len(shape) != t.dim() or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        shown = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape [{shown}], got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def _check_forward_args(x, weight, targets):
    _check_tensor("x", x, _FLOAT_DTYPES, (None, None), None)
    T, D = x.shape
    _check_tensor("weight", weight, _FLOAT_DTYPES, (None, D), x.device)
    _check_tensor("targets", targets, (torch.int64,), (T,), x.device)
    if weight.shape[0] < 1 or D < 1:
        raise ValueError(f"weight: expected V >= 1 and D >= 1, got shape {list(weight.shape)}")
    if max(x.numel(), weight.numel()) > _INT32_MAX:
        raise ValueError(f"x / weight: more than 2³¹ elements ({x.numel()}, {weight.numel()}) are not supported")


def _check_backward_args(row_grad, x_f8, w_f8, targets, lse, used_scales):
    _check_tensor("x_f8", x_f8, (torch.float8_e4m3fn,), (None, None), None)
    T, D = x_f8.shape
    device = x_f8.device
    _check_tensor("w_f8", w_f8, (torch.float8_e4m3fn,), (None, D), device)
    _check_tensor("row_grad", row_grad, (torch.float32,), (T,), device)
    _check_tensor("targets", targets, (torch.int64,), (T,), device)
    _check_tensor("lse", lse, (torch.float32,), (T,), device)
    _check_tensor("used_scales", used_scales, (torch.float32,), (2,), device)


def forward(x, weight, targets, softcap, logit_scale, x_scale, w_scale, ignore_index, *, config=None):
    """Fused: -> (row_loss [T] fp32, lse [T] fp32, x_f8 [T, D], w_f8 [V, D] e4m3, used_scales [2] fp32).

    No [T, V] tensor is allocated. config: overrides of the launch table (see ``get_config``).
    """
    _check_forward_args(x, weight, targets)
    config = get_config(x.device, config)
    x_f8, w_f8, used_scales = quantize_operands(x, weight, x_scale, w_scale, config)
    if x.shape[0] == 0:
        empty = _alloc((0,), torch.float32, x.device)
        return empty, _alloc((0,), torch.float32, x.device), x_f8, w_f8, used_scales
    row_loss, lse = _fused_lse_loss(x_f8, w_f8, targets, used_scales, float(softcap), float(logit_scale),
                                    int(ignore_index), config)
    return row_loss, lse, x_f8, w_f8, used_scales


def backward(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale, ignore_index,
             x_dtype, w_dtype, *, config=None):
    """Fused: -> (dx [T, D] in x_dtype, dw [V, D] in w_dtype), recomputing the logits, no [T, V] tensor.

    row_grad must already be 0 at ignored rows (the op layer does that); ignore_index is unused.
    """
    _check_backward_args(row_grad, x_f8, w_f8, targets, lse, used_scales)
    T, D = x_f8.shape
    if T == 0:
        return (_alloc((0, D), x_dtype, x_f8.device),
                _zeros(tuple(w_f8.shape), w_dtype, x_f8.device))
    config = get_config(x_f8.device, config)
    return _fused_backward(row_grad, x_f8, w_f8, targets, lse, used_scales, float(softcap), float(logit_scale),
                           grad_scale, x_dtype, w_dtype, config)


def forward_materialized(x, weight, targets, softcap, logit_scale, x_scale, w_scale, ignore_index, *, config=None):
    """Materialised: bf16 logits [T, V] from an FP8 matmul, then one pass per row for lse and loss."""
    _check_forward_args(x, weight, targets)
    config = get_config(x.device, config)
    x_f8, w_f8, used_scales = quantize_operands(x, weight, x_scale, w_scale, config)
    if x.shape[0] == 0:
        return (_alloc((0,), torch.float32, x.device), _alloc((0,), torch.float32, x.device),
                x_f8, w_f8, used_scales)
    logits = fp8_matmul(x_f8, w_f8.t(), used_scales[0:1], used_scales[1:2], torch.bfloat16, config)
    row_loss, lse, _dl, _gs = _ce_rows(logits, targets, float(softcap), float(logit_scale), int(ignore_index),
                                       config)
    return row_loss, lse, x_f8, w_f8, used_scales


def backward_materialized(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale,
                          ignore_index, x_dtype, w_dtype, *, config=None):
    """Materialised: recompute bf16 logits, one pass writing e5m2 dlogits [T, V], two FP8 matmuls."""
    _check_backward_args(row_grad, x_f8, w_f8, targets, lse, used_scales)
    T, D = x_f8.shape
    if T == 0:
        return (_alloc((0, D), x_dtype, x_f8.device),
                _zeros(tuple(w_f8.shape), w_dtype, x_f8.device))
    config = get_config(x_f8.device, config)
    logits = fp8_matmul(x_f8, w_f8.t(), used_scales[0:1], used_scales[1:2], torch.bfloat16, config)
    _loss, _lse, dl, gs = _ce_rows(logits, targets, float(softcap), float(logit_scale), int(ignore_index), config,
                                   lse=lse, row_grad=row_grad, grad_scale=grad_scale)
    del logits
    dx = fp8_matmul(dl, w_f8, gs, used_scales[1:2], x_dtype, config)
    dw = fp8_matmul(dl.t(), x_f8, gs, used_scales[0:1], w_dtype, config)
    return dx, dw


def softcap_ce_fwd_bwd_materialized(logits, targets, row_grad, softcap, logit_scale, grad_scale, ignore_index,
                                    *, config=None):
    """One launch over materialised logits [T, V]: -> (row_loss, lse, dl [T, V] e5m2, grad_scale used [1]).

    For when the row gradient is known before the loss (e.g. a summed loss with grad 1): each row is
    read twice (logsumexp, then the gradient) by the same program, while it is hot in L2.
    """
    _check_tensor("logits", logits, _FLOAT_DTYPES, (None, None), None)
    T, V = logits.shape
    _check_tensor("targets", targets, (torch.int64,), (T,), logits.device)
    _check_tensor("row_grad", row_grad, (torch.float32,), (T,), logits.device)
    config = get_config(logits.device, config)
    return _ce_rows(logits, targets, float(softcap), float(logit_scale), int(ignore_index), config,
                    row_grad=row_grad, grad_scale=grad_scale)
