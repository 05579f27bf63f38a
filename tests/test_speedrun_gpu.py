"""speedrun on a GPU (tier 2, skipped without CUDA): FlexAttention vs the dense-mask reference with
gradients, the record-sized model training a few steps with each available kernels backend, and the
compiled model (FlexAttention path: no graph break, same result as eager, no recompilation) and trainer."""

import json
import math
import re
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
    # Eager: one compilation per backend would not fit the GPU tier's minutes (the compiled trainer is below).
    code = main(["--preset", "record", "--backend", backend, "--synthetic=true", "--data", str(tmp_path / "d"),
                 "--out", str(tmp_path / "o"), "--steps", "6", "--seq_len", "8192", "--batch_tokens", "16384",
                 "--val_seq_len", "8192", "--val_tokens", "16384", "--val_every", "3", "--compile=false",
                 "--warmup_steps=0"])
    err = capsys.readouterr().err
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["train_loss"]) and e["mem_alloc_mib"] > 0 for e in log[1:])
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5


# The record's shapes, fewer layers (compile time grows with the graph): every kind of layer is there.
SMALL_RECORD = {"num_layers": 4, "window_pattern": "LSSL", "no_attention_layers": (2,), "num_value_embeds": 1,
                "seq_len": 4096, "val_seq_len": 4096}


def test_compiled_record_model_with_flex_attention_has_no_graph_break():
    import torch._dynamo
    from speedrun.config import build_config
    from speedrun.model import GPT

    cfg = build_config("record", SMALL_RECORD)
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    with torch.no_grad():
        model.lm_head_w.normal_(0, 0.02)  # zero at init: no gradient would flow back through the head
    g = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, 50000, (cfg.seq_len + 1,), device="cuda", generator=g)
    tokens[torch.rand(cfg.seq_len + 1, device="cuda", generator=g) < 0.003] = data.EOT
    inputs, targets = tokens[:-1].to(torch.int32), tokens[1:]
    window = torch.tensor(3, dtype=torch.int32, device="cuda")
    assert model.attention_kind(inputs.device) == "flex"
    explained = torch._dynamo.explain(model)(inputs, targets, window)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    results = []
    for fn in (model, compiled):
        loss = fn(inputs, targets, window)
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    names = ["loss"] + [n for n, _ in model.named_parameters()]
    for name, got, want in zip(names, results[1], results[0]):
        # bf16 activations, FP8 head: compiled fusion rounds differently; matrices must agree closely.
        if want.dim() >= 2 or name == "loss":
            rel = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
            assert rel < 3e-2, (name, rel)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(inputs, targets, torch.tensor(5, dtype=torch.int32, device="cuda")).backward()


def test_compiled_trainer_warm_up_and_record_lines(tmp_path, capsys):
    from speedrun.train_gpt import main

    args = ["--preset", "record", "--synthetic=true", "--data", str(tmp_path / "d"), "--steps", "4",
            "--batch_tokens", "8192", "--val_tokens", "8192", "--val_every", "2", "--log_every", "2",
            *[f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in SMALL_RECORD.items()]]
    code = main([*args, "--out", str(tmp_path / "o"), "--warmup_steps=2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "compile inductor, warm-up 2 step(s)" in out and "warm-up: 2 untimed step(s)" in out
    assert re.search(r"^step:4/4 val_loss:\d+\.\d{4} train_time:\d+ms step_avg:[\d.]+ms \| loss .* tok/s/GPU .*"
                     r"MFU [\d.]+% \| mem \d+/\d+ MiB", out, re.M), out
    assert re.search(r"peak memory allocated: \d+ MiB reserved: \d+ MiB", out)
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "train_loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        assert math.isfinite(e["train_loss"]) and e["step_ms"] > 0 and 0 < e["mfu"] < 1
        assert e["mem_alloc_mib"] > 0 and e["tokens_per_s_per_rank"] > 0
    # The warm-up changed nothing: the first step's loss is the zero-init head's, and an eager run
    # without warm-up gives the same losses up to the compiled kernels' rounding.
    assert steps[0]["train_loss"] == pytest.approx(math.log(50304), rel=1e-3)
    assert main([*args, "--out", str(tmp_path / "e"), "--compile=false", "--warmup_steps=0"]) == 0
    eager = [json.loads(line) for line in (tmp_path / "e" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(log, eager):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-2), (key, a, b)
