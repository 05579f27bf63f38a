"""Document-causal sliding-window attention over one packed token sequence.

The rule (the speedrun's): query i sees key j when
    j <= i                                   (causal)
    doc(j) == doc(i)                         (same document; a document starts at each EOT token)
    i // B - j // B < window_blocks          (sliding window in B-token blocks, B = 128)
Long layers use ``window_blocks``, short layers half of it.

Two forms of the same rule:
  * ``dense_mask``: a [T, T] bool matrix for ``scaled_dot_product_attention``
    (the CPU path: FlexAttention has no backward on CPU);
  * ``flex_block_mask``: a FlexAttention ``BlockMask`` (the GPU path). The window
    is block-aligned, so it is expressed purely by which key blocks each query
    block lists; the per-token ``mask_mod`` only needs causality and documents,
    and it carries no Python int that would force a recompile per window size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedrun.data import EOT


def document_ids(tokens: torch.Tensor, eot: int = EOT) -> torch.Tensor:
    """doc[i] = number of EOT tokens in tokens[:i+1]: a document begins at its EOT."""
    return (tokens == eot).cumsum(0, dtype=torch.int32)


def short_window(window_blocks):
    """Half the long window, at least one block (an int, or a 0-d tensor: see ``_check_window``)."""
    if isinstance(window_blocks, torch.Tensor):
        return torch.clamp(window_blocks // 2, min=1)
    return max(1, window_blocks // 2)


def _check_window(window_blocks) -> None:
    # The window may be a 0-d integer tensor: a compiled model then serves every window size with one
    # graph (a Python int would be specialised into it, one recompilation per size). A tensor is not
    # checked here: reading its value would break the graph and wait for the device.
    if not isinstance(window_blocks, torch.Tensor) and window_blocks < 1:
        raise ValueError(f"window_blocks: expected >= 1, got {window_blocks}")


def dense_mask(tokens: torch.Tensor, window_blocks: int, block_size: int = 128, eot: int = EOT) -> torch.Tensor:
    """The rule evaluated for every (query, key) pair: bool [T, T], True = may attend."""
    _check_window(window_blocks)
    docs = document_ids(tokens, eot)
    pos = torch.arange(tokens.numel(), device=tokens.device)
    q, k = pos[:, None], pos[None, :]
    return (k <= q) & (docs[:, None] == docs[None, :]) & (q // block_size - k // block_size < window_blocks)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [nq, nk] bool block table -> (counts [1, 1, nq], indices [1, 1, nq, nk]) listing the True blocks first."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def flex_block_mask(tokens: torch.Tensor, window_blocks: int, block_size: int = 128, eot: int = EOT):
    """The rule as a FlexAttention BlockMask (T must be a multiple of block_size).

    Per (query block, key block) the table says: skip (no visible pair),
    full (every pair visible: no causal or document edge inside), or partial
    (evaluate ``mask_mod`` per token).
    """
    from torch.nn.attention.flex_attention import BlockMask

    T = tokens.numel()
    if T % block_size:
        raise ValueError(f"tokens: length {T} is not a multiple of the attention block size {block_size}")
    _check_window(window_blocks)
    docs = document_ids(tokens, eot)
    nb = T // block_size
    first, last = docs.view(nb, block_size)[:, 0], docs.view(nb, block_size)[:, -1]
    qb = torch.arange(nb, device=tokens.device)[:, None]
    kb = torch.arange(nb, device=tokens.device)[None, :]
    in_window = (kb <= qb) & (qb - kb < window_blocks)
    # Documents are contiguous and increasing, so an earlier key block shares a
    # document with the query block exactly when its last doc is the query's
    # first; the diagonal block always has its own tokens (i == j) to see.
    any_visible = in_window & ((last[None, :] == first[:, None]) | (kb == qb))
    all_visible = any_visible & (kb < qb) & (first[None, :] == last[None, :]) & (first[:, None] == last[:, None])
    partial = any_visible & ~all_visible

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(all_visible), BLOCK_SIZE=block_size,
                                    mask_mod=document_causal)


def block_mask_to_dense(block_mask, T: int) -> torch.Tensor:
    """Token-level [T, T] view of a BlockMask built by ``flex_block_mask`` (for tests and debugging)."""
    bq, bk = block_mask.BLOCK_SIZE
    out = torch.zeros(T, T, dtype=torch.bool)
    pos = torch.arange(T)
    lists = ((block_mask.kv_num_blocks, block_mask.kv_indices, True),
             (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False))
    for counts, indices, partial in lists:
        if counts is None:
            continue
        counts, indices = counts[0, 0].cpu(), indices[0, 0].cpu()
        for q_block in range(counts.numel()):
            rows = slice(q_block * bq, (q_block + 1) * bq)
            for k_block in indices[q_block, :counts[q_block]].tolist():
                cols = slice(k_block * bk, (k_block + 1) * bk)
                if partial:
                    out[rows, cols] = block_mask.mask_mod(0, 0, pos[rows, None], pos[None, cols])
                else:
                    out[rows, cols] = True
    return out


class AttentionMasks:
    """The long and short masks of one sequence, in the form the chosen kernel needs."""

    def __init__(self, tokens: torch.Tensor, window_blocks, block_size: int, kind: str):
        self.kind = kind
        if kind == "flex":
            self.long = flex_block_mask(tokens, window_blocks, block_size)
            self.short = flex_block_mask(tokens, short_window(window_blocks), block_size)
        elif kind == "sdpa":
            self.long = dense_mask(tokens, window_blocks, block_size)
            self.short = dense_mask(tokens, short_window(window_blocks), block_size)
        else:
            raise ValueError(f"attention: expected 'flex' or 'sdpa', got {kind!r}")


_compiled_flex = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, kind: str, scale: float) -> torch.Tensor:
    """q, k, v [1, H, T, hd] -> [1, H, T, hd] under ``mask`` (a BlockMask for "flex", bool [T, T] for "sdpa")."""
    if kind == "flex":
        global _compiled_flex
        if _compiled_flex is None:
            from torch.nn.attention.flex_attention import flex_attention
            # Eager FlexAttention materialises the [T, T] scores; compiled, it is a fused kernel.
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
