"""Triton backend of relu2_mlp: the two GEMMs with an epilogue fused in Triton, the four plain ones on cuBLAS.

    forward   post    = relu(x·w_fcᵀ)²           fused: relu² on the fp32 accumulator, pre never reaches memory
              out     = post·w_projᵀ              cuBLAS (torch.mm)
    backward  dpre    = (dy·w_proj)·2·sqrt(post)  fused: relu(pre) = sqrt(post) read in the epilogue
              dx      = dpre·w_fc                 cuBLAS
              dw_fc   = dpreᵀ·x                   cuBLAS, written in w_fc's own layout
              dw_proj = dyᵀ·post                  cuBLAS, written in w_proj's own layout

Why these two fused: unfused, each epilogue is a [T, H] round trip through HBM (the
forward would write pre and read it back; the backward would write dpost and read it
with post): at the speedrun's T = 49152, H = 3072 in bf16 that is 604 MB, ~180 µs at
3.35 TB/s per layer and direction, against ~330 µs for the GEMM itself at 700 TFLOP/s.
The four plain GEMMs have nothing to fuse and cuBLAS is the best public GEMM.

The fused kernel, C[M, N] = epilogue(A[M, K]·B[K, N]) with A = x or dy [T, D] and
B = w_fcᵀ or w_proj [D, H]:
- persistent: min(#SMs, tiles) programs walk the output tiles (grouped order), so the
  epilogue of one tile overlaps the first loads of the next (the tile loop is flattened
  for the software pipeliner) and no tile waits on a launch;
- fed by TMA through host-side tensor descriptors (no allocator, no in-kernel descriptor
  setup), B in either layout: N-contiguous (w_proj, or a w_fc stored [D, H]) loads
  [BLOCK_K, BLOCK_N] boxes, K-contiguous (w_fc stored [H, D]) loads [BLOCK_N, BLOCK_K]
  boxes and transposes them in shared memory; a ragged T is clipped by the descriptor;
- the epilogue runs on two [BLOCK_M, BLOCK_N/2] halves, which keeps the fp32 accumulator,
  the post tile of the backward and the store staging under 255 registers;
- operands that TMA cannot describe (a row stride that is not a multiple of 16 bytes, a
  misaligned base, neither dim contiguous) take the same kernel's pointer path with masks.
Both paths run under the Triton interpreter (CPU tests).

Operands are bf16/fp16 with fp32 accumulation; fp32 operands are multiplied by tl.dot in
its default precision, TF32 on a GPU. The epilogue runs in fp32 and rounds once on store.
Launch parameters come from the committed table (kernels/triton_impl/tuned_configs.py).

Order: kernel -> configuration -> launcher (fused_gemm) -> backend entry points.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.relu2_mlp import matmul_in_layout
from kernels.triton_impl._tiles import grouped_tile, interpreting, num_sms, tuned_config

EPILOGUE_RELU2 = 1       # C = relu(acc)²
EPILOGUE_RELU2_GRAD = 2  # C = acc·2·sqrt(aux), aux = post with C's shape
EPILOGUE_NAMES = {EPILOGUE_RELU2: "relu2", EPILOGUE_RELU2_GRAD: "relu2_grad"}

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------

@triton.jit
def _epilogue_half(acc, c, aux, off_m, off_n, M, N,
                   stride_cm, stride_cn, stride_xm, stride_xn,
                   EPILOGUE: tl.constexpr, USE_TMA: tl.constexpr, OUT_DTYPE: tl.constexpr,
                   BLOCK_M: tl.constexpr, HALF_N: tl.constexpr, INDEX_64: tl.constexpr):
    # acc: [BLOCK_M, HALF_N] fp32, the output columns [off_n, off_n + HALF_N).
    if not USE_TMA:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, HALF_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if INDEX_64:
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
    if EPILOGUE == 1:
        # `acc < 0` is False for NaN, so NaN propagates as in torch.relu.
        y = tl.where(acc < 0.0, 0.0, acc)
        y = y * y
    else:
        if USE_TMA:
            post = aux.load([off_m, off_n])
        else:
            post = tl.load(aux + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
        y = acc * (2.0 * tl.sqrt(post.to(tl.float32)))
    if USE_TMA:
        c.store([off_m, off_n], y.to(OUT_DTYPE))
    else:
        tl.store(c + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, y.to(OUT_DTYPE), mask=mask)


@triton.jit
def _relu2_gemm_kernel(
    # C[M, N] = epilogue(A[M, K]·B[K, N]). With USE_TMA: host tensor descriptors (b over B, or over
    # Bᵀ when B_KMAJOR); without: base pointers addressed through the strides below.
    a, b, c, aux,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,  # pointer path only (ignored with TMA)
    stride_cm, stride_cn, stride_xm, stride_xn,
    # compile-time
    EPILOGUE: tl.constexpr,     # 1: relu², 2: relu² gradient (reads aux)
    USE_TMA: tl.constexpr,
    B_KMAJOR: tl.constexpr,     # TMA: b describes Bᵀ [N, K] (K contiguous)
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # persistent: program p handles tiles p, p + NUM_PROGRAMS, ...
    FLATTEN: tl.constexpr,       # let the pipeliner run across tile boundaries
    INDEX_64: tl.constexpr,      # pointer path: some element offset can pass 2^31
    DOT_FP32: tl.constexpr,      # interpreter only: its bf16 tl.dot multiplies raw bit patterns
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if not USE_TMA:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            if INDEX_64:
                offs_m = offs_m.to(tl.int64)
                offs_n = offs_n.to(tl.int64)
            a_ptrs = a + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
            b_ptrs = b + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            if USE_TMA:
                at = a.load([off_m, ki * BLOCK_K])
                if B_KMAJOR:
                    bt = b.load([off_n, ki * BLOCK_K]).T
                else:
                    bt = b.load([ki * BLOCK_K, off_n])
            else:
                k_left = K - ki * BLOCK_K
                at = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
                bt = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
            if DOT_FP32:
                at = at.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(at, bt, acc)
        # Two [BLOCK_M, BLOCK_N / 2] halves: columns [0, BN/2) and [BN/2, BN) of the tile.
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        _epilogue_half(acc0, c, aux, off_m, off_n, M, N, stride_cm, stride_cn, stride_xm, stride_xn,
                       EPILOGUE, USE_TMA, OUT_DTYPE, BLOCK_M, BLOCK_N // 2, INDEX_64)
        _epilogue_half(acc1, c, aux, off_m, off_n + BLOCK_N // 2, M, N, stride_cm, stride_cn, stride_xm, stride_xn,
                       EPILOGUE, USE_TMA, OUT_DTYPE, BLOCK_M, BLOCK_N // 2, INDEX_64)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

# Interpreter: small tiles so that odd test shapes span several tiles in every dim,
# and 3 programs so that the persistent loop gives each several tiles.
_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1, FLATTEN=True,
                         PROGRAMS=3)


def table_key(M: int, N: int, K: int, dtype: torch.dtype, epilogue: int) -> str:
    """Key of the tuning table: dtype, epilogue, N, K and whether M (tokens) fills a 128-row tile."""
    rows = "m64" if M <= 64 else "m"
    return f"{str(dtype).replace('torch.', '')}/{EPILOGUE_NAMES[epilogue]}/{rows}/n{N}/k{K}"


def default_config(M: int, N: int, K: int, dtype: torch.dtype, epilogue: int) -> dict:
    """Starting points for an H100 when the table has no entry for the shape.

    16-bit, many tokens: 128x256x64 tiles, 8 warps (two warpgroups of 64x256 wgmma). Shared
    memory: a stage is (128·64 + 64·256)·2 B = 48 KiB; the epilogue stages a 128x128 half
    (32 KiB) and the backward its post half (32 KiB): 4 stages forward (224 KiB), 3 backward.
    """
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=True)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4, FLATTEN=True)
    stages = 4 if epilogue == EPILOGUE_RELU2 else 3
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages, FLATTEN=True)


# The pointer path (operands TMA cannot describe, e.g. a row stride that is not a multiple of 16
# bytes): its loads are narrow and cannot be staged by cp.async, so the accumulator, the 64-bit
# pointer tiles and the masks share the registers; 128x128x32 over 8 warps is the largest tile that
# compiles without spills (sm_90a, triton 3.6 and 3.9).
POINTER_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True)


def gpu_config(M: int, N: int, K: int, dtype: torch.dtype, epilogue: int) -> dict:
    """The GPU launch parameters of one fused GEMM: the table's entry for the shape, else ``default_config``."""
    return tuned_config("relu2_gemm", table_key(M, N, K, dtype, epilogue)) or default_config(M, N, K, dtype, epilogue)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------

def _alloc(shape, dtype, device):
    # Every output and temporary comes from here, so tests can hand out NaN-poisoned buffers.
    return torch.empty(shape, dtype=dtype, device=device)


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D view a TMA descriptor can address: unit inner stride, 16-byte aligned base and row stride.

    Rows must not overlap (a broadcast view has row stride 0): such views take the pointer path.
    """
    elt = t.element_size()
    return (t.stride(1) == 1 and t.stride(0) >= t.size(1) and (t.stride(0) * elt) % 16 == 0
            and t.data_ptr() % 16 == 0 and t.size(1) * elt >= 16)


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _b_operand(b: torch.Tensor):
    """(tensor to describe, K-major?) for B [K, N]: B itself when N is contiguous, else Bᵀ [N, K]."""
    if b.stride(1) == 1 or b.size(1) == 1:
        return b, False
    if b.stride(0) == 1 or b.size(0) == 1:
        return b.t(), True
    return None, False


def launch_args(a, b, out, epilogue, aux=None, config=None, target_sms=None):
    """(grid, args, meta) of the fused GEMM out = epilogue(a·b): ``_relu2_gemm_kernel[grid](*args, **meta)``.

    config: overrides of the configuration (USE_TMA=False forces the pointer path; PROGRAMS caps
    the persistent grid, default the SM count). target_sms: build the launch of a GPU with that
    many SMs whatever the tensors' device (meta tensors: the sm_90a compile check).
    """
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"a, b, out: shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(out.shape)} do not chain "
                         f"as [M, K]·[K, N] -> [M, N]")
    if epilogue not in EPILOGUE_NAMES:
        raise ValueError(f"epilogue: expected EPILOGUE_RELU2 or EPILOGUE_RELU2_GRAD, got {epilogue!r}")
    if epilogue == EPILOGUE_RELU2_GRAD and (aux is None or tuple(aux.shape) != (M, N)):
        raise ValueError(f"aux: expected post of shape [{M}, {N}] for the relu² gradient epilogue, "
                         f"got {None if aux is None else tuple(aux.shape)}")
    if min(M, N, K) == 0:
        raise ValueError(f"a, b: every dim must be >= 1, got M={M}, N={N}, K={K}")
    aux_t = aux if aux is not None else out  # never read by the relu² epilogue
    b_desc_t, b_kmajor = _b_operand(b)
    use_tma = bool((config or {}).get("USE_TMA", True)) and b_desc_t is not None and all(
        _tma_ok(t) for t in (a, b_desc_t, out, aux_t))
    if a.device.type == "cuda" or target_sms is not None:
        cfg = gpu_config(M, N, K, a.dtype, epilogue) if use_tma else dict(POINTER_CONFIG)
    else:
        cfg = dict(_INTERPRET_CONFIG)
    cfg.update(config or {})
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if use_tma:
        half = [bm, bn // 2]
        tensors = (TensorDescriptor.from_tensor(a, [bm, bk]),
                   TensorDescriptor.from_tensor(b_desc_t, [bn, bk] if b_kmajor else [bk, bn]),
                   TensorDescriptor.from_tensor(out, half), TensorDescriptor.from_tensor(aux_t, half))
    else:
        tensors, b_kmajor = (a, b, out, aux_t), False
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = min(tiles, cfg.get("PROGRAMS") or target_sms or num_sms(a.device))
    # Pointer path: 32-bit element offsets unless one can pass 2^31 (tile overhang included).
    pad = (bm + bn + bk) * max(abs(s) for t in (a, b, out, aux_t) for s in t.stride())
    index_64 = not use_tma and (pad + max(_max_offset(t) for t in (a, b, out, aux_t))) >= 2**31
    args = (*tensors, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), aux_t.stride(0), aux_t.stride(1))
    meta = dict(EPILOGUE=epilogue, USE_TMA=use_tma, B_KMAJOR=b_kmajor, OUT_DTYPE=_TL_DTYPES[out.dtype],
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], NUM_PROGRAMS=programs,
                FLATTEN=bool(cfg.get("FLATTEN", True)), INDEX_64=index_64,
                DOT_FP32=interpreting() and a.dtype == torch.bfloat16,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (programs,), args, meta


def fused_gemm(a, b, out, epilogue, aux=None, config=None):
    """out[M, N] = epilogue(a[M, K]·b[K, N]) written in place; all of them may be strided views.

    epilogue: EPILOGUE_RELU2 (out = relu(a·b)²) or EPILOGUE_RELU2_GRAD (out = (a·b)·2·sqrt(aux),
    aux [M, N]). config: overrides of the configuration (see ``launch_args``).
    """
    grid, args, meta = launch_args(a, b, out, epilogue, aux, config)
    _relu2_gemm_kernel[grid](*args, **meta)
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
    if x.dim() != 2 or x.size(0) < 1 or x.size(1) < 1:
        raise ValueError(f"x: expected a 2-D [T, D] tensor with T >= 1 and D >= 1, got shape {list(x.shape)}")


def _check_weights(x, w_fc, w_proj):
    _check_x(x)
    T, D = x.shape
    H = w_fc.shape[0] if isinstance(w_fc, torch.Tensor) and w_fc.dim() == 2 else -1
    if H == 0:
        raise ValueError(f"w_fc: H = 0 rows; expected a [H, {D}] weight with H >= 1")
    _check("w_fc", w_fc, x.dtype, (H, D), x.device)
    _check("w_proj", w_proj, x.dtype, (D, H), x.device)
    return T, D, H


def forward(x, w_fc, w_proj, config=None):
    """x [T, D], w_fc [H, D], w_proj [D, H] (weights in any strides) -> (out [T, D], post [T, H]), in x.dtype.

    config: optional overrides for the fused GEMM (benchmarks).
    """
    T, D, H = _check_weights(x, w_fc, w_proj)
    post = _alloc((T, H), x.dtype, x.device)
    fused_gemm(x, w_fc.t(), post, EPILOGUE_RELU2, config=config)
    out = torch.mm(post, w_proj.t(), out=_alloc((T, D), x.dtype, x.device))
    return out, post


def backward(dy, x, w_fc, w_proj, post, config=None):
    """-> (dx [T, D], dw_fc [H, D], dw_proj [D, H]); each weight gradient in its weight's layout."""
    T, D, H = _check_weights(x, w_fc, w_proj)
    _check("dy", dy, x.dtype, (T, D), x.device)
    _check("post", post, x.dtype, (T, H), x.device)
    dpre = _alloc((T, H), x.dtype, x.device)
    fused_gemm(dy, w_proj, dpre, EPILOGUE_RELU2_GRAD, aux=post, config=config)
    dx = torch.mm(dpre, w_fc, out=_alloc((T, D), x.dtype, x.device))
    return dx, matmul_in_layout(dpre.t(), x, w_fc, _alloc), matmul_in_layout(dy.t(), post, w_proj, _alloc)
