"""Triton backend of relu2_mlp against float64 math.

tier 0: the launch-config table and argument checks (no kernel runs).
tier 1 (interpret): small odd shapes, through the backend functions, the strided GEMM
    launcher and the public op; outputs come from NaN-poisoned buffers.
tier 2 (gpu): the speedrun's shapes (T up to 64K, D 768/1024, H = 4D).
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.triton_impl import relu2_mlp as impl  # noqa: E402

# Elementwise bound: |got - want| <= tol·(rms(want) + |want|). For 16-bit types
# about 8 units of roundoff: post and dpre are rounded to the storage dtype
# before the next GEMM, as the contract specifies.
_TOL = {torch.bfloat16: 8 * 2.0**-8, torch.float16: 8 * 2.0**-11}
_TOL_FP32_IEEE = 2e-5        # interpreter: fp32 tl.dot is exact IEEE
_TOL_FP32_TF32 = 8 * 2.0**-11  # GPU: fp32 tl.dot multiplies in TF32


def _tol(dtype, device):
    if dtype == torch.float32:
        return _TOL_FP32_IEEE if torch.device(device).type == "cpu" else _TOL_FP32_TF32
    return _TOL[dtype]


def _assert_close(name, got, want, tol):
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite elements (unwritten?)"
    got = got.detach()
    err = (got.double() - want).abs()
    bound = tol * (want.pow(2).mean().sqrt() + want.abs())
    worst = float((err / bound).max())
    assert worst <= 1.0, f"{name}: max error {float(err.max()):.3e} is {worst:.2f}x the tolerance {tol:.1e}"


def _inputs(T, D, H, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_fc = torch.randn(H, D, generator=g) / math.sqrt(D)
    w_proj = torch.randn(D, H, generator=g) / math.sqrt(H)
    dy = torch.randn(T, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, w_fc, w_proj, dy)]


def _float64_math(x, w_fc, w_proj, dy):
    """The exact block: pre is kept here, so this checks the sqrt(post) recovery too."""
    x, w_fc, w_proj, dy = (t.double() for t in (x, w_fc, w_proj, dy))
    pre = x @ w_fc.T
    post = pre.relu().square()
    out = post @ w_proj.T
    dpre = (dy @ w_proj) * 2 * pre.relu()
    return out, post, dpre @ w_fc, dpre.T @ x, dy.T @ post


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the backend allocates (outputs, dpre, split-K workspace) starts as NaN."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(impl, "_alloc", alloc)


def _run_and_check(T, D, H, dtype, device, seed):
    x, w_fc, w_proj, dy = _inputs(T, D, H, dtype, device, seed)
    out, post = impl.forward(x, w_fc, w_proj)
    dx, dw_fc, dw_proj = impl.backward(dy, x, w_fc, w_proj, post)
    assert out.dtype == post.dtype == dx.dtype == dw_fc.dtype == dw_proj.dtype == dtype
    want = _float64_math(x, w_fc, w_proj, dy)
    tol = _tol(dtype, device)
    for name, got, ref in zip(("out", "post", "dx", "dw_fc", "dw_proj"), (out, post, dx, dw_fc, dw_proj), want):
        _assert_close(name, got, ref, tol)


# ---------------------------------------------------------------------------
# tier 1: backend functions, launcher, public op
# ---------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_backward_match_float64(triton_device, poisoned, dtype):
    _run_and_check(37, 40, 72, dtype, triton_device, seed=1)


@pytest.mark.interpret
@pytest.mark.parametrize("T, D, H", [
    (1, 40, 72),     # a single token
    (64, 32, 128),   # every dim a multiple of the interpreter's 32-blocks: the unmasked path
    (97, 24, 200),   # several row blocks, a ragged last one in every dim
])
def test_batch_edges_match_float64(triton_device, poisoned, T, D, H):
    _run_and_check(T, D, H, torch.bfloat16, triton_device, seed=T)


_SMALL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


@pytest.mark.interpret
@pytest.mark.parametrize("split_k, index_64", [(1, False), (3, False), (4, True)])
def test_matmul_strided_views_split_k(triton_device, poisoned, split_k, index_64):
    # a and b are transposed views, as in dyᵀ·post; K = 301 leaves a ragged k-tile in the last split.
    g = torch.Generator().manual_seed(split_k)
    a = torch.randn(301, 50, generator=g).to(triton_device, torch.bfloat16).t()
    b = torch.randn(45, 301, generator=g).to(triton_device, torch.bfloat16).t()
    out = impl._alloc((50, 45), torch.bfloat16, triton_device)
    impl.matmul(a, b, out, config=dict(_SMALL, SPLIT_K=split_k, INDEX_64=index_64))
    _assert_close("out", out, a.double() @ b.double(), _TOL[torch.bfloat16])


@pytest.mark.interpret
def test_matmul_epilogues_into_strided_output(triton_device):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(70, 33, generator=g).to(triton_device, torch.float16)
    b = torch.randn(33, 41, generator=g).to(triton_device, torch.float16)
    post = torch.rand(41, 70, generator=g).to(triton_device, torch.float16).t()  # aux as a transposed view
    acc = a.double() @ b.double()
    cases = [
        (impl.EPILOGUE_NONE, None, acc),
        (impl.EPILOGUE_RELU_SQUARE, None, acc.relu().square()),
        (impl.EPILOGUE_RELU_SQUARE_GRAD, post, acc * 2 * post.double().sqrt()),
    ]
    for epilogue, aux, want in cases:
        # out is the transpose of a contiguous NaN buffer: only the stored elements become finite
        out = torch.full((41, 70), float("nan"), dtype=torch.float16, device=triton_device).t()
        impl.matmul(a, b, out, epilogue=epilogue, aux=aux, config=dict(_SMALL, SPLIT_K=1))
        _assert_close(f"epilogue {epilogue}", out, want, _TOL[torch.float16])


@pytest.mark.interpret
@pytest.mark.parametrize("M, N", [(64, 45), (37, 64)])  # one dim a multiple of the 32-block, one ragged
def test_matmul_stays_inside_its_views(triton_device, M, N):
    # Operands are windows of NaN-filled buffers: a load past K (or past the aux window)
    # turns valid outputs NaN. out is a window of a sentinel buffer: a store past M or N shows.
    K, pad = 70, 19
    g = torch.Generator().manual_seed(M + N)

    def window(rows, cols, fill):
        buf = torch.full((rows + pad, cols + pad), fill, dtype=torch.float16)
        buf[:rows, :cols] = torch.rand(rows, cols, generator=g) - 0.25
        return buf.to(triton_device), buf[:rows, :cols].to(triton_device)

    _, a = window(M, K, float("nan"))
    _, b = window(K, N, float("nan"))
    _, post = window(M, N, float("nan"))
    post = post.abs()
    out_buf, _ = window(M, N, 1234.0)
    out_buf[:M, :N] = float("nan")
    out = out_buf[:M, :N]
    impl.matmul(a, b, out, epilogue=impl.EPILOGUE_RELU_SQUARE_GRAD, aux=post, config=dict(_SMALL, SPLIT_K=1))
    _assert_close("out", out, (a.double() @ b.double()) * 2 * post.double().sqrt(), _TOL[torch.float16])
    outside = torch.ones_like(out_buf, dtype=torch.bool)
    outside[:M, :N] = False
    assert (out_buf[outside] == 1234.0).all(), "the kernel wrote outside out's window"


@pytest.mark.interpret
def test_public_op_leading_dims_and_saved_activation(triton_device):
    B, S, D, H = 3, 17, 40, 72
    T = B * S  # T > D, so the [H, D] weights are smaller than one [T, H] activation
    x, w_fc, w_proj, _ = _inputs(T, D, H, torch.bfloat16, triton_device, seed=5)
    x = x.reshape(B, S, D)
    dy = torch.randn(B, S, D, generator=torch.Generator().manual_seed(6)).to(triton_device, torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (x, w_fc, w_proj)]

    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = kernels.relu2_mlp(*leaves, backend="triton")
    out.backward(dy)

    big = [s for s in saved_shapes if math.prod(s) >= T * H]
    assert big == [(T, H)], f"expected exactly one saved [T, H] = {(T, H)} activation, saved {saved_shapes}"
    want = _float64_math(x.reshape(T, D), w_fc, w_proj, dy.reshape(T, D))
    tol = _TOL[torch.bfloat16]
    _assert_close("out", out.reshape(T, D), want[0], tol)
    _assert_close("dx", leaves[0].grad.reshape(T, D), want[2], tol)
    _assert_close("dw_fc", leaves[1].grad, want[3], tol)
    _assert_close("dw_proj", leaves[2].grad, want[4], tol)


# ---------------------------------------------------------------------------
# tier 0: config table and argument checks (no kernel launch)
# ---------------------------------------------------------------------------

_H100_SMEM = 227 * 1024


@pytest.mark.parametrize("D", [768, 1024])
@pytest.mark.parametrize("T", [1, 37, 4096, 49152, 65536])
def test_config_table_covers_speedrun_shapes(T, D):
    H = 4 * D
    gemms = {  # role: (M, N, K, epilogue)
        "post": (T, H, D, impl.EPILOGUE_RELU_SQUARE),
        "out": (T, D, H, impl.EPILOGUE_NONE),
        "dw_proj": (D, H, T, impl.EPILOGUE_NONE),
        "dpre": (T, H, D, impl.EPILOGUE_RELU_SQUARE_GRAD),
        "dw_fc": (H, D, T, impl.EPILOGUE_NONE),
        "dx": (T, D, H, impl.EPILOGUE_NONE),
    }
    for role, (M, N, K, epilogue) in gemms.items():
        cfg = impl.pick_config(M, N, K, torch.bfloat16, epilogue, num_sms=132)
        assert cfg["BLOCK_K"] >= 16 and min(cfg["BLOCK_M"], cfg["BLOCK_N"]) >= 16, (role, cfg)
        smem = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2 * cfg["num_stages"]
        assert smem <= _H100_SMEM, (role, cfg, smem)
        assert 1 <= cfg["SPLIT_K"] <= triton.cdiv(K, cfg["BLOCK_K"]), (role, cfg)
        if epilogue != impl.EPILOGUE_NONE:
            assert cfg["SPLIT_K"] == 1, (role, cfg)
    # Speedrun weight gradients: 144 output tiles of 128² on 132 SMs would run a nearly empty second wave.
    if T >= 16384 and D == 768:
        for role in ("dw_proj", "dw_fc"):
            M, N, K, _ = gemms[role]
            assert impl.pick_config(M, N, K, torch.bfloat16, num_sms=132)["SPLIT_K"] >= 2, role


def test_bad_arguments_name_the_argument():
    x = torch.zeros(5, 8, dtype=torch.bfloat16)
    w_fc = torch.zeros(12, 8, dtype=torch.bfloat16)
    w_proj = torch.zeros(8, 12, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x: dtype torch.float64"):
        impl.forward(x.double(), w_fc.double(), w_proj.double())
    with pytest.raises(TypeError, match="w_proj: dtype"):
        impl.forward(x, w_fc, w_proj.half())
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        impl.forward(x[None], w_fc, w_proj)
    with pytest.raises(ValueError, match=r"w_proj: expected shape \[8, 12\]"):
        impl.forward(x, w_fc, w_proj.t())
    with pytest.raises(ValueError, match=r"post: expected shape \[5, 12\]"):
        impl.backward(x, x, w_fc, w_proj, torch.zeros(5, 11, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="SPLIT_K=2 needs epilogue NONE"):
        impl.matmul(x, w_fc.t(), torch.empty(5, 12, dtype=torch.bfloat16), epilogue=impl.EPILOGUE_RELU_SQUARE,
                    config=dict(_SMALL, SPLIT_K=2))


def _compile_for_sm90(M, N, K, a_strides, b_strides, epilogue, split_k=None):
    """Compile the GEMM kernel for an H100 (sm_90a) as the launcher would specialise it, without a GPU.

    Returns (compiled kernel, config). Ints equal to 1 become constants and multiples of 16 carry the
    divisibility hint, as at a real launch.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    cfg = impl.pick_config(M, N, K, torch.bfloat16, epilogue, num_sms=132)
    if split_k is not None:
        cfg["SPLIT_K"] = split_k
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, cfg["SPLIT_K"]), bk) * bk
    ints = dict(M=M, N=N, K=K, stride_am=a_strides[0], stride_ak=a_strides[1], stride_bk=b_strides[0],
                stride_bn=b_strides[1], stride_cs=M * N, stride_cm=N, stride_cn=1, stride_xm=N, stride_xn=1,
                K_PER_SPLIT=k_per_split)
    constexprs = dict(EPILOGUE=epilogue, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                      EVEN_M=M % bm == 0, EVEN_N=N % bn == 0, EVEN_K=K % bk == 0, INDEX_64=False, DOT_FP32=False)
    out_type = "*fp32" if cfg["SPLIT_K"] > 1 else "*bf16"
    fn = impl._matmul_epilogue_kernel
    fn = JITFunction(fn.fn) if not isinstance(fn, JITFunction) else fn  # imported under the interpreter
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr"):
            signature[name] = out_type if name == "c_ptr" else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints and ints[name] != 1:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs.setdefault(name, ints.get(name))
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), cfg


def _ptxas_spills(ptx: str):
    """Spill-store bytes reported by a ptxas that accepts this PTX, or None when none is at hand."""
    import glob
    import os
    import subprocess
    import tempfile

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for ptxas in sorted(glob.glob(os.path.join(bin_dir, "ptxas*")), reverse=True):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            run = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
        if run.returncode == 0:
            return sum(int(line.split("bytes spill stores")[0].split(",")[-1])
                       for line in run.stderr.splitlines() if "bytes spill stores" in line)
    return None


def _compile_role_for_sm90(role):
    """Compile one speedrun GEMM for sm_90a; returns the facts the test checks."""
    T, D, H = 49152 + 37, 768, 3072  # ragged T: masked rows, still vectorised
    if role == "dpre":  # dy [T, D] · w_proj [D, H], ×2·sqrt(post) epilogue: the most live registers
        kernel, cfg = _compile_for_sm90(T, H, D, (D, 1), (H, 1), impl.EPILOGUE_RELU_SQUARE_GRAD)
    else:  # dpreᵀ [H, T] · x [T, D], split-K over the ragged T
        kernel, cfg = _compile_for_sm90(H, D, T, (1, H), (D, 1), impl.EPILOGUE_NONE)
    ptx = kernel.asm["ptx"]
    return dict(cfg=cfg, wgmma="wgmma" in ptx, shared=kernel.metadata.shared, spills=_ptxas_spills(ptx))


@pytest.mark.slow
@pytest.mark.parametrize("role", ["dpre", "dw_fc"])
def test_kernel_compiles_for_h100(role):
    # The interpreter cannot show GPU-only failures (lowering, shared memory, register spills):
    # compile the two hardest speedrun GEMMs for sm_90a on this machine. On a GPU the tier-1/2 tests
    # compile and run the real kernels. The compiler refuses to run with TRITON_INTERPRET=1 set,
    # so a child process without it does the work.
    import json
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the tier-1/2 tests compile and run the real kernels")
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, os.path.abspath(__file__), role], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    cfg = facts["cfg"]
    if role == "dw_fc":
        assert cfg["SPLIT_K"] >= 2, cfg
    assert facts["wgmma"], "expected Hopper warpgroup MMA"
    stage_bytes = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2
    assert facts["shared"] >= cfg["num_stages"] * stage_bytes, f"loads were not software-pipelined: {facts}"
    assert facts["shared"] <= _H100_SMEM, facts
    assert facts["spills"] in (None, 0), f"register spill stores: {facts}"


# ---------------------------------------------------------------------------
# tier 2: full shapes on a GPU
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T, D", [(49152, 768), (65536, 1024), (4099, 768), (1, 1024)])
def test_gpu_full_shapes_match_float64(cuda_device, poisoned, T, D):
    _run_and_check(T, D, 4 * D, torch.bfloat16, cuda_device, seed=T + D)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes_match_float64(cuda_device, poisoned, dtype):
    _run_and_check(8191, 768, 3072, dtype, cuda_device, seed=3)


@pytest.mark.gpu
def test_gpu_split_k_is_deterministic(cuda_device):
    x, w_fc, w_proj, dy = _inputs(49152, 768, 3072, torch.bfloat16, cuda_device, seed=11)
    _, post = impl.forward(x, w_fc, w_proj)
    first = impl.backward(dy, x, w_fc, w_proj, post)
    second = impl.backward(dy, x, w_fc, w_proj, post)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


if __name__ == "__main__":  # child process of test_kernel_compiles_for_h100
    import json
    import sys

    print(json.dumps(_compile_role_for_sm90(sys.argv[1])))
