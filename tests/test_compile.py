"""torch.compile(fullgraph=True) traces a model that calls every op, and matches eager."""

import torch

import kernels


class TinyBlock(torch.nn.Module):
    def __init__(self, D=16, H=64, V=50):
        super().__init__()
        self.w_fc = torch.nn.Parameter(torch.randn(H, D) * D ** -0.5)
        self.w_proj = torch.nn.Parameter(torch.randn(D, H) * H ** -0.5)
        self.head = torch.nn.Parameter(torch.randn(V, D) * D ** -0.5)

    def forward(self, x, targets):
        h = x + kernels.relu2_mlp(x, self.w_fc, self.w_proj)
        fp8_loss = kernels.fp8_head_loss(h, self.head, targets, logit_scale=0.5, reduction="sum")
        ce_loss = kernels.softcap_cross_entropy(h @ self.head.T, targets)
        ortho = kernels.newton_schulz(self.w_fc, steps=2)  # differentiable through the fp32 iteration
        return fp8_loss + ce_loss + 1e-3 * (ortho * self.w_fc).sum()


def test_fullgraph_compile_matches_eager():
    torch.manual_seed(0)
    model = TinyBlock()
    x, targets = torch.randn(9, 16), torch.randint(0, 50, (9,))
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (model, compiled):
        loss = fn(x, targets)
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
