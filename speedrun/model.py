"""The speedrun record's GPT (record #23; facts in shared/notes/record-config.md).

One packed sequence per forward (batch size 1): x is [T, D] throughout. The
hot ops go through ``kernels`` (the ReLU² MLP and the FP8 head), so the
``backend`` switch covers the whole model; attention is FlexAttention on a
GPU and ``scaled_dot_product_attention`` with the same mask on a CPU.

Precision: weight matrices are fp32 masters cast to the activation dtype at
use; embedding tables are stored in the activation dtype (bf16 in the record);
the scalar gates are fp32 0-dim tensors, which do not promote bf16 activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from speedrun.attention import AttentionMasks, attend
from speedrun.config import Config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learned weight."""
    return F.rms_norm(x, (x.size(-1),))


def linear_init_(w: torch.Tensor, in_features: int) -> torch.Tensor:
    """Uniform with std 0.5 / sqrt(in_features) (a uniform's std is bound / sqrt(3))."""
    bound = math.sqrt(3) * 0.5 * in_features ** -0.5
    with torch.no_grad():
        return w.uniform_(-bound, bound)


class Rotary(nn.Module):
    """Half-truncated rotary embedding: head_dim/4 frequencies in (1/1024)^[0, 1], head_dim/4 at zero."""

    def __init__(self, head_dim: int, max_len: int):
        super().__init__()
        quarter = head_dim // 4
        freq = (1 / 1024) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
        freq = torch.cat([freq, freq.new_zeros(quarter)])
        theta = torch.arange(max_len, dtype=torch.float32)[:, None] * freq[None, :]
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, hd] -> same, rotated by absolute position in the packed sequence."""
        T = x.size(0)
        if T > self.cos.size(0):
            raise ValueError(f"sequence of {T} tokens is longer than the rotary table ({self.cos.size(0)})")
        cos, sin = self.cos[:T, None, :], self.sin[:T, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: Config, rotary: Rotary):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, cfg.head_dim, cfg.attn_scale
        inner = cfg.num_heads * cfg.head_dim
        self.qkv_w = nn.Parameter(linear_init_(torch.empty(3, inner, cfg.model_dim), cfg.model_dim))
        self.proj_w = nn.Parameter(torch.zeros(cfg.model_dim, inner))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = l0*v + l1*ve
        self.rotary = rotary  # one table shared by all layers

    def forward(self, x, ve, mask, kind):
        T, H, hd = x.size(0), self.num_heads, self.head_dim
        q, k, v = F.linear(x, self.qkv_w.flatten(0, 1).type_as(x)).view(T, 3 * H, hd).chunk(3, dim=1)
        q, k = self.rotary(norm(q)), self.rotary(norm(k))
        v = self.lambdas[0] * v + self.lambdas[1] * ve.view_as(v) if ve is not None else self.lambdas[0] * v
        y = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, kind, self.scale)
        y = y[0].transpose(0, 1).reshape(T, H * hd)
        return F.linear(y, self.proj_w.type_as(y))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.model_dim
        self.fc_w = nn.Parameter(linear_init_(torch.empty(hidden, cfg.model_dim), cfg.model_dim))
        self.proj_w = nn.Parameter(torch.zeros(cfg.model_dim, hidden))
        self.backend = None if cfg.backend == "auto" else cfg.backend

    def forward(self, x):
        return kernels.relu2_mlp(x, self.fc_w.type_as(x), self.proj_w.type_as(x), backend=self.backend)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int, rotary: Rotary):
        super().__init__()
        self.attn = None if layer in cfg.no_attention_layers else Attention(cfg, rotary)
        self.mlp = MLP(cfg)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # x = l0*x + l1*x0

    def forward(self, x, x0, ve, mask, kind):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask, kind)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        L, n_ve = cfg.num_layers, cfg.num_value_embeds
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim, dtype=dtype)
        self.value_embeds = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.num_heads * cfg.head_dim, dtype=dtype) for _ in range(n_ve))
        rotary = Rotary(cfg.head_dim, max(cfg.seq_len, cfg.val_seq_len))
        self.blocks = nn.ModuleList(Block(cfg, i, rotary) for i in range(L))
        self.skip_weights = nn.Parameter(torch.ones(L // 2))
        self.lm_head_w = nn.Parameter(torch.zeros(cfg.padded_vocab, cfg.model_dim))
        # ve_i feeds layer i and layer L - n_ve + i (the U-net mirror); the middle layers get none.
        self.ve_of_layer = [i if i < n_ve else (i - (L - n_ve) if i >= L - n_ve else None) for i in range(L)]
        self.logit_scale = cfg.model_dim ** -0.5
        if cfg.fp8_scales == "static":
            # The record's (x, weight, logits' gradient) scales: after RMSNorm |x| <= sqrt(D).
            self.fp8_scales = (math.sqrt(cfg.model_dim) / 448, 24 / 448, 1 / 448)
        else:
            self.fp8_scales = None
        self.backend = None if cfg.backend == "auto" else cfg.backend

    def attention_kind(self, device: torch.device) -> str:
        if self.cfg.attention != "auto":
            return self.cfg.attention
        return "flex" if device.type == "cuda" else "sdpa"

    def hidden(self, inputs: torch.Tensor, window_blocks: int) -> torch.Tensor:
        """inputs [T] token ids -> final normalised hidden states [T, D]."""
        cfg = self.cfg
        kind = self.attention_kind(inputs.device)
        masks = AttentionMasks(inputs, window_blocks, cfg.attn_block, kind)
        ve = [table(inputs) for table in self.value_embeds]
        x = x0 = norm(self.embed(inputs))
        skips, half = [], cfg.num_layers // 2
        for i, block in enumerate(self.blocks):
            if i >= half and skips:
                x = x + self.skip_weights[i - half] * skips.pop()
            ve_i = ve[self.ve_of_layer[i]] if self.ve_of_layer[i] is not None else None
            mask = masks.long if cfg.window_pattern[i] == "L" else masks.short
            x = block(x, x0, ve_i, mask, kind)
            if i < half:
                skips.append(x)
        return norm(x)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, window_blocks: int) -> torch.Tensor:
        """Training: summed cross-entropy (the FP8 head when head_fp8). Eval: mean cross-entropy."""
        x = self.hidden(inputs, window_blocks)
        cfg = self.cfg
        if self.training and cfg.head_fp8:
            return kernels.fp8_head_loss(x, self.lm_head_w, targets, softcap=cfg.softcap, logit_scale=self.logit_scale,
                                         scales=self.fp8_scales, reduction="sum", backend=self.backend,
                                         rounding=cfg.head_rounding)
        if self.training:
            logits = F.linear(x, self.lm_head_w.type_as(x))
            return kernels.softcap_cross_entropy(logits, targets, softcap=cfg.softcap, logit_scale=self.logit_scale,
                                                 reduction="sum")
        return self.eval_loss(x, targets)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        # Chunked so that [chunk, V] logits, not [T, V], are ever alive (T is 256K per GPU in the record).
        w = self.lm_head_w.type_as(x)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for xs, ts in zip(x.split(chunk), targets.split(chunk)):
            total += kernels.softcap_cross_entropy(F.linear(xs, w), ts, softcap=self.cfg.softcap,
                                                   logit_scale=self.logit_scale, reduction="sum")
        return total / targets.numel()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The record's optimizer split: Muon for block matrices, Adam for the rest (three lrs)."""
        groups = {"muon": [], "head": [self.lm_head_w], "embed": [], "scalar": [self.skip_weights]}
        groups["embed"] = [self.embed.weight] + [t.weight for t in self.value_embeds]
        for p in self.blocks.parameters():
            groups["muon" if p.dim() >= 2 else "scalar"].append(p)
        assert sum(len(v) for v in groups.values()) == len(list(self.parameters()))
        return groups

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (blocks and head): the 6N of the FLOP count."""
        return sum(p.numel() for p in self.blocks.parameters() if p.dim() >= 2) + self.lm_head_w.numel()
