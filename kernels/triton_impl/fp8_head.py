"""Triton backend of fp8_head_loss: the chunked design of kernels/fp8_head.py with Triton kernels.

Stages (kernels.fp8_head.Stages; the loop itself is kernels.fp8_head.chunked_forward):
    quantise   x, W -> e4m3, with the transposed copies the gradient GEMMs need (x_f8ᵀ, W_f8ᵀ), in
               one tiled pass each; a dynamic scale is an atomic-max pass first, read on the device
    GEMMs      torch._scaled_mm (cuBLAS) on GPUs with FP8 matmuls: fast accumulation for the logits
               (K = D = 768), full precision for dx (K = V) and dW (K = chunk rows). Elsewhere (CPU
               tensors under the interpreter, older GPUs, or config gemm="triton"), _fp8_matmul_kernel,
               which promotes its FP8 partial sums into the fp32 accumulator after every BLOCK_K of K
               (max_num_imprecise_acc = BLOCK_K, the largest value Triton accepts: the dot's K). Its
               epilogue can add into the output, which the dW accumulation over chunks uses.
    CE         _ce_rows_kernel: one program per row at a time (a persistent grid of SMs × 2
               programs, so the rows in flight, ~26 MB of bf16 logits, stay in the 50 MB L2): pass 1
               reads the row from HBM and keeps sum exp(z - softcap) per lane (|z| <= softcap, so no
               running max is needed for softcap <= 40); pass 2 reads it again, from L2, and writes
               the e5m2 dl. Special-function ops per logit: pass 1 ex2 + rcp (the tanh) + ex2,
               pass 2 tanh.approx + ex2 on a GPU (the gradient is rounded to e5m2's 2 mantissa bits;
               tanh.approx's 2^-11 is far below that): 5 MUFU, against 6 in the previous design.
               fast_tanh_lse=True makes pass 1 tanh.approx too (4 MUFU), at up to 7e-3 on z.
    transpose  _transpose_bytes_kernel: dl [n, V] -> dlᵀ [V, n16] in tiles, zero in the padding.

Napkin floors per stage at T = 49152, D = 768, V = 50304, bf16 logits (rounding="record"), H100
SXM (FP8 1979 TFLOP/s dense, 3.35 TB/s, MUFU 16/clk/SM × 132 SMs × 1.98 GHz = 4.18e12/s):
    quantise x, W      0.38 GB                            0.11 ms
    logits GEMM        3.80 TFLOP, writes 4.95 GB         1.92 ms (FLOPs; 1.48 ms of bytes)
    CE                 reads 4.95 GB, writes 2.47 GB      2.96 ms (5 MUFU × 2.47e9; 2.21 ms of bytes)
    transpose dl       2.47 + 2.47 GB                     1.48 ms
    dx GEMM            3.80 TFLOP                         1.92 ms
    dW GEMM            3.80 TFLOP                         1.92 ms
    dW fp32 adds       5 × 3 × 154.5 MB                   0.69 ms (none with dw_gemm="triton")
  sum of the floors (no stage overlaps another): 11.0 ms; the record's path: 11.2 ms. fp32 logits
  (rounding="fp32") double the logits' bytes: the GEMM becomes memory-bound (3.06 ms), the CE 3.69 ms.
  bench_fp8_head prints these beside its timings.

Numerics follow kernels/fp8_head.py (reference_forward / reference_backward):
  * q = t / scale (IEEE division), finite values saturated to ±448 (e4m3) / ±57344 (e5m2),
    non-finite -> NaN, round to nearest even (the hardware cast, cvt.rn.satfinite, on a GPU).
  * Interpreter workarounds (constexpr INTERPRET, set for CPU tensors; none of it is compiled for
    a GPU): its fp32->fp8 and fp32->bf16 casts do not round to nearest even (fp8 double-rounds,
    bf16 truncates), so values are first rounded onto the target grid here; its fp8 decoding
    turns e4m3fn NaN into 480 (and e5m2 NaN/Inf into finite values), which would make a NaN
    input vanish in tl.dot, so fp8 operands are decoded to fp32 with the special codes fixed and
    multiplied in fp32 (exact there); its fp32->fp8 cast turns NaN into a finite code, so NaN
    codes are written explicitly; inline PTX (tanh.approx) does not exist there.
  * dl is multiplied by 1/grad_scale instead of divided by it (one division per program instead
    of one per element); the two can differ in the last fp32 bit, which moves a value across an
    e5m2 rounding boundary only rarely.
  * A non-finite logit (from a huge x_scale·w_scale) makes its row's loss NaN: tanh would
    saturate it to a finite z. A target outside [0, V) that is not ignore_index (possible only
    with kernels.set_target_checks(False)) makes its row's loss and gradient NaN.

Order: device helpers -> kernels -> launch configuration -> launchers -> stages -> entry points.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels import fp8_head as _op
from kernels.triton_impl._tiles import grouped_tile

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
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
def _round_bf16(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        x = _round_to_bf16_grid(x)
    else:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


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
def _e4m3_codes(q, INTERPRET: tl.constexpr):
    # q -> e4m3fn bytes with the contract's saturation; NaN -> 0x7F (the interpreter's cast gives 384).
    q = _saturate_round(q, 448.0, 3, -6, INTERPRET)
    code = q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(q != q, 0x7F, code)


@triton.jit
def _e5m2_codes(d, INTERPRET: tl.constexpr):
    # dl -> e5m2 bytes. On a GPU the plain cast (cvt.rn.satfinite) is the contract: dl is finite or
    # NaN (|dl| <= |g|·logit_scale / grad_scale, checked to fit fp32), and satfinite keeps NaN.
    if INTERPRET:
        q = _saturate_round(d, 57344.0, 2, -14, True)
        code = q.to(tl.float8e5).to(tl.uint8, bitcast=True)
        code = tl.where(q != q, 0x7F, code)
    else:
        code = d.to(tl.float8e5).to(tl.uint8, bitcast=True)
    return code


@triton.jit
def _tanh(u, FAST: tl.constexpr):
    if FAST:
        # One MUFU.TANH; max relative error 2^-11. GPU only (no inline PTX under the interpreter).
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        # e = 2^(-2|u|·log2 e) in (0, 1] never overflows; (1 - e) / (1 + e) is ex2 + rcp (div.full).
        e = tl.exp2(tl.abs(u) * -2.8853900817779268)
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0.0, -t, t)
    return t


@triton.jit
def _softcap_t(x, u_scale, FAST: tl.constexpr):
    # t = tanh(u_scale·x), NaN for a non-finite x (tanh would saturate ±inf to a finite z).
    t = _tanh(x * u_scale, FAST)
    return tl.where(tl.abs(x) < float("inf"), t, float("nan"))


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
def _quantize_kernel(
    # src [R, C] (fp32 / bf16 / fp16, unit column stride) -> dst [R, C] and (WRITE_T) dst_t [C, R]
    # as e4m3fn bytes, inside zero-padded buffers; used_scale_ptr[0] = the scale
    src_ptr, dst_ptr, dst_t_ptr,
    amax_ptr, used_scale_ptr,
    static_scale,                       # used when not DYNAMIC
    R, C, stride_src, stride_dst, stride_dst_t,
    DYNAMIC: tl.constexpr, ROUND_BF16: tl.constexpr, WRITE_T: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if DYNAMIC:
        amax = tl.load(amax_ptr)
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, tl.full((), 448.0, tl.float32)), 1.0)
    else:
        scale = static_scale
    if (pid_r == 0) & (pid_c == 0):
        tl.store(used_scale_ptr, scale)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    t = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
    q = tl.math.div_rn(t.to(tl.float32), tl.broadcast_to(scale, (BLOCK_R, BLOCK_C)))
    if ROUND_BF16:
        q = _round_bf16(q, INTERPRET)  # the record's division in bf16
    code = _e4m3_codes(q, INTERPRET)
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * stride_dst + cols[None, :], code, mask=mask)
    if WRITE_T:
        tl.store(dst_t_ptr + cols.to(tl.int64)[:, None] * stride_dst_t + rows[None, :], tl.trans(code),
                 mask=(cols < C)[:, None] & (rows < R)[None, :])


@triton.jit
def _transpose_bytes_kernel(
    # dst [V, n_pad] = src [n, V]ᵀ for the first n columns, 0 in columns n .. n_pad (1-byte elements)
    src_ptr, dst_ptr,
    n, V, n_pad, stride_src, stride_dst,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    tile = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :],
                   mask=(rows < n)[:, None] & (cols < V)[None, :], other=0)
    tl.store(dst_ptr + cols.to(tl.int64)[:, None] * stride_dst + rows[None, :], tl.trans(tile),
             mask=(cols < V)[:, None] & (rows < n_pad)[None, :])


# ---------------------------------------------------------------------------
# Kernels: softcapped cross-entropy over logit rows
# ---------------------------------------------------------------------------

@triton.jit
def _ce_rows_kernel(
    # logits [n_rows, V] (fp32 or bf16, row stride stride_l), targets [n_rows] int64
    logits_ptr, tgt_ptr,
    # row loss and lse [n_rows] fp32: written by pass 1 (LSE_PASS), else lse is read
    loss_ptr, lse_ptr,
    # dl [n_rows, >= V] e5m2 bytes (GRAD_PASS); the row gradient: rg [n_rows] fp32 (ROW_GRAD) or the
    # 0-dim g0 for every valid row; the e5m2 scale gs (0-dim)
    dl_ptr, rg_ptr, g0_ptr, gs_ptr,
    n_rows, V, stride_l, stride_dl, ignore_index,
    softcap, u_scale, logit_scale,      # z = softcap·tanh(u_scale·logit), u_scale = logit_scale / softcap
    LSE_PASS: tl.constexpr, GRAD_PASS: tl.constexpr, ROW_GRAD: tl.constexpr,
    ROUND_DL_BF16: tl.constexpr,        # rounding="record": dl rounded to bf16 before / grad_scale
    FIXED_SHIFT: tl.constexpr,          # softcap <= 40: sum exp(z - softcap) needs no running max
    FAST_TANH_LSE: tl.constexpr, FAST_TANH_GRAD: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    sc2 = softcap * 1.4426950408889634  # z·log2(e) = t·sc2
    offs = tl.arange(0, BLOCK_V)
    if GRAD_PASS:
        inv_gs = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.load(gs_ptr))
        if not ROW_GRAD:
            g0 = tl.load(g0_ptr)
    # Persistent: each program walks rows pid, pid + P, ...; P is chosen so that the rows in flight
    # fit in L2 and pass 2 does not go back to HBM.
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row_logits = logits_ptr + tl.cast(row, tl.int64) * stride_l
        tgt = tl.load(tgt_ptr + row)
        valid = tgt != ignore_index
        in_range = (tgt >= 0) & (tgt < V)
        if LSE_PASS:
            acc = tl.zeros((BLOCK_V,), tl.float32)
            m_vec = tl.full((BLOCK_V,), -1.0, tl.float32) * sc2  # z·log2(e) >= -sc2
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                mask = cols < V
                x = tl.load(row_logits + cols, mask=mask, other=0.0, eviction_policy="evict_last")
                y = _softcap_t(x.to(tl.float32), u_scale, FAST_TANH_LSE) * sc2
                if FIXED_SHIFT:
                    acc += tl.where(mask, tl.exp2(y - sc2), 0.0)
                else:
                    m_new = tl.maximum(m_vec, tl.where(mask, y, m_vec))  # a NaN y reaches acc below
                    acc = acc * tl.exp2(m_vec - m_new) + tl.where(mask, tl.exp2(y - m_new), 0.0)
                    m_vec = m_new
            if FIXED_SHIFT:
                lse2 = sc2 + tl.log2(tl.sum(acc, axis=0))
            else:
                m = tl.max(m_vec, axis=0)
                lse2 = m + tl.log2(tl.sum(acc * tl.exp2(m_vec - m), axis=0))
            lse = lse2 * 0.6931471805599453
            x_t = tl.load(row_logits + tl.where(valid & in_range, tgt, 0)).to(tl.float32)
            z_t = softcap * _softcap_t(x_t, u_scale, False)
            loss = tl.where(valid, tl.where(in_range, lse - z_t, float("nan")), 0.0)
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, lse)
        else:
            lse = tl.load(lse_ptr + row)
        if GRAD_PASS:
            if ROW_GRAD:
                g = tl.load(rg_ptr + row)
            else:
                g = g0
            g = tl.where(valid, tl.where(in_range, g, float("nan")), 0.0)
            if ROUND_DL_BF16:
                coef = g * logit_scale
            else:
                coef = g * logit_scale * inv_gs
            lse2 = lse * 1.4426950408889634
            row_dl = dl_ptr + tl.cast(row, tl.int64) * stride_dl
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                mask = cols < V
                x = tl.load(row_logits + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                t = _softcap_t(x.to(tl.float32), u_scale, FAST_TANH_GRAD)
                p = tl.exp2(t * sc2 - lse2)
                d = tl.where(cols == tgt, p - 1.0, p) * (coef * (1.0 - t * t))
                if ROUND_DL_BF16:
                    d = _round_bf16(d, INTERPRET) * inv_gs
                d = tl.where(valid, d, 0.0)  # ignored rows are exactly 0, even with NaN logits
                tl.store(row_dl + cols, _e5m2_codes(d, INTERPRET), mask=mask)


# ---------------------------------------------------------------------------
# Kernels: FP8 GEMM (interpreter, GPUs without torch._scaled_mm, and the accumulating dW variant)
# ---------------------------------------------------------------------------

@triton.jit
def _fp8_matmul_kernel(
    # C[M, N] (+)= (A[M, K]·B[K, N])·scale_a·scale_b, fp8 operands (any strides), fp32 accumulation
    a_ptr, b_ptr, c_ptr,
    scale_a_ptr, scale_b_ptr,  # fp32 scalars on the device
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr,  # add the product into C (fp32) instead of overwriting it
    FAST_ACC: tl.constexpr,    # keep the tensor core's reduced-precision accumulation (short K only)
    ROUND_BF16: tl.constexpr,  # interpreter with a bf16 output: round to nearest even before the cast
    INTERPRET: tl.constexpr,   # decode the fp8 operands to fp32 (NaN codes fixed) before the dot
    DOT_FP16: tl.constexpr,    # GPUs without FP8 MMA: both formats are exact in fp16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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
            acc = tl.dot(_fp8_as_f32(a), _fp8_as_f32(b), acc)
        elif DOT_FP16:
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        elif FAST_ACC:
            acc = tl.dot(a, b, acc)  # Triton's default on sm_90: 2^30, the MMA's own accumulator throughout
        else:
            # Hopper's FP8 MMA accumulates in reduced precision; Triton then adds each dot's partial
            # sum into acc in fp32 every max_num_imprecise_acc elements of K (here: once per tile).
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = acc * (tl.load(scale_a_ptr) * tl.load(scale_b_ptr))
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    if ROUND_BF16:
        acc = _round_to_bf16_grid(acc)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


# GPU values are untested guesses (no GPU in the session that wrote them); bench_fp8_head measures.
_CONFIGS_GPU = {
    # 16 KB of bf16 logits per load per program, 2 programs per SM: ~32 KB in flight per SM.
    "ce": dict(BLOCK_V=8192, num_warps=8, programs_per_sm=2, l2_bytes=32 << 20, fast_tanh_lse=False,
               fast_tanh_grad=True),
    "transpose": dict(BLOCK_R=64, BLOCK_V=128, num_warps=4),
    "quantize": dict(BLOCK_R=64, BLOCK_C=128, num_warps=4),
    "amax": dict(BLOCK=4096, num_warps=8),
    "matmul": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    # "scaled_mm" (cuBLAS through torch) or "triton" (_fp8_matmul_kernel); dw_gemm overrides the dW GEMM.
    "gemm": "scaled_mm",
    "dw_gemm": None,
    "chunk_rows": None,
    "chunk_bytes": _op.CHUNK_BYTES,
}
# Interpreter: small tiles so that odd test shapes span several tiles, programs and chunks.
_CONFIGS_INTERPRET = {
    "ce": dict(BLOCK_V=64, num_warps=4, programs_per_sm=1, l2_bytes=32 << 20, fast_tanh_lse=False,
               fast_tanh_grad=False),
    "transpose": dict(BLOCK_R=16, BLOCK_V=32, num_warps=4),
    "quantize": dict(BLOCK_R=16, BLOCK_C=32, num_warps=4),
    "amax": dict(BLOCK=256, num_warps=4),
    "matmul": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
    "gemm": "triton",
    "dw_gemm": None,
    "chunk_rows": None,
    "chunk_bytes": _op.CHUNK_BYTES,
    "programs": 3,  # the CE kernel's persistent grid under the interpreter
}
_GEMMS = ("scaled_mm", "triton")


def get_config(device: torch.device, overrides: dict | None = None) -> dict:
    """The launch table for ``device``, with ``overrides`` ({"ce": {"BLOCK_V": 128}, "chunk_rows": 32}) merged in."""
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
    for key in ("gemm", "dw_gemm"):
        if config[key] is not None and config[key] not in _GEMMS:
            raise ValueError(f"config[{key!r}]: expected one of {_GEMMS}, got {config[key]!r}")
    if config["gemm"] is None:
        raise ValueError("config['gemm']: expected one of ('scaled_mm', 'triton'), got None")
    rows = config["chunk_rows"]
    if rows is not None and (not isinstance(rows, int) or rows < 16 or rows % 16):
        raise ValueError(f"config['chunk_rows']: expected None or a multiple of 16, got {rows!r}")
    block_k = config["matmul"]["BLOCK_K"]
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"config['matmul']['BLOCK_K']: expected a power of two >= 32 (FP8 dots), got {block_k}")
    return config


def _alloc(shape, dtype, device):
    # Every output and workspace comes from here (zeroed padding from torch.zeros), so tests can hand
    # out poisoned buffers and list what was allocated.
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros(shape, dtype, device):
    return torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype) if dtype in _FP8_DTYPES \
        else torch.zeros(shape, dtype=dtype, device=device)


def _interpret_workarounds(device: torch.device) -> bool:
    # CPU tensors mean the interpreter, whose casts do not round to nearest even and which has no PTX.
    return device.type == "cpu"


def _launch_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def _absmax(t: torch.Tensor, out: torch.Tensor, config: dict) -> None:
    """out[0] = max(out[0], max|t|) (out zeroed by the caller); NaN wins."""
    block = config["amax"]["BLOCK"]
    if t.numel() == 0:
        return
    _absmax_kernel[(triton.cdiv(t.numel(), block),)](t, out, t.numel(), BLOCK=block,
                                                      num_warps=config["amax"]["num_warps"])


def quantize(t: torch.Tensor, scale, padded_shape=None, transposed_shape=None, round_bf16: bool = False,
             config: dict | None = None):
    """t [R, C] (contiguous rows) -> (q [padded_shape] e4m3, qᵀ [transposed_shape] or None, used scale 0-dim).

    scale None: amax/448 (1 unless amax > 0), read on the device. Padding is zero.
    """
    config = config if config is not None and "quantize" in config else get_config(t.device, config)
    R, C = t.shape
    padded_shape = tuple(padded_shape or (R, C))
    q = (_alloc if padded_shape == (R, C) else _zeros)(padded_shape, torch.float8_e4m3fn, t.device)
    q_t = None
    if transposed_shape is not None:
        transposed_shape = tuple(transposed_shape)
        q_t = (_alloc if transposed_shape == (C, R) else _zeros)(transposed_shape, torch.float8_e4m3fn, t.device)
    used = _alloc((), torch.float32, t.device)
    amax = used
    if scale is None:
        amax = _zeros((1,), torch.float32, t.device)
        _absmax(t, amax, config)
    cfg = config["quantize"]
    grid = (max(1, triton.cdiv(R, cfg["BLOCK_R"])), max(1, triton.cdiv(C, cfg["BLOCK_C"])))  # one writes the scale
    _quantize_kernel[grid](
        t, q.view(torch.uint8), (q_t if q_t is not None else q).view(torch.uint8),
        amax, used, 1.0 if scale is None else float(scale),
        R, C, max(t.stride(0), 1), q.stride(0), q_t.stride(0) if q_t is not None else 0,
        DYNAMIC=scale is None, ROUND_BF16=bool(round_bf16), WRITE_T=q_t is not None,
        INTERPRET=_interpret_workarounds(t.device), BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"],
    )
    return q, q_t, used


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out: torch.Tensor,
               accumulate: bool = False, fast_accum: bool = False, config: dict | None = None) -> torch.Tensor:
    """out (+)= (a [M, K] · b [K, N])·scale_a·scale_b; a, b fp8 (any strides), scales fp32 0-dim or [1] on the device.

    accumulate needs an fp32 out. fast_accum: no promotion of the FP8 partial sums (for short K).
    Returns out.
    """
    M, K = a.shape
    if b.shape[0] != K:
        raise ValueError(f"b: expected shape [{K}, N] to chain with a {tuple(a.shape)}, got {tuple(b.shape)}")
    N = b.shape[1]
    if tuple(out.shape) != (M, N):
        raise ValueError(f"out: expected shape {(M, N)}, got {tuple(out.shape)}")
    if accumulate and out.dtype != torch.float32:
        raise TypeError(f"out: accumulate needs a float32 output, got {out.dtype}")
    config = config if config is not None and "matmul" in config else get_config(a.device, config)
    cfg = config["matmul"]
    interpret = _interpret_workarounds(a.device)
    dot_fp16 = not interpret and _capability(a.device.index or 0) < (8, 9)
    grid = (max(1, triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])),)
    if M and N:
        _fp8_matmul_kernel[grid](
            a, b, out, scale_a, scale_b, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            ACCUMULATE=bool(accumulate), FAST_ACC=bool(fast_accum), ROUND_BF16=interpret and out.dtype == torch.bfloat16, INTERPRET=interpret,
            DOT_FP16=dot_fp16, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            GROUP_M=cfg["GROUP_M"], **_launch_kwargs(cfg),
        )
    return out


def softcap_ce_rows(logits, targets, row_loss, lse, *, dl=None, row_grad=None, g0=None, gs=None, lse_in=False,
                    round_dl_bf16=False, softcap=15.0, logit_scale=1.0, ignore_index=-100, config=None) -> None:
    """The CE stage over logits [n, V] (unit column stride); see kernels.fp8_head.Stages.ce."""
    config = config if config is not None and "ce" in config else get_config(logits.device, config)
    n, V = logits.shape
    if n == 0:
        return
    cfg = config["ce"]
    interpret = _interpret_workarounds(logits.device)
    if interpret:
        programs = config["programs"]
    else:
        sms = _num_sms(logits.device.index if logits.device.index is not None else torch.cuda.current_device())
        row_bytes = V * logits.element_size()
        programs = max(sms, min(sms * cfg["programs_per_sm"], cfg["l2_bytes"] // max(row_bytes, 1)))
    grad = dl is not None
    if grad and gs is None:
        raise ValueError("gs: the gradient pass needs the e5m2 scale")
    if grad and row_grad is None and g0 is None:
        raise ValueError("g0: the gradient pass needs row_grad or g0")
    dummy = lse
    _ce_rows_kernel[(max(1, min(n, programs)),)](
        logits, targets, row_loss if row_loss is not None else dummy, lse,
        dl.view(torch.uint8) if grad else dummy, row_grad if row_grad is not None else dummy,
        g0 if g0 is not None else dummy, gs if gs is not None else dummy,
        n, V, logits.stride(0), dl.stride(0) if grad else 0, ignore_index,
        float(softcap), float(logit_scale) / float(softcap), float(logit_scale),
        LSE_PASS=not lse_in, GRAD_PASS=grad, ROW_GRAD=row_grad is not None, ROUND_DL_BF16=bool(round_dl_bf16),
        FIXED_SHIFT=float(softcap) <= 40.0, FAST_TANH_LSE=cfg["fast_tanh_lse"] and not interpret,
        FAST_TANH_GRAD=cfg["fast_tanh_grad"] and not interpret, INTERPRET=interpret,
        BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )


def transpose_bytes(src: torch.Tensor, dst: torch.Tensor, config: dict | None = None) -> None:
    """dst [V, n_pad][:, :n] = src [n, V]ᵀ, dst[:, n:] = 0; 1-byte dtypes, unit column strides."""
    config = config if config is not None and "transpose" in config else get_config(src.device, config)
    n, V = src.shape
    n_pad = dst.shape[1]
    if dst.shape[0] != V or n_pad < n:
        raise ValueError(f"dst: expected shape [{V}, >= {n}], got {tuple(dst.shape)}")
    cfg = config["transpose"]
    if V == 0 or n_pad == 0:
        return
    grid = (triton.cdiv(V, cfg["BLOCK_V"]), triton.cdiv(n_pad, cfg["BLOCK_R"]))
    _transpose_bytes_kernel[grid](src.view(torch.uint8), dst.view(torch.uint8), n, V, n_pad,
                                  max(src.stride(0), 1), max(dst.stride(0), 1), BLOCK_R=cfg["BLOCK_R"],
                                  BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"])


# ---------------------------------------------------------------------------
# Stages for the chunked driver
# ---------------------------------------------------------------------------

class TritonStages(_op.Stages):
    def __init__(self, device: torch.device, config: dict):
        self.config = config
        fp8_mm = (device.type == "cuda" and hasattr(torch, "_scaled_mm")
                  and _capability(device.index if device.index is not None else torch.cuda.current_device())
                  >= (8, 9))
        self.gemm = {role: config["gemm"] for role in ("logits", "dx", "dw")}
        if config["dw_gemm"] is not None:
            self.gemm["dw"] = config["dw_gemm"]
        if not fp8_mm:
            self.gemm = dict.fromkeys(self.gemm, "triton")

    def alloc(self, shape, dtype, device):
        return _alloc(shape, dtype, device)

    def quantize(self, t, scale, padded_shape, transposed_shape, round_bf16):
        return quantize(t, scale, padded_shape, transposed_shape, round_bf16, self.config)

    def mm(self, a, b, scale_a, scale_b, out, *, role, fast_accum, accumulate):
        if self.gemm[role] == "triton":
            fp8_matmul(a, b, scale_a, scale_b, out, accumulate, fast_accum, self.config)
            return
        self.overwrite_then_add(out, accumulate, lambda target: torch._scaled_mm(
            a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out.dtype, use_fast_accum=fast_accum, out=target))

    def ce(self, logits, targets, row_loss, lse, **kwargs):
        softcap_ce_rows(logits, targets, row_loss, lse, config=self.config, **kwargs)

    def transpose(self, src, dst):
        transpose_bytes(src, dst, self.config)


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


def _check_sizes(T, D, V):
    if V < 1 or D < 1:
        raise ValueError(f"weight: expected V >= 1 and D >= 1, got shape [{V}, {D}]")
    if max(T * D, V * D, T, V) > _INT32_MAX:
        raise ValueError(f"x / weight: more than 2³¹ elements (T={T}, D={D}, V={V}) are not supported")


def forward(x, weight, targets, softcap, logit_scale, x_scale, w_scale, grad_scale, ignore_index, reduction,
            need_dx, need_dw, rounding, *, config=None):
    """-> (loss, lse, dx, dw, x_f8, w_f8, used_scales), the op's forward contract; no [T, V] tensor."""
    _check_tensor("x", x, _FLOAT_DTYPES, (None, None), None)
    T, D = x.shape
    _check_tensor("weight", weight, _FLOAT_DTYPES, (None, D), x.device)
    _check_tensor("targets", targets, (torch.int64,), (T,), x.device)
    _check_sizes(T, D, weight.shape[0])
    config = get_config(x.device, config)
    return _op.chunked_forward(TritonStages(x.device, config), x, weight, targets, float(softcap), float(logit_scale),
                               x_scale, w_scale, grad_scale, int(ignore_index), reduction, bool(need_dx),
                               bool(need_dw), rounding, chunk_rows=config["chunk_rows"],
                               chunk_bytes=config["chunk_bytes"])


def backward(row_grad, x_f8, w_f8, targets, lse, used_scales, softcap, logit_scale, grad_scale, ignore_index,
             need_dx, need_dw, x_dtype, w_dtype, rounding, *, config=None):
    """reduction "none": -> (dx, dw), recomputing each chunk's logits. row_grad must be 0 at ignored rows."""
    _check_tensor("x_f8", x_f8, (torch.float8_e4m3fn,), (None, None), None)
    T, D = x_f8.shape
    device = x_f8.device
    _check_tensor("w_f8", w_f8, (torch.float8_e4m3fn,), (None, D), device)
    _check_tensor("row_grad", row_grad, (torch.float32,), (T,), device)
    _check_tensor("targets", targets, (torch.int64,), (T,), device)
    _check_tensor("lse", lse, (torch.float32,), (T,), device)
    _check_tensor("used_scales", used_scales, (torch.float32,), (2,), device)
    _check_sizes(T, D, w_f8.shape[0])
    config = get_config(device, config)
    return _op.chunked_backward(TritonStages(device, config), row_grad, x_f8, w_f8, targets, lse, used_scales,
                                float(softcap), float(logit_scale), grad_scale, int(ignore_index), bool(need_dx),
                                bool(need_dw), x_dtype, w_dtype, rounding, chunk_rows=config["chunk_rows"],
                                chunk_bytes=config["chunk_bytes"])
