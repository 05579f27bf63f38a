"""The FP8 lm-head with softcapped cross-entropy: the whole op, its CE kernel alone, and each stage of a chunk.

Kernels and providers (the loss is summed over tokens, as in the speedrun's training):
  fp8_head        forward + backward of the whole head
    reference       bf16 x·Wᵀ (F.linear) + the op's softcap cross-entropy, compiled together
    scaled_mm       the record's head: e4m3 operands, torch._scaled_mm to bf16 logits, the cross-entropy,
                    an e5m2 logits' gradient multiplied back with _scaled_mm; all under one torch.compile,
                    as the record compiles its model (the baseline of the 1.1x and memory targets)
    triton, cuda    kernels.fp8_head_loss(..., rounding="record"): the same numerics as scaled_mm
    triton_fp32, cuda_fp32    rounding="fp32" (fp32 logits: more logit traffic, the package default)
    triton_dw_gemm  triton with the dW GEMM in Triton (adds into the fp32 accumulator in its epilogue)
                    instead of _scaled_mm + an fp32 add per chunk. A candidate: whichever of it and
                    "triton" is slower at the speedrun shape on the first GPU run is to be deleted
                    (the config key dw_gemm with it, if this one loses).
    triton_4_chunks triton with 2 GiB of chunk buffers (4 chunks, not 6): less dW-add traffic, more
                    memory; the first GPU run sets kernels.fp8_head.CHUNK_BYTES from the two.
  fp8_head_ce     the CE kernel alone on one chunk of bf16 logits [C, V] (loss, lse, e5m2 dl):
                    bytes = the logits read (the issue's ">= 2.5 TB/s of logits read")
  fp8_head_stage  each stage of one chunk at the speedrun shape, the napkin floor printed beside it
Each provider of fp8_head is checked against the op's reference backend with the same rounding (fp32
arithmetic on the quantised values; the speedrun shape in its 2048-row chunks). Target range checks
are switched off for timing (``kernels.set_target_checks(False)``).

    python -m benchmarks.bench_fp8_head [--smoke] [--full] [--out DIR]
"""

import contextlib
import importlib
import math

import torch
import torch.nn.functional as F

from benchmarks import harness

KERNEL = "fp8_head"
CE_KERNEL = "fp8_head_ce"
STAGE_KERNEL = "fp8_head_stage"
SOFTCAP = 15.0
IGNORE_INDEX = -100
SPEEDRUN = {"T": 49152, "D": 768, "V": 50304}
H100 = harness.datasheet_for("h100")  # the H100 SXM's datasheet peaks: the floors printed on any machine
# H100 SXM: 132 SMs, 16 special-function results per clock per SM, 1.98 GHz boost clock.
H100_MUFU_PER_S = 132 * 16 * 1.98e9
CE_MUFU = {"triton": 5, "cuda": 4}  # per logit (kernels/triton_impl/fp8_head.py, csrc/softcap_ce.cu)


def shapes(ctx) -> list[dict]:
    if ctx.smoke:
        return [{"T": 32, "D": 32, "V": 64}]
    if ctx.proof:
        return [SPEEDRUN]
    out = [SPEEDRUN, {"T": 8192, "D": 768, "V": 50304}, {"T": 16384, "D": 1024, "V": 50304},
           {"T": 8192, "D": 768, "V": 50257}]
    if ctx.full:
        out += [{"T": 65536, "D": 768, "V": 50304}, {"T": 16384, "D": 1536, "V": 50304},
                {"T": 49152, "D": 768, "V": 1000}, {"T": 1, "D": 768, "V": 50304}]
    return out


def scales_for(D: int) -> tuple[float, float, float]:
    """The speedrun's static scales, with x's following its RMS-normed size sqrt(D)."""
    return math.sqrt(D) / 448, 24 / 448, 1 / 448


def costs(T: int, D: int, V: int, x_elt: int, w_elt: int) -> dict:
    """(FLOPs, minimal bytes) per mode, of the math rather than of a provider: 2·T·V·D forward, 4·T·V·D
    backward; inputs read once, e4m3 copies written once and read back, gradients written once.

    The package's op does all three GEMMs in its forward and only scales in its backward, so only
    fwd+bwd compares it with the baselines. The [T, V] intermediates are not counted (avoiding them is
    the point; the stage table at the start prints them).
    """
    fwd_bytes = T * D * x_elt + V * D * w_elt + (T * D + V * D) + 8 * T + 8 * T
    bwd_bytes = (T * D + V * D) + 8 * T + 4 * T + 4 * T + T * D * x_elt + V * D * w_elt
    fwd, bwd = 2 * T * V * D, 4 * T * V * D
    return {"fwd": (fwd, fwd_bytes), "bwd": (bwd, bwd_bytes), "fwd+bwd": (fwd + bwd, fwd_bytes + bwd_bytes)}


def stage_floors(T: int, D: int, V: int, backend: str, logit_bytes: int, chunks: int) -> list[tuple]:
    """(stage, GFLOP, GB, MUFU ops) of the whole op at one shape, summed over the chunks."""
    tv = T * V
    return [
        ("quantise x, W (+ transposes)", 0.0, (T * D * 2 + 2 * T * D + V * D * 4 + 2 * V * D) / 1e9, 0),
        ("logits GEMM", 2 * tv * D / 1e9, (tv * logit_bytes + T * D + V * D * chunks) / 1e9, 0),
        ("CE (loss, lse, e5m2 dl)", 0.0, (tv * logit_bytes + tv) / 1e9, CE_MUFU[backend] * tv),
        ("transpose dl", 0.0, 2 * tv / 1e9, 0),
        ("dx GEMM", 2 * tv * D / 1e9, (tv + V * D * chunks + T * D * 2) / 1e9, 0),
        ("dW GEMM (fp32 partials)", 2 * tv * D / 1e9, (tv + T * D + V * D * 4 * chunks) / 1e9, 0),
        ("dW fp32 adds (cuBLAS path)", 0.0, 3 * V * D * 4 * (chunks - 1) / 1e9, 0),
    ]


def print_floors(ctx, shape) -> None:
    """The napkin floors of each stage at ``shape``, at the H100 datasheet and at this run's measured ceilings."""
    op = importlib.import_module("kernels.fp8_head")
    T, D, V = shape["T"], shape["D"], shape["V"]
    measured = ctx.ceilings.get("measured") or {}
    on_gpu = ctx.device.type == "cuda"
    fp8_peak, hbm_peak = H100["fp8_tflops"] * 1e12, H100["hbm_gbps"] * 1e9
    for backend in ("triton", "cuda"):
        for rounding, logit_bytes in (("record", 2), ("fp32", 4)):
            rows = op.chunk_rows_for(T, ((V + 15) // 16 * 16) * (logit_bytes + 1), op.CHUNK_BYTES)
            chunks = -(-T // rows)
            print(f"napkin floors: fp8_head {backend} rounding={rounding} [T={T} D={D} V={V}], {chunks} chunks of "
                  f"{rows} rows; {H100['name']} datasheet (FP8 {H100['fp8_tflops']:.0f} TFLOP/s, "
                  f"{H100['hbm_gbps'] / 1e3:.2f} TB/s, MUFU {H100_MUFU_PER_S:.3g}/s)"
                  + (f" | measured here (FP8 {measured.get('fp8_tflops') or 0:.0f} TFLOP/s, "
                     f"{(measured.get('hbm_gbps') or 0) / 1e3:.2f} TB/s)" if on_gpu else ""), flush=True)
            total = 0.0
            for stage, gflop, gb, mufu in stage_floors(T, D, V, backend, logit_bytes, chunks):
                parts = [gflop * 1e9 / fp8_peak, gb * 1e9 / hbm_peak, mufu / H100_MUFU_PER_S]
                floor_ms = 1e3 * max(parts)
                total += floor_ms
                line = (f"  {stage:30s} {gflop:8.1f} GFLOP {gb:7.2f} GB {mufu / 1e9:6.2f} G MUFU -> "
                        f"{floor_ms:6.3f} ms ({'FLOPs' if parts[0] == max(parts) else 'bytes' if parts[1] == max(parts) else 'MUFU'})")
                if on_gpu and measured.get("fp8_tflops") and measured.get("hbm_gbps"):
                    here = max(gflop * 1e9 / (measured["fp8_tflops"] * 1e12), gb * 1e9 / (measured["hbm_gbps"] * 1e9))
                    line += f", {1e3 * here:.3f} ms at the measured ceilings (MUFU not measured)"
                print(line, flush=True)
            print(f"  {'sum of the floors':30s} {total:.3f} ms (no stage overlaps another)", flush=True)
    # The record's path at the same floors: 3 GEMMs, a compiled CE forward (read logits; sigmoid = ex2 + rcp,
    # then exp: 3 MUFU per logit), a backward CE + e5m2 cast (read logits, write g_f8; 3 MUFU), a transposed copy.
    tv = T * V
    record = [("3 GEMMs", 3 * 2 * tv * D / fp8_peak), ("CE forward", max(2 * tv / hbm_peak, 3 * tv / H100_MUFU_PER_S)),
              ("CE backward + cast", max(3 * tv / hbm_peak, 3 * tv / H100_MUFU_PER_S)), ("g_f8ᵀ copy", 2 * tv / hbm_peak)]
    print(f"napkin floors: the record's path at [T={T} D={D} V={V}]: "
          + ", ".join(f"{name} {1e3 * sec:.3f} ms" for name, sec in record)
          + f"; sum {1e3 * sum(sec for _, sec in record):.3f} ms", flush=True)


def _quantize(t, scale, fp8_dtype):
    fp8_max = torch.finfo(fp8_dtype).max
    return (t.float() / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)


def scaled_mm_head(scales, device):
    """logits = x·Wᵀ in bf16 the way the record computes them, as an autograd function of (x, w).

    Meant to be traced by torch.compile together with the loss (as the record's
    compiled model does), so the casts fuse and the backward is compiled too.
    """
    sx, sw, sg = (torch.tensor(s, dtype=torch.float32, device=device) for s in scales)

    class ScaledMMLogits(torch.autograd.Function):
        @staticmethod
        def forward(fctx, x, w):
            x_f8, w_f8 = _quantize(x, sx, torch.float8_e4m3fn), _quantize(w, sw, torch.float8_e4m3fn)
            fctx.save_for_backward(x_f8, w_f8)
            fctx.dtypes = (x.dtype, w.dtype)
            return torch._scaled_mm(x_f8, w_f8.T, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)

        @staticmethod
        def backward(fctx, grad):
            x_f8, w_f8 = fctx.saved_tensors
            g_f8 = _quantize(grad, sg, torch.float8_e5m2)
            # _scaled_mm wants its second operand column-major: transpose, copy, transpose back.
            dx = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)
            dw = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, scale_a=sx, scale_b=sg,
                                  out_dtype=torch.float32).T
            return dx.to(fctx.dtypes[0]), dw.to(fctx.dtypes[1])

    return ScaledMMLogits.apply


@contextlib.contextmanager
def triton_config(overrides: dict):
    """The triton backend's launch table with ``overrides`` for the duration of a call (GPU and CPU tables)."""
    impl = importlib.import_module("kernels.triton_impl.fp8_head")
    saved = [(table, {k: table[k] for k in overrides}) for table in (impl._CONFIGS_GPU, impl._CONFIGS_INTERPRET)]
    for table, _ in saved:
        table.update(overrides)
    try:
        yield
    finally:
        for table, old in saved:
            table.update(old)


def _op_providers(ctx, targets, logit_scale, scales):
    """name -> (callable(x, w), rounding, note) for the package's providers, or (None, reason)."""
    import kernels
    providers = {}
    for backend in ("triton", "cuda"):
        reason = ctx.unavailable("fp8_head", backend)
        for suffix, rounding, overrides in (("", "record", None), ("_fp32", "fp32", None),
                                            ("_dw_gemm", "record", {"dw_gemm": "triton"}),
                                            ("_4_chunks", "record", {"chunk_bytes": 2 << 30})):
            name = backend + suffix
            if overrides and backend != "triton":
                continue
            if reason is not None:
                providers[name] = (None, rounding, reason)
                continue

            def fn(x, w, b=backend, r=rounding, o=overrides):
                with triton_config(o) if o else contextlib.nullcontext():
                    return kernels.fp8_head_loss(x, w, targets, SOFTCAP, logit_scale, scales, "sum", IGNORE_INDEX,
                                                 backend=b, rounding=r)
            providers[name] = (fn, rounding, "")
    return providers


def run_op(ctx) -> None:
    import kernels
    ce_reference = importlib.import_module("kernels.softcap_cross_entropy").reference_forward
    ctx.declare_kernel(
        KERNEL, reference="reference", compiled="scaled_mm", peak="fp8",
        description="Summed softcapped cross-entropy of x·Wᵀ, x [T, D] bf16, W [V, D] fp32, static speedrun "
                    "scales; FLOPs against the FP8 peak. The package's op does every GEMM in its forward and "
                    "only scales in its backward: compare fwd+bwd.",
        targets=[t for backend in ("triton", "cuda") for t in (
            harness.Target(SPEEDRUN, "fwd+bwd", backend, "speedup", 1.1, "scaled_mm",
                           "issue 17: ≥ 1.1× the record's path (_scaled_mm + compiled CE, compiled as a whole)"),
            harness.Target(SPEEDRUN, "fwd+bwd", backend, "speedup", 1.5, "reference",
                           "issue 17: ≥ 1.5× bf16 matmul + compiled CE"),
            harness.Target(SPEEDRUN, "fwd+bwd", backend, "memory_ratio", 0.25, "scaled_mm",
                           "issue 17: peak extra memory ≤ 25 % of the record's path"))])
    for shape in shapes(ctx):
        T, D, V = shape["T"], shape["D"], shape["V"]
        logit_scale, scales = D**-0.5, scales_for(D)
        gen = torch.Generator(device=ctx.device).manual_seed(T + 17 * D + V)
        x = F.rms_norm(torch.randn(T, D, device=ctx.device, generator=gen), (D,)).to(torch.bfloat16)
        x = x.requires_grad_(True)
        w = (0.02 * torch.randn(V, D, device=ctx.device, generator=gen)).requires_grad_(True)
        targets = torch.randint(0, min(V, 50257), (T,), device=ctx.device, generator=gen)
        targets[::97] = IGNORE_INDEX
        grad_out = torch.tensor(1.0, device=ctx.device)
        oracles = {}
        for rounding in ("record", "fp32"):
            xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
            loss = kernels.fp8_head_loss(xr, wr, targets, SOFTCAP, logit_scale, scales, "sum", IGNORE_INDEX,
                                         backend="reference", rounding=rounding)
            oracles[rounding] = (loss.detach().double(), *torch.autograd.grad(loss, (xr, wr)))
            del xr, wr, loss
        case_costs = costs(T, D, V, x.element_size(), w.element_size())

        def checker(loss_tol, cos_min, grad_tol, rounding="record"):
            loss64, dx32, dw32 = oracles[rounding]

            def check(loss, grads):
                metrics = harness.compare("loss", loss, loss64, rel_tol=loss_tol)
                metrics.update(harness.compare("dx", grads[0], dx32, rel_tol=grad_tol, cos_min=cos_min))
                metrics.update(harness.compare("dw", grads[1], dw32, rel_tol=grad_tol, cos_min=cos_min))
                return metrics
            return check

        def ce(logits, ls=logit_scale):
            return ce_reference(logits, targets, SOFTCAP, ls, IGNORE_INDEX)[0].sum()

        # Each baseline is compiled whole (matmul, casts, loss), as the record compiles its model.
        providers = {"reference": (ctx.compile(lambda x, w: ce(F.linear(x, w.to(x.dtype)))),
                                   checker(2e-2, 0.99, 0.15))}
        if T % 16 == 0 and D % 16 == 0 and V % 16 == 0:
            head = scaled_mm_head(scales, ctx.device)
            providers["scaled_mm"] = (ctx.compile(lambda x, w: ce(head(x, w))), checker(1e-3, 0.99, 0.15))
        else:
            providers["scaled_mm"] = (None, "torch._scaled_mm needs T, D and V to be multiples of 16")
        # tanh.approx (triton) or the fp16-cached tanh (cuda) in the gradient pass flips ~1 % of the e5m2 codes.
        for name, (fn, rounding, reason) in _op_providers(ctx, targets, logit_scale, scales).items():
            providers[name] = (fn, checker(1e-4, 0.999, 5e-2, rounding)) if fn is not None else (None, reason)
        for name, (fn, check) in ctx.ordered(providers):
            if fn is None:
                for mode in harness.MODES:
                    ctx.skip(kernel=KERNEL, shape=shape, provider=name, mode=mode, note=check)
                continue
            ctx.bench_autograd(kernel=KERNEL, shape=shape, provider=name, forward=fn, inputs=[x, w],
                               grad_out=grad_out, costs=case_costs, check=check)
        del x, w, targets, oracles, providers
        ctx.cleanup()


# ---------------------------------------------------------------------------
# The CE kernel alone, and each stage of a chunk
# ---------------------------------------------------------------------------

def _chunk_shape(ctx, smoke=None):
    """One chunk of the speedrun's head with bf16 logits (tiny under --smoke)."""
    op = importlib.import_module("kernels.fp8_head")
    if ctx.smoke if smoke is None else smoke:
        return {"C": 32, "D": 32, "V": 64}
    T, D, V = SPEEDRUN["T"], SPEEDRUN["D"], SPEEDRUN["V"]
    return {"C": op.chunk_rows_for(T, V * 3, op.CHUNK_BYTES), "D": D, "V": V}


def _stages(backend, device):
    if backend == "triton":
        impl = importlib.import_module("kernels.triton_impl.fp8_head")
        return impl.TritonStages(device, impl.get_config(device))
    impl = importlib.import_module("kernels.cuda_impl.fp8_head")
    return impl.CudaStages(device)


def _raiser(exc: BaseException):
    """A provider that fails with ``exc`` (a setup error), so that the harness records it as failed."""
    def fn():
        raise exc
    return fn


def run_ce(ctx) -> None:
    """The CE kernel on one chunk of bf16 logits; the target is absolute (2.5 TB/s), so its fraction of this
    device's datasheet HBM bandwidth is what the harness compares."""
    ce = importlib.import_module("kernels.softcap_cross_entropy")
    shape = _chunk_shape(ctx)
    C, V = shape["C"], shape["V"]
    hbm = ((ctx.ceilings.get("datasheet") or {}).get("hbm_gbps")) or H100["hbm_gbps"]
    ctx.declare_kernel(
        CE_KERNEL, reference="reference", compiled="compiled", peak="bf16",
        description="The CE stage on one chunk: bf16 logits [C, V] -> loss, lse, e5m2 dl; bytes = logits read",
        targets=[harness.Target(_chunk_shape(ctx, smoke=False), "fwd+bwd", backend, "peak_fraction", 2500.0 / hbm, None,
                                f"issue 17: the CE kernel alone ≥ 2.5 TB/s of logits read ({2500 / hbm:.0%} of "
                                f"this device's {hbm / 1e3:.2f} TB/s)") for backend in ("triton", "cuda")])
    gen = torch.Generator(device=ctx.device).manual_seed(C + V)
    logits = (torch.randn(C, V, device=ctx.device, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, min(V, 50257), (C,), device=ctx.device, generator=gen)
    targets[::97] = IGNORE_INDEX
    gs = torch.tensor(1 / 448, device=ctx.device)
    g0 = torch.tensor(1.0, device=ctx.device)
    ls = 768**-0.5
    row_grad = torch.where(targets != IGNORE_INDEX, 1.0, 0.0)

    def ref():
        loss, lse = ce.reference_forward(logits, targets, SOFTCAP, ls, IGNORE_INDEX)
        dl = ce.reference_backward(row_grad, logits, targets, lse, SOFTCAP, ls, IGNORE_INDEX)
        dl = dl.to(torch.bfloat16).float() / gs
        return loss, dl.clamp(-57344, 57344).to(torch.float8_e5m2)

    loss64, dl_ref = ref()
    providers = {"reference": ref, "compiled": ctx.compile(ref)}
    for backend in ("triton", "cuda"):
        reason = ctx.unavailable("fp8_head", backend)
        if reason is not None:
            providers[backend] = reason
            continue
        try:
            stages = _stages(backend, ctx.device)
        except Exception as exc:  # noqa: BLE001 - a failed record for this provider, not the end of the script
            providers[backend] = _raiser(exc)
            continue
        loss_buf = torch.empty(C, device=ctx.device)
        lse_buf = torch.empty(C, device=ctx.device)
        dl_buf = torch.empty(C, V, dtype=torch.float8_e5m2, device=ctx.device)

        def fn(stages=stages, loss_buf=loss_buf, lse_buf=lse_buf, dl_buf=dl_buf):
            stages.ce(logits, targets, loss_buf, lse_buf, dl=dl_buf, row_grad=None, g0=g0, gs=gs, lse_in=False,
                      round_dl_bf16=True, softcap=SOFTCAP, logit_scale=ls, ignore_index=IGNORE_INDEX)
            return loss_buf, dl_buf
        providers[backend] = fn
    for name, fn in ctx.ordered(providers):
        if isinstance(fn, str):
            ctx.skip(kernel=CE_KERNEL, shape=shape, provider=name, mode="fwd+bwd", note=fn)
            continue

        def check(fn=fn):
            loss, dl = fn()
            metrics = harness.compare("loss", loss, loss64, rel_tol=1e-4)
            agree = float((dl.view(torch.uint8) == dl_ref.view(torch.uint8)).float().mean())
            if agree < 0.97:
                raise harness.ValidationError(f"dl: only {agree:.2%} of the e5m2 codes equal the fp32 reference's")
            metrics["dl_code_agreement"] = agree
            return metrics

        ctx.bench(kernel=CE_KERNEL, shape=shape, provider=name, mode="fwd+bwd", fn=fn, flops=None,
                  bytes_moved=C * V * 2, check=check,
                  note=f"{CE_MUFU.get(name, '?')} MUFU/logit; floor {1e3 * max(C * V * 3 / (hbm * 1e9), CE_MUFU.get(name, 0) * C * V / H100_MUFU_PER_S):.3f} ms"
                  if name in CE_MUFU else "")
    del logits, targets
    ctx.cleanup()


def run_stages(ctx) -> None:
    """Each stage of one chunk at the speedrun shape (rounding="record"), its napkin floor beside it."""
    base = _chunk_shape(ctx)
    C, D, V = base["C"], base["D"], base["V"]
    T = C
    ctx.declare_kernel(STAGE_KERNEL, reference="triton", compiled="cuda", peak="fp8",
                       description=f"one chunk of C={C} rows of the speedrun head, stage by stage (record rounding)")
    gen = torch.Generator(device=ctx.device).manual_seed(7)
    x = F.rms_norm(torch.randn(T, D, device=ctx.device, generator=gen), (D,)).to(torch.bfloat16)
    w = 0.02 * torch.randn(V, D, device=ctx.device, generator=gen)
    targets = torch.randint(0, min(V, 50257), (T,), device=ctx.device, generator=gen)
    xs, ws, gs_f = scales_for(D)
    for backend in ("triton", "cuda"):
        reason = ctx.unavailable("fp8_head", backend)
        stages, setup_error = None, None
        if not reason:
            try:
                stages = _stages(backend, ctx.device)
                x8, x8t, xs_t = stages.quantize(x, xs, (T, D), (D, T), True)
                w8, w8t, ws_t = stages.quantize(w, ws, (V, D), (D, V), False)
            except Exception as exc:  # noqa: BLE001 - each stage becomes a failed record instead
                stages, setup_error = None, exc
        bufs = {}
        if stages is not None:
            gs = torch.tensor(gs_f, device=ctx.device)
            g0 = torch.tensor(1.0, device=ctx.device)
            bufs = dict(logits=torch.empty(C, V, dtype=torch.bfloat16, device=ctx.device),
                        dl=torch.zeros(C, V, dtype=torch.uint8, device=ctx.device).view(torch.float8_e5m2),
                        dlt=torch.zeros(V, C, dtype=torch.uint8, device=ctx.device).view(torch.float8_e5m2),
                        dx=torch.empty(C, D, dtype=torch.bfloat16, device=ctx.device),
                        dw=torch.zeros(V, D, device=ctx.device), loss=torch.empty(C, device=ctx.device),
                        lse=torch.empty(C, device=ctx.device))
            b = bufs
            stage_fns = {
                "quantise x+W": (lambda: (stages.quantize(x, xs, (T, D), (D, T), True),
                                          stages.quantize(w, ws, (V, D), (D, V), False)), 0.0,
                                 T * D * 4 + V * D * 6),
                "logits GEMM": (lambda: stages.mm(x8, w8.t(), xs_t, ws_t, b["logits"], role="logits",
                                                  fast_accum=True, accumulate=False), 2 * C * V * D,
                                C * V * 2 + C * D + V * D),
                "CE": (lambda: stages.ce(b["logits"], targets, b["loss"], b["lse"], dl=b["dl"], row_grad=None, g0=g0,
                                         gs=gs, lse_in=False, round_dl_bf16=True, softcap=SOFTCAP,
                                         logit_scale=D**-0.5, ignore_index=IGNORE_INDEX), 0.0, C * V * 3),
                "transpose dl": (lambda: stages.transpose(b["dl"], b["dlt"]), 0.0, 2 * C * V),
                "dx GEMM": (lambda: stages.mm(b["dl"], w8t.t(), gs, ws_t, b["dx"], role="dx", fast_accum=False,
                                              accumulate=False), 2 * C * V * D, C * V + V * D + 2 * C * D),
                "dW GEMM (accumulating)": (lambda: stages.mm(b["dlt"], x8t.t(), gs, xs_t, b["dw"], role="dw",
                                                             fast_accum=False, accumulate=True), 2 * C * V * D,
                                           C * V + C * D + 4 * 4 * V * D),
            }
        else:
            fn = None if setup_error is None else _raiser(setup_error)  # failed records, with its message
            stage_fns = dict.fromkeys(("quantise x+W", "logits GEMM", "CE", "transpose dl", "dx GEMM",
                                       "dW GEMM (accumulating)"), (fn, None, None))
        for stage, (fn, flops, nbytes) in stage_fns.items():
            shape = {"C": C, "D": D, "V": V, "stage": stage}
            if fn is None:
                ctx.skip(kernel=STAGE_KERNEL, shape=shape, provider=backend, mode="fwd", note=reason)
                continue
            mufu = CE_MUFU[backend] * C * V if stage == "CE" else 0
            note = f"MUFU floor {1e3 * mufu / H100_MUFU_PER_S:.3f} ms (H100)" if mufu else ""
            ctx.bench(kernel=STAGE_KERNEL, shape=shape, provider=backend, mode="fwd", fn=fn, flops=flops or None,
                      bytes_moved=nbytes, note=note)
        del bufs, stages
        ctx.cleanup()


def run(ctx: harness.BenchContext) -> None:
    import kernels
    kernels.set_target_checks(False)
    print_floors(ctx, SPEEDRUN)  # the speedrun's, whatever this run's shapes
    try:
        run_op(ctx)
        run_ce(ctx)
        run_stages(ctx)
    finally:
        kernels.set_target_checks(True)


if __name__ == "__main__":
    raise SystemExit(harness.main(run))
