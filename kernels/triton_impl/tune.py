"""Tune and inspect the Triton kernels at the speedrun's shapes.

    python -m kernels.triton_impl.tune [--only relu2|ns] [--quick]   # GPU: time the candidates, print the best
    python -m kernels.triton_impl.tune --write [...]                 # ... and rewrite tuned_configs.py
    python -m kernels.triton_impl.tune --resources [--json]          # no GPU needed: compile every kernel at
                                                                     # every case for sm_90a and report it

Tuning times every candidate configuration of each kernel on its own inputs at the shapes
the trainer runs (triton.testing.do_bench: median over ~50 ms after warm-up), keeps the fastest
and, with --write, replaces kernels/triton_impl/tuned_configs.py (MEASURED = True, the device,
date and triton version). Commit that file: later runs read the table and never autotune.

--resources compiles each kernel as its launcher would specialise it (the same argument
builders, on meta tensors) for GPUTarget("cuda", 90, 32) and reports, per kernel and shape:
registers per thread, spill stores/loads (ptxas -v), local memory, shared memory, and the
static count of HGMMA (warpgroup MMA), UTMALDG/UTMASTG (TMA), LDGSTS (cp.async) and MUFU
instructions in the SASS. It runs with any triton that has the NVIDIA backend (3.6, 3.9),
without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pprint
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

H100_SMS = 132
H100_SMEM = 232448  # bytes of dynamic shared memory one block may use (227 KiB)
TABLE_PATH = Path(__file__).with_name("tuned_configs.py")

# The speedrun's MLP (T tokens per GPU, model dim, hidden dim) and Muon batches (one call per shape,
# as kernels.muon.Muon groups them; and a rank's share at 8 GPUs).
MLP_SHAPES = [(49152, 768, 3072), (49152, 1024, 4096)]
NS_SHAPES = [(44, 768, 768), (24, 768, 3072), (6, 768, 768), (3, 768, 3072)]


# ---------------------------------------------------------------------------
# Cases: one kernel launch each, built by the launchers' own argument builders
# ---------------------------------------------------------------------------

def _mlp_cases(device, T, D, H, dtype=torch.bfloat16, fc_layout="hd", misaligned=False, sms=H100_SMS,
               configs=None):
    """[(name, kernel, grid, args, meta)] of the two fused GEMMs of one MLP forward+backward."""
    from kernels.triton_impl import relu2_mlp as m
    if misaligned:
        D = D - 2  # a row stride of (D - 2)·2 bytes is not a multiple of 16: the pointer path
    x = torch.empty(T, D, dtype=dtype, device=device)
    w_fc = torch.empty(H, D, dtype=dtype, device=device) if fc_layout == "hd" else \
        torch.empty(D, H, dtype=dtype, device=device).t()
    w_proj = torch.empty(D, H, dtype=dtype, device=device)
    post = torch.empty(T, H, dtype=dtype, device=device)
    cases = []
    for epilogue, a, b, aux in ((m.EPILOGUE_RELU2, x, w_fc.t(), None), (m.EPILOGUE_RELU2_GRAD, x, w_proj, post)):
        grid, args, meta = m.launch_args(a, b, post, epilogue, aux, (configs or {}).get(epilogue), target_sms=sms)
        name = (f"relu2_mlp {m.EPILOGUE_NAMES[epilogue]:10s} {str(dtype)[6:]} T={T} D={D} H={H} "
                f"{'w_fc[H,D]' if fc_layout == 'hd' else 'w_fc[D,H]ᵀ'}")
        cases.append((name, m._relu2_gemm_kernel, grid, args, meta))
    return cases


def _ns_cases(device, batch, m, n, sms=H100_SMS, tall_out=False):
    """[(name, kernel, grid, args, meta)] of one Newton-Schulz step (normalisation included)."""
    from kernels.triton_impl import newton_schulz as ns
    cfg = ns.step_configs(batch, m, n, torch.device("cuda"), sms=sms)
    for c in cfg.values():
        c.setdefault("PROGRAMS", sms * int(c.get("CTAS_PER_SM", 1)))
    G = torch.empty(batch, n, m, device=device) if tall_out else torch.empty(batch, m, n, device=device)
    X = torch.empty(batch, m, n, dtype=torch.bfloat16, device=device)
    A = torch.empty(batch, m, m, dtype=torch.bfloat16, device=device)
    S = torch.empty_like(A)
    out = torch.empty(batch, n, m, device=device).mT if tall_out else torch.empty(batch, m, n, device=device)
    X_next = torch.empty_like(X)
    shape = f"{batch}x{m}x{n}"
    cases = []
    for kernel, grid, args, meta in ns.normalize_args(G, X.mT if tall_out else X, 1.0, 1e-7, sms=sms):
        cases.append((f"newton_schulz {kernel.__name__.strip('_').replace('_kernel', ''):14s} {shape}"
                      f"{' tall' if tall_out else ''}", kernel, grid, args, meta))
    if not tall_out:
        g = ns.gram_args(X, (X.stride(2), X.stride(1)), A, cfg["gram"])
        cases.append((f"newton_schulz sym_xxt        {shape}", ns._sym_gram_kernel, *g))
        g = ns.gram_args(A, (A.stride(1), A.stride(2)), S, cfg["poly"], Q=A, alpha=2.0, beta=-4.7)
        cases.append((f"newton_schulz sym_poly       {shape}", ns._sym_gram_kernel, *g))
    if "impl" not in cfg["axpy"] and not tall_out:
        g = ns.axpy_args(S, X, X_next, 3.4, cfg["axpy"])
        cases.append((f"newton_schulz axpy_matmul    {shape} -> bf16", ns._axpy_matmul_kernel, *g))
    if "impl" not in cfg["axpy"]:
        g = ns.axpy_args(S, X, out, 3.4, cfg["axpy"])
        cases.append((f"newton_schulz axpy_matmul    {shape} -> {'fp32ᵀ (tall G)' if tall_out else 'fp32'}",
                      ns._axpy_matmul_kernel, *g))
    return cases


def resource_cases(only: str | None = None) -> list:
    meta_dev = torch.device("meta")
    cases = []
    if only in (None, "relu2"):
        T, D, H = MLP_SHAPES[0]
        cases += _mlp_cases(meta_dev, T, D, H)
        cases += _mlp_cases(meta_dev, T + 37, D, H)                 # ragged T
        cases += _mlp_cases(meta_dev, T + 37, D, H, fc_layout="dh")  # w_fc stored [D, H]: N-major B
        cases += _mlp_cases(meta_dev, *MLP_SHAPES[1])
        cases += _mlp_cases(meta_dev, 4099, D, H, misaligned=True)   # the pointer path
        cases += _mlp_cases(meta_dev, 8191, D, H, dtype=torch.float32)
    if only in (None, "ns"):
        for batch, m, n in NS_SHAPES[:2]:
            cases += _ns_cases(meta_dev, batch, m, n)
        cases += _ns_cases(meta_dev, 24, 768, 3072, tall_out=True)
    return cases


# ---------------------------------------------------------------------------
# sm_90a compilation and its report
# ---------------------------------------------------------------------------

def _bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_sm90(kernel, args, meta):
    """The kernel compiled for sm_90a as a launch with these arguments would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    fn = kernel
    meta = dict(meta)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    signature, constexprs, attrs = {}, {}, {}
    positional = iter(args)
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name], constexprs[name] = "constexpr", meta[name]
            continue
        value = next(positional)
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1  # the launcher's specialisation of 1
            continue
        signature[name] = mangle_type(value)
        if isinstance(value, torch.Tensor) or (isinstance(value, int) and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled) -> dict:
    """Registers, spills, local and shared memory, and the SASS instruction counts that matter."""
    facts = {"shared": compiled.metadata.shared}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        # triton ships a ptxas per architecture family, the CUDA toolkit may have a newer one: the
        # first that takes this PTX version
        for path in _ptxas_candidates():
            ptxas = subprocess.run([path, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "p.cubin")],
                                   capture_output=True, text=True)
            if ptxas.returncode == 0:
                break
    for key in ("REG", "LOCAL", "STACK"):
        found = re.search(rf"\b{key}:(\d+)", usage)
        facts[key.lower()] = int(found.group(1)) if found else None
    stores = [int(v) for v in re.findall(r"(\d+) bytes spill stores", ptxas.stderr)]
    loads = [int(v) for v in re.findall(r"(\d+) bytes spill loads", ptxas.stderr)]
    facts["spill_stores"] = sum(stores) if ptxas.returncode == 0 else None
    facts["spill_loads"] = sum(loads) if ptxas.returncode == 0 else None
    opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, flags=re.M)
    for op in ("HGMMA", "QGMMA", "UTMALDG", "UTMASTG", "LDGSTS", "MUFU", "LDL", "STL"):
        facts[op] = sum(1 for o in opcodes if o.split(".")[0] == op)
    kinds = [o.split(".")[1] for o in opcodes if o.startswith("MUFU.")]
    facts["MUFU_KINDS"] = {k: kinds.count(k) for k in sorted(set(kinds))}  # e.g. {"EX2": 97, "TANH": 32}
    return facts


def _ptxas_candidates() -> list[str]:
    bin_dir = os.path.dirname(_bin("ptxas"))
    found = [os.path.join(bin_dir, n) for n in sorted(os.listdir(bin_dir), reverse=True) if n.startswith("ptxas")]
    return found + [p for p in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas") if p and os.path.exists(p)]


def report_resources(as_json: bool, only: str | None = None) -> int:
    import triton
    rows = []
    for name, kernel, grid, args, meta in resource_cases(only):
        row = {"case": name, "grid": list(grid), "num_warps": meta.get("num_warps"),
               "num_stages": meta.get("num_stages"), "tma": bool(meta.get("USE_TMA", False))}
        try:
            row.update(resources(compile_sm90(kernel, args, meta)))
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a finding
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows.append(row)
    if as_json:
        print(json.dumps({"triton": triton.__version__, "rows": rows}))
        return 0 if all("error" not in r for r in rows) else 1
    print(f"triton {triton.__version__}, sm_90a, H100 limits: 255 registers, {H100_SMEM} B shared memory")
    print(f"{'case':66s} {'warps':>5s} {'stg':>3s} {'regs':>4s} {'spill':>5s} {'smem':>7s} "
          f"{'HGMMA':>5s} {'TMA ld':>6s} {'TMA st':>6s} {'cp.async':>8s} {'MUFU':>4s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:66s} ERROR {r['error']}")
            continue
        cells = [r["num_warps"], r["num_stages"], r["reg"], r["spill_stores"], r["shared"], r["HGMMA"], r["UTMALDG"],
                 r["UTMASTG"], r["LDGSTS"], r["MUFU"]]
        widths = (5, 3, 4, 5, 7, 5, 6, 6, 8, 4)
        print(f"{r['case']:66s} " + " ".join(f"{'-' if v is None else v!s:>{w}s}" for v, w in zip(cells, widths)))
    return 0 if all("error" not in r for r in rows) else 1


# ---------------------------------------------------------------------------
# Autotuning on a GPU
# ---------------------------------------------------------------------------

MLP_CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=True),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=1, num_warps=8, num_stages=4, FLATTEN=True),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=False),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, FLATTEN=True),
]
GRAM_CANDIDATES = [
    dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=4, CTAS_PER_SM=1),
    dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3, CTAS_PER_SM=1),
    dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=5, CTAS_PER_SM=1),
    dict(BLOCK=128, BLOCK_K=64, num_warps=4, num_stages=3, CTAS_PER_SM=1),
    dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=4, CTAS_PER_SM=2),
    dict(BLOCK=64, BLOCK_K=128, num_warps=4, num_stages=3, CTAS_PER_SM=2),
]
AXPY_CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, CTAS_PER_SM=1),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, CTAS_PER_SM=1),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, CTAS_PER_SM=1),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, CTAS_PER_SM=2),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, CTAS_PER_SM=1),
    dict(impl="cublas"),
]


def _fastest(label, candidates, run):
    import triton.testing
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            run(cfg)  # compile and check it runs before timing
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=10, rep=50)
        except Exception as exc:  # noqa: BLE001 - out of resources and the like: not a candidate here
            print(f"  {label}: {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        print(f"  {label}: {ms:8.4f} ms  {cfg}", flush=True)
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"{label}: no candidate ran on this GPU")
    print(f"  {label}: best {best_ms:.4f} ms  {best}", flush=True)
    return dict(best)


def tune(table: dict, only: str | None, quick: bool) -> dict:
    from kernels.triton_impl import newton_schulz as ns
    from kernels.triton_impl import relu2_mlp as m
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    mlp = MLP_CANDIDATES[:3] if quick else MLP_CANDIDATES
    gram = GRAM_CANDIDATES[:3] + GRAM_CANDIDATES[4:5] if quick else GRAM_CANDIDATES
    axpy = AXPY_CANDIDATES[:2] + AXPY_CANDIDATES[-1:] if quick else AXPY_CANDIDATES
    if only in (None, "relu2"):
        for T, D, H in MLP_SHAPES:
            x = torch.randn(T, D, device=dev, generator=gen).bfloat16()
            w_fc = (torch.randn(H, D, device=dev, generator=gen) * D ** -0.5).bfloat16()
            w_proj = (torch.randn(D, H, device=dev, generator=gen) * H ** -0.5).bfloat16()
            post = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
            m.fused_gemm(x, w_fc.t(), post, m.EPILOGUE_RELU2)
            dpre = torch.empty_like(post)
            runs = ((m.EPILOGUE_RELU2, lambda c: m.fused_gemm(x, w_fc.t(), post, m.EPILOGUE_RELU2, None, c)),
                    (m.EPILOGUE_RELU2_GRAD, lambda c: m.fused_gemm(x, w_proj, dpre, m.EPILOGUE_RELU2_GRAD, post, c)))
            for epilogue, run in runs:
                key = m.table_key(T, H, D, torch.bfloat16, epilogue)
                table["relu2_gemm"][key] = _fastest(f"relu2_gemm {key}", mlp, run)
            del x, w_fc, w_proj, post, dpre
    if only in (None, "ns"):
        for batch, mm, n in NS_SHAPES:
            G = torch.randn(batch, mm, n, device=dev, generator=gen)
            X = ns.normalize(G)
            A = ns.sym_xxt(X)
            S = ns.sym_poly(A, -4.775, 2.0315)
            S_out = torch.empty_like(S)
            out = torch.empty_like(X)
            table["ns_gram"][ns.gram_key("ns_gram", batch, mm, n)] = _fastest(
                f"ns_gram b{batch} {mm}x{n}", gram, lambda c: ns._launch_gram(X, (X.stride(2), X.stride(1)), A, c))
            table["ns_poly"][ns.gram_key("ns_poly", batch, mm, mm)] = _fastest(
                f"ns_poly b{batch} {mm}", gram,
                lambda c: ns._launch_gram(A, (A.stride(1), A.stride(2)), S_out, c, Q=A, alpha=2.0315, beta=-4.775))
            table["ns_axpy"][ns.axpy_key(batch, mm, n)] = _fastest(
                f"ns_axpy b{batch} {mm}x{n}", axpy, lambda c: ns._launch_axpy(S, X, out, 3.4445, c))
            del G, X, A, S, S_out, out
    return table


def write_table(table: dict, device_name: str) -> None:
    import triton
    head = TABLE_PATH.read_text().split("MEASURED =")[0]
    head = head.replace("MEASURED is False: the entries below are estimates for an H100/H200 (132 SMs, 227 KiB of "
                        "shared\nmemory per block), not yet measured on a GPU.",
                        "MEASURED is True: the entries below were timed by the tuner on DEVICE.")
    body = (f"MEASURED = True\nDEVICE = {device_name!r}\n"
            f"DATE = {datetime.date.today().isoformat()!r}\nTRITON = {triton.__version__!r}\n\n"
            f"TABLE = {pprint.pformat(table, width=110, sort_dicts=True)}\n")
    # gpu_check may kill the tuner at its limit: a half-written table would break every import of kernels.
    tmp = TABLE_PATH.with_suffix(".py.tmp")
    tmp.write_text(head + body)
    os.replace(tmp, TABLE_PATH)
    print(f"wrote {TABLE_PATH}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resources", action="store_true", help="compile for sm_90a and report (no GPU needed)")
    p.add_argument("--json", action="store_true", help="with --resources: one JSON object on stdout")
    p.add_argument("--write", action="store_true", help="rewrite kernels/triton_impl/tuned_configs.py")
    p.add_argument("--only", choices=("relu2", "ns"), default=None)
    p.add_argument("--quick", action="store_true", help="fewer candidates (a first pass under a tight budget)")
    args = p.parse_args(argv)
    if args.resources:
        return report_resources(args.json, args.only)
    if not torch.cuda.is_available():
        print("tuning needs a CUDA device (use --resources for the compile report)", file=sys.stderr)
        return 2
    from kernels.triton_impl import tuned_configs
    from kernels.triton_impl._tiles import interpreting
    if interpreting():
        print("unset TRITON_INTERPRET to tune on the GPU", file=sys.stderr)
        return 2
    table = {k: dict(v) for k, v in tuned_configs.TABLE.items()}
    table = tune(table, args.only, args.quick)
    if args.write:
        write_table(table, torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
