"""The hand-written CUDA kernels (kernels._C) one by one, against torch and the Triton equivalents.

Kernels and providers:
  cuda_softcap_ce  bf16 logits [T, V]: fwd = loss + lse; bwd = dlogits from a saved lse;
                   fwd+bwd = loss + dlogits in one pass (bf16, and e5m2 as "cuda_e5m2").
                   reference = the op's fp32 PyTorch math, compiled = it under torch.compile
                   (the Triton CE kernel is timed at the FP8 head's chunk shape in bench_fp8_head).
  cuda_fp8_cast    static-scale e4m3 cast of a bf16 tensor (cuda, cuda_dynamic with the amax pass),
                   and the transposed e5m2 re-cast the FP8 head's backward needs (mode "bwd").
                   reference = kernels.fp8_head.quantize (eager), compiled = it compiled.
  cuda_relu2       relu² forward and backward over [T, H] bf16.
  cuda_sym_xxt     X·Xᵀ for bf16 [B, M, K]: torch.bmm, the Triton symmetric kernel, the CUDA one.
Bytes count each operand read once and each result written once ("effective" bandwidth);
every provider is first checked against float64 math (on a subset of rows for [T, V]).

    python -m benchmarks.bench_cuda_kernels [--smoke] [--full] [--out DIR]
"""

import importlib
import math

import torch

from benchmarks import harness

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
H100_HBM_GBPS = 3350.0  # the fraction of it that 2.5 TB/s is, for the peak_fraction targets
TB_25 = 2500.0 / H100_HBM_GBPS

CE_SPEEDRUN = {"T": 49152, "V": 50304}
CAST_BIG = {"R": 49152, "C": 3072}
XXT_TARGET = {"B": 12, "M": 768, "K": 3072}


def _cuda_ops(ctx, op="fp8_head"):
    """(ops module, None) when the cuda backend runs here, else (None, reason)."""
    reason = ctx.unavailable(op, "cuda")
    if reason is not None:
        return None, reason
    return importlib.import_module("kernels.cuda_impl.ops"), None


def _rows_subset(T: int) -> torch.Tensor:
    """Rows the float64 oracle checks: both ends and a stride through the middle."""
    idx = sorted(set(list(range(min(T, 64))) + list(range(max(T - 64, 0), T)) + list(range(0, T, max(T // 64, 1)))))
    return torch.tensor(idx)


# ---------------------------------------------------------------------------
# Softcapped cross-entropy
# ---------------------------------------------------------------------------

def bench_softcap_ce(ctx) -> None:
    kernel = "cuda_softcap_ce"
    ctx.declare_kernel(
        kernel, reference="reference", compiled="compiled", peak="bf16",
        description="softcap 15 cross-entropy over bf16 logits [T, V]; bytes: logits read once, dlogits "
                    "written once, per-row vectors",
        targets=[harness.Target(CE_SPEEDRUN, "fwd+bwd", "cuda", "peak_fraction", TB_25, None,
                                "issue 7: ≥ 2.5 TB/s effective (read logits, write bf16 dlogits)")])
    ce = importlib.import_module("kernels.softcap_cross_entropy")
    ops, why_not = _cuda_ops(ctx)
    softcap, logit_scale = 15.0, 1 / math.sqrt(768)

    def ref_fwd(logits, targets):
        return ce.reference_forward(logits, targets, softcap, logit_scale, -100)

    def ref_bwd(logits, targets, lse, grad):
        return ce.reference_backward(grad, logits, targets, lse, softcap, logit_scale, -100).to(torch.bfloat16)

    def ref_fused(logits, targets, grad):
        loss, lse = ref_fwd(logits, targets)
        return loss, ref_bwd(logits, targets, lse, grad)

    compiled_fwd, compiled_bwd, compiled_fused = ctx.compile(ref_fwd), ctx.compile(ref_bwd), ctx.compile(ref_fused)

    shapes = [{"T": 19, "V": 77}] if ctx.smoke else [CE_SPEEDRUN, {"T": 8192, "V": 50304}, {"T": 4099, "V": 32001}]
    for shape in shapes[:1] if ctx.proof else shapes:
        T, V = shape["T"], shape["V"]
        gen = torch.Generator(device=ctx.device).manual_seed(T + V)
        logits = (torch.randn(T, V, device=ctx.device, generator=gen) * 30).to(torch.bfloat16)
        targets = torch.randint(0, V, (T,), device=ctx.device, generator=gen)
        targets[::97] = -100
        grad = torch.full((T,), 1.0 / T, device=ctx.device)
        rows = _rows_subset(T).to(ctx.device)
        sub = logits[rows]
        t64 = torch.tanh(sub.double() * (logit_scale / softcap))
        z64 = softcap * t64
        lse64 = torch.logsumexp(z64, dim=1)
        valid = targets[rows] != -100
        safe = torch.where(valid, targets[rows], 0)
        loss64 = torch.where(valid, lse64 - z64.gather(1, safe[:, None]).squeeze(1), 0.0)
        p64 = torch.exp(z64 - lse64[:, None])
        p64[torch.arange(len(rows), device=ctx.device), safe] -= 1
        dl64 = p64 * torch.where(valid, grad[rows].double(), 0.0)[:, None] * logit_scale * (1 - t64 * t64)
        # The saved lse every provider's backward starts from, in row chunks to bound memory.
        lse_saved = torch.cat([ref_fwd(logits[i:i + 4096], targets[i:i + 4096])[1] for i in range(0, T, 4096)])

        elt = 2
        vec = T * (8 + 4 + 4)  # targets, loss, lse
        costs = {"fwd": T * V * elt + vec, "bwd": T * V * (elt + elt) + vec + T * 4,
                 "fwd+bwd": T * V * (elt + elt) + vec + T * 4}

        def check_fused(out, scale=1.0, fp8=False, loss_tol=1e-4):
            loss, dl = out
            metrics = harness.compare("loss", loss[rows], loss64, rel_tol=loss_tol)
            # e5m2 keeps 2 mantissa bits: up to 12.5% per element.
            metrics.update(harness.compare("dlogits", dl[rows].double() * scale, dl64, rel_tol=0.1 if fp8 else 2e-2,
                                           cos_min=0.99 if fp8 else 0.999))
            return metrics

        # (implementation, float8 dlogits dtype or None for bf16, tanh.approx in the CUDA kernel)
        providers = {"reference": ("ref", None, False), "compiled": ("compiled", None, False),
                     "cuda": ("cuda", None, False), "cuda_fast_tanh": ("cuda", None, True),
                     "cuda_e5m2": ("cuda", E5M2, False)}
        # The Triton CE kernel is timed beside this one at the FP8 head's chunk shape: bench_fp8_head's fp8_head_ce.
        for name, (impl, dl_dtype, fast) in ctx.ordered(providers):
            if impl == "cuda" and ops is None:
                for mode in (harness.MODES if dl_dtype is None else ("fwd+bwd",)):
                    ctx.skip(kernel=kernel, shape=shape, provider=name, mode=mode, note=why_not)
                continue
            gs = 2.0**-16  # puts |dlogits| <= logit_scale / T well inside e5m2
            out_bytes = 1 if dl_dtype is not None else 2
            fused_bytes = T * V * (elt + out_bytes) + vec
            if impl == "ref":
                fwd = lambda: ref_fwd(logits, targets)  # noqa: E731
                bwd = lambda: ref_bwd(logits, targets, lse_saved, grad)  # noqa: E731
                fused = lambda: ref_fused(logits, targets, grad)  # noqa: E731
            elif impl == "compiled":
                fwd = lambda: compiled_fwd(logits, targets)  # noqa: E731
                bwd = lambda: compiled_bwd(logits, targets, lse_saved, grad)  # noqa: E731
                fused = lambda: compiled_fused(logits, targets, grad)  # noqa: E731
            elif impl == "cuda":
                fwd = lambda fast=fast: ops.softcap_ce_forward(  # noqa: E731
                    logits, targets, softcap, logit_scale, fast_tanh=fast)
                dtype = dl_dtype or torch.bfloat16
                scale = gs if dl_dtype is not None else 1.0
                bwd = lambda dtype=dtype, scale=scale, fast=fast: ops.softcap_ce_backward(  # noqa: E731
                    logits, targets, lse_saved, softcap, logit_scale, grad=grad, dlogits_dtype=dtype, dl_scale=scale,
                    fast_tanh=fast)
                fused = lambda dtype=dtype, scale=scale, fast=fast: ops.softcap_ce_forward(  # noqa: E731
                    logits, targets, softcap, logit_scale, grad=grad, dlogits_dtype=dtype, dl_scale=scale,
                    fast_tanh=fast)[::2]
            # tanh.approx moves z by up to 7e-3 (see csrc/softcap_ce.cu): looser loss tolerance.
            loss_tol = 2e-3 if fast else 1e-4
            if impl in ("ref", "compiled", "cuda") and dl_dtype is None:
                ctx.bench(kernel=kernel, shape=shape, provider=name, mode="fwd", fn=fwd, flops=None,
                          bytes_moved=costs["fwd"],
                          check=lambda fwd=fwd, tol=loss_tol: harness.compare("loss", fwd()[0][rows], loss64,
                                                                              rel_tol=tol))
                ctx.bench(kernel=kernel, shape=shape, provider=name, mode="bwd", fn=bwd, flops=None,
                          bytes_moved=costs["bwd"],
                          check=lambda bwd=bwd: harness.compare("dlogits", bwd()[rows], dl64, rel_tol=2e-2,
                                                                cos_min=0.999))
            scale = gs if dl_dtype is not None else 1.0
            ctx.bench(kernel=kernel, shape=shape, provider=name, mode="fwd+bwd", fn=fused, flops=None,
                      bytes_moved=fused_bytes if dl_dtype is not None else costs["fwd+bwd"],
                      check=lambda fused=fused, scale=scale, fp8=dl_dtype is not None, tol=loss_tol: check_fused(
                          fused(), scale, fp8, tol),
                      note=("e5m2 dlogits" if dl_dtype is not None else "") + (" tanh.approx" if fast else ""))
            fwd = bwd = fused = None
            ctx.cleanup()
        del logits, targets, grad, sub, lse_saved
        ctx.cleanup()


# ---------------------------------------------------------------------------
# Float8 casts
# ---------------------------------------------------------------------------

def bench_fp8_cast(ctx) -> None:
    kernel = "cuda_fp8_cast"
    ctx.declare_kernel(
        kernel, reference="reference", compiled="compiled", peak="bf16",
        description="fwd: bf16 [R, C] -> e4m3 with a per-tensor scale; bwd: e5m2 [R, C] -> its transpose "
                    "(the head backward's dlᵀ); bytes: read once, write once",
        targets=[harness.Target(CAST_BIG, "fwd", "cuda", "peak_fraction", TB_25, None,
                                "issue 7: the FP8 cast ≥ 2.5 TB/s effective")])
    fp8 = importlib.import_module("kernels.fp8_head")
    ops, why_not = _cuda_ops(ctx)

    def ref_cast(x, scale):
        return fp8.quantize(x, scale, E4M3)

    def ref_dynamic(x):
        return fp8.quantize(x, fp8.amax_scale(x, 448.0), E4M3)

    def ref_transpose(q):
        return q.t().contiguous()

    compiled_cast, compiled_dynamic = ctx.compile(ref_cast), ctx.compile(ref_dynamic)
    compiled_transpose = ctx.compile(ref_transpose)

    shapes = [{"R": 19, "C": 77}] if ctx.smoke else [CAST_BIG, {"R": 49152, "C": 768}, {"R": 4099, "C": 50304}]
    for shape in shapes[:1] if ctx.proof else shapes:
        R, C = shape["R"], shape["C"]
        gen = torch.Generator(device=ctx.device).manual_seed(R + C)
        x = torch.randn(R, C, device=ctx.device, generator=gen).to(torch.bfloat16) * 20
        scale = torch.tensor(0.05, device=ctx.device)
        want = ref_cast(x, scale).view(torch.uint8)
        want_dyn = ref_dynamic(x).view(torch.uint8)
        q5 = fp8.quantize(x, scale, E5M2)

        def exact(name, got, want):
            if not torch.equal(got.view(torch.uint8), want):
                bad = int((got.view(torch.uint8) != want).sum())
                raise harness.ValidationError(f"{name}: {bad} bytes differ from kernels.fp8_head.quantize")
            return {f"{name}_exact": 1.0}

        fwd_bytes, bwd_bytes = R * C * (2 + 1), R * C * 2
        casts = {"reference": (lambda: ref_cast(x, scale), want),
                 "reference_dynamic": (lambda: ref_dynamic(x), want_dyn),
                 "compiled": (lambda: compiled_cast(x, scale), want),
                 "compiled_dynamic": (lambda: compiled_dynamic(x), want_dyn)}
        transposes = {"reference": lambda: ref_transpose(q5), "compiled": lambda: compiled_transpose(q5)}
        if ops is not None:
            casts["cuda"] = (lambda: ops.fp8_cast(x, E4M3, scale)[0], want)
            casts["cuda_dynamic"] = (lambda: ops.fp8_cast(x, E4M3, None)[0], want_dyn)
            transposes["cuda"] = lambda: ops.fp8_cast(q5, E5M2, 1.0, write=False, transpose=True)[1]
        else:
            for mode in ("fwd", "bwd"):
                ctx.skip(kernel=kernel, shape=shape, provider="cuda", mode=mode, note=why_not)
        for name, (fn, ref) in ctx.ordered(casts):
            ctx.bench(kernel=kernel, shape=shape, provider=name, mode="fwd", fn=fn, flops=None, bytes_moved=fwd_bytes,
                      check=lambda fn=fn, ref=ref: exact("q", fn(), ref))
        want_t = q5.view(torch.uint8).t().contiguous()
        for name, fn in ctx.ordered(transposes):
            ctx.bench(kernel=kernel, shape=shape, provider=name, mode="bwd", fn=fn, flops=None, bytes_moved=bwd_bytes,
                      check=lambda fn=fn: exact("q_t", fn(), want_t))
        del x, want, want_dyn, q5, want_t
        ctx.cleanup()


# ---------------------------------------------------------------------------
# relu²
# ---------------------------------------------------------------------------

def bench_relu2(ctx) -> None:
    kernel = "cuda_relu2"
    ctx.declare_kernel(kernel, reference="reference", compiled="compiled", peak="bf16",
                       description="fwd: post = relu(pre)²; bwd: dpre = dpost·2·sqrt(post); bf16 [T, H]")
    ops, why_not = _cuda_ops(ctx, "relu2_mlp")

    def ref_fwd(pre):
        return torch.relu(pre).square()

    def ref_bwd(dpost, post):
        return dpost * (2 * post.sqrt())

    compiled_fwd, compiled_bwd = ctx.compile(ref_fwd), ctx.compile(ref_bwd)
    shapes = [{"T": 19, "H": 40}] if ctx.smoke else [{"T": 49152, "H": 3072}, {"T": 4099, "H": 3072}][:1 if ctx.proof else 2]
    for shape in shapes:
        T, H = shape["T"], shape["H"]
        gen = torch.Generator(device=ctx.device).manual_seed(T + H)
        pre = torch.randn(T, H, device=ctx.device, generator=gen).to(torch.bfloat16)
        dpost = torch.randn(T, H, device=ctx.device, generator=gen).to(torch.bfloat16)
        post = ref_fwd(pre)
        pre64 = pre.double()
        post64, dpre64 = pre64.relu().square(), dpost.double() * 2 * pre64.relu()
        providers = {"reference": (lambda: ref_fwd(pre), lambda: ref_bwd(dpost, post)),
                     "compiled": (lambda: compiled_fwd(pre), lambda: compiled_bwd(dpost, post))}
        if ops is not None:
            providers["cuda"] = (lambda: ops.relu2_forward(pre)[0], lambda: ops.relu2_backward(dpost, post)[0])
        else:
            for mode in ("fwd", "bwd"):
                ctx.skip(kernel=kernel, shape=shape, provider="cuda", mode=mode, note=why_not)
        for name, (fwd, bwd) in ctx.ordered(providers):
            ctx.bench(kernel=kernel, shape=shape, provider=name, mode="fwd", fn=fwd, flops=None,
                      bytes_moved=2 * T * H * 2,
                      check=lambda fwd=fwd: harness.compare("post", fwd(), post64, rel_tol=1e-2, cos_min=0.9999))
            ctx.bench(kernel=kernel, shape=shape, provider=name, mode="bwd", fn=bwd, flops=None,
                      bytes_moved=3 * T * H * 2,
                      check=lambda bwd=bwd: harness.compare("dpre", bwd(), dpre64, rel_tol=1e-2, cos_min=0.9999))
        del pre, dpost, post, pre64, post64, dpre64
        ctx.cleanup()


# ---------------------------------------------------------------------------
# Symmetric X·Xᵀ
# ---------------------------------------------------------------------------

def bench_sym_xxt(ctx) -> None:
    kernel = "cuda_sym_xxt"
    ctx.declare_kernel(
        kernel, reference="reference", compiled=None, peak="bf16",
        description="A = X·Xᵀ for bf16 X [B, M, K] (fp32 accumulation, bf16 out); TFLOP/s with the plain "
                    "2·B·M²·K count",
        targets=[harness.Target(XXT_TARGET, "fwd", "cuda", "speedup", 1 / 1.2, "triton",
                                "issue 7: the CUDA X·Xᵀ within 1.2× of the Triton one")])
    ops, why_not = _cuda_ops(ctx, "newton_schulz")
    try:
        triton_ns = importlib.import_module("kernels.triton_impl.newton_schulz")
    except ImportError:
        triton_ns = None
    triton_reason = ctx.unavailable("newton_schulz", "triton") or (
        None if triton_ns is not None and hasattr(triton_ns, "sym_xxt") else "no kernels.triton_impl.newton_schulz.sym_xxt")

    shapes = ([{"B": 2, "M": 37, "K": 24}] if ctx.smoke else
              [XXT_TARGET] if ctx.proof else
              [{"B": 1, "M": 768, "K": 768}, {"B": 16, "M": 768, "K": 768}, XXT_TARGET, {"B": 1, "M": 4096, "K": 4096}])
    for shape in shapes:
        B, M, K = shape["B"], shape["M"], shape["K"]
        gen = torch.Generator(device=ctx.device).manual_seed(B + M + K)
        X = (torch.randn(B, M, K, device=ctx.device, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
        ref64 = X.double() @ X.double().mT
        flops, bytes_moved = 2 * B * M * M * K, B * (M * K + M * M) * 2
        providers = {"reference": lambda: torch.bmm(X, X.mT)}
        if triton_reason is None:
            providers["triton"] = lambda: triton_ns.sym_xxt(X)
        else:
            ctx.skip(kernel=kernel, shape=shape, provider="triton", mode="fwd", note=triton_reason)
        if ops is not None:
            providers["cuda"] = lambda: ops.sym_xxt(X)
            providers["cuda_tile64"] = lambda: ops.sym_xxt(X, tile=64)
            providers["cuda_tile128"] = lambda: ops.sym_xxt(X, tile=128)
        else:
            ctx.skip(kernel=kernel, shape=shape, provider="cuda", mode="fwd", note=why_not)
        for name, fn in ctx.ordered(providers):
            ctx.bench(kernel=kernel, shape=shape, provider=name, mode="fwd", fn=fn, flops=flops,
                      bytes_moved=bytes_moved,
                      check=lambda fn=fn: harness.compare("A", fn(), ref64, rel_tol=1e-2, cos_min=0.9999))
        del X, ref64
        ctx.cleanup()


def run(ctx: harness.BenchContext) -> None:
    for bench in (bench_softcap_ce, bench_fp8_cast, bench_relu2, bench_sym_xxt):
        bench(ctx)


if __name__ == "__main__":
    raise SystemExit(harness.main(run))
