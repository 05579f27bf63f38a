"""Shared by the tests: float64 oracles and plain per-parameter references (written independently of the
package), and the sm_90a compile report of the Triton kernels."""

import json
import os
import subprocess
import sys

import torch

QUINTIC = (3.4445, -4.7750, 2.0315)


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


def f64_relu2_mlp(x, w_fc, w_proj, dy):
    """(out, post, dx, dw_fc, dw_proj) of relu(x·w_fcᵀ)²·w_projᵀ in float64, pre kept (no sqrt(post) trick)."""
    x, w_fc, w_proj, dy = (t.detach().double() for t in (x, w_fc, w_proj, dy))
    pre = x @ w_fc.T
    post = pre.relu().square()
    out = post @ w_proj.T
    dpre = (dy @ w_proj) * 2 * pre.relu()
    return out, post, dpre @ w_fc, dpre.T @ x, dy.T @ post


def plain_newton_schulz(G, steps):
    """One matrix [rows, cols] in bf16 as the speedrun writes it: tall ones through their transpose."""
    X = (G.float() / (torch.linalg.vector_norm(G.float()) + 1e-7)).to(torch.bfloat16)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    a, b, c = QUINTIC
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return (X.T if tall else X).float()


class PlainMuon:
    """Per-parameter Muon written the textbook way (buf = m*buf + (1-m)*g), one matrix at a time."""

    def __init__(self, params, lr, momentum, nesterov, ns_steps=5):
        self.params, self.lr, self.momentum, self.nesterov, self.ns_steps = params, lr, momentum, nesterov, ns_steps
        self.bufs = [torch.zeros(p.shape, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def step(self):
        m = self.momentum
        for p, buf in zip(self.params, self.bufs):
            if p.grad is None:
                continue
            g = p.grad.float()
            buf.mul_(m).add_(g, alpha=1 - m)
            u = (1 - m) * g + m * buf if self.nesterov else buf
            mats = u.reshape(-1, p.shape[-2], p.shape[-1])
            o = torch.stack([plain_newton_schulz(mat, self.ns_steps) for mat in mats]).view(p.shape)
            p.add_(o.to(p.dtype), alpha=-self.lr * max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5)


def sm90_resource_report(only):
    """Rows of ``python -m kernels.triton_impl.tune --resources --json --only <only>`` ("relu2" or "ns").

    Run in a child process without TRITON_INTERPRET (the compiler refuses to run under it); every
    kernel compiled for sm_90a with this machine's triton, without a GPU.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "kernels.triton_impl.tune", "--resources", "--json", "--only", only],
                         env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["rows"]
