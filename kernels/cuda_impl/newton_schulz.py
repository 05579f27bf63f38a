"""Newton-Schulz on the "cuda" backend: the CUDA symmetric X·Xᵀ plus two torch (cuBLAS) products.

Per step: A = X·Xᵀ (csrc/sym_xxt.cu: upper tiles only, mirrored), then
B = b·A + c·A·A and X = a·X + B·X as torch.baddbmm, whose epilogue folds the
scalars into the product (one bf16 rounding each, where the reference rounds
after every operation).

The kernel wants 16-byte aligned rows, so X is zero-padded once to a column
count that is a multiple of 8: padded columns stay zero through every step
(B·0 = 0) and do not change X·Xᵀ.
"""

import torch

from kernels.cuda_impl import ops
from kernels.newton_schulz import normalize


def forward(G: torch.Tensor, coefficients, norm_scale: float, eps: float) -> torch.Tensor:
    """G [B, M, N] (fp32 / bf16 / fp16, contiguous, CUDA) -> orthogonalised [B, M, N] in G.dtype."""
    X = normalize(G, norm_scale, eps)[0].to(torch.bfloat16)  # no overflow of ‖G‖², as in the reference
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # [B, N, M]: the Gram matrix is the smaller N x N
    rows, cols = X.shape[-2:]
    padded_cols = (cols + 7) // 8 * 8
    if padded_cols != cols or not X.is_contiguous():
        Xp = torch.zeros((X.size(0), rows, padded_cols), dtype=torch.bfloat16, device=X.device)
        Xp[:, :, :cols] = X
        X = Xp
    for a, b, c in coefficients:
        A = ops.sym_xxt(X)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    X = X[:, :, :cols]
    if tall:
        X = X.mT
    return X.to(G.dtype).contiguous()
