"""relu² MLP on the "cuda" backend: torch (cuBLAS) matmuls around the CUDA relu² kernels.

forward:  pre = x·w_fcᵀ;  post = relu(pre)² (CUDA);  out = post·w_projᵀ
backward: dpost = dy·w_proj;  dpre = dpost·2·sqrt(post) (CUDA);
          dx = dpre·w_fc;  dw_fc = dpreᵀ·x;  dw_proj = dyᵀ·post
Only post is saved, as the contract says; pre is recovered as sqrt(post). The weights
may be strided views (cuBLAS takes transposed operands as they are); each weight
gradient is written in its weight's layout.
"""

import torch

from kernels.cuda_impl import ops
from kernels.relu2_mlp import matmul_in_layout


def forward(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] (contiguous), w_fc [H, D], w_proj [D, H] (one dtype, CUDA) -> (out [T, D], post [T, H])."""
    pre = x @ w_fc.T
    post, _ = ops.relu2_forward(pre)
    return post @ w_proj.T, post


def backward(dy: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
             post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [T, D], dw_fc [H, D], dw_proj [D, H]) in the inputs' dtype."""
    dpost = dy @ w_proj
    dpre, _ = ops.relu2_backward(dpost, post)
    return dpre @ w_fc, matmul_in_layout(dpre.T, x, w_fc), matmul_in_layout(dy.T, post, w_proj)
