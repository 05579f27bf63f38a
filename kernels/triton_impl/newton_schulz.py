"""Triton backend of newton_schulz: batched, symmetric-aware, persistent Newton-Schulz.

The iteration runs on wide matrices X [m, n], m <= n (a tall G is written transposed by the
normalisation, and the last step writes straight into G's layout). Per step, three kernels:

    sym_xxt      A = X·Xᵀ              [m, m]  symmetric: only tiles on/above the diagonal are
                                              computed; off-diagonal tiles are stored twice
                                              (tile and mirror), diagonal tiles take their
                                              upper triangle and mirror it, so A == Aᵀ bit for bit
    sym_poly     S = b·A + c·A·A       [m, m]  A·A is symmetric too (A is), same tiles; the b·A
                                              axpy is fused into the epilogue
    axpy_matmul  X' = a·X + S·X        [m, n]  tiled GEMM, the a·X axpy in the epilogue (cuBLAS'
                                              baddbmm would first copy X into its output)

The two symmetric products are one kernel (`_sym_gram_kernel`): the right operand is
addressed through its own strides, so X·Xᵀ reads X's rows as columns and A·A reads A[k, j]
in place of A[j, k] (equal: A is symmetric), which keeps its loads coalesced. Both GEMM
kernels share one masked K-loop (`_dot_k_loop`).

Persistence and the wave tail: each kernel runs min(tiles, #SMs·CTAS_PER_SM) programs over
the flattened (matrix, tile) space of the whole batch, so a batch is one launch per kernel
and its tail is that of the whole batch, not of each matrix. With Muon grouping every matrix
of one shape in the model into one call, the speedrun's two calls are, on 132 SMs with
128x128 tiles (one program per SM):
    44 x 768x768:   gram, poly 44·21 = 924 tiles = 7.00 waves, no tail
                    axpy      44·36 = 1584 tiles = 12.00 waves, no tail
    24 x 768x3072:  gram, poly 24·21 = 504 tiles = 3.82 waves (the 4th wave 82% busy: 95.5%)
                    axpy      24·6·24 = 3456 tiles = 26.2 waves (97.0%); 128x256 tiles would
                    give 1728 = 13.1 waves (93.5%)
Grouped per parameter (33 QKV slices, 11 output projections, 12 fc, 12 proj, four launches
each) the same gram work took 5.25 -> 6, 1.75 -> 2, 1.91 -> 2 and 1.91 -> 2 waves: 12 instead
of 11, and the axpy 5 + 2 + 7 + 7 = 21 waves at 128x256 instead of 6 + 14 = 20.

Normalisation: X0 = G / (norm_scale·‖G‖_F + eps) without ever forming ‖G‖² in fp32 (it
overflows for ‖G‖ > 1.8e19): one pass reduces each chunk of each matrix to (e, s), with 2^e
the power of two bringing the chunk's max |g| into [0.5, 1) and s = Σ (g·2^-e)²; a second pass
combines a matrix's chunks to ‖G·2^-E‖, then writes X0 = (g·2^-E) / (norm_scale·‖G·2^-E‖ +
eps·2^-E) in bf16 (transposed for a tall G). Scaling by powers of two is exact, so this equals
the plain formula wherever that one does not overflow.

Operands are rounded to bf16, products accumulate in fp32, epilogues run in fp32 and round
once on store. Under the Triton interpreter the kernels compute on bf16-rounded values held in
fp32 (its bf16 dot is wrong and its bf16 casts truncate), so interpreter results match a GPU's
up to summation order.

Launch parameters come from the committed table (kernels/triton_impl/tuned_configs.py; keys
"ns_gram", "ns_poly", "ns_axpy"), else from the heuristics below. An axpy entry with
impl="cublas" runs torch.baddbmm instead, where a GPU measurement found it faster.

Order: kernels -> configuration -> launchers (public: normalize, sym_xxt, sym_poly, axpy_matmul)
-> forward (the backend entry point).
"""

import contextlib

import torch
import triton
import triton.language as tl

from kernels.triton_impl._tiles import grouped_tile, interpreting, num_sms, triangle, tuned_config, \
    upper_triangle_tile

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _round_bf16(x):
    # fp32 -> fp32 holding the nearest bf16 (ties to even). Interpreter only: its
    # fp32 -> bf16 casts and stores truncate, where a GPU rounds to nearest-even.
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _bf16_operand(t, INTERPRET: tl.constexpr):
    # Tensor-core operand: bf16. The interpreter gets the same values in fp32,
    # since its bf16 tl.dot multiplies raw bit patterns.
    if INTERPRET:
        return _round_bf16(t.to(tl.float32))
    else:
        return t.to(tl.bfloat16)


@triton.jit
def _pow2(e):
    # 2^e in fp32, exact, for integer e in [-126, 127] (built from the exponent bits).
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(m):
    # e with m·2^-e in [0.5, 1) for a normal m >= 0, clamped to [-126, 126] (0, subnormals and
    # huge or non-finite m land on the clamps, where the scaling still cannot overflow).
    e = ((m.to(tl.int32, bitcast=True) >> 23) & 255) - 126
    return tl.minimum(tl.maximum(e, -126), 126)


@triton.jit
def _sumsq_partials_kernel(
    g_ptr,          # G [B, numel] contiguous per matrix (stride_gb between matrices)
    part_e_ptr,     # [B, NUM_CHUNKS] int32: each chunk's scale exponent
    part_s_ptr,     # [B, NUM_CHUNKS] fp32: Σ (g·2^-e)² over the chunk
    numel, stride_gb, chunk,
    NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    start = pid_c * chunk
    run_e = -126
    run_s = 0.0
    # One pass: each block is scaled by its own power of two, then merged into the running
    # (e, s); 4^(e_small - e_big) below 2^-126 flushes to 0 (a contribution < 2^-110 relative).
    for off in range(start, tl.minimum(start + chunk, numel), BLOCK):
        idx = off + offs
        g = tl.load(g_ptr + pid_b * stride_gb + idx, mask=idx < numel, other=0.0).to(tl.float32)
        e = _exponent(tl.max(tl.abs(g), axis=0))
        gs = g * _pow2(-e)
        s = tl.sum(gs * gs, axis=0)
        hi = tl.maximum(e, run_e)
        d_new = 2 * (e - hi)
        d_run = 2 * (run_e - hi)
        f_new = tl.where(d_new >= -126, _pow2(tl.maximum(d_new, -126)), 0.0)
        f_run = tl.where(d_run >= -126, _pow2(tl.maximum(d_run, -126)), 0.0)
        run_s = run_s * f_run + s * f_new
        run_e = hi
    tl.store(part_e_ptr + pid_b * NUM_CHUNKS + pid_c, run_e)
    tl.store(part_s_ptr + pid_b * NUM_CHUNKS + pid_c, run_s)


@triton.jit
def _normalize_kernel(
    g_ptr, stride_gb, stride_gm, stride_gn,   # G [B, M, N], any strides
    x_ptr, stride_xb, stride_xm, stride_xn,   # X0 written at X[b, i, j] for G[b, i, j] (a transposed view for tall G)
    part_e_ptr, part_s_ptr,                    # the partials of _sumsq_partials_kernel
    M, N, norm_scale, eps,
    NUM_CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    # The matrix's scale: E = max chunk exponent, S = Σ s·4^(e - E) = ‖G·2^-E‖².
    chunks = tl.arange(0, NUM_CHUNKS)
    e = tl.load(part_e_ptr + pid_b * NUM_CHUNKS + chunks)
    s = tl.load(part_s_ptr + pid_b * NUM_CHUNKS + chunks)
    big = tl.max(e, axis=0)
    d = 2 * (e - big)
    total = tl.sum(s * tl.where(d >= -126, _pow2(tl.maximum(d, -126)), 0.0), axis=0)
    inv_scale = _pow2(-big)
    denom = norm_scale * tl.sqrt(total) + eps * inv_scale

    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = ((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = ((pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    g = tl.load(g_ptr + pid_b * stride_gb + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                mask=mask, other=0.0).to(tl.float32)
    x = (g * inv_scale) / denom
    if INTERPRET:
        x = _round_bf16(x)
    tl.store(x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn,
             x.to(tl.bfloat16), mask=mask)


@triton.jit
def _dot_k_loop(acc, l_ptrs, r_ptrs, step_l, step_r, mask_l, mask_r, offs_k, k_len,
                BLOCK_K: tl.constexpr, EVEN: tl.constexpr, INTERPRET: tl.constexpr):
    # acc += L·R over k in [0, k_len): L tiles [BM, BLOCK_K] at l_ptrs, R tiles [BLOCK_K, BN] at
    # r_ptrs, advanced by step_l / step_r per k-tile. mask_l / mask_r: valid rows of L / columns
    # of R (ignored when EVEN, i.e. no ragged tile anywhere).
    for kk in range(0, tl.cdiv(k_len, BLOCK_K)):
        if EVEN:
            lt = tl.load(l_ptrs)
            rt = tl.load(r_ptrs)
        else:
            k_left = k_len - kk * BLOCK_K
            lt = tl.load(l_ptrs, mask=mask_l[:, None] & (offs_k[None, :] < k_left), other=0.0)
            rt = tl.load(r_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        acc = tl.dot(_bf16_operand(lt, INTERPRET), _bf16_operand(rt, INTERPRET), acc)
        l_ptrs += step_l
        r_ptrs += step_r
    return acc


@triton.jit
def _sym_gram_kernel(
    # left operand L[i, kk] = P[i, kk] and right operand R[kk, j], both read from P
    p_ptr,
    stride_pb, stride_pm, stride_pk,  # L: batch, row (i), reduction (kk)
    stride_rk, stride_rn,             # R: reduction (kk), column (j)
    # epilogue addend Q [m, m] (HAS_ADD): out = alpha·(L·R) + beta·Q
    q_ptr, stride_qb, stride_qm, stride_qn,
    # output [m, m], symmetric
    out_ptr, stride_ob, stride_om, stride_on,
    # sizes and epilogue scalars
    batch, m, k, alpha, beta,
    # compile-time
    HAS_ADD: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,       # m % BLOCK == 0 and k % BLOCK_K == 0: no masks anywhere
    NUM_PROGRAMS: tl.constexpr,
    INTERPRET: tl.constexpr,  # running in the Triton interpreter (see _bf16_operand)
    ROUND_OUT: tl.constexpr,  # interpreter and a bf16 output: round to nearest-even before the store
):
    pid = tl.program_id(0)
    side = tl.cdiv(m, BLOCK)
    per_matrix = side * (side + 1) // 2
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, batch * per_matrix, NUM_PROGRAMS):
        pid_b = (tile // per_matrix).to(tl.int64)
        tile_i, tile_j = upper_triangle_tile(tile % per_matrix)
        offs_i = tile_i * BLOCK + offs
        offs_j = tile_j * BLOCK + offs
        mask_i = offs_i < m
        mask_j = offs_j < m
        offs_i64 = offs_i.to(tl.int64)
        offs_j64 = offs_j.to(tl.int64)

        p_base = p_ptr + pid_b * stride_pb
        l_ptrs = p_base + offs_i64[:, None] * stride_pm + offs_k[None, :] * stride_pk
        r_ptrs = p_base + offs_k[:, None] * stride_rk + offs_j64[None, :] * stride_rn
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        acc = _dot_k_loop(acc, l_ptrs, r_ptrs, BLOCK_K * stride_pk, BLOCK_K * stride_rk, mask_i, mask_j,
                          offs_k, k, BLOCK_K, EVEN, INTERPRET)

        if HAS_ADD:
            q_ptrs = q_ptr + pid_b * stride_qb + offs_i64[:, None] * stride_qm + offs_j64[None, :] * stride_qn
            if EVEN:
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=mask_i[:, None] & mask_j[None, :], other=0.0)
            acc = alpha * acc + beta * q.to(tl.float32)
        # One rounding for both copies of a tile.
        if ROUND_OUT:
            acc = _round_bf16(acc)
        out_tile = acc.to(out_ptr.dtype.element_ty)
        if tile_i == tile_j:
            # Exact symmetry by construction: the rounded upper triangle, mirrored.
            out_tile = tl.where(offs_i[:, None] <= offs_j[None, :], out_tile, tl.trans(out_tile))
        o_base = out_ptr + pid_b * stride_ob
        o_ptrs = o_base + offs_i64[:, None] * stride_om + offs_j64[None, :] * stride_on
        if EVEN:
            tl.store(o_ptrs, out_tile)
        else:
            tl.store(o_ptrs, out_tile, mask=mask_i[:, None] & mask_j[None, :])
        if tile_i != tile_j:
            # Mirror: transpose in registers so the store stays row-contiguous.
            t_ptrs = o_base + offs_j64[:, None] * stride_om + offs_i64[None, :] * stride_on
            if EVEN:
                tl.store(t_ptrs, tl.trans(out_tile))
            else:
                tl.store(t_ptrs, tl.trans(out_tile), mask=mask_j[:, None] & mask_i[None, :])


@triton.jit
def _axpy_matmul_kernel(
    # S [m, m] (left factor)
    s_ptr, stride_sb, stride_sm, stride_sk,
    # X [m, n] (right factor and epilogue addend)
    x_ptr, stride_xb, stride_xm, stride_xn,
    # out [m, n] = S·X + alpha·X; any dtype and strides (the last step writes G's layout)
    out_ptr, stride_ob, stride_om, stride_on,
    batch, m, n, alpha,
    # compile-time
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN: tl.constexpr,       # m % BLOCK_M == m % BLOCK_K == n % BLOCK_N == 0: no masks anywhere
    NUM_PROGRAMS: tl.constexpr,
    INTERPRET: tl.constexpr,  # see _sym_gram_kernel
    ROUND_OUT: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(m, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    per_matrix = num_pid_m * num_pid_n
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, batch * per_matrix, NUM_PROGRAMS):
        pid_b = (tile // per_matrix).to(tl.int64)
        pid_m, pid_n = grouped_tile(tile % per_matrix, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < m
        mask_n = offs_n < n
        offs_m64 = offs_m.to(tl.int64)
        offs_n64 = offs_n.to(tl.int64)

        s_ptrs = s_ptr + pid_b * stride_sb + offs_m64[:, None] * stride_sm + offs_k[None, :] * stride_sk
        x_base = x_ptr + pid_b * stride_xb
        x_ptrs = x_base + offs_k[:, None] * stride_xm + offs_n64[None, :] * stride_xn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _dot_k_loop(acc, s_ptrs, x_ptrs, BLOCK_K * stride_sk, BLOCK_K * stride_xm, mask_m, mask_n,
                          offs_k, m, BLOCK_K, EVEN, INTERPRET)

        x_ij = x_base + offs_m64[:, None] * stride_xm + offs_n64[None, :] * stride_xn
        o_ptrs = out_ptr + pid_b * stride_ob + offs_m64[:, None] * stride_om + offs_n64[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        if EVEN:
            x_tile = tl.load(x_ij)
        else:
            x_tile = tl.load(x_ij, mask=mask, other=0.0)
        # The addend is the bf16 X the product used, as in the bf16 reference.
        acc += alpha * _bf16_operand(x_tile, INTERPRET).to(tl.float32)
        if ROUND_OUT:
            acc = _round_bf16(acc)
        if EVEN:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty))
        else:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

GRAM_KEYS = ("BLOCK", "BLOCK_K")
AXPY_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")

# Interpreter: small tiles, so small odd test shapes get several tiles (off-diagonal, diagonal
# and ragged ones), and 3 programs, so the persistent loop gives each program several tiles.
_INTERPRET_GRAM = dict(BLOCK=32, BLOCK_K=32, num_warps=4, num_stages=1, PROGRAMS=3)
_INTERPRET_AXPY = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1, PROGRAMS=3)


def gram_key(kind: str, batch: int, m: int, k: int) -> str:
    return f"b{batch}/m{m}/k{k}" if kind == "ns_gram" else f"b{batch}/m{m}"


def axpy_key(batch: int, m: int, n: int) -> str:
    return f"b{batch}/m{m}/n{n}"


def gram_config(batch: int, m: int, k: int, device: torch.device, kind: str = "ns_gram",
                sms: int | None = None) -> dict:
    """Launch parameters of the symmetric kernel for a [batch, m, k] -> [batch, m, m] product.

    The committed table's entry when there is one; else 128x128 tiles (8 warps, 4 stages of
    2x128x64 bf16 = 128 KiB shared memory, one program per SM) when the batch has at least a
    wave of them, 64x64 (two programs per SM) otherwise, so small batches still fill the GPU.
    kind: "ns_gram" (X·Xᵀ) or "ns_poly" (b·A + c·A·A). sms: the SM count (default: the device's;
    given, a GPU configuration is returned for any device, as the sm_90a compile check needs).
    """
    if device.type != "cuda" and sms is None:
        return dict(_INTERPRET_GRAM)
    cfg = tuned_config(kind, gram_key(kind, batch, m, k))
    if cfg is not None:
        return cfg
    if batch * triangle(triton.cdiv(m, 128)) >= (sms or num_sms(device)):
        return dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=4, CTAS_PER_SM=1)
    return dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=4, CTAS_PER_SM=2)


def axpy_config(batch: int, m: int, n: int, device: torch.device, sms: int | None = None) -> dict:
    """Launch parameters of the axpy GEMM [batch, m, m] x [batch, m, n] (table, else H100 starting points)."""
    if device.type != "cuda" and sms is None:
        return dict(_INTERPRET_AXPY)
    cfg = tuned_config("ns_axpy", axpy_key(batch, m, n))
    if cfg is not None:
        return cfg
    sms = sms or num_sms(device)
    if batch * triton.cdiv(m, 128) * triton.cdiv(n, 128) >= sms:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, CTAS_PER_SM=1)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, CTAS_PER_SM=2)


def _check_config(name: str, config: dict, required: tuple[str, ...]) -> dict:
    if not isinstance(config, dict):
        raise TypeError(f"{name}: expected a dict, got {type(config).__name__}")
    if config.get("impl") == "cublas":
        return config
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{name}: missing keys {missing}; expected {list(required)} "
                         "(num_warps, num_stages, CTAS_PER_SM, PROGRAMS optional)")
    for key in required:
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (key.startswith("BLOCK") and v & (v - 1)):
            raise ValueError(f"{name}[{key!r}]: expected a positive int (a power of two for blocks), got {v!r}")
    return config


def _programs(tiles: int, config: dict, device: torch.device) -> int:
    # Persistent grid: PROGRAMS when given, else CTAS_PER_SM per SM (3 under the interpreter).
    if config.get("PROGRAMS"):
        return max(1, min(tiles, int(config["PROGRAMS"])))
    if device.type != "cuda":
        return max(1, min(tiles, _INTERPRET_GRAM["PROGRAMS"]))
    return max(1, min(tiles, num_sms(device) * int(config.get("CTAS_PER_SM", 1))))


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def gram_args(P, R_strides, out, config, Q=None, alpha=1.0, beta=0.0):
    """(grid, args, meta) of the symmetric product out = alpha·(L·R) + beta·Q (Q None: out = L·R).

    P [B, m, k] (any strides) holds L = P and R (R_strides: its strides along k and along j).
    """
    batch, m, k = P.shape
    block, block_k = config["BLOCK"], config["BLOCK_K"]
    programs = _programs(batch * triangle(triton.cdiv(m, block)), config, P.device)
    q = Q if Q is not None else out  # unread when HAS_ADD is False
    args = (P, P.stride(0), P.stride(1), P.stride(2), R_strides[0], R_strides[1],
            q, q.stride(0), q.stride(1), q.stride(2),
            out, out.stride(0), out.stride(1), out.stride(2),
            batch, m, k, float(alpha), float(beta))
    meta = dict(HAS_ADD=Q is not None, BLOCK=block, BLOCK_K=block_k,
                EVEN=(m % block == 0) and (k % block_k == 0), NUM_PROGRAMS=programs,
                INTERPRET=interpreting(), ROUND_OUT=interpreting() and out.dtype == torch.bfloat16,
                num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    return (programs,), args, meta


def _launch_gram(P, R_strides, out, config, Q=None, alpha=1.0, beta=0.0):
    grid, args, meta = gram_args(P, R_strides, out, config, Q, alpha, beta)
    _sym_gram_kernel[grid](*args, **meta)
    return out


def axpy_args(S, X, out, alpha, config):
    """(grid, args, meta) of out = S·X + alpha·X (S [B, m, m], X [B, m, n], any strides)."""
    batch, m, n = X.shape
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = _programs(batch * triton.cdiv(m, bm) * triton.cdiv(n, bn), config, X.device)
    args = (S, S.stride(0), S.stride(1), S.stride(2),
            X, X.stride(0), X.stride(1), X.stride(2),
            out, out.stride(0), out.stride(1), out.stride(2),
            batch, m, n, float(alpha))
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config["GROUP_M"],
                EVEN=(m % bm == 0) and (m % bk == 0) and (n % bn == 0), NUM_PROGRAMS=programs,
                INTERPRET=interpreting(), ROUND_OUT=interpreting() and out.dtype == torch.bfloat16,
                num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    return (programs,), args, meta


def _launch_axpy(S, X, out, alpha, config):
    if config.get("impl") == "cublas":
        return out.copy_(torch.baddbmm(X, S, X, beta=alpha))
    grid, args, meta = axpy_args(S, X, out, alpha, config)
    _axpy_matmul_kernel[grid](*args, **meta)
    return out


# Normalisation passes (memory-bound): 4096 elements per iteration and program in the first
# (16 per thread: two block reductions per 16 KiB of fp32 keep the loads streaming), 64x64
# tiles in the second (a tall G's transposed store goes through shared memory).
_NORM_BLOCK = 4096
_NORM_TILE = 64


def normalize_args(G, X, norm_scale, eps, sms=None):
    """[(kernel, grid, args, meta)] of the two normalisation passes, G [B, M, N] contiguous -> X (any strides).

    The partials buffers are allocated here; sms: the SM count the chunking aims at (default: the device's).
    """
    batch, M, N = G.shape
    numel = M * N
    blocks = triton.cdiv(numel, _NORM_BLOCK)
    # Enough chunks for ~4 programs per SM over the batch; a power of two (the combine is one vector).
    sms = sms or (num_sms(G.device) if G.device.type == "cuda" else 2)
    num_chunks = min(triton.next_power_of_2(max(1, triton.cdiv(4 * sms, batch))), triton.next_power_of_2(blocks))
    chunk = triton.cdiv(blocks, num_chunks) * _NORM_BLOCK
    part_e = torch.full((batch, num_chunks), -126, dtype=torch.int32, device=G.device)  # empty chunk: neutral
    part_s = torch.zeros((batch, num_chunks), dtype=torch.float32, device=G.device)
    partials = (_sumsq_partials_kernel, (triton.cdiv(numel, chunk), batch),
                (G, part_e, part_s, numel, G.stride(0), chunk),
                dict(NUM_CHUNKS=num_chunks, BLOCK=_NORM_BLOCK, num_warps=8))
    scale = (_normalize_kernel, (triton.cdiv(M, _NORM_TILE) * triton.cdiv(N, _NORM_TILE), batch),
             (G, G.stride(0), G.stride(1), G.stride(2), X, X.stride(0), X.stride(1), X.stride(2),
              part_e, part_s, M, N, float(norm_scale), float(eps)),
             dict(NUM_CHUNKS=num_chunks, BLOCK_M=_NORM_TILE, BLOCK_N=_NORM_TILE, INTERPRET=interpreting(),
                  num_warps=4))
    return [partials, scale]


def _launch_normalize(G, X, norm_scale, eps):
    # G [B, M, N] contiguous -> X[b, i, j] = G[b, i, j] / (norm_scale·‖G[b]‖ + eps) in bf16 (X: any strides).
    for kernel, grid, args, meta in normalize_args(G, X, norm_scale, eps):
        kernel[grid](*args, **meta)
    return X


def _as_batch(name: str, t, ndims=(2, 3)) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected bfloat16, float16 or float32")
    if t.dim() not in ndims:
        raise ValueError(f"{name}: expected a 2-D or 3-D tensor, got shape {tuple(t.shape)}")
    return t if t.dim() == 3 else t.unsqueeze(0)


def _check_scalar(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    return float(v)


def _check_out(out, shape, device, squeeze: bool):
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=device)
    out3 = _as_batch("out", out)
    if tuple(out3.shape) != tuple(shape):
        want = shape[1:] if squeeze else shape
        raise ValueError(f"out: expected shape {tuple(want)}, got {tuple(out.shape)}")
    if out3.device != device:
        raise ValueError(f"out: on {out3.device}, expected {device}")
    return out3


def _check_not_aliased(out, given, inp, inp_name):
    # Programs read input tiles other programs have already overwritten if out aliases the input.
    if given is not None and out.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr():
        raise ValueError(f"out: shares storage with {inp_name}; the product cannot be computed in place")


def _check_device(**tensors) -> torch.device:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name}: on {t.device}, but {first_name} is on {first.device}")
    if first.device.type == "cpu" and not interpreting():
        raise RuntimeError("triton kernels on CPU tensors need TRITON_INTERPRET=1 set before importing kernels")
    return first.device


def normalize(G: torch.Tensor, norm_scale: float = 1.0, eps: float = 1e-7, out: torch.Tensor | None = None):
    """X0 = G / (norm_scale·‖G‖_F + eps) per matrix, in bf16, for any finite G (no overflow of ‖G‖²).

    G: [B, M, N] or [M, N], bf16/fp16/fp32. out: optional bf16 tensor of G's shape, any strides.
    """
    squeeze = isinstance(G, torch.Tensor) and G.dim() == 2
    G3 = _as_batch("G", G)
    device = _check_device(G=G3)
    out3 = _check_out(out, tuple(G3.shape), device, squeeze)
    if out3.numel() > 0:
        _check_not_aliased(out3, out, G3, "G")
        _launch_normalize(G3.contiguous(), out3, _check_scalar("norm_scale", norm_scale), _check_scalar("eps", eps))
    return out3[0] if squeeze else out3


def sym_xxt(X: torch.Tensor, out: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """A = X·Xᵀ per matrix, computing only tiles on/above the diagonal; A == Aᵀ exactly.

    X: [B, m, k] or [m, k], bf16/fp16/fp32, any strides (rounded to bf16 on load).
    out: optional [B, m, m] (or [m, m]) of any float dtype and strides; default a new bf16 tensor.
    config: optional launch parameters overriding ``gram_config`` (BLOCK, BLOCK_K, num_warps, num_stages,
    CTAS_PER_SM or PROGRAMS).
    """
    squeeze = isinstance(X, torch.Tensor) and X.dim() == 2
    X3 = _as_batch("X", X)
    device = _check_device(X=X3)
    batch, m, k = X3.shape
    out3 = _check_out(out, (batch, m, m), device, squeeze)
    if out3.numel() == 0:
        return out3[0] if squeeze else out3
    _check_not_aliased(out3, out, X3, "X")
    config = _check_config("config", config, GRAM_KEYS) if config else gram_config(batch, m, k, device)
    _launch_gram(X3, (X3.stride(2), X3.stride(1)), out3, config)
    return out3[0] if squeeze else out3


def sym_poly(A: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None, *,
             config: dict | None = None) -> torch.Tensor:
    """S = b·A + c·A·A per matrix for SYMMETRIC A, computing only tiles on/above the diagonal.

    A: [B, m, m] or [m, m]; its symmetry is assumed, not checked (A·A reads A[k, j] for A[j, k]).
    out, config: as for ``sym_xxt``.
    """
    b, c = _check_scalar("b", b), _check_scalar("c", c)
    squeeze = isinstance(A, torch.Tensor) and A.dim() == 2
    A3 = _as_batch("A", A)
    if A3.shape[1] != A3.shape[2]:
        raise ValueError(f"A: expected square matrices, got shape {tuple(A.shape)}")
    device = _check_device(A=A3)
    batch, m, _ = A3.shape
    out3 = _check_out(out, (batch, m, m), device, squeeze)
    if out3.numel() == 0:
        return out3[0] if squeeze else out3
    _check_not_aliased(out3, out, A3, "A")
    config = (_check_config("config", config, GRAM_KEYS) if config
              else gram_config(batch, m, m, device, kind="ns_poly"))
    # R[kk, j] = A[j, kk] = A[kk, j]: address it row-major, the coalesced way.
    _launch_gram(A3, (A3.stride(1), A3.stride(2)), out3, config, Q=A3, alpha=c, beta=b)
    return out3[0] if squeeze else out3


def axpy_matmul(S: torch.Tensor, X: torch.Tensor, a: float, out: torch.Tensor | None = None, *,
                config: dict | None = None) -> torch.Tensor:
    """a·X + S·X per matrix, the axpy fused into the GEMM epilogue.

    S: [B, m, m], X: [B, m, n] (or both 2-D), any strides, rounded to bf16 on load.
    out: optional [B, m, n] of any float dtype and strides (must not overlap X); default new bf16.
    config: optional overrides of ``axpy_config`` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages,
    CTAS_PER_SM or PROGRAMS; or impl="cublas").
    """
    a = _check_scalar("a", a)
    squeeze = isinstance(X, torch.Tensor) and X.dim() == 2
    S3, X3 = _as_batch("S", S), _as_batch("X", X)
    if S.dim() != X.dim():
        raise ValueError(f"S: expected {X.dim()} dims like X, got shape {tuple(S.shape)}")
    batch, m, n = X3.shape
    if tuple(S3.shape) != (batch, m, m):
        raise ValueError(f"S: expected shape {(batch, m, m)[3 - S.dim():]} for X of shape {tuple(X.shape)}, "
                         f"got {tuple(S.shape)}")
    device = _check_device(S=S3, X=X3)
    out3 = _check_out(out, (batch, m, n), device, squeeze)
    if out3.numel() == 0:
        return out3[0] if squeeze else out3
    _check_not_aliased(out3, out, X3, "X")
    config = _check_config("config", config, AXPY_KEYS) if config else axpy_config(batch, m, n, device)
    _launch_axpy(S3, X3, out3, a, config)
    return out3[0] if squeeze else out3


# ---------------------------------------------------------------------------
# Backend entry point
# ---------------------------------------------------------------------------

def forward(G: torch.Tensor, coefficients, norm_scale: float, eps: float) -> torch.Tensor:
    """G [B, M, N] (contiguous, fp32/bf16/fp16) -> Newton-Schulz iterate [B, M, N] in G.dtype.

    coefficients: one (a, b, c) per step. Arguments arrive validated from kernels.newton_schulz.
    """
    # Triton launches on the current device: G may live on another one.
    with torch.cuda.device(G.device) if G.device.type == "cuda" else contextlib.nullcontext():
        return _iterate(G, coefficients, norm_scale, eps, torch.empty_like(G))


def step_configs(batch: int, m: int, n: int, device: torch.device, sms: int | None = None) -> dict:
    """{"gram", "poly", "axpy"}: the launch parameters of one step on a [batch, m, n] (m <= n) iterate."""
    return {"gram": gram_config(batch, m, n, device, sms=sms), "poly": gram_config(batch, m, m, device, "ns_poly", sms),
            "axpy": axpy_config(batch, m, n, device, sms)}


def _iterate(G, coefficients, norm_scale, eps, out, configs: dict | None = None):
    # out: [B, M, N] in G.dtype, contiguous; fully overwritten (tests pass it NaN-filled).
    # configs: optional overrides {"gram", "poly", "axpy"} of step_configs (benchmarks, the tuner).
    batch, M, N = G.shape
    if G.numel() == 0:
        return out
    tall = M > N
    m, n = (N, M) if tall else (M, N)
    # X0 in the wide layout [B, m, n]; a tall G is written transposed.
    X = torch.empty((batch, m, n), dtype=torch.bfloat16, device=G.device)
    _launch_normalize(G.contiguous(), X.mT if tall else X, norm_scale, eps)
    if len(coefficients) == 0:
        return out.copy_(X.mT if tall else X)
    cfg = step_configs(batch, m, n, G.device)
    cfg.update(configs or {})
    A = torch.empty((batch, m, m), dtype=torch.bfloat16, device=G.device)
    S = torch.empty_like(A)
    x, x_next = X, torch.empty_like(X)
    dst_final = out.mT if tall else out
    last = len(coefficients) - 1
    for step, (a, b, c) in enumerate(coefficients):
        _launch_gram(x, (x.stride(2), x.stride(1)), A, cfg["gram"])
        _launch_gram(A, (A.stride(1), A.stride(2)), S, cfg["poly"], Q=A, alpha=c, beta=b)
        dst = dst_final if step == last else x_next
        _launch_axpy(S, x, dst, a, cfg["axpy"])
        x, x_next = dst, x
    return out
