"""speedrun on a GPU (tier 2, skipped without CUDA): FlexAttention vs the dense-mask reference with
gradients, and the record-sized model training a few steps with each available kernels backend."""

import json
import math
from pathlib import Path

import pytest
import torch

from speedrun import data

pytestmark = pytest.mark.gpu


def test_flex_attention_matches_dense_reference_with_grads():
    from speedrun.attention import attend, dense_mask, flex_block_mask

    T, H, hd, window = 2048, 6, 128, 5
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 50000, (T,), device="cuda", generator=g)
    tokens[torch.rand(T, device="cuda", generator=g) < 0.004] = data.EOT
    tokens[[0, 128, 700]] = data.EOT
    qkv = [torch.randn(1, H, T, hd, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
           for _ in range(3)]
    ref = [t.detach().double().requires_grad_() for t in qkv]
    out = attend(*qkv, flex_block_mask(tokens, window, 128), "flex", 0.12)
    want = attend(*ref, dense_mask(tokens, window, 128), "sdpa", 0.12)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(want)
    out.backward(grad.to(out.dtype))
    want.backward(grad)
    for a, b in zip(qkv, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_record_model_trains_with_each_backend(tmp_path, backend, capsys):
    import kernels
    from speedrun.train_gpt import main

    if backend not in kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available here")
    # The record's model and optimizer on the synthetic corpus, with shorter sequences.
    code = main(["--preset", "record", "--backend", backend, "--synthetic=true", "--data", str(tmp_path / "d"),
                 "--out", str(tmp_path / "o"), "--steps", "6", "--seq_len", "8192", "--batch_tokens", "16384",
                 "--val_seq_len", "8192", "--val_tokens", "16384", "--val_every", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["train_loss"]) and e["mem_alloc_mib"] > 0 for e in log[1:])
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
