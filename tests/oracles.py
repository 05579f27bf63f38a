"""Float64 oracles shared by the tests, written independently of the package."""

import torch


def f64_newton_schulz(G, coefficients, norm_scale=1.0, eps=1e-7):
    """The Newton-Schulz iteration in float64 throughout, (a, b, c) per step; tall inputs through the transpose."""
    X = G.double()
    X = X / (norm_scale * torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for a, b, c in coefficients:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X
