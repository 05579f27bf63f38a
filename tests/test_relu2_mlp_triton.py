"""Triton backend of relu2_mlp against float64 math.

tier 0: the configuration table and argument checks (no kernel runs); the sm_90a compile check.
tier 1 (interpret): small odd shapes through the backend functions, the fused GEMM launcher and
    the public op, on both load paths (TMA descriptors and pointers), both weight layouts and a
    persistent grid of several tiles per program; outputs come from NaN-poisoned buffers.
tier 2 (gpu): the speedrun's shapes (T up to 64K, D 768/1024, H = 4D).
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.triton_impl import relu2_mlp as impl  # noqa: E402
from oracles import f64_relu2_mlp, sm90_resource_report  # noqa: E402

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


def _inputs(T, D, H, dtype, device, seed, fc_layout="hd"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_fc = torch.randn(H, D, generator=g) / math.sqrt(D)
    w_proj = torch.randn(D, H, generator=g) / math.sqrt(H)
    dy = torch.randn(T, D, generator=g)
    x, w_fc, w_proj, dy = (t.to(device=device, dtype=dtype) for t in (x, w_fc, w_proj, dy))
    if fc_layout == "dh":  # stored [D, H], passed as its [H, D] transpose
        w_fc = w_fc.t().contiguous().t()
    return x, w_fc, w_proj, dy


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the backend allocates (outputs and dpre, cuBLAS ones included) starts as NaN."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(impl, "_alloc", alloc)


@pytest.fixture
def paths(monkeypatch):
    """The load path (TMA or pointers) of every fused GEMM launched during the test, in order."""
    seen = []
    real = impl.launch_args

    def spy(*args, **kwargs):
        grid, a, meta = real(*args, **kwargs)
        seen.append("tma" if meta["USE_TMA"] else "pointer")
        return grid, a, meta

    monkeypatch.setattr(impl, "launch_args", spy)
    return seen


def _run_and_check(T, D, H, dtype, device, seed, fc_layout="hd"):
    x, w_fc, w_proj, dy = _inputs(T, D, H, dtype, device, seed, fc_layout)
    out, post = impl.forward(x, w_fc, w_proj)
    dx, dw_fc, dw_proj = impl.backward(dy, x, w_fc, w_proj, post)
    assert out.dtype == post.dtype == dx.dtype == dw_fc.dtype == dw_proj.dtype == dtype
    # each weight gradient in its weight's layout
    assert dw_fc.stride() == w_fc.stride() and dw_proj.stride() == w_proj.stride()
    want = f64_relu2_mlp(x, w_fc, w_proj, dy)
    tol = _tol(dtype, device)
    for name, got, ref in zip(("out", "post", "dx", "dw_fc", "dw_proj"), (out, post, dx, dw_fc, dw_proj), want):
        _assert_close(name, got, ref, tol)


# ---------------------------------------------------------------------------
# tier 1: backend functions, launcher, public op
# ---------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_backward_match_float64(triton_device, poisoned, paths, dtype):
    _run_and_check(37, 40, 72, dtype, triton_device, seed=1)
    assert paths == ["tma", "tma"]


@pytest.mark.interpret
@pytest.mark.parametrize("T, D, H", [
    (1, 40, 72),     # a single token
    (64, 32, 128),   # every dim a multiple of the interpreter's blocks
    (97, 24, 200),   # several row blocks, a ragged last one in every dim
])
def test_batch_edges_match_float64(triton_device, poisoned, T, D, H):
    _run_and_check(T, D, H, torch.bfloat16, triton_device, seed=T)


@pytest.mark.interpret
@pytest.mark.parametrize("fc_layout", ["hd", "dh"])
def test_both_weight_layouts(triton_device, poisoned, paths, fc_layout):
    # w_fc as stored [H, D] (B read K-major) or stored [D, H] and passed transposed (B read N-major).
    _run_and_check(37, 40, 72, torch.bfloat16, triton_device, seed=2, fc_layout=fc_layout)
    assert paths == ["tma", "tma"]


@pytest.mark.interpret
@pytest.mark.parametrize("T, D, H", [(37, 37, 72), (20, 24, 70)])  # rows of 74 / 140 bytes: not 16-byte multiples
def test_pointer_path_for_operands_tma_cannot_describe(triton_device, poisoned, paths, T, D, H):
    _run_and_check(T, D, H, torch.bfloat16, triton_device, seed=3)
    assert paths == ["pointer", "pointer"]


@pytest.mark.interpret
@pytest.mark.parametrize("use_tma", [True, False])
@pytest.mark.parametrize("programs", [1, 4])
def test_persistent_grid_covers_every_tile(triton_device, use_tma, programs):
    # 4 x 4 tiles of 32 x 32 over 1 or 4 programs: every tile written, whichever program owns it.
    g = torch.Generator().manual_seed(programs)
    a = torch.randn(100, 48, generator=g).to(triton_device, torch.float16)
    b = (torch.randn(48, 112, generator=g) / 7).to(triton_device, torch.float16)
    post = torch.rand(100, 112, generator=g).to(triton_device, torch.float16)
    acc = a.double() @ b.double()
    for epilogue, aux, want in ((impl.EPILOGUE_RELU2, None, acc.relu().square()),
                                (impl.EPILOGUE_RELU2_GRAD, post, acc * 2 * post.double().sqrt())):
        out = torch.full((100, 112), float("nan"), dtype=torch.float16, device=triton_device)
        impl.fused_gemm(a, b, out, epilogue, aux, config=dict(PROGRAMS=programs, USE_TMA=use_tma))
        _assert_close(f"epilogue {epilogue}", out, want, _TOL[torch.float16])


@pytest.mark.interpret
@pytest.mark.parametrize("M, N", [(64, 48), (37, 64)])  # one dim a multiple of the 32-block, one ragged
def test_fused_gemm_stays_inside_its_views(triton_device, M, N):
    # Operands are windows of NaN-filled buffers: a load past K (or past the aux window)
    # turns valid outputs NaN. out is a window of a sentinel buffer: a store past M or N shows.
    # Row strides stay 16-byte multiples (pad 8), so the windows go through TMA.
    K, pad = 72, 8
    g = torch.Generator().manual_seed(M + N)

    def window(rows, cols, fill):
        buf = torch.full((rows + pad, cols + pad), fill, dtype=torch.float16)
        buf[:rows, :cols] = torch.rand(rows, cols, generator=g) - 0.25
        buf = buf.to(triton_device)
        return buf, buf[:rows, :cols]

    for use_tma in (True, False):
        _, a = window(M, K, float("nan"))
        _, b = window(K, N, float("nan"))
        _, post = window(M, N, float("nan"))
        post = post.abs()
        out_buf, _ = window(M, N, 1234.0)
        out_buf[:M, :N] = float("nan")
        out = out_buf[:M, :N]
        grid, args, meta = impl.launch_args(a, b, out, impl.EPILOGUE_RELU2_GRAD, post, dict(USE_TMA=use_tma))
        assert meta["USE_TMA"] == use_tma
        impl._relu2_gemm_kernel[grid](*args, **meta)
        _assert_close(f"out (tma={use_tma})", out, (a.double() @ b.double()) * 2 * post.double().sqrt(),
                      _TOL[torch.float16])
        outside = torch.ones_like(out_buf, dtype=torch.bool)
        outside[:M, :N] = False
        assert (out_buf[outside] == 1234.0).all(), f"the kernel wrote outside out's window (tma={use_tma})"


@pytest.mark.interpret
def test_non_finite_input_gives_non_finite_output(triton_device):
    x, w_fc, w_proj, dy = _inputs(37, 40, 72, torch.bfloat16, triton_device, seed=4)
    x[5, 3] = float("nan")
    x[9, 0] = float("inf")
    out, post = impl.forward(x, w_fc, w_proj)
    dx, dw_fc, dw_proj = impl.backward(dy, x, w_fc, w_proj, post)
    for row in (5, 9):
        assert not torch.isfinite(out[row]).all(), f"row {row}: a non-finite x gave a finite output"
    assert torch.isfinite(out[[0, 1, 2]]).all()
    assert not torch.isfinite(dw_fc).all() and not torch.isfinite(dw_proj).all()


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
    want = f64_relu2_mlp(x.reshape(T, D), w_fc, w_proj, dy.reshape(T, D))
    tol = _TOL[torch.bfloat16]
    _assert_close("out", out.reshape(T, D), want[0], tol)
    _assert_close("dx", leaves[0].grad.reshape(T, D), want[2], tol)
    _assert_close("dw_fc", leaves[1].grad, want[3], tol)
    _assert_close("dw_proj", leaves[2].grad, want[4], tol)


@pytest.mark.interpret
def test_public_op_with_fc_stored_wide(triton_device):
    # A model storing fc as [D, H] passes fc.T: no copy on the way in, its gradient arrives contiguous.
    T, D, H = 21, 40, 72
    x, w_fc, w_proj, dy = _inputs(T, D, H, torch.bfloat16, triton_device, seed=7)
    fc_wide = w_fc.t().contiguous().requires_grad_()  # [D, H]
    x.requires_grad_()
    out = kernels.relu2_mlp(x, fc_wide.t(), w_proj, backend="triton")
    out.backward(dy)
    assert fc_wide.grad.is_contiguous() and fc_wide.grad.shape == (D, H)
    want = f64_relu2_mlp(x, w_fc, w_proj, dy)
    _assert_close("out", out, want[0], _TOL[torch.bfloat16])
    _assert_close("dw_fc", fc_wide.grad.t(), want[3], _TOL[torch.bfloat16])


# ---------------------------------------------------------------------------
# tier 0: configuration table and argument checks (no kernel launch)
# ---------------------------------------------------------------------------

_H100_SMEM = 227 * 1024


@pytest.mark.parametrize("D", [768, 1024])
@pytest.mark.parametrize("T", [1, 37, 4096, 49152, 49189, 65536])
@pytest.mark.parametrize("epilogue", [impl.EPILOGUE_RELU2, impl.EPILOGUE_RELU2_GRAD])
def test_config_table_covers_speedrun_shapes(T, D, epilogue):
    H = 4 * D
    cfg = impl.gpu_config(T, H, D, torch.bfloat16, epilogue)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    assert bk >= 16 and min(bm, bn) >= 16 and bn % 2 == 0, cfg
    # pipeline stages + the epilogue's store staging half (+ the post half in the backward)
    halves = 1 if epilogue == impl.EPILOGUE_RELU2 else 2
    smem = (bm + bn) * bk * 2 * cfg["num_stages"] + halves * bm * (bn // 2) * 2
    assert smem <= _H100_SMEM, (cfg, smem)
    assert set(impl.CONFIG_KEYS) <= set(cfg)


def test_tma_path_only_for_views_a_descriptor_can_address():
    base = torch.zeros(64, 776, dtype=torch.bfloat16)
    assert impl._tma_ok(base[:, :768])                      # row stride 776·2 B: 16-byte multiple
    assert not impl._tma_ok(base[:, 1:769])                 # base 2 bytes off alignment
    assert not impl._tma_ok(torch.zeros(64, 766, dtype=torch.bfloat16))  # row stride 1532 B
    assert not impl._tma_ok(base.t())                       # inner stride not 1
    assert not impl._tma_ok(torch.zeros(1, 768, dtype=torch.bfloat16).expand(64, 768))  # rows overlap


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
    with pytest.raises(ValueError, match="x: expected a 2-D .* D >= 1"):
        impl.forward(x[:, :0], w_fc[:, :0], w_proj[:0])
    with pytest.raises(ValueError, match="w_fc: H = 0 rows"):
        impl.forward(x, w_fc[:0], w_proj[:, :0])
    with pytest.raises(ValueError, match=r"w_proj: expected shape \[8, 12\]"):
        impl.forward(x, w_fc, w_proj.t())
    with pytest.raises(ValueError, match=r"post: expected shape \[5, 12\]"):
        impl.backward(x, x, w_fc, w_proj, torch.zeros(5, 11, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="epilogue: expected"):
        impl.fused_gemm(x, w_fc.t(), torch.empty(5, 12, dtype=torch.bfloat16), epilogue=0)
    with pytest.raises(ValueError, match=r"aux: expected post of shape \[5, 12\]"):
        impl.fused_gemm(x, w_fc.t(), torch.empty(5, 12, dtype=torch.bfloat16), impl.EPILOGUE_RELU2_GRAD)


@pytest.fixture(scope="module")
def sm90_report():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the tier-1/2 tests compile and run the real kernels")
    pytest.importorskip("triton.backends.nvidia")
    return sm90_resource_report("relu2")


@pytest.mark.slow
def test_fused_gemms_compile_for_h100(sm90_report):
    # The interpreter cannot show GPU-only failures (lowering, shared memory, register spills):
    # every speedrun case of the fused GEMMs, compiled for sm_90a with this machine's triton.
    rows = sm90_report
    assert len(rows) == 12 and all(r["case"].startswith("relu2_mlp") for r in rows)
    for r in rows:
        assert "error" not in r, r
        assert r["HGMMA"] > 0, f"expected Hopper warpgroup MMA: {r}"
        assert r["reg"] <= 255 and r["spill_stores"] in (0, None) and r["local"] == 0, f"register spills: {r}"
        assert r["shared"] <= 232448, r
        if r["tma"]:
            assert r["UTMALDG"] > 0 and r["UTMASTG"] > 0, f"expected TMA loads and stores: {r}"
    assert sum(r["tma"] for r in rows) >= 10  # every aligned case takes the descriptor path


# ---------------------------------------------------------------------------
# tier 2: full shapes on a GPU
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T, D", [(49152, 768), (65536, 1024), (4099, 768), (1, 1024)])
def test_gpu_full_shapes_match_float64(cuda_device, poisoned, paths, T, D):
    _run_and_check(T, D, 4 * D, torch.bfloat16, cuda_device, seed=T + D)
    assert paths == ["tma", "tma"]


@pytest.mark.gpu
def test_gpu_fc_stored_wide_and_pointer_path(cuda_device, poisoned, paths):
    _run_and_check(8192 + 37, 768, 3072, torch.bfloat16, cuda_device, seed=9, fc_layout="dh")
    _run_and_check(4099, 766, 3064, torch.bfloat16, cuda_device, seed=10)  # 1532-byte rows: pointer path
    assert paths == ["tma", "tma", "pointer", "pointer"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes_match_float64(cuda_device, poisoned, dtype):
    _run_and_check(8191, 768, 3072, dtype, cuda_device, seed=3)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(cuda_device):
    x, w_fc, w_proj, dy = _inputs(49152, 768, 3072, torch.bfloat16, cuda_device, seed=11)
    _, post = impl.forward(x, w_fc, w_proj)
    first = impl.backward(dy, x, w_fc, w_proj, post)
    second = impl.backward(dy, x, w_fc, w_proj, post)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
