"""The CUDA extension kernels._C and the "cuda" backend.

tier 0 (unmarked, CPU): the install built and imports the extension (when nvcc exists), it
    needs no CUDA runtime library, a call without a GPU raises a clear "no CUDA device" error,
    bad arguments raise ValueError, the build never fails the install (no nvcc, a failing
    build, disabled), and extension_status() explains each outcome.
tier 2 (gpu): each kernel against float64 math or the op's own quantiser, on fresh random
    inputs, odd sizes, every dtype path, padded row strides and misaligned (scalar) paths,
    with outputs allocated as NaN poison; then the three ops through the public API.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fp8_head_oracle import f64_softcap_ce
from oracles import f64_newton_schulz

import kernels
import kernels.cuda_impl as cuda_impl
from kernels.cuda_impl import extension_status, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_GPU = torch.cuda.is_available()
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _nvcc_on_this_machine() -> bool:
    if os.environ.get("KERNELS_NO_CUDA_EXT") == "1":
        return False
    explicit = os.environ.get("KERNELS_NVCC")
    if explicit is not None:
        return os.path.isfile(explicit)
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    return (shutil.which("nvcc") is not None or os.path.isfile("/usr/local/cuda/bin/nvcc")
            or any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes))


def _ext():
    ok, reason = extension_status()
    if not ok:
        pytest.skip(reason)
    return cuda_impl.extension()


# ===========================================================================
# tier 0: build, import, errors without a GPU
# ===========================================================================

def test_install_built_the_extension_when_nvcc_exists():
    record = cuda_impl.build_record()
    if record is None:
        pytest.skip("no build record: the package was not installed through setup.py")
    if not _nvcc_on_this_machine():
        assert record["status"] in ("nvcc_missing", "disabled"), record
        return
    assert record["status"] == "built", f"nvcc is here but the extension did not build: {record}"
    ok, reason = extension_status()
    assert ok, reason


def test_extension_imports_and_links_cudart_statically():
    _C = _ext()
    assert isinstance(_C.runtime_info(), str) and "cudart" in _C.runtime_info()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not installed")
    dynamic = subprocess.run([readelf, "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not any("libcudart" in line or "libcuda." in line for line in needed), needed


_FAKE = 1 << 20  # a plausible, 16-byte aligned address; never dereferenced without a device

_CALLS = {
    "softcap_ce": lambda C: C.softcap_ce(device=0, stream=0, logits=_FAKE, logits_dtype=C.DTYPE_BFLOAT16,
                                         ld_logits=64, targets=_FAKE, rows=4, cols=64, softcap=15.0,
                                         logit_scale=1.0, ignore_index=-100, loss=_FAKE),
    "softcap_ce_record_rounding": lambda C: C.softcap_ce(
        device=0, stream=0, logits=_FAKE, logits_dtype=C.DTYPE_FLOAT32, ld_logits=64, targets=_FAKE, rows=4, cols=64,
        softcap=15.0, logit_scale=1.0, ignore_index=-100, loss=_FAKE, dlogits=_FAKE,
        dlogits_dtype=C.DTYPE_FLOAT8_E5M2, ld_dlogits=64, round_bf16=True),
    "fp8_amax": lambda C: C.fp8_amax(device=0, stream=0, x=_FAKE, dtype=C.DTYPE_FLOAT32, n=8, amax=_FAKE),
    "fp8_cast_record_rounding": lambda C: C.fp8_cast(device=0, stream=0, x=_FAKE, x_dtype=C.DTYPE_FLOAT32, rows=4,
                                                     cols=8, ld_x=8, out=_FAKE, ld_out=8, round_bf16=True),
    "fp8_cast": lambda C: C.fp8_cast(device=0, stream=0, x=_FAKE, x_dtype=C.DTYPE_BFLOAT16, rows=4, cols=8,
                                     ld_x=8, out=_FAKE, ld_out=8),
    "relu2_forward": lambda C: C.relu2_forward(device=0, stream=0, pre=_FAKE, dtype=C.DTYPE_BFLOAT16, n=8,
                                               out=_FAKE),
    "relu2_backward": lambda C: C.relu2_backward(device=0, stream=0, dpost=_FAKE, post=_FAKE,
                                                 dtype=C.DTYPE_BFLOAT16, n=8, out=_FAKE),
    "sym_xxt": lambda C: C.sym_xxt(device=0, stream=0, x=_FAKE, batch=1, m=8, k=8, sbx=64, ldx=8, out=_FAKE,
                                   out_dtype=C.DTYPE_BFLOAT16, sbo=64, ldo=8),
}


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("kernel", sorted(_CALLS))
def test_call_without_a_gpu_raises_a_clear_error(kernel):
    _C = _ext()
    assert _C.device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _CALLS[kernel](_C)


@pytest.mark.parametrize("call, pattern", [
    (lambda C: C.sym_xxt(device=0, stream=0, x=_FAKE, batch=1, m=8, k=13, sbx=104, ldx=13, out=_FAKE,
                         out_dtype=C.DTYPE_BFLOAT16, sbo=64, ldo=8), "16-byte aligned"),
    (lambda C: C.sym_xxt(device=0, stream=0, x=_FAKE, batch=1, m=8, k=8, sbx=64, ldx=8, out=_FAKE,
                         out_dtype=C.DTYPE_FLOAT8_E4M3, sbo=64, ldo=8), "out_dtype"),
    (lambda C: C.softcap_ce(device=0, stream=0, logits=_FAKE, logits_dtype=C.DTYPE_BFLOAT16, ld_logits=64,
                            targets=_FAKE, rows=4, cols=64, softcap=0.0, logit_scale=1.0, ignore_index=-100),
     "softcap"),
    (lambda C: C.softcap_ce(device=0, stream=0, logits=_FAKE, logits_dtype=C.DTYPE_FLOAT8_E4M3, ld_logits=64,
                            targets=_FAKE, rows=4, cols=64, softcap=15.0, logit_scale=1.0, ignore_index=-100),
     "logits"),
    (lambda C: C.softcap_ce(device=0, stream=0, logits=_FAKE, logits_dtype=C.DTYPE_BFLOAT16, ld_logits=32,
                            targets=_FAKE, rows=4, cols=64, softcap=15.0, logit_scale=1.0, ignore_index=-100),
     "ld_logits"),
    (lambda C: C.fp8_cast(device=0, stream=0, x=_FAKE, x_dtype=C.DTYPE_BFLOAT16, rows=4, cols=8, ld_x=8,
                          out=_FAKE, ld_out=8, out_dtype=C.DTYPE_BFLOAT16), "out_dtype"),
    (lambda C: C.fp8_amax(device=0, stream=0, x=_FAKE, dtype=C.DTYPE_FLOAT8_E5M2, n=8, amax=_FAKE), "x must be"),
    (lambda C: C.relu2_forward(device=0, stream=0, pre=_FAKE, dtype=C.DTYPE_FLOAT8_E4M3, n=8, out=_FAKE),
     "dtype"),
])
def test_bad_arguments_raise_value_error_before_touching_a_device(call, pattern):
    _C = _ext()
    with pytest.raises(ValueError, match=pattern):
        call(_C)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: ops.sym_xxt(torch.zeros(4, 8, dtype=torch.bfloat16)), ValueError, "x: the CUDA kernels need a CUDA"),
    (lambda: ops.fp8_cast(torch.zeros(4, 8)), ValueError, "x: the CUDA kernels need a CUDA"),
    (lambda: ops.relu2_forward(torch.zeros(4, 8)), ValueError, "pre: the CUDA kernels need a CUDA"),
    (lambda: ops.softcap_ce_forward(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), 15.0, 1.0),
     ValueError, "logits: the CUDA kernels need a CUDA"),
    (lambda: ops.sym_xxt([1, 2]), TypeError, "x: expected a torch.Tensor"),
])
def test_wrappers_reject_what_the_kernels_cannot_take(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("record, imported, expect_ok, pattern", [
    ({"status": "nvcc_missing", "message": "nvcc was not found at install time (looked in PATH)"}, False, False,
     r"^CUDA extension not built: nvcc was not found at install time"),
    ({"status": "failed", "message": "the nvcc build failed at install time: nvcc failed on x.cu"}, False, False,
     r"^CUDA extension not built: the nvcc build failed"),
    ({"status": "disabled", "message": "KERNELS_NO_CUDA_EXT=1 was set at install time"}, False, False,
     "KERNELS_NO_CUDA_EXT"),
    ({"status": "built", "message": "built with nvcc 13.0"}, False, False, "was built but does not import"),
    (None, False, False, "no build record"),
    ({"status": "built", "message": "built with nvcc 13.0 for sm_90a"}, True, True, "built with nvcc 13.0 for sm_90a"),
])
def test_extension_status_explains_each_build_outcome(monkeypatch, record, imported, expect_ok, pattern):
    class FakeExt:
        @staticmethod
        def runtime_info():
            return "cudart (fake)"

    monkeypatch.setattr(cuda_impl, "build_record", lambda: record)
    monkeypatch.setattr(cuda_impl, "_C", FakeExt if imported else None)
    monkeypatch.setattr(cuda_impl, "_IMPORT_ERROR", None if imported else ImportError("no module kernels._C"))
    ok, reason = extension_status()
    assert ok is expect_ok
    assert __import__("re").search(pattern, reason), reason
    if not expect_ok:
        # The dispatch passes the reason on when "cuda" is asked for.
        from kernels.backend import why_unavailable
        assert why_unavailable("cuda", torch.device("cuda")) == reason
        with pytest.raises(RuntimeError, match=pattern.lstrip("^")):
            cuda_impl.extension()


def _run_setup(tmp_path, **env):
    if not os.path.isfile(os.path.join(ROOT, "setup.py")):
        pytest.skip("no setup.py next to the tests (installed copy)")
    pytest.importorskip("pybind11", reason="setup.py builds the extension with pybind11")
    full_env = {k: v for k, v in os.environ.items() if k not in ("KERNELS_NVCC", "KERNELS_CUDA_ARCH",
                                                                "KERNELS_NO_CUDA_EXT")}
    full_env.update(env)
    lib, tmp = tmp_path / "lib", tmp_path / "tmp"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp",
                           str(tmp)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(lib / "kernels" / "_cuda_build.json") as f:
        return json.load(f), proc.stderr


@pytest.mark.parametrize("env, status, pattern", [
    ({"KERNELS_NVCC": "/nonexistent/nvcc"}, "nvcc_missing", "nvcc was not found at install time"),
    ({"KERNELS_NO_CUDA_EXT": "1"}, "disabled", "KERNELS_NO_CUDA_EXT=1"),
    ({"KERNELS_CUDA_ARCH": "sm_bogus"}, "failed", "KERNELS_CUDA_ARCH: cannot read target 'sm_bogus'"),
])
def test_the_build_never_fails_the_install(tmp_path, env, status, pattern):
    if status == "failed" and not _nvcc_on_this_machine():
        pytest.skip("a failing build needs an nvcc to fail with")
    record, log = _run_setup(tmp_path, **env)
    assert record["status"] == status and pattern in record["message"], record
    assert "not building the CUDA extension" in log or "building the CUDA extension failed" in log, log
    assert not list((tmp_path / "lib" / "kernels").glob("_C*.so"))


# ===========================================================================
# tier 0: the cuda backend's FP8-head glue, with the extension emulated on CPU
# ===========================================================================

class _EmulatedOps:
    """kernels.cuda_impl.ops' cast and CE wrappers with their documented contracts, in PyTorch on CPU."""

    def __init__(self):
        import importlib
        self.head = importlib.import_module("kernels.fp8_head")
        self.ce = importlib.import_module("kernels.softcap_cross_entropy")  # kernels.<name> is the function

    def fp8_cast(self, x, dtype=E4M3, scale=None, *, write=True, transpose=False, out=None, out_t=None,
                 round_bf16=False):
        assert out is None or out.stride(1) == 1
        used = (self.head.amax_scale(x.float(), torch.finfo(dtype).max) if scale is None
                else torch.as_tensor(scale, dtype=torch.float32).reshape(()))
        q = self.head.quantize(x.float(), used, dtype, round_bf16=round_bf16)
        if write:
            out = q if out is None else out.view(torch.uint8).copy_(q.view(torch.uint8)).view(dtype)
        if transpose:
            assert out_t is not None and out_t.stride(1) == 1
            out_t.view(torch.uint8).copy_(q.view(torch.uint8).t())
        return (out if write else None), (out_t if transpose else None), used

    def _grad(self, logits, targets, lse, softcap, logit_scale, ignore_index, grad, dl_scale, out, round_bf16):
        rows = logits.size(0)
        g = torch.ones(rows) if grad is None else torch.as_tensor(grad, dtype=torch.float32).expand(rows)
        d = self.ce.reference_backward(g, logits.float(), targets, lse, softcap, logit_scale, ignore_index)
        d = torch.where((targets != ignore_index)[:, None], d, 0.0)
        if round_bf16:
            d = d.to(torch.bfloat16).float()
        q = self.head.quantize(d, torch.as_tensor(dl_scale, dtype=torch.float32).reshape(()), out.dtype)
        out.view(torch.uint8).copy_(q.view(torch.uint8))

    def softcap_ce_forward(self, logits, targets, softcap, logit_scale, ignore_index=-100, *, grad=None,
                           dlogits_dtype=None, dl_scale=1.0, out=None, fast_tanh=False, round_bf16=False,
                           loss_out=None, lse_out=None):
        loss, lse = self.ce.reference_forward(logits.float(), targets, softcap, logit_scale, ignore_index)
        loss_out.copy_(loss)
        lse_out.copy_(lse)
        if dlogits_dtype is not None:
            self._grad(logits, targets, lse, softcap, logit_scale, ignore_index, grad, dl_scale, out, round_bf16)
        return loss_out, lse_out, out

    def softcap_ce_backward(self, logits, targets, lse, softcap, logit_scale, ignore_index=-100, *, grad=None,
                            dlogits_dtype=torch.bfloat16, dl_scale=1.0, out=None, fast_tanh=False, round_bf16=False):
        self._grad(logits, targets, lse, softcap, logit_scale, ignore_index, grad, dl_scale, out, round_bf16)
        return out


@pytest.mark.parametrize("reduction, rounding", [("sum", "fp32"), ("mean", "record"), ("none", "record")])
@pytest.mark.parametrize("T, D, V", [(37, 40, 203), (48, 32, 64)])
def test_cuda_backend_glue_matches_the_reference(monkeypatch, poisoned, reduction, rounding, T, D, V):
    # Everything of the cuda backend but its kernels: the chunk loop, padding, the transposed casts,
    # the CE arguments (g0 / row gradients, scales, record rounding) and the _scaled_mm layouts.
    from fp8_head_oracle import f64_fp8_head
    from kernels import fp8_head as head
    from kernels.cuda_impl import fp8_head as cuda_head

    emulated = _EmulatedOps()
    for name in ("fp8_cast", "softcap_ce_forward", "softcap_ce_backward"):
        monkeypatch.setattr(cuda_head.ops, name, getattr(emulated, name))
    monkeypatch.setattr(cuda_head, "_fp8_matmul_supported", lambda device: True)
    real_mm = torch._scaled_mm

    def strict_mm(a, b, *, scale_a, scale_b, out_dtype, use_fast_accum, out):
        assert a.stride(1) == 1 and a.stride(0) > 1 and b.stride(0) == 1 and b.stride(1) > 1, (a.stride(), b.stride())
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, (a.shape, b.shape)
        return real_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum,
                       out=out)

    monkeypatch.setattr(torch, "_scaled_mm", strict_mm)
    g = torch.Generator().manual_seed(T + V)
    x, w = torch.randn(T, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::5] = -100
    args = (x, w, targets, 15.0, 0.5, 0.011, 0.0037, 1 / 448, -100, reduction, True, True, rounding)
    loss, lse, dx, dw, x_f8, w_f8, used = cuda_head.forward(*args, chunk_rows=16)
    up = torch.rand(T, generator=g) + 0.5
    if reduction == "none":
        dx, dw = cuda_head.backward(torch.where(targets != -100, up, 0.0), x_f8, w_f8, targets, lse, used, 15.0, 0.5,
                                    1 / 448, -100, True, True, torch.float32, torch.float32, rounding, chunk_rows=16)
    want = f64_fp8_head(x, w, targets, logit_scale=0.5, scales=(0.011, 0.0037, 1 / 448), reduction=reduction,
                        rounding=rounding, upstream=up.double() if reduction == "none" else 1.0)
    assert torch.allclose(loss.double(), want["loss"], rtol=1e-5, atol=1e-5)
    for name, got in (("dx", dx), ("dw", dw)):
        assert _rel_err(got, want[name]) < 1e-4, (name, _rel_err(got, want[name]))
    assert head.chunk_rows_for(T, 1, 1) == 16


# ===========================================================================
# tier 2 helpers
# ===========================================================================

@pytest.fixture
def poisoned(monkeypatch):
    """Every output the wrappers allocate starts as NaN (float8: the NaN byte 0x7F)."""
    def alloc(shape, dtype, device):
        if dtype in (E4M3, E5M2):
            return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(dtype)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ops, "_alloc", alloc)


@pytest.fixture
def gpu():
    _ext()
    return torch.device("cuda")


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _padded_view(t, extra_cols):
    """t as a view with row stride t.size(1) + extra_cols into a NaN-filled buffer."""
    buf = torch.full((t.size(0), t.size(1) + extra_cols), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[:, :t.size(1)]
    view.copy_(t)
    return view


def _misaligned_view(t):
    """t as a view whose rows start 2 elements into a buffer: no 16-byte vector path."""
    buf = torch.full((t.size(0), t.size(1) + 2), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[:, 2:]
    view.copy_(t)
    return view


def _ce_float64(logits, targets, softcap, logit_scale, ignore_index, grad=None):
    """(loss, lse, dlogits) in float64; grad is d(total)/d(row_loss) per row (default 1).

    Non-finite logits and targets outside [0, V) that are not ignore_index give NaN rows.
    """
    return f64_softcap_ce(logits, targets, softcap, logit_scale, ignore_index, 1.0 if grad is None else grad)


def _ce_inputs(R, V, dtype, seed, ignore_some=True):
    g = _gen(seed)
    # Spread so that the softcap saturates for some logits (|logit·scale| > 15).
    logits = (torch.randn(R, V, generator=g, device="cuda") * 40).to(dtype)
    targets = torch.randint(0, V, (R,), generator=g, device="cuda")
    if ignore_some and R > 2:
        targets[1] = -100
        targets[-1] = -100
    return logits, targets


_FP8_REL = {E4M3: 2.0**-3, E5M2: 2.0**-2}    # one unit in the last place, relative
_FP8_TINY = {E4M3: 2.0**-9, E5M2: 2.0**-16}  # smallest subnormal


def _assert_fp8_close(name, got, want_scaled, dtype):
    """Dequantised float8 within one unit in the last place of the exact value (a rounding boundary may flip)."""
    raw = got.view(torch.uint8)
    assert not ((raw & 0x7F) == 0x7F).any(), f"{name}: NaN bytes (unwritten or non-finite)"
    got64 = got.double()
    want = want_scaled.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    err = (got64 - want).abs()
    bound = _FP8_REL[dtype] * want.abs() + _FP8_TINY[dtype]
    worst = float((err / bound).max())
    assert worst <= 1.0, f"{name}: max error {float(err.max()):.3g} is {worst:.2f}x the one-ulp bound"


def _assert_close(name, got, want, rtol, atol):
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite elements"
    err = (got.double() - want).abs()
    bound = rtol * want.abs() + atol
    worst = float((err / bound).max())
    assert worst <= 1.0, f"{name}: max error {float(err.max()):.3g} is {worst:.2f}x the bound"


# ===========================================================================
# tier 2: softcapped cross-entropy
# ===========================================================================

# (R, V): odd sizes; 60001 bf16 columns (117 KiB) overflow the shared-memory row cache.
_CE_SHAPES = [(1, 7), (37, 1000), (5, 4099), (3, 50304), (2, 60001)]


@pytest.mark.gpu
@pytest.mark.parametrize("R, V", _CE_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
def test_ce_forward_matches_float64(gpu, poisoned, R, V, dtype, layout):
    logits, targets = _ce_inputs(R, V, dtype, seed=R * 7 + V)
    view = {"contiguous": lambda t: t, "padded": lambda t: _padded_view(t, 5), "misaligned": _misaligned_view}[layout]
    loss, lse, dl = ops.softcap_ce_forward(view(logits), targets, 15.0, 1 / math.sqrt(768))
    assert dl is None
    want_loss, want_lse, _ = _ce_float64(logits, targets, 15.0, 1 / math.sqrt(768), -100)
    _assert_close("lse", lse, want_lse, 1e-5, 1e-4)
    _assert_close("loss", loss, want_loss, 1e-5, 1e-4)
    assert (loss[targets == -100] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("R, V", _CE_SHAPES)
@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", FLOATS + (E4M3, E5M2))
def test_ce_fused_forward_backward_matches_float64(gpu, poisoned, R, V, in_dtype, out_dtype):
    logits, targets = _ce_inputs(R, V, in_dtype, seed=R + V)
    grad = torch.rand(R, generator=_gen(R), device="cuda") + 0.5
    fp8 = out_dtype in (E4M3, E5M2)
    # fp8 needs a scale that puts the gradient in range: |dlogits| <= |grad| * logit_scale.
    scale = (float(grad.max()) * 0.5 / torch.finfo(out_dtype).max) if fp8 else 1.0
    loss, lse, dl = ops.softcap_ce_forward(logits, targets, 15.0, 0.5, grad=grad, dlogits_dtype=out_dtype,
                                           dl_scale=scale)
    want_loss, want_lse, want_dl = _ce_float64(logits, targets, 15.0, 0.5, -100, grad)
    _assert_close("loss", loss, want_loss, 1e-5, 1e-4)
    _assert_close("lse", lse, want_lse, 1e-5, 1e-4)
    assert dl.shape == (R, V) and dl.dtype == out_dtype
    # Pass 2 reads tanh rounded to fp16 from shared memory (|Δt| <= 2^-12|t|): p within 15·2^-12 = 3.7e-3
    # relatively, 1 - t² within 2^-11 absolutely; rows over the cache (60001 columns) use tanh.approx (2^-11).
    if fp8:
        _assert_fp8_close("dlogits", dl, want_dl / scale, out_dtype)
    else:
        _assert_close("dlogits", dl, want_dl, 2e-2, 2e-3 * float(want_dl.abs().max()))
    ignored = targets == -100
    assert (dl[ignored].float() == 0).all()
    # The backward from the saved lse recomputes tanh (tanh.approx): the same gradient within that error.
    dl_bwd = ops.softcap_ce_backward(logits, targets, lse, 15.0, 0.5, grad=grad, dlogits_dtype=out_dtype,
                                     dl_scale=scale)
    if fp8:
        _assert_fp8_close("dlogits from lse", dl_bwd, want_dl / scale, out_dtype)
    else:
        _assert_close("dlogits from lse", dl_bwd, want_dl, 2e-2, 2e-3 * float(want_dl.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("R, V", [(37, 1000), (3, 50304)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, E5M2])
def test_ce_fast_tanh_within_its_error_budget(gpu, poisoned, R, V, out_dtype):
    """tanh.approx in pass 1: |Δt| <= 2^-11·|t|, so |Δz| <= 7.3e-3 at softcap 15 and |Δloss| <= 1.5e-2."""
    logits, targets = _ce_inputs(R, V, torch.bfloat16, seed=R * V)
    scale = 2.0**-14 if out_dtype == E5M2 else 1.0
    loss, lse, dl = ops.softcap_ce_forward(logits, targets, 15.0, 1 / math.sqrt(768), dlogits_dtype=out_dtype,
                                           dl_scale=scale, fast_tanh=True)
    want_loss, want_lse, want_dl = _ce_float64(logits, targets, 15.0, 1 / math.sqrt(768), -100)
    _assert_close("lse", lse, want_lse, 0.0, 1e-2)
    _assert_close("loss", loss, want_loss, 0.0, 2e-2)
    got = dl.double() * scale
    # 1 - t² is off by up to 2|t||Δt| ~ 1e-3 in absolute terms, i.e. relative to the largest gradient.
    _assert_close("dlogits", got, want_dl, 0.3 if out_dtype == E5M2 else 2e-2, 2e-3 * float(want_dl.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("grad_kind", ["none", "float", "scalar_tensor", "rows_strided"])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_ce_backward_from_saved_lse(gpu, poisoned, grad_kind, scale_kind):
    R, V = 29, 3001
    logits, targets = _ce_inputs(R, V, torch.bfloat16, seed=11)
    _, lse, _ = ops.softcap_ce_forward(logits, targets, 15.0, 0.25)
    grad = {"none": None, "float": 0.75, "scalar_tensor": torch.tensor(0.75, device="cuda"),
            "rows_strided": (torch.rand(2 * R, generator=_gen(3), device="cuda") + 0.5)[::2]}[grad_kind]
    scale = 2.0**-5 if scale_kind == "float" else torch.full((1,), 2.0**-5, device="cuda")
    out = _padded_view(torch.zeros(R, V, device="cuda"), 3)  # row-padded destination
    dl = ops.softcap_ce_backward(logits, targets, lse, 15.0, 0.25, grad=grad, dlogits_dtype=torch.float32,
                                 dl_scale=scale, out=out)
    assert dl.data_ptr() == out.data_ptr()
    g = (None if grad is None else torch.as_tensor(grad, device="cuda", dtype=torch.float32))
    _, _, want = _ce_float64(logits, targets, 15.0, 0.25, -100, g)
    # tanh.approx (|Δt| <= 2^-11|t|): p within 7.3e-3 relatively, 1 - t² within 2^-10 absolutely.
    _assert_close("dlogits", dl, want / 2.0**-5, 2e-2, 2e-3 * float(want.abs().max()) / 2.0**-5)
    assert torch.isnan(out.as_strided((R, 3), (V + 3, 1), V)).all(), "wrote past the row into the padding"


@pytest.mark.gpu
def test_ce_non_finite_logits_and_bad_targets_poison_only_their_row(gpu):
    logits, targets = _ce_inputs(7, 333, torch.bfloat16, seed=5, ignore_some=False)
    logits[2, 17] = float("nan")
    logits[4, 3] = float("inf")  # tanh would saturate it to the finite z = softcap: NaN instead
    targets[6] = 333  # out of range and not ignore_index (the op's check switched off)
    loss, lse, dl = ops.softcap_ce_forward(logits, targets, 15.0, 1.0, dlogits_dtype=torch.bfloat16)
    for row in (2, 4, 6):
        assert torch.isnan(loss[row]) and torch.isnan(dl[row].float()).all(), row
    assert torch.isnan(lse[2]) and torch.isnan(lse[4]) and torch.isfinite(lse[6])
    keep = torch.tensor([0, 1, 3, 5], device="cuda")
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(dl[keep].float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [15.0, 40.0, 60.0])  # fixed shift up to 40, a running max above
def test_ce_large_softcap(gpu, poisoned, softcap):
    logits, targets = _ce_inputs(9, 5003, torch.float32, seed=int(softcap))
    logits = logits * 10  # most z near ±softcap: e^(z - softcap) spans e^(-2·softcap)
    loss, lse, _ = ops.softcap_ce_forward(logits, targets, softcap, 1.0)
    want_loss, want_lse, _ = _ce_float64(logits, targets, softcap, 1.0, -100)
    _assert_close("lse", lse, want_lse, 1e-5, 1e-4)
    _assert_close("loss", loss, want_loss, 1e-5, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_ce_record_rounding_of_the_gradient(gpu, poisoned, in_dtype):
    R, V = 33, 2001
    logits, targets = _ce_inputs(R, V, in_dtype, seed=21)
    scale = 1 / 448
    _, lse, dl = ops.softcap_ce_forward(logits, targets, 15.0, 0.5, dlogits_dtype=E5M2, dl_scale=scale,
                                        round_bf16=True)
    _, _, want = _ce_float64(logits, targets, 15.0, 0.5, -100)
    want = want.to(torch.bfloat16).double() / scale
    _assert_fp8_close("dlogits", dl, want, E5M2)


# ===========================================================================
# tier 2: float8 quantisation
# ===========================================================================

def _quantize_ref(t, scale, dtype):
    from kernels.fp8_head import quantize
    return quantize(t, scale, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 7, 4099, 1 << 20])
def test_amax_matches_torch_and_propagates_nan(gpu, dtype, n):
    x = (torch.randn(n, generator=_gen(n), device="cuda") * 3).to(dtype)
    assert ops.fp8_amax(x).item() == x.abs().amax().float().item()
    assert ops.fp8_amax(torch.zeros(n, dtype=dtype, device="cuda")).item() == 0.0
    x[n // 2] = float("nan")
    assert math.isnan(ops.fp8_amax(x).item())


def _cast_input(rows, cols, dtype, seed, specials=True):
    """Random values; with specials also saturating ones, a NaN and an inf (which make amax non-finite)."""
    t = torch.randn(rows, cols, generator=_gen(seed), device="cuda") * 100
    if specials:
        t[0, 0] = 1e6
        t[-1, -1] = -1e6
        if rows * cols > 4:
            t[rows // 2, cols // 2] = float("nan")
            t.view(-1)[1] = float("inf")
    if dtype in (E4M3, E5M2):
        return _quantize_ref(t, torch.tensor(1.0, device="cuda"), dtype)
    return t.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", FLOATS + (E4M3, E5M2))
@pytest.mark.parametrize("out_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 5), (64, 64), (65, 130), (257, 1000), (1024, 768)])
@pytest.mark.parametrize("scale_kind", ["dynamic", "float", "tensor"])
def test_cast_and_transposed_cast_match_the_op_quantiser(gpu, poisoned, in_dtype, out_dtype, rows, cols,
                                                         scale_kind):
    if scale_kind == "dynamic" and in_dtype in (E4M3, E5M2):
        pytest.skip("dynamic scales take fp32 / fp16 / bf16 inputs")
    x = _cast_input(rows, cols, in_dtype, seed=rows * cols, specials=scale_kind != "dynamic")
    if scale_kind == "dynamic":
        from kernels.fp8_head import amax_scale
        want_scale = amax_scale(x.float(), torch.finfo(out_dtype).max)
        scale = None
    else:
        want_scale = torch.tensor(0.37, device="cuda")
        scale = 0.37 if scale_kind == "float" else want_scale.clone()
    want = _quantize_ref(x.float(), want_scale, out_dtype).view(torch.uint8)
    q, q_t, used = ops.fp8_cast(x, out_dtype, scale, transpose=True)
    assert q.dtype == q_t.dtype == out_dtype and q_t.shape == (cols, rows)
    assert used.item() == want_scale.item()
    assert torch.equal(q.view(torch.uint8), want), "cast differs from kernels.fp8_head.quantize"
    assert torch.equal(q_t.view(torch.uint8), want.T), "transposed cast differs"
    # Flat path (no transpose), and a row-padded source through the tiled path.
    q_flat, none, _ = ops.fp8_cast(x, out_dtype, scale)
    assert none is None and torch.equal(q_flat.view(torch.uint8), want)
    if in_dtype not in (E4M3, E5M2):
        q_pad, _, _ = ops.fp8_cast(_misaligned_view(x), out_dtype, scale)
        assert torch.equal(q_pad.view(torch.uint8), want)
        # The record's rounding: x / scale to bf16 first, through both the flat and the tiled path.
        from kernels.fp8_head import quantize
        want_bf16 = quantize(x.float(), want_scale, out_dtype, round_bf16=True).view(torch.uint8)
        for transpose in (False, True):
            q_r, q_rt, _ = ops.fp8_cast(x, out_dtype, scale, transpose=transpose, round_bf16=True)
            assert torch.equal(q_r.view(torch.uint8), want_bf16), f"round_bf16 cast (transpose={transpose})"
            if transpose:
                assert torch.equal(q_rt.view(torch.uint8), want_bf16.T)


@pytest.mark.gpu
def test_transposed_cast_into_padded_destination(gpu):
    x = _cast_input(50, 70, torch.bfloat16, seed=1)
    buf = torch.full((80, 64), 0x55, dtype=torch.uint8, device="cuda").view(E4M3)
    out_t = buf[:70, :50]
    ops.fp8_cast(x, E4M3, 0.5, write=False, transpose=True, out_t=out_t)
    want = _quantize_ref(x.float(), torch.tensor(0.5, device="cuda"), E4M3).view(torch.uint8)
    raw = buf.view(torch.uint8)
    assert torch.equal(raw[:70, :50], want.T)
    assert (raw[70:] == 0x55).all() and (raw[:, 50:] == 0x55).all(), "wrote outside the destination view"


# ===========================================================================
# tier 2: relu²
# ===========================================================================

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 13, 4099, 3 * 1024 * 1024 + 5])
@pytest.mark.parametrize("f8", [None, E4M3, E5M2])
def test_relu2_forward_backward_match_the_reference_in_dtype(gpu, poisoned, dtype, n, f8):
    g = _gen(n)
    pre = (torch.randn(n, generator=g, device="cuda") * 4).to(dtype)
    if n > 1:
        pre[n // 2] = float("nan")  # relu keeps NaN, as torch.relu does
    dpost = torch.randn(n, generator=g, device="cuda").to(dtype)
    post, post_f8 = ops.relu2_forward(pre, f8_dtype=f8, f8_scale=0.25)
    want_post = torch.relu(pre).square()
    torch.testing.assert_close(post, want_post, rtol=0, atol=0, equal_nan=True)
    dpre, dpre_f8 = ops.relu2_backward(dpost, post, f8_dtype=f8, f8_scale=torch.full((1,), 0.5, device="cuda"))
    want_dpre = dpost * (2 * post.sqrt())
    torch.testing.assert_close(dpre, want_dpre, rtol=0, atol=0, equal_nan=True)
    if f8 is not None:
        assert torch.equal(post_f8.view(torch.uint8),
                           _quantize_ref(want_post, torch.tensor(0.25, device="cuda"), f8).view(torch.uint8))
        assert torch.equal(dpre_f8.view(torch.uint8),
                           _quantize_ref(want_dpre, torch.tensor(0.5, device="cuda"), f8).view(torch.uint8))
    else:
        assert post_f8 is None and dpre_f8 is None


@pytest.mark.gpu
def test_relu2_misaligned_scalar_path(gpu, poisoned):
    base = torch.randn(1001, generator=_gen(1), device="cuda").to(torch.bfloat16)
    pre = base[1:]  # 2 bytes into the buffer: no 16-byte vectors
    assert pre.data_ptr() % 16 != 0
    post, _ = ops.relu2_forward(pre)
    torch.testing.assert_close(post, torch.relu(pre).square(), rtol=0, atol=0)
    dpre, _ = ops.relu2_backward(pre, post)
    torch.testing.assert_close(dpre, pre * (2 * post.sqrt()), rtol=0, atol=0)


# ===========================================================================
# tier 2: symmetric X·Xᵀ
# ===========================================================================

BF16_HALF_ULP = 2.0**-8
FP32_ACC = 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("B, M, K", [(1, 1, 8), (1, 7, 24), (3, 65, 40), (2, 130, 13), (1, 200, 1000),
                                     (4, 256, 768), (2, 768, 3072)])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_sym_xxt_matches_float64_and_is_exactly_symmetric(gpu, poisoned, B, M, K, tile, out_dtype):
    x = torch.randn(B, M, K, generator=_gen(M * K), device="cuda").to(torch.bfloat16)
    A = ops.sym_xxt(x, out_dtype, tile=tile)
    assert A.shape == (B, M, M) and A.dtype == out_dtype
    x64 = x.double()
    ref = x64 @ x64.mT
    bound = FP32_ACC * (x64.abs() @ x64.abs().mT)
    if out_dtype == torch.bfloat16:
        bound = bound + BF16_HALF_ULP * ref.abs()
    err = (A.double() - ref).abs()
    assert torch.isfinite(A).all(), "unwritten elements"
    assert (err <= bound).all(), f"max excess {float((err - bound).max()):.3g}"
    assert torch.equal(A, A.mT), "mirrored tiles differ from their source tiles"


@pytest.mark.gpu
def test_sym_xxt_strided_and_2d_inputs(gpu, poisoned):
    x = torch.randn(3, 40, 64, device="cuda").to(torch.bfloat16)
    ref = x.double() @ x.double().mT
    for variant in (x[:, :, :50], x.mT.contiguous().mT, x[1]):
        A = ops.sym_xxt(variant, torch.float32)
        v64 = variant.double()
        assert torch.allclose(A.double(), v64 @ v64.mT, rtol=1e-5, atol=1e-3)
    assert torch.allclose(ops.sym_xxt(x, torch.float32).double(), ref, rtol=1e-5, atol=1e-3)


# ===========================================================================
# tier 2: the three ops through the public API
# ===========================================================================

def _rel_err(got, truth):
    return float((got.double() - truth).norm() / truth.norm())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 37), (37, 5), (3, 64, 96), (2, 130, 70), (12, 768, 768), (4, 768, 3072)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_newton_schulz_cuda_backend(gpu, shape, dtype):
    G = torch.randn(shape, generator=_gen(sum(shape)), device="cuda").to(dtype)
    X = kernels.newton_schulz(G, steps=5, backend="cuda")
    ref = kernels.newton_schulz(G, steps=5, backend="reference")
    assert X.shape == G.shape and X.dtype == dtype and torch.isfinite(X).all()
    truth = f64_newton_schulz(G, [(3.4445, -4.7750, 2.0315)] * 5)
    assert _rel_err(X, truth) <= 2 * _rel_err(ref, truth) + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("T, D, H", [(1, 8, 32), (37, 24, 100), (1000, 768, 3072)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_relu2_mlp_cuda_backend(gpu, T, D, H, dtype):
    g = _gen(T + D + H)
    x = torch.randn(T, D, generator=g, device="cuda").to(dtype).requires_grad_()
    w_fc = (torch.randn(H, D, generator=g, device="cuda") / math.sqrt(D)).to(dtype).requires_grad_()
    w_proj = (torch.randn(D, H, generator=g, device="cuda") / math.sqrt(H)).to(dtype).requires_grad_()
    dy = torch.randn(T, D, generator=g, device="cuda").to(dtype)
    results = {}
    for backend in ("cuda", "reference"):
        out = kernels.relu2_mlp(x, w_fc, w_proj, backend=backend)
        grads = torch.autograd.grad(out, (x, w_fc, w_proj), dy)
        results[backend] = (out, *grads)
    x64, wf64, wp64, dy64 = (t.detach().double() for t in (x, w_fc, w_proj, dy))
    pre = x64 @ wf64.T
    out64 = pre.relu().square() @ wp64.T
    dpre = (dy64 @ wp64) * 2 * pre.relu()
    truth = (out64, dpre @ wf64, dpre.T @ x64, dy64.T @ pre.relu().square())
    for name, got, ref, want in zip(("out", "dx", "dw_fc", "dw_proj"), results["cuda"], results["reference"], truth):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        assert _rel_err(got, want) <= 2 * _rel_err(ref, want) + 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("T, D, V", [(7, 24, 37), (64, 128, 1000), (300, 768, 50304)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static_scales", [False, True])
@pytest.mark.parametrize("reduction, rounding", [("sum", "fp32"), ("mean", "record"), ("none", "fp32")])
def test_fp8_head_cuda_backend_matches_float64(gpu, T, D, V, dtype, static_scales, reduction, rounding):
    from fp8_head_oracle import f64_fp8_head

    g = _gen(T + D + V)
    x = torch.randn(T, D, generator=g, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, device="cuda") * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g, device="cuda")
    targets[T // 2] = -100
    scales = kernels.SPEEDRUN_SCALES if static_scales else None
    loss = kernels.fp8_head_loss(x, w, targets, logit_scale=D**-0.5, scales=scales, reduction=reduction,
                                 backend="cuda", rounding=rounding)
    up = torch.rand(loss.shape, generator=_gen(1), device="cuda") + 0.5
    dx, dw = torch.autograd.grad(loss, (x, w), up)
    want = f64_fp8_head(x.detach(), w.detach(), targets, logit_scale=D**-0.5, scales=scales, reduction=reduction,
                        rounding=rounding, upstream=up.double() if reduction == "none" else float(up))
    assert torch.allclose(loss.double(), want["loss"], rtol=1e-5, atol=1e-5)
    # The CE kernel's fp16-cached tanh moves ~1 % of the e5m2 codes by one step against float64.
    for name, got, ref in (("dx", dx, want["dx"]), ("dw", dw, want["dw"])):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        cos = torch.nn.functional.cosine_similarity(got.double().flatten(), ref.flatten(), dim=0)
        assert cos > 0.9999, (name, float(cos))
        assert _rel_err(got, ref) < 2e-2, name
