"""Triton Newton-Schulz: each kernel alone and the whole iteration vs float64 math.

tier 0: the sm_90a compile check of every kernel at the speedrun's shapes; the configuration table.
tier 1 (interpret): small odd shapes, CPU tensors under the Triton interpreter (CUDA tensors on a GPU),
    outputs NaN-poisoned, persistent grids of several tiles per program.
tier 2 (gpu): the speedrun's stacks and large squares.
"""

import math

import pytest
import torch

from oracles import QUINTIC, f64_newton_schulz, sm90_resource_report

BF16_HALF_ULP = 2.0**-8  # relative rounding error bound of one bf16 rounding
FP32_ACC = 1e-5          # bound on fp32 accumulation error relative to sum |terms| (k <= a few thousand)


@pytest.fixture
def tn():
    from kernels.triton_impl import newton_schulz as module
    return module


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, device, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(seed)).to(device=device, dtype=dtype)


def _poison(shape, device, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _padded(t, pad=3):
    """t as a view into a NaN-filled buffer larger in its last two dims: a read past a mask shows as NaN."""
    buf = torch.full((*t.shape[:-2], t.shape[-2] + pad, t.shape[-1] + pad), float("nan"), dtype=t.dtype,
                     device=t.device)
    view = buf[..., : t.shape[-2], : t.shape[-1]]
    view.copy_(t)
    return view


def _assert_within(out, ref, bound, what):
    """|out - ref| <= bound elementwise, every element written (NaN poison fails)."""
    out64 = out.double()
    assert torch.isfinite(out64).all(), f"{what}: {int((~torch.isfinite(out64)).sum())} elements not written/finite"
    excess = (out64 - ref).abs() - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{what}: error {float((out64 - ref).abs().flatten()[worst]):.3g} exceeds bound "
                               f"{float(bound.flatten()[worst]):.3g} at flat index {worst}")


def _rel_err(x, truth):
    return float((x.double() - truth).norm() / truth.norm())


def _bf16_reference(G, coefficients, norm_scale=1.0, eps=1e-7):
    from kernels.newton_schulz import reference_forward
    return reference_forward(G, coefficients, norm_scale, eps)


# ---------------------------------------------------------------------------
# tier 1: each kernel alone
# ---------------------------------------------------------------------------

# (batch, m, k): odd (ragged tiles), wide and tall, batch 1 and several, one fully even (no-mask path).
GRAM_SHAPES = [(1, 37, 101), (3, 37, 101), (2, 101, 37), (1, 5, 3), (2, 64, 96)]


@pytest.mark.interpret
@pytest.mark.parametrize("shape", GRAM_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "padded"])
def test_sym_xxt(tn, triton_device, shape, layout):
    batch, m, k = shape
    if layout == "transposed":  # X given as a strided view, as the tall path does
        X = _randn((batch, k, m), 1, triton_device, torch.bfloat16).mT
    else:
        X = _randn(shape, 1, triton_device, torch.bfloat16)
    if layout == "padded":
        X = _padded(X)
    out = _poison((batch, m, m), triton_device)
    A = tn.sym_xxt(X, out=out)
    assert A.data_ptr() == out.data_ptr() and A.dtype == torch.bfloat16
    x64 = X.double()
    ref = x64 @ x64.mT
    bound = BF16_HALF_ULP * ref.abs() + FP32_ACC * (x64.abs() @ x64.abs().mT)
    _assert_within(A, ref, bound, "sym_xxt")
    assert torch.equal(A, A.mT), "mirror tiles differ from their source tiles"


@pytest.mark.interpret
def test_sym_xxt_2d_and_default_out(tn, triton_device):
    X = _randn((37, 50), 2, triton_device, torch.float32)  # fp32 input: rounded to bf16 on load
    A = tn.sym_xxt(X)
    assert A.shape == (37, 37) and A.dtype == torch.bfloat16
    xb = X.bfloat16().double()
    ref = xb @ xb.T
    _assert_within(A, ref, BF16_HALF_ULP * ref.abs() + FP32_ACC * (xb.abs() @ xb.abs().T), "sym_xxt 2-D")


def _symmetric(batch, m, seed, device):
    R = torch.randn((batch, m, m), generator=_gen(seed), dtype=torch.float64)
    return ((R + R.mT) / (2 * math.sqrt(m))).to(device=device, dtype=torch.bfloat16)


@pytest.mark.interpret
@pytest.mark.parametrize("batch,m", [(1, 37), (3, 37), (2, 64), (1, 70)])
@pytest.mark.parametrize("padded", [False, True])
def test_sym_poly(tn, triton_device, batch, m, padded):
    A = _symmetric(batch, m, 3, triton_device)
    if padded:
        A = _padded(A)
    assert torch.equal(A, A.mT)
    b, c = QUINTIC[1], QUINTIC[2]
    out = _poison((batch, m, m), triton_device)
    S = tn.sym_poly(A, b, c, out=out)
    a64 = A.double()
    ref = b * a64 + c * (a64 @ a64)
    bound = BF16_HALF_ULP * ref.abs() + FP32_ACC * (abs(b) * a64.abs() + abs(c) * (a64.abs() @ a64.abs()))
    _assert_within(S, ref, bound, "sym_poly")
    assert torch.equal(S, S.mT)


AXPY_SHAPES = [(1, 37, 101), (3, 37, 101), (2, 64, 96), (1, 7, 5)]


@pytest.mark.interpret
@pytest.mark.parametrize("shape", AXPY_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "padded"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_axpy_matmul(tn, triton_device, shape, layout, out_dtype):
    batch, m, n = shape
    S = _symmetric(batch, m, 4, triton_device)
    if layout == "padded":
        S = _padded(S)
    if layout == "transposed":  # X and out as transposed views: the tall path's last step
        X = _randn((batch, n, m), 5, triton_device, torch.bfloat16).mT
        out_storage = _poison((batch, n, m), triton_device, out_dtype)
        out = out_storage.mT
    else:
        X = _randn(shape, 5, triton_device, torch.bfloat16)
        out = _poison(shape, triton_device, out_dtype)
        if layout == "padded":
            X = _padded(X)
    a = QUINTIC[0]
    Y = tn.axpy_matmul(S, X, a, out=out)
    assert Y.dtype == out_dtype and Y.data_ptr() == out.data_ptr()
    s64, x64 = S.double(), X.double()
    ref = a * x64 + s64 @ x64
    rounding = BF16_HALF_ULP * ref.abs() if out_dtype == torch.bfloat16 else 0.0
    bound = rounding + FP32_ACC * (abs(a) * x64.abs() + s64.abs() @ x64.abs())
    _assert_within(Y, ref, bound, "axpy_matmul")


# ---------------------------------------------------------------------------
# tier 1: the whole iteration
# ---------------------------------------------------------------------------

# (shape, steps): square, wide, tall, odd; batch 1 and several.
ITER_CASES = [((1, 37, 101), 5), ((3, 37, 101), 2), ((2, 101, 37), 5), ((1, 48, 48), 5), ((2, 33, 33), 3)]


@pytest.mark.interpret
@pytest.mark.parametrize("shape,steps", ITER_CASES)
def test_iteration_vs_float64(tn, triton_device, shape, steps):
    G = _randn(shape, 6, triton_device)
    coefficients = [QUINTIC] * steps
    out = _poison(shape, triton_device, torch.float32)
    X = tn._iterate(G, coefficients, 1.0, 1e-7, out)
    assert X.data_ptr() == out.data_ptr()
    assert torch.isfinite(X).all()
    truth = f64_newton_schulz(G.cpu(), coefficients).to(triton_device)
    err = _rel_err(X, truth)
    ref_err = _rel_err(_bf16_reference(G, coefficients, 1.0, 1e-7), truth)
    assert err <= 2 * ref_err + 1e-4, f"triton error {err:.3g} vs bf16 reference error {ref_err:.3g}"
    assert err < 0.05


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_dtypes(tn, triton_device, dtype):
    G = _randn((2, 21, 40), 7, triton_device, dtype)
    X = tn.forward(G, [QUINTIC] * 2, 1.0, 1e-7)
    assert X.dtype == dtype and X.shape == G.shape and X.is_contiguous()
    truth = f64_newton_schulz(G.cpu().double(), [QUINTIC] * 2).to(triton_device)
    ref_err = _rel_err(_bf16_reference(G, [QUINTIC] * 2, 1.0, 1e-7), truth)
    assert _rel_err(X, truth) <= 2 * ref_err + 1e-4


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(1, 24, 61), (2, 61, 24), (1, 33, 33)])
def test_quintic_singular_values_in_band(tn, triton_device, shape):
    # Well-conditioned input: singular values spread over [0.1, 1].
    batch, M, N = shape
    r = min(M, N)
    gen = _gen(8)
    U, _ = torch.linalg.qr(torch.randn(batch, M, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, N, r, generator=gen, dtype=torch.float64))
    s = torch.linspace(0.1, 1.0, r, dtype=torch.float64)
    G = (U * s) @ V.mT
    X = tn.forward(G.float().to(triton_device), [QUINTIC] * 5, 1.0, 1e-7)
    sv = torch.linalg.svdvals(X.cpu().double())
    assert sv.min() >= 0.5 and sv.max() <= 1.5, f"singular values in [{sv.min():.3f}, {sv.max():.3f}]"


@pytest.mark.interpret
def test_public_api_triton_backend(triton_device):
    import kernels
    G = _randn((2, 2, 21, 34), 9, triton_device)  # leading dims flattened by the op layer
    for coefficients in ("quintic", "polar_express"):
        X = kernels.newton_schulz(G, steps=2, coefficients=coefficients, backend="triton")
        ref = kernels.newton_schulz(G, steps=2, coefficients=coefficients, backend="reference")
        assert X.shape == G.shape and X.dtype == G.dtype
        norm_scale = 1.02 if coefficients == "polar_express" else 1.0
        from kernels.newton_schulz import resolve_coefficients
        per_step, _ = resolve_coefficients(coefficients, 2)
        truth = f64_newton_schulz(G.cpu().reshape(4, 21, 34), per_step, norm_scale).reshape(G.shape).to(triton_device)
        assert _rel_err(X, truth) <= 2 * _rel_err(ref, truth) + 1e-4


@pytest.mark.interpret
def test_muon_on_triton_backend(triton_device):
    from kernels.muon import Muon
    p = torch.nn.Parameter(_randn((3, 19, 26), 10, triton_device))
    q = torch.nn.Parameter(p.detach().clone())
    opt_t = Muon([p], lr=0.05, ns_steps=2, backend="triton")
    opt_r = Muon([q], lr=0.05, ns_steps=2, backend="reference")
    p.grad = _randn(p.shape, 11, triton_device)
    q.grad = p.grad.clone()
    before = p.detach().clone()
    opt_t.step()
    opt_r.step()
    d_t, d_r = p.detach() - before, q.detach() - before
    assert float((d_t - d_r).norm() / d_r.norm()) < 0.05


@pytest.mark.interpret
@pytest.mark.parametrize("programs", [1, 2, 5])
def test_persistent_programs_compute_the_same_tiles(tn, triton_device, programs):
    # Whichever program owns a tile, it computes it the same way: bit-identical results.
    X = _randn((3, 70, 45), 13, triton_device, torch.bfloat16)
    A = tn.sym_xxt(X, out=_poison((3, 70, 70), triton_device))
    A_p = tn.sym_xxt(X, out=_poison((3, 70, 70), triton_device), config=dict(BLOCK=32, BLOCK_K=32, PROGRAMS=programs))
    assert torch.equal(A, A_p)
    S = tn.sym_poly(A, -4.775, 2.0315, config=dict(BLOCK=32, BLOCK_K=32, PROGRAMS=programs))
    assert torch.equal(S, tn.sym_poly(A, -4.775, 2.0315))
    Y = tn.axpy_matmul(S[:, :, :], A[:, :, :45].contiguous(), 3.4, config=dict(
        BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, PROGRAMS=programs))
    assert torch.equal(Y, tn.axpy_matmul(S, A[:, :, :45].contiguous(), 3.4))


@pytest.mark.interpret
def test_diagonal_tiles_are_exactly_symmetric(tn, triton_device):
    # One 64-block holds the whole matrix: every tile is diagonal, so symmetry comes from the mirror alone.
    X = _randn((2, 50, 77), 15, triton_device, torch.bfloat16)
    A = tn.sym_xxt(X, out=_poison((2, 50, 50), triton_device), config=dict(BLOCK=64, BLOCK_K=32))
    assert torch.equal(A, A.mT)
    S = tn.sym_poly(A, -4.775, 2.0315, out=_poison((2, 50, 50), triton_device), config=dict(BLOCK=64, BLOCK_K=32))
    assert torch.equal(S, S.mT)


@pytest.mark.interpret
@pytest.mark.parametrize("scale", [1.0, 1e25, 1e37, 1e-30])
@pytest.mark.parametrize("shape, dtype", [((3, 37, 101), torch.float32), ((2, 64, 48), torch.bfloat16)])
def test_normalize_any_finite_scale(tn, triton_device, scale, shape, dtype):
    G = _randn(shape, 16, "cpu") * scale
    G = G.to(triton_device, dtype)
    X = tn.normalize(G, 1.02, 0.0, out=_poison(shape, triton_device))
    g64 = G.double()
    want = g64 / (1.02 * torch.linalg.vector_norm(g64, dim=(-2, -1), keepdim=True))
    _assert_within(X, want, BF16_HALF_ULP * want.abs() + 1e-6 * want.abs().amax(), f"normalize at {scale:g}")


@pytest.mark.interpret
def test_normalize_eps_zero_matrix_and_non_finite(tn, triton_device):
    G = _randn((4, 20, 30), 17, triton_device)
    G[1] = 0.0
    G[2, 3, 4] = float("inf")
    G[3, 0, 0] = float("nan")
    X = tn.normalize(G, 1.0, 1e-7, out=_poison(G.shape, triton_device))
    g64 = G[0].double()
    want = g64 / (torch.linalg.vector_norm(g64) + 1e-7)
    _assert_within(X[0], want, BF16_HALF_ULP * want.abs() + 1e-7, "normalize")
    assert torch.equal(X[1], torch.zeros_like(X[1]))       # 0 / (0 + eps)
    assert not torch.isfinite(X[2]).all() and not torch.isfinite(X[3]).all()


@pytest.mark.interpret
def test_huge_input_through_the_iteration(tn, triton_device):
    G = _randn((2, 21, 40), 18, triton_device) * 1e30  # ‖G‖² would be ~1e63 in fp32
    X = tn.forward(G, [QUINTIC] * 2, 1.0, 1e-7)
    truth = f64_newton_schulz(G.cpu(), [QUINTIC] * 2).to(triton_device)
    assert _rel_err(X, truth) < 0.05


@pytest.mark.interpret
def test_cublas_axpy_option(tn, triton_device):
    S = _symmetric(2, 37, 19, triton_device)
    X = _randn((2, 37, 50), 20, triton_device, torch.bfloat16)
    Y = tn.axpy_matmul(S, X, 3.4445, out=_poison((2, 37, 50), triton_device, torch.float32),
                       config=dict(impl="cublas"))
    ref = 3.4445 * X.double() + S.double() @ X.double()
    assert _rel_err(Y, ref) < 2e-2


# ---------------------------------------------------------------------------
# tier 1: argument checks (no kernel runs)
# ---------------------------------------------------------------------------

@pytest.mark.interpret
def test_launchers_reject_bad_input(tn, triton_device):
    X = _randn((2, 8, 12), 0, triton_device, torch.bfloat16)
    with pytest.raises(TypeError, match="X"):
        tn.sym_xxt(X.to(torch.float64))
    with pytest.raises(ValueError, match="X"):
        tn.sym_xxt(X[None])
    with pytest.raises(ValueError, match="out"):
        tn.sym_xxt(X, out=_poison((2, 8, 9), triton_device))
    with pytest.raises(ValueError, match="A"):
        tn.sym_poly(X, 1.0, 1.0)
    with pytest.raises(TypeError, match="b"):
        tn.sym_poly(X[:, :, :8], "1", 1.0)
    with pytest.raises(ValueError, match="S"):
        tn.axpy_matmul(X[:, :, :7], X, 1.0)
    S = X[:, :, :8]
    with pytest.raises(ValueError, match="out"):
        tn.axpy_matmul(S, X, 1.0, out=X)
    A = torch.zeros((2, 8, 8), dtype=torch.bfloat16, device=triton_device)
    with pytest.raises(ValueError, match="out"):
        tn.sym_poly(A, 1.0, 1.0, out=A)
    with pytest.raises(ValueError, match="out"):
        tn.sym_xxt(A, out=A)
    with pytest.raises(ValueError, match=r"config: missing keys \['BLOCK_K'\]"):
        tn.sym_xxt(X, config={"BLOCK": 16})
    with pytest.raises(ValueError, match=r"config\['BLOCK'\]: expected a positive int \(a power of two"):
        tn.sym_xxt(X, config={"BLOCK": 24, "BLOCK_K": 16})
    with pytest.raises(TypeError, match="norm_scale: expected a float"):
        tn.normalize(X, "1")


@pytest.mark.interpret
def test_explicit_config(tn, triton_device):
    # Benchmarks pass configs; a 16x16 tile gives 3x3 tiles for m = 37 (6 programs, 3 mirrored).
    X = _randn((2, 37, 45), 12, triton_device, torch.bfloat16)
    A = tn.sym_xxt(X, out=_poison((2, 37, 37), triton_device), config={"BLOCK": 16, "BLOCK_K": 16})
    ref = X.double() @ X.double().mT
    _assert_within(A, ref, BF16_HALF_ULP * ref.abs() + FP32_ACC * (X.double().abs() @ X.double().abs().mT), "16x16")


# ---------------------------------------------------------------------------
# tier 0: configuration table and the sm_90a compile check
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch, m, n", [(44, 768, 768), (24, 768, 3072), (6, 768, 768), (3, 768, 3072),
                                         (1, 4096, 4096), (2, 100, 300)])
def test_step_configs_fit_an_h100(tn, batch, m, n):
    cfg = tn.step_configs(batch, m, n, torch.device("cuda"), sms=132)
    for name in ("gram", "poly"):
        c = cfg[name]
        smem = 2 * c["BLOCK"] * c["BLOCK_K"] * 2 * c["num_stages"]
        assert smem * c.get("CTAS_PER_SM", 1) <= 227 * 1024, (name, c)
    c = cfg["axpy"]
    if c.get("impl") != "cublas":
        smem = (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * 2 * c["num_stages"]
        assert smem * c.get("CTAS_PER_SM", 1) <= 227 * 1024, c


def test_speedrun_wave_arithmetic(tn):
    # The tile counts the module docstring's wave arithmetic rests on (132 SMs, 128-tiles).
    from kernels.triton_impl._tiles import triangle
    assert 44 * triangle(768 // 128) == 924 == 7 * 132
    assert 44 * (768 // 128) ** 2 == 1584 == 12 * 132
    assert 24 * triangle(768 // 128) == 504 and 24 * 6 * 24 == 3456
    cfg = tn.step_configs(44, 768, 768, torch.device("cuda"), sms=132)
    assert cfg["gram"]["BLOCK"] == 128 and cfg["axpy"]["BLOCK_M"] == cfg["axpy"]["BLOCK_N"] == 128


@pytest.mark.slow
def test_kernels_compile_for_h100():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the tier-1/2 tests compile and run the real kernels")
    pytest.importorskip("triton.backends.nvidia")
    rows = sm90_resource_report("ns")
    assert len(rows) >= 12
    for r in rows:
        assert "error" not in r, r
        assert r["reg"] <= 255 and r["spill_stores"] in (0, None) and r["local"] == 0, f"register spills: {r}"
        assert r["shared"] <= 232448, r
        if any(k in r["case"] for k in ("sym_xxt", "sym_poly", "axpy")):
            assert r["HGMMA"] > 0, f"expected Hopper warpgroup MMA: {r}"
            assert r["LDGSTS"] > 0, f"expected cp.async-pipelined loads: {r}"


# ---------------------------------------------------------------------------
# tier 2: GPU, speedrun shapes and large squares
# ---------------------------------------------------------------------------

GPU_ITER_SHAPES = [(24, 3072, 768), (24, 768, 3072), (24, 768, 768), (1, 768, 768), (1, 4096, 4096),
                   (2, 1024, 1024), (1, 1000, 3001)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_ITER_SHAPES)
def test_gpu_iteration_vs_float64(tn, shape):
    G = _randn(shape, 20, "cpu").cuda().bfloat16()
    coefficients = [QUINTIC] * 5
    out = _poison(shape, "cuda")
    X = tn._iterate(G, coefficients, 1.0, 1e-7, out)
    truth = f64_newton_schulz(G.double(), coefficients)
    ref = _bf16_reference(G, coefficients)
    err, ref_err = _rel_err(X, truth), _rel_err(ref, truth)
    assert err <= 2 * ref_err, f"triton error {err:.3g} vs bf16 reference error {ref_err:.3g}"
    # The last matrix of the stack sits at the largest offsets: check it on its own.
    err_last, ref_last = _rel_err(X[-1], truth[-1]), _rel_err(ref[-1], truth[-1])
    assert err_last <= 2 * ref_last, f"last matrix: {err_last:.3g} vs {ref_last:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(24, 768, 3072), (4, 3072, 768), (4, 1024, 1024), (3, 1000, 1501)])
def test_gpu_kernels_alone(tn, shape):
    batch, m, n = shape
    X = (_randn(shape, 21, "cpu") / math.sqrt(n)).cuda().bfloat16()
    A = tn.sym_xxt(X, out=_poison((batch, m, m), "cuda"))
    x64 = X.double()
    ref = x64 @ x64.mT
    _assert_within(A, ref, BF16_HALF_ULP * ref.abs() + FP32_ACC * (x64.abs() @ x64.abs().mT), "sym_xxt")
    assert torch.equal(A, A.mT)
    S = tn.sym_poly(A, QUINTIC[1], QUINTIC[2], out=_poison((batch, m, m), "cuda"))
    a64 = A.double()
    ref = QUINTIC[1] * a64 + QUINTIC[2] * (a64 @ a64)
    bound = BF16_HALF_ULP * ref.abs() + FP32_ACC * (abs(QUINTIC[1]) * a64.abs() + QUINTIC[2] * (a64.abs() @ a64.abs()))
    _assert_within(S, ref, bound, "sym_poly")
    assert torch.equal(S, S.mT)
    Y = tn.axpy_matmul(S, X, QUINTIC[0], out=_poison(shape, "cuda"))
    s64 = S.double()
    ref = QUINTIC[0] * x64 + s64 @ x64
    bound = BF16_HALF_ULP * ref.abs() + FP32_ACC * (QUINTIC[0] * x64.abs() + s64.abs() @ x64.abs())
    _assert_within(Y, ref, bound, "axpy_matmul")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_public_api_dtypes(dtype):
    import kernels
    G = _randn((12, 768, 3072), 22, "cpu").cuda().to(dtype)
    X = kernels.newton_schulz(G, backend="triton")
    assert X.dtype == dtype and X.shape == G.shape
    truth = f64_newton_schulz(G.double(), [QUINTIC] * 5)
    ref = kernels.newton_schulz(G, backend="reference")
    assert _rel_err(X, truth) <= 2 * _rel_err(ref, truth)


@pytest.mark.gpu
def test_gpu_quintic_band_speedrun_shape(tn):
    gen = _gen(23)
    U, _ = torch.linalg.qr(torch.randn(4, 3072, 768, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(4, 768, 768, generator=gen, dtype=torch.float64))
    G = ((U * torch.linspace(0.05, 1.0, 768, dtype=torch.float64)) @ V.mT).cuda().bfloat16()
    X = tn.forward(G, [QUINTIC] * 5, 1.0, 1e-7)
    sv = torch.linalg.svdvals(X.double())
    assert sv.min() >= 0.5 and sv.max() <= 1.5, f"singular values in [{sv.min():.3f}, {sv.max():.3f}]"
