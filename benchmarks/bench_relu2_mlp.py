"""ReLU² MLP, relu(x·W_fcᵀ)²·W_projᵀ: the block (forward, backward, both) and its two fused GEMMs.

kernel relu2_mlp, providers:
    reference        the public op on its plain-PyTorch backend (cuBLAS GEMMs + unfused elementwise)
    compiled         the same math under torch.compile (what a trainer without custom kernels gets)
    triton, cuda     kernels.relu2_mlp(..., backend=...)
    triton[modded]   a modded-nanogpt-style baseline, written here from its published facts: the same
                     split (relu² and 2·sqrt(post)·dpost fused into persistent TMA GEMMs, the four plain
                     GEMMs on cuBLAS) with its tile choice 128x256x64, GROUP_M 1, 8 warps, 4 stages
                     forward / 3 backward, through this package's fused kernel
kernel relu2_mlp_gemm: each fused GEMM alone (mode fwd: post = relu(x·W_fcᵀ)², mode bwd:
dpre = (dy·W_proj)·2·sqrt(post)), against cuBLAS's plain GEMM of the same FLOPs (torch.mm,
no epilogue) and cuBLAS + the unfused epilogue; the target rows print cuBLAS time / fused time.

Every provider is first checked against float64 math (output and the three gradients).
FLOPs: 4·T·D·H forward, 8·T·D·H backward; bytes: each operand read once, each result written once.

    python -m benchmarks.bench_relu2_mlp [--smoke] [--full] [--out DIR]
"""

import importlib

import torch

from benchmarks import harness

KERNEL = "relu2_mlp"
GEMM_KERNEL = "relu2_mlp_gemm"
SPEEDRUN = {"T": 49152, "D": 768, "H": 3072}
MODDED_CONFIG = {1: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=1, num_warps=8, num_stages=4),
                 2: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=1, num_warps=8, num_stages=3)}


def shapes(ctx) -> list[dict]:
    if ctx.smoke:
        return [{"T": 19, "D": 24, "H": 40}]
    if ctx.proof:
        return [SPEEDRUN]
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


def gemm_costs(T: int, D: int, H: int, elt: int) -> dict:
    """The fused GEMMs: 2·T·D·H FLOPs; bytes x/dy, the weight, post written (fwd) or read + dpre written (bwd)."""
    return {"fwd": (2 * T * D * H, elt * (T * D + D * H + T * H)),
            "bwd": (2 * T * D * H, elt * (T * D + D * H + 2 * T * H))}


class _ModdedStyle(torch.autograd.Function):
    """The triton backend's math with modded-nanogpt's tile choice (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        impl = importlib.import_module("kernels.triton_impl.relu2_mlp")
        out, post = impl.forward(x, w_fc, w_proj, config=MODDED_CONFIG[1])
        ctx.save_for_backward(x, w_fc, w_proj, post)
        return out

    @staticmethod
    def backward(ctx, dy):
        impl = importlib.import_module("kernels.triton_impl.relu2_mlp")
        x, w_fc, w_proj, post = ctx.saved_tensors
        return impl.backward(dy.contiguous(), x, w_fc, w_proj, post, config=MODDED_CONFIG[2])


def _targets():
    gemm = [harness.Target(SPEEDRUN, mode, "triton", "speedup", 0.9, "cublas",
                           "report: cuBLAS time of the same FLOPs (plain GEMM) / fused GEMM time")
            for mode in ("fwd", "bwd")]
    block = [harness.Target(SPEEDRUN, "fwd+bwd", "triton", "speedup", 1.15, "compiled",
                            "issue 14: ≥ 1.15× the compiled reference"),
             harness.Target(SPEEDRUN, "fwd+bwd", "triton", "peak_fraction", 0.65, None,
                            "issue 14: ≥ 65% of the bf16 peak"),
             harness.Target(SPEEDRUN, "fwd+bwd", "triton", "speedup", 1.0, "triton[modded]",
                            "beat the modded-nanogpt-style split")]
    return block, gemm


def run(ctx: harness.BenchContext) -> None:
    import kernels
    reference_forward = importlib.import_module("kernels.relu2_mlp").reference_forward
    block_targets, gemm_targets = _targets()
    ctx.declare_kernel(
        KERNEL, reference="reference", compiled="compiled", peak="bf16",
        description="relu(x·W_fcᵀ)²·W_projᵀ in bf16, x [T, D], W_fc [H, D], W_proj [D, H].",
        targets=block_targets)
    ctx.declare_kernel(
        GEMM_KERNEL, reference="cublas+epilogue", compiled="compiled", peak="bf16",
        description="The fused GEMMs alone: fwd post = relu(x·W_fcᵀ)², bwd dpre = (dy·W_proj)·2·sqrt(post); "
                    "cublas = torch.mm of the same shape without the epilogue.",
        targets=gemm_targets)
    triton_reason = ctx.unavailable(KERNEL, "triton")

    def compiled_math(x, w_fc, w_proj):
        return reference_forward(x, w_fc, w_proj)[0]

    providers = {
        "reference": lambda x, w_fc, w_proj: kernels.relu2_mlp(x, w_fc, w_proj, backend="reference"),
        "compiled": ctx.compile(compiled_math),
    }
    for backend in ("triton", "cuda"):
        providers[backend] = (lambda b: lambda x, w_fc, w_proj: kernels.relu2_mlp(x, w_fc, w_proj, backend=b))(backend)
    providers["triton[modded]"] = _ModdedStyle.apply

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
        out64, post64 = reference_forward(x64, fc64, proj64)
        grads64 = torch.autograd.grad(out64, (x64, fc64, proj64), dy.double())
        out64, post64 = out64.detach(), post64.detach()
        dpre64 = (dy.double() @ proj64.detach()) * 2 * post64.sqrt()
        del x64, fc64, proj64

        def check(out, grads, out64=out64, grads64=grads64):
            metrics = harness.compare("out", out, out64, rel_tol=3e-2, cos_min=0.999)
            for name, g, g64 in zip(("dx", "dw_fc", "dw_proj"), grads, grads64):
                metrics.update(harness.compare(name, g, g64, rel_tol=5e-2, cos_min=0.999))
            return metrics

        for name, fwd in ctx.ordered(providers):
            reason = ctx.provider_unavailable(KERNEL, name)
            if reason is not None:
                for mode in harness.MODES:
                    ctx.skip(kernel=KERNEL, shape=shape, provider=name, mode=mode, note=reason)
                continue
            ctx.bench_autograd(kernel=KERNEL, shape=shape, provider=name, forward=fwd, inputs=[x, w_fc, w_proj],
                               grad_out=dy, costs=costs(T, D, H, x.element_size()), check=check)

        _bench_gemms(ctx, shape, x.detach(), w_fc.detach(), w_proj.detach(), dy, post64, dpre64, triton_reason)
        del x, w_fc, w_proj, dy, out64, grads64, post64, dpre64
        ctx.cleanup()


def _bench_gemms(ctx, shape, x, w_fc, w_proj, dy, post64, dpre64, triton_reason):
    T, D, H = shape["T"], shape["D"], shape["H"]
    post = post64.to(x.dtype)
    impl = None if triton_reason else importlib.import_module("kernels.triton_impl.relu2_mlp")
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    gemm_costs_ = gemm_costs(T, D, H, x.element_size())
    compiled_fwd = ctx.compile(lambda a, b: torch.relu(a @ b).square())
    compiled_bwd = ctx.compile(lambda a, b, p: (a @ b) * (2 * p.sqrt()))
    cases = {
        "fwd": (post64, {
            "cublas": lambda: torch.mm(x, w_fc.t(), out=out),
            "cublas+epilogue": lambda: torch.relu(torch.mm(x, w_fc.t())).square(),
            "compiled": lambda: compiled_fwd(x, w_fc.t()),
        }),
        "bwd": (dpre64, {
            "cublas": lambda: torch.mm(dy, w_proj, out=out),
            "cublas+epilogue": lambda: torch.mm(dy, w_proj) * (2 * post.sqrt()),
            "compiled": lambda: compiled_bwd(dy, w_proj, post),
        }),
    }
    for mode, (want, providers) in cases.items():
        if impl is not None:
            if mode == "fwd":
                providers["triton"] = lambda: impl.fused_gemm(x, w_fc.t(), out, impl.EPILOGUE_RELU2)
                providers["triton[modded]"] = lambda: impl.fused_gemm(x, w_fc.t(), out, impl.EPILOGUE_RELU2,
                                                                      config=MODDED_CONFIG[1])
            else:
                providers["triton"] = lambda: impl.fused_gemm(dy, w_proj, out, impl.EPILOGUE_RELU2_GRAD, post)
                providers["triton[modded]"] = lambda: impl.fused_gemm(dy, w_proj, out, impl.EPILOGUE_RELU2_GRAD, post,
                                                                      config=MODDED_CONFIG[2])
        else:
            for name in ("triton", "triton[modded]"):
                ctx.skip(kernel=GEMM_KERNEL, shape=shape, provider=name, mode=mode, note=triton_reason)
        flops, bytes_moved = gemm_costs_[mode]
        for name, fn in ctx.ordered(providers):
            # cuBLAS alone computes the GEMM without the epilogue: checked against the plain product
            ref = (x.double() @ w_fc.double().t() if mode == "fwd" else dy.double() @ w_proj.double()) \
                if name == "cublas" else want
            ctx.bench(kernel=GEMM_KERNEL, shape=shape, provider=name, mode=mode, fn=fn, flops=flops,
                      bytes_moved=bytes_moved,
                      check=lambda fn=fn, ref=ref: harness.compare("C", fn(), ref, rel_tol=3e-2, cos_min=0.999))


if __name__ == "__main__":
    raise SystemExit(harness.main(run))
