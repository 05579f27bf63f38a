"""Batched Newton-Schulz (Muon's orthogonalisation), 5 quintic steps, bf16 in.

Providers: reference (the public op on its plain-PyTorch backend), compiled
(that reference function under torch.compile), triton and cuda through
``kernels.newton_schulz(..., backend=...)``. Each is checked against the same
iteration in float64: its error must stay within 2× the bf16 reference's.

FLOPs are the plain count, ignoring symmetry: per step and matrix with
m = min(M, N), n = max(M, N): X·Xᵀ 2m²n, A·A 2m³, B·X 2m²n.

    python -m benchmarks.bench_newton_schulz [--smoke] [--full] [--out DIR]
"""

import importlib

import torch

from benchmarks import harness

KERNEL = "newton_schulz"
STEPS = 5
EPS = 1e-7


def speedrun_stacks(batches) -> list[dict]:
    return [{"B": b, "M": m, "N": n} for (m, n) in ((768, 768), (3072, 768), (768, 3072)) for b in batches]


def shapes(ctx) -> list[dict]:
    if ctx.smoke:
        return [{"B": 2, "M": 40, "N": 24}]
    if ctx.full:
        return speedrun_stacks((1, 2, 4, 6, 8, 12, 16, 24)) + [
            {"B": 1, "M": s, "N": s} for s in (1024, 2048, 3072, 4096, 6144, 8192)]
    # The targets' shapes first, so a run cut short by its time budget still measures them.
    return (speedrun_stacks((24,)) + [{"B": 1, "M": 4096, "N": 4096}] + speedrun_stacks((6, 1))
            + [{"B": 1, "M": s, "N": s} for s in (1024, 2048, 8192)])


def flops(B: int, M: int, N: int, steps: int = STEPS) -> int:
    m, n = min(M, N), max(M, N)
    return B * steps * (4 * m * m * n + 2 * m**3)


def float64_iteration(G: torch.Tensor, coefficients, norm_scale: float, eps: float) -> torch.Tensor:
    """The op's math without rounding: the oracle."""
    X = G.double()
    X = X / (norm_scale * torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for a, b, c in coefficients:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def run(ctx: harness.BenchContext) -> None:
    import kernels
    ns_module = importlib.import_module("kernels.newton_schulz")
    coefficients, norm_scale = ns_module.resolve_coefficients("quintic", STEPS)
    stacks = [s for s in shapes(ctx) if s["B"] > 1 and s["M"] in (768, 3072) and s["N"] in (768, 3072)]
    square = {"B": 1, "M": 4096, "N": 4096}
    targets = [harness.Target(s, "fwd", "triton", "speedup", 1.3, "compiled", "issue 4: ≥ 1.3× compiled on the "
                              "speedrun's stacks") for s in stacks]
    if not ctx.smoke:
        targets.append(harness.Target(square, "fwd", "triton", "speedup", 1.4, "compiled",
                                      "issue 4: ≥ 1.4× compiled at 4096²"))
    ctx.declare_kernel(KERNEL, reference="reference", compiled="compiled", peak="bf16", targets=targets,
                       description=f"{STEPS} quintic Newton-Schulz steps on a bf16 batch G [B, M, N]; "
                                   "TFLOP/s with the plain (non-symmetric) FLOP count.")

    reference_forward = ns_module.reference_forward

    def compiled_math(G):
        return reference_forward(G, coefficients, norm_scale, EPS)

    providers = {"reference": lambda G: kernels.newton_schulz(G, steps=STEPS, eps=EPS, backend="reference"),
                 "compiled": ctx.compile(compiled_math)}
    for backend in ("triton", "cuda"):
        providers[backend] = (lambda b: lambda G: kernels.newton_schulz(G, steps=STEPS, eps=EPS, backend=b))(backend)

    for shape in shapes(ctx):
        B, M, N = shape["B"], shape["M"], shape["N"]
        gen = torch.Generator(device=ctx.device).manual_seed(B * 131 + M * 7 + N)
        G = torch.randn(B, M, N, device=ctx.device, generator=gen).to(torch.bfloat16)
        oracle = float64_iteration(G, coefficients, norm_scale, EPS)
        ref_err = harness.compare("ref", reference_forward(G, coefficients, norm_scale, EPS), oracle)["ref_rel_err"]
        bytes_moved = 2 * G.numel() * G.element_size()  # read G, write X

        for name, fn in providers.items():
            reason = ctx.unavailable(KERNEL, name) if name in ("triton", "cuda") else None
            if reason is not None:
                ctx.skip(kernel=KERNEL, shape=shape, provider=name, mode="fwd", note=reason)
                continue

            def check(fn=fn):
                out = fn(G)
                if out.dtype != G.dtype:
                    raise harness.ValidationError(f"out: dtype {out.dtype}, expected {G.dtype}")
                metrics = harness.compare("out", out, oracle, rel_tol=max(2 * ref_err, 1e-2))
                metrics["bf16_reference_rel_err"] = ref_err
                return metrics

            ctx.bench(kernel=KERNEL, shape=shape, provider=name, mode="fwd", fn=lambda fn=fn: fn(G),
                      flops=flops(B, M, N), bytes_moved=bytes_moved, check=check)
        del G, oracle
        ctx.cleanup()


if __name__ == "__main__":
    raise SystemExit(harness.main(run))
