"""ReLU² MLP, relu(x·W_fcᵀ)²·W_projᵀ: forward, backward and both.

Providers: reference (the public op on its plain-PyTorch backend), compiled
(the same math under torch.compile: what a trainer without custom kernels
gets), triton and cuda through ``kernels.relu2_mlp(..., backend=...)``.
Every provider is first checked against float64 math (output and the three
gradients). FLOPs: 4·T·D·H forward, 8·T·D·H backward.

    python -m benchmarks.bench_relu2_mlp [--smoke] [--full] [--out DIR]
"""

import importlib

import torch

from benchmarks import harness

KERNEL = "relu2_mlp"
SPEEDRUN = {"T": 49152, "D": 768, "H": 3072}


def shapes(ctx) -> list[dict]:
    if ctx.smoke:
        return [{"T": 19, "D": 24, "H": 40}]
    out = [SPEEDRUN, {"T": 8192, "D": 768, "H": 3072}, {"T": 16384, "D": 1024, "H": 4096},
           {"T": 4099, "D": 768, "H": 3072}]
    if ctx.full:
        out += [{"T": 65536, "D": 768, "H": 3072}, {"T": 32768, "D": 1024, "H": 4096}, {"T": 1, "D": 768, "H": 3072}]
    return out


def costs(T: int, D: int, H: int, elt: int) -> dict:
    """(FLOPs, minimal bytes) per mode: each operand read once, each result written once."""
    fwd_bytes = elt * (T * D + 2 * H * D + T * D + T * H)  # x, weights; out, post
    bwd_bytes = elt * (2 * T * D + 2 * H * D + T * H + T * D + 2 * H * D)  # dy, x, weights, post; dx, dweights
    fwd, bwd = 4 * T * D * H, 8 * T * D * H
    return {"fwd": (fwd, fwd_bytes), "bwd": (bwd, bwd_bytes), "fwd+bwd": (fwd + bwd, fwd_bytes + bwd_bytes)}


def run(ctx: harness.BenchContext) -> None:
    import kernels
    reference_forward = importlib.import_module("kernels.relu2_mlp").reference_forward
    ctx.declare_kernel(
        KERNEL, reference="reference", compiled="compiled", peak="bf16",
        description="relu(x·W_fcᵀ)²·W_projᵀ in bf16, x [T, D], W_fc [H, D], W_proj [D, H].",
        targets=[harness.Target(SPEEDRUN, "fwd+bwd", "triton", "speedup", 1.15, "compiled",
                                "issue 6: ≥ 1.15× the compiled reference"),
                 harness.Target(SPEEDRUN, "fwd+bwd", "triton", "peak_fraction", 0.65, None,
                                "issue 6: ≥ 65% of the bf16 peak")])

    def compiled_math(x, w_fc, w_proj):
        return reference_forward(x, w_fc, w_proj)[0]

    providers = {
        "reference": lambda x, w_fc, w_proj: kernels.relu2_mlp(x, w_fc, w_proj, backend="reference"),
        "compiled": ctx.compile(compiled_math),
    }
    for backend in ("triton", "cuda"):
        providers[backend] = (lambda b: lambda x, w_fc, w_proj: kernels.relu2_mlp(x, w_fc, w_proj, backend=b))(backend)

    dtype = torch.bfloat16
    for shape in shapes(ctx):
        T, D, H = shape["T"], shape["D"], shape["H"]
        gen = torch.Generator(device=ctx.device).manual_seed(T * 7 + D)
        x = torch.randn(T, D, device=ctx.device, generator=gen).to(dtype).requires_grad_(True)
        w_fc = (torch.randn(H, D, device=ctx.device, generator=gen) * (0.5 * D**-0.5)).to(dtype).requires_grad_(True)
        w_proj = (torch.randn(D, H, device=ctx.device, generator=gen) * (0.5 * H**-0.5)).to(dtype).requires_grad_(True)
        dy = torch.randn(T, D, device=ctx.device, generator=gen).to(dtype)

        # float64 oracle, the same math
        x64, fc64, proj64 = (t.detach().double().requires_grad_(True) for t in (x, w_fc, w_proj))
        out64 = reference_forward(x64, fc64, proj64)[0]
        grads64 = torch.autograd.grad(out64, (x64, fc64, proj64), dy.double())
        out64 = out64.detach()
        del x64, fc64, proj64

        def check(out, grads, out64=out64, grads64=grads64):
            metrics = harness.compare("out", out, out64, rel_tol=3e-2, cos_min=0.999)
            for name, g, g64 in zip(("dx", "dw_fc", "dw_proj"), grads, grads64):
                metrics.update(harness.compare(name, g, g64, rel_tol=5e-2, cos_min=0.999))
            return metrics

        for name, fwd in providers.items():
            reason = ctx.unavailable(KERNEL, name) if name in ("triton", "cuda") else None
            if reason is not None:
                for mode in harness.MODES:
                    ctx.skip(kernel=KERNEL, shape=shape, provider=name, mode=mode, note=reason)
                continue
            ctx.bench_autograd(kernel=KERNEL, shape=shape, provider=name, forward=fwd, inputs=[x, w_fc, w_proj],
                               grad_out=dy, costs=costs(T, D, H, x.element_size()), check=check)
        del x, w_fc, w_proj, dy, out64, grads64
        ctx.cleanup()


if __name__ == "__main__":
    raise SystemExit(harness.main(run))
