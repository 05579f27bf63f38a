"""Triton backend of relu2_mlp: six tiled GEMMs (two forward, four backward) with fused epilogues.

Every GEMM of the block goes through one kernel, C[M, N] = epilogue(A[M, K]·B[K, N]),
whose operands are addressed through strides so transposes (w_fcᵀ, dyᵀ, dpreᵀ)
are views, never copies:

    forward   post    = relu(x·w_fcᵀ)²          epilogue RELU_SQUARE (pre never reaches memory)
              out     = post·w_projᵀ
    backward  dw_proj = dyᵀ·post                 split-K (K = T is long, the output is small)
              dpre    = (dy·w_proj)·2·sqrt(post) epilogue RELU_SQUARE_GRAD (relu(pre) = sqrt(post))
              dw_fc   = dpreᵀ·x                  split-K
              dx      = dpre·w_fc

Operands are bf16/fp16 with fp32 accumulation; fp32 operands are accepted and
multiplied by tl.dot in its default precision, which is TF32 on a GPU (about
10 mantissa bits per product; accumulation stays fp32). Outputs are stored in
the operands' dtype, post included.

Order: kernels -> launchers (config table, split-K) -> forward / backward.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.triton_impl._tiles import grouped_tile

EPILOGUE_NONE = 0
EPILOGUE_RELU_SQUARE = 1       # C = relu(acc)²
EPILOGUE_RELU_SQUARE_GRAD = 2  # C = acc·2·sqrt(aux), aux = post with C's shape

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _matmul_epilogue_kernel(
    # C[M, N] = epilogue(A[M, K]·B[K, N]); with split-K, C is an fp32 [SPLIT, M, N] workspace
    a_ptr, b_ptr, c_ptr, aux_ptr,
    M, N, K,
    # strides in elements; any layout (transposed views included)
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cn,  # stride_cs: between split-K slices of the workspace
    stride_xm, stride_xn,             # aux (post), read only by EPILOGUE_RELU_SQUARE_GRAD
    # split-K: program (i, s) reduces k in [s·K_PER_SPLIT, (s+1)·K_PER_SPLIT), a multiple of BLOCK_K
    K_PER_SPLIT,
    # compile-time
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,  # dims divisible: drop masks
    INDEX_64: tl.constexpr,  # some offset can pass 2³¹ elements
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies raw bit patterns
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INDEX_64:
        pid_k = pid_k.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    mask_m = offs_m < M
    mask_n = offs_n < N

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + (k_start + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Masks name only the ragged dims: a row mask is constant along k, so a ragged T
    # still lets the compiler vectorise the loads (and pipeline them with cp.async).
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            if EVEN_M:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            if EVEN_N:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = offs_k < K - k
            if EVEN_M:
                a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if EVEN_N:
                b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
            else:
                b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_c = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 1:
        # `acc < 0` is False for NaN, so NaN propagates as in torch.relu.
        acc = tl.where(acc < 0.0, 0.0, acc)
        acc = acc * acc
    elif EPILOGUE == 2:
        aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
        if EVEN_M and EVEN_N:
            post = tl.load(aux_ptrs)
        else:
            post = tl.load(aux_ptrs, mask=mask_c, other=0.0)
        acc = acc * (2.0 * tl.sqrt(post.to(tl.float32)))

    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if EVEN_M and EVEN_N:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _split_k_sum_kernel(
    # out[i] = Σ_s ws[s, i] for the flattened [SPLIT, numel] fp32 workspace; out contiguous
    ws_ptr, out_ptr,
    numel, num_splits,
    BLOCK: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if INDEX_64:
        offs = offs.to(tl.int64)
    mask = offs < numel
    ws_ptrs = ws_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # Fixed order over the splits: the result is deterministic, unlike atomics.
    for _ in range(0, num_splits):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += numel  # advancing the 64-bit pointer: no s·numel product to overflow int32
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Tile shapes: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
# Shared memory per stage is (BM + BN)·BK·itemsize: 48 KiB for the large 16-bit
# tile, so 3 stages fit the H100's 227 KiB with room for the epilogue.
_TILE_LARGE = (128, 256, 64, 8, 8, 3)   # 16-bit, many output tiles: most FLOPs per byte loaded
_TILE_MEDIUM = (128, 128, 64, 8, 8, 4)  # 16-bit, few output tiles (weight gradients, split-K)
_TILE_SMALL_M = (64, 128, 64, 8, 4, 4)  # 16-bit, M ≤ 64 (a handful of tokens)
_TILE_FP32 = (128, 128, 32, 8, 8, 3)    # fp32 operands take twice the shared memory per element
_TILE_INTERPRET = (32, 32, 32, 4, 4, 1)  # interpreter: small tiles so odd test shapes span several

# Rough H100 figures for the split-K cost model; only their ratio matters.
_SM_FLOPS = 700e12 / 132  # sustained bf16 tensor-core FLOP/s of one SM
_HBM_BYTES_PER_S = 2.5e12
_MAX_SPLIT_K = 16


def _choose_split_k(M, N, K, block_m, block_n, block_k, num_sms):
    """The split count minimising waves·(k-steps per split) plus the fp32 reduction's traffic.

    Weight gradients have M·N small (768 × 3072 = 144 tiles of 128²) and K = T long: unsplit,
    144 tiles on 132 SMs run as two waves, the second nearly empty.
    """
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    k_steps = triton.cdiv(K, block_k)
    step_s = 2.0 * block_m * block_n * block_k / _SM_FLOPS
    best_split, best_s = 1, None
    for split in range(1, min(_MAX_SPLIT_K, k_steps) + 1):
        steps_per_split = triton.cdiv(k_steps, split)
        if triton.cdiv(k_steps, steps_per_split) != split:
            continue  # would leave an empty split
        waves = triton.cdiv(tiles * split, num_sms)
        t = waves * steps_per_split * step_s
        if split > 1:
            # workspace written by the GEMM (overlapped), read once by the sum, plus a launch
            t += split * M * N * 4 / _HBM_BYTES_PER_S + 5e-6
        if best_s is None or t < best_s * 0.98:  # prefer fewer splits unless clearly faster
            best_split, best_s = split, t
    return best_split


def pick_config(M, N, K, dtype, epilogue=EPILOGUE_NONE, num_sms=None, interpret=False):
    """Launch parameters for one GEMM: a dict of block sizes, GROUP_M, SPLIT_K, num_warps, num_stages.

    The table is keyed by the output's tile count and the dtype; split-K is used only without an
    epilogue (relu² of a partial sum is not the partial of relu²). Not tuned on a GPU yet.
    """
    if interpret:
        tile = _TILE_INTERPRET
    elif dtype == torch.float32:
        tile = _TILE_FP32
    elif M <= 64:
        tile = _TILE_SMALL_M
    elif triton.cdiv(M, 128) * triton.cdiv(N, 256) >= 4 * (num_sms or 132):
        tile = _TILE_LARGE
    else:
        tile = _TILE_MEDIUM
    block_m, block_n, block_k, group_m, num_warps, num_stages = tile
    split_k = 1
    if epilogue == EPILOGUE_NONE and not interpret and num_sms:
        split_k = _choose_split_k(M, N, K, block_m, block_n, block_k, num_sms)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, SPLIT_K=split_k,
                num_warps=num_warps, num_stages=num_stages)


def _alloc(shape, dtype, device):
    # Every output and workspace comes from here, so tests can hand out NaN-poisoned buffers.
    return torch.empty(shape, dtype=dtype, device=device)


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def matmul(a, b, out, epilogue=EPILOGUE_NONE, aux=None, config=None):
    """out[M, N] = epilogue(a[M, K]·b[K, N]), written in place; all three may be strided views.

    aux: post [M, N] for EPILOGUE_RELU_SQUARE_GRAD. config: a pick_config dict, to override the table.
    """
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"matmul: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)} "
                         f"do not chain as [M, K]·[K, N] -> [M, N]")
    if epilogue == EPILOGUE_RELU_SQUARE_GRAD and (aux is None or tuple(aux.shape) != (M, N)):
        raise ValueError(f"aux: expected post of shape [{M}, {N}] for the relu² gradient epilogue, "
                         f"got {None if aux is None else tuple(aux.shape)}")
    interpret = a.device.type == "cpu"
    if config is None:
        num_sms = None if interpret else _num_sms(a.device.index if a.device.index is not None
                                                  else torch.cuda.current_device())
        config = pick_config(M, N, K, a.dtype, epilogue, num_sms=num_sms, interpret=interpret)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    split_k = config["SPLIT_K"]
    if split_k > 1 and epilogue != EPILOGUE_NONE:
        raise ValueError(f"config: SPLIT_K={split_k} needs epilogue NONE (an epilogue is not linear in "
                         f"the partial sums), got epilogue {epilogue}")
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)  # never launch an empty split

    if split_k > 1:
        c = _alloc((split_k, M, N), torch.float32, out.device)
        stride_cs, stride_cm, stride_cn = c.stride()
    else:
        c = out
        stride_cs, (stride_cm, stride_cn) = 0, out.stride()
    aux_t = aux if aux is not None else out  # never read without the gradient epilogue
    largest = max(_max_offset(t) for t in (a, b, c, aux_t))
    index_64 = bool(config.get("INDEX_64", False)) or largest > _INT32_MAX

    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split_k)
    _matmul_epilogue_kernel[grid](
        a, b, c, aux_t,
        M, N, K,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        stride_cs, stride_cm, stride_cn,
        aux_t.stride(0), aux_t.stride(1),
        k_per_split,
        EPILOGUE=epilogue,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        EVEN_M=M % block_m == 0, EVEN_N=N % block_n == 0, EVEN_K=K % block_k == 0,
        INDEX_64=index_64,
        DOT_FP32=_interpreting() and a.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if split_k > 1:
        if not out.is_contiguous():
            raise ValueError("out: split-K writes the reduced result contiguously; got a strided out")
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(M * N, block),)](
            c, out, M * N, split_k, BLOCK=block, INDEX_64=index_64, num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------
# Backend entry points
# ---------------------------------------------------------------------------

def _check(name, t, dtype, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from x's {dtype}; the triton backend takes "
                        f"one dtype among bfloat16, float16, float32")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected x's device {device}")


def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported by the triton backend; "
                        f"expected bfloat16, float16 or float32")
    if x.dim() != 2 or x.size(0) < 1:
        raise ValueError(f"x: expected a 2-D [T, D] tensor with T >= 1, got shape {list(x.shape)}")


def forward(x, w_fc, w_proj):
    """x [T, D], w_fc [H, D], w_proj [D, H] -> (out [T, D], post = relu(x·w_fcᵀ)² [T, H]), in x.dtype."""
    _check_x(x)
    T, D = x.shape
    H = w_fc.shape[0] if isinstance(w_fc, torch.Tensor) else -1
    _check("w_fc", w_fc, x.dtype, (H, D), x.device)
    _check("w_proj", w_proj, x.dtype, (D, H), x.device)
    post = _alloc((T, H), x.dtype, x.device)
    matmul(x, w_fc.t(), post, epilogue=EPILOGUE_RELU_SQUARE)
    out = _alloc((T, D), x.dtype, x.device)
    matmul(post, w_proj.t(), out)
    return out, post


def backward(dy, x, w_fc, w_proj, post):
    """-> (dx [T, D], dw_fc [H, D], dw_proj [D, H]); dpre = (dy·w_proj)·2·sqrt(post) is a [T, H] temporary."""
    _check_x(x)
    T, D = x.shape
    H = w_fc.shape[0] if isinstance(w_fc, torch.Tensor) else -1
    _check("w_fc", w_fc, x.dtype, (H, D), x.device)
    _check("w_proj", w_proj, x.dtype, (D, H), x.device)
    _check("dy", dy, x.dtype, (T, D), x.device)
    _check("post", post, x.dtype, (T, H), x.device)
    dw_proj = _alloc((D, H), w_proj.dtype, x.device)
    matmul(dy.t(), post, dw_proj)
    dpre = _alloc((T, H), x.dtype, x.device)
    matmul(dy, w_proj, dpre, epilogue=EPILOGUE_RELU_SQUARE_GRAD, aux=post)
    dw_fc = _alloc((H, D), w_fc.dtype, x.device)
    matmul(dpre.t(), x, dw_fc)
    dx = _alloc((T, D), x.dtype, x.device)
    matmul(dpre, w_fc, dx)
    return dx, dw_fc, dw_proj
