"""speedrun: attention masks (dense vs FlexAttention), schedules, config, model wiring, and the trainer
(smoke preset: 1 and 2 processes, exact resume, bad inputs, non-finite loss)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speedrun import data, plot, train_gpt
from speedrun.attention import block_mask_to_dense, dense_mask, flex_block_mask
from speedrun.config import build_config, parse_overrides
from speedrun.model import GPT
from speedrun.train_gpt import evaluate, lr_multiplier, main, muon_momentum, window_blocks
from trainer_runs import read_log, run_smoke

REPO_ROOT = Path(__file__).resolve().parents[1]
EOT = data.EOT


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------

def _rule_by_loops(tokens, window_blocks, block):
    """The mask rule written out pair by pair: same document = no EOT in tokens[j+1 .. i]."""
    toks = tokens.tolist()
    T = len(toks)
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            if EOT in toks[j + 1:i + 1]:
                continue
            out[i, j] = i // block - j // block < window_blocks
    return out


def _tokens(T, eot_prob, seed, eot_at=()):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (T,), generator=g)
    tokens[torch.rand(T, generator=g) < eot_prob] = EOT
    for i in eot_at:
        tokens[i] = EOT
    return tokens


def test_dense_mask_is_the_rule():
    for T, block, window, p in [(37, 8, 2, 0.1), (64, 16, 1, 0.05), (50, 4, 5, 0.3), (24, 8, 3, 0.0)]:
        tokens = _tokens(T, p, seed=T)
        assert torch.equal(dense_mask(tokens, window, block), _rule_by_loops(tokens, window, block))


CASES = [
    # (T, block, window, eot_prob, forced EOT positions)
    (256, 32, 1, 0.02, ()),
    (256, 32, 2, 0.02, ()),
    (384, 32, 3, 0.0, ()),                 # one long document: full blocks inside the window
    (384, 32, 5, 0.2, ()),                 # many short documents: partial blocks only
    (320, 64, 4, 0.0, (0, 64, 128, 191)),  # documents starting exactly on / just before block edges
    (256, 32, 100, 0.01, (5,)),            # window wider than the sequence
    (128, 32, 2, 1.0, ()),                 # every token its own document
]


@pytest.mark.parametrize("T, block, window, p, eot_at", CASES)
def test_flex_block_mask_gives_the_dense_mask(T, block, window, p, eot_at):
    tokens = _tokens(T, p, seed=T + window, eot_at=eot_at)
    bm = flex_block_mask(tokens, window, block)
    assert torch.equal(block_mask_to_dense(bm, T), dense_mask(tokens, window, block))
    # No block is listed twice (partial and full are disjoint) and no listed block is empty.
    partial = torch.zeros(T // block, T // block, dtype=torch.bool)
    for q in range(T // block):
        for k in bm.kv_indices[0, 0, q, :bm.kv_num_blocks[0, 0, q]].tolist():
            partial[q, k] = True
        for k in bm.full_kv_indices[0, 0, q, :bm.full_kv_num_blocks[0, 0, q]].tolist():
            assert not partial[q, k]
            assert dense_mask(tokens, window, block)[q * block:(q + 1) * block, k * block:(k + 1) * block].all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_forward_matches_sdpa_on_cpu():
    # FlexAttention has no CPU backward, but its (eager) forward runs: the same mask gives the same output.
    from torch.nn.attention.flex_attention import flex_attention
    T, block, window, H, hd = 256, 32, 3, 2, 16
    tokens = _tokens(T, 0.03, seed=1, eot_at=(70,))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, hd, generator=g, dtype=torch.float64) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=flex_block_mask(tokens, window, block), scale=0.12)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(tokens, window, block),
                                                            scale=0.12)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# Schedules and config
# ---------------------------------------------------------------------------

def test_record_schedules():
    # Window warm-up: 128 tokens growing to 1792, in 128-token blocks.
    assert window_blocks(0.0, 1728, 128) == 1
    assert window_blocks(1 / 1770, 1728, 128) == 1
    assert window_blocks(0.5, 1728, 128) == 7  # 864 -> 896 tokens
    assert window_blocks(1.0, 1728, 128) == 14
    assert window_blocks(0.99, 1728, 128) == 14  # 1710.7 -> 1792
    # Constant, then linear to 0.1 over the last 40%.
    assert lr_multiplier(0.0, 0.4, 0.1) == 1.0 and lr_multiplier(0.59, 0.4, 0.1) == 1.0
    assert lr_multiplier(0.8, 0.4, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(1.0, 0.4, 0.1) == pytest.approx(0.1)
    cfg = build_config("record", {})
    assert muon_momentum(0, cfg) == pytest.approx(0.85) and muon_momentum(150, cfg) == pytest.approx(0.90)
    assert muon_momentum(300, cfg) == pytest.approx(0.95) and muon_momentum(1000, cfg) == pytest.approx(0.95)


def test_overrides_and_validation():
    assert parse_overrides(["--steps", "7", "--model_dim=128", "--head_fp8=false", "--no_attention_layers=1,3",
                            "--data", "d"]) == {"num_steps": 7, "model_dim": 128, "head_fp8": False,
                                                "no_attention_layers": (1, 3), "data_dir": "d"}
    with pytest.raises(ValueError, match="unknown option --modle_dim"):
        parse_overrides(["--modle_dim=3"])
    with pytest.raises(ValueError, match="--num_steps: cannot read 'x' as int"):
        parse_overrides(["--steps=x"])
    with pytest.raises(ValueError, match="--window_pattern: expected 3 letters"):
        build_config("smoke", {"num_layers": 3})
    with pytest.raises(ValueError, match="--preset: expected one of"):
        build_config("fast", {})
    cfg = build_config("record", {})
    assert cfg.out == "runs/record" and cfg.padded_vocab == 50304
    assert [cfg.grad_accum(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple of world_size"):
        cfg.grad_accum(3)
    # The record's 10,485,760 validation tokens are 40 whole sequences of 262,144: any rank count covers them.
    assert cfg.val_tokens == 40 * cfg.val_seq_len
    with pytest.raises(ValueError, match="--val_tokens: expected a multiple of val_seq_len=128"):
        build_config("smoke", {"val_tokens": 200})
    # Compiled on CUDA by default, eager on a CPU; any other value is refused.
    assert cfg.compile_backend("cuda") == "inductor" and cfg.compile_backend("cpu") is None
    assert build_config("smoke", {"compile": "aot_eager"}).compile_backend("cpu") == "aot_eager"
    assert build_config("smoke", {"compile": "false"}).compile_backend("cuda") is None
    with pytest.raises(ValueError, match="--compile: expected one of auto, true, false"):
        build_config("smoke", {"compile": "fast"})
    # A bare boolean switch is true; permission to change the data is never inherited by a resume.
    assert parse_overrides(["--allow_data_change", "--steps", "3"]) == {"allow_data_change": True, "num_steps": 3}
    assert parse_overrides(["--allow_data_change"]) == {"allow_data_change": True}
    base = vars(build_config("smoke", {"allow_data_change": True}))
    assert build_config("smoke", {}, base=base).allow_data_change is False
    assert build_config("smoke", {}, base={**base, "compile": False}).compile == "false"  # an older checkpoint


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def test_record_model_shapes_and_optimizer_split():
    with torch.device("meta"):
        model = GPT(build_config("record", {}))
    D, V, L = 768, 50257, 12
    assert model.embed.weight.dtype == torch.bfloat16 and len(model.value_embeds) == 3
    assert model.lm_head_w.shape == (50304, D) and model.blocks[7].attn is None
    assert sum(b.attn is not None for b in model.blocks) == 11
    assert model.blocks[0].attn.qkv_w.shape == (3, 768, D)
    assert model.ve_of_layer == [0, 1, 2, None, None, None, None, None, None, 0, 1, 2]
    groups = model.param_groups()
    n_muon = sum(p.numel() for p in groups["muon"])
    assert n_muon == 11 * 4 * D * D + L * 2 * 4 * D * D
    assert all(p.dim() >= 2 for p in groups["muon"]) and all(p.dim() < 2 for p in groups["scalar"])
    assert sum(p.numel() for p in groups["embed"]) == 4 * V * D
    assert sum(p.numel() for p in model.parameters()) == n_muon + 4 * V * D + 50304 * D + 11 * 2 + L * 2 + 6


def _small_model(seed=0, **overrides):
    cfg = build_config("smoke", {"num_layers": 4, "window_pattern": "LSSL", **overrides})
    torch.manual_seed(seed)
    return GPT(cfg), cfg


def test_zero_init_head_gives_uniform_loss():
    model, cfg = _small_model()
    tokens = _tokens(cfg.seq_len + 1, 0.02, seed=3)
    inputs, targets = tokens[:-1].to(torch.int32), tokens[1:]
    expect = math.log(cfg.padded_vocab)
    assert model(inputs, targets, 2).item() == pytest.approx(expect * cfg.seq_len, rel=1e-6)  # fp8 head, sum
    model.eval()
    assert model(inputs, targets, 2).item() == pytest.approx(expect, rel=1e-6)  # plain head, mean


def test_model_is_causal_and_document_isolated():
    # With random (not zero) projections, changing token j may change hidden states only at
    # positions >= j in the same document: proves the wiring (skips, value embeds, masks).
    model, cfg = _small_model(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    T = cfg.seq_len
    tokens = _tokens(T, 0.0, seed=4, eot_at=(0, 50, 90))
    j = 60
    changed = tokens.clone()
    changed[j] = (changed[j] + 1) % 1000
    with torch.no_grad():
        a = model.hidden(tokens.to(torch.int32), window_blocks=4)
        b = model.hidden(changed.to(torch.int32), window_blocks=4)
    moved = (a - b).abs().amax(-1) > 0
    assert not moved[:j].any() and not moved[90:].any()
    assert moved[j:90].all()


def _compile_case(training: bool):
    # Every kind of layer: value embeddings, a block without attention, long and short windows, the FP8 head.
    model, cfg = _small_model(seed=2, num_value_embeds=1, no_attention_layers=(2,))
    with torch.no_grad():
        model.lm_head_w.normal_(0, 0.05)  # zero at init: nothing would flow back through the head
    model.train(training)
    tokens = _tokens(cfg.seq_len + 1, 0.03, seed=5, eot_at=(0, 40))
    return model, tokens[:-1].to(torch.int32), tokens[1:]


def test_model_traces_with_no_graph_break():
    # The record compiles its whole model: every kernels op and the mask builders must trace as
    # one graph, in training (FP8 head) and evaluation (chunked head), with the window as a tensor.
    for training in (True, False):
        model, inputs, targets = _compile_case(training)
        explained = torch._dynamo.explain(model)(inputs, targets, torch.tensor(2, dtype=torch.int32))
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_forward_and_backward_match_eager_without_recompiling():
    torch._dynamo.reset()
    model, inputs, targets = _compile_case(True)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        loss = fn(inputs, targets, torch.tensor(2, dtype=torch.int32))
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    for (name, _), got, want in zip([("loss", None), *model.named_parameters()], results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    # Another window size is another value of the same input: no second compilation.
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss = compiled(inputs, targets, torch.tensor(3, dtype=torch.int32))
        loss.backward()
    assert torch.equal(loss, model(inputs, targets, 3))


def test_evaluate_is_the_mean_over_exactly_val_tokens(tmp_path):
    # A stand-in model whose "loss" is the mean target id: the result must be the mean over exactly
    # the first val_tokens targets of the validation window (3 sequences of 128).
    tokens = np.arange(2000) % 1000
    data.write_shard(tmp_path / "t_val_000000.bin", tokens)
    cfg = build_config("smoke", {"val_tokens": 384})
    stream = data.TokenStream([tmp_path / "t_val_000000.bin"], 384, 128, wrap=False)

    class MeanTarget(torch.nn.Module):
        def forward(self, inputs, targets, window):
            assert not self.training and inputs.shape == (128,)
            return targets.double().mean()

    got = evaluate(MeanTarget(), cfg, stream, 1, torch.device("cpu"), 1)
    assert got == pytest.approx(tokens[1:385].mean(), rel=1e-6)
    assert evaluate(MeanTarget(), cfg, stream, 1, torch.device("cpu"), 1) == got  # the same set every time


# ---------------------------------------------------------------------------
# Trainer runs (smoke preset)
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_run_log_and_checkpoint(tmp_path, smoke_data, capsys):
    code, out, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path))
    assert code == 0, err
    log = read_log(tmp_path)
    assert [e["step"] for e in log] == [0, 1, 2, 3, 4]
    for e in log[1:]:
        assert {"step", "train_loss", "lr", "step_ms", "tokens", "tokens_per_s"} <= set(e)
        assert e["tokens"] == 256 * e["step"] and math.isfinite(e["train_loss"])
    assert [e["step"] for e in log if "val_loss" in e] == [0, 2, 4]
    assert log[1]["train_loss"] == pytest.approx(math.log(50304), rel=1e-6)  # zero-init head
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 1.0  # it learns
    # train_time: the record's (steps only), growing by each step's time; tokens/s per rank.
    times = [e["train_time_ms"] for e in log]
    assert times[0] == 0 and all(b > a for a, b in zip(times, times[1:]))
    for prev, e in zip(log[1:], log[2:]):
        assert e["train_time_ms"] - prev["train_time_ms"] == pytest.approx(e["step_ms"], rel=0.05)  # no val time
        assert e["tokens_per_s_per_rank"] == pytest.approx(256 / (e["step_ms"] / 1000))
    # The record's line form, beside this trainer's fields.
    val_line = re.search(r"^step:4/4 val_loss:(\d+\.\d{4}) train_time:(\d+)ms step_avg:(\d+\.\d\d)ms \| loss "
                         r"\d+\.\d{4} \| \d+ ms \| [\d.]+k tok/s/process", out, re.M)
    assert val_line, out
    assert float(val_line.group(1)) == pytest.approx(log[-1]["val_loss"], abs=5e-5)
    assert int(val_line.group(2)) == round(log[-1]["train_time_ms"])
    assert float(val_line.group(3)) == pytest.approx(log[-1]["train_time_ms"] / 4, abs=0.006)
    assert re.search(r"^step:0/4 val_loss:10\.8258 train_time:0ms step_avg:0\.00ms", out, re.M)
    assert re.search(r"^step:3/4 train_time:\d+ms step_avg:[\d.]+ms \| loss", out, re.M)
    assert "source entropy" in out and f"log {tmp_path / 'log.jsonl'}" in out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["data"]["pos"] > 0 and ckpt["config"]["preset"] == "smoke"
    # The data's identity travels with the position.
    identity = ckpt["data"]["identity"]
    assert identity["shards"] == [["synthetic_train_000001.bin", 1 << 14]]
    assert identity["val_shards"] == [["synthetic_val_000000.bin", 1 << 12]]
    assert identity["synthetic"]["train_tokens"] == 1 << 14 and ckpt["data"]["step_tokens"] == 256


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, smoke_data, capsys):
    common = ["--data", str(smoke_data), "--steps", "6", "--val_every", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_smoke(capsys, *common, "--out", str(full))[0] == 0
    code, out, _ = run_smoke(capsys, *common, "--out", str(part), "--stop_after", "3")
    assert code == 0 and "--resume" in out
    assert [e["step"] for e in read_log(part)] == [0, 1, 2, 3]
    code, out, err = run_smoke(capsys, "--resume", str(part / "checkpoint.pt"))
    assert code == 0, err
    assert "resumed at step 3" in out
    want, got = read_log(full), read_log(part)
    assert [e["step"] for e in got] == [0, 1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got):
        assert a.get("train_loss") == b.get("train_loss") and a.get("val_loss") == b.get("val_loss"), (a, b)
    a, b = torch.load(full / "checkpoint.pt", weights_only=True), torch.load(part / "checkpoint.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.slow
def test_warm_up_leaves_the_run_unchanged(tmp_path, smoke_data, capsys):
    # Warm-up steps train on the real shapes and data, then model, optimizer, data and RNG go back:
    # the run after it is the run without it, bit for bit.
    common = ["--data", str(smoke_data), "--steps", "3", "--val_every", "3"]
    assert run_smoke(capsys, *common, "--out", str(tmp_path / "cold"), "--warmup_steps=0")[0] == 0
    code, out, err = run_smoke(capsys, *common, "--out", str(tmp_path / "warm"), "--warmup_steps=3")
    assert code == 0, err
    assert "warm-up 3 step(s)" in out and "warm-up: 3 untimed step(s)" in out
    cold, warm = read_log(tmp_path / "cold"), read_log(tmp_path / "warm")
    assert [(e.get("train_loss"), e.get("val_loss")) for e in cold] == \
        [(e.get("train_loss"), e.get("val_loss")) for e in warm]
    a = torch.load(tmp_path / "cold" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "warm" / "checkpoint.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["data"] == b["data"]
    for sa, sb in zip(a["optimizers"], b["optimizers"]):
        for idx, state in sa["state"].items():
            for key, t in state.items():
                assert torch.equal(t, sb["state"][idx][key]), (idx, key)


@pytest.mark.slow
def test_losses_are_read_on_the_host_every_log_every_steps(tmp_path, smoke_data, capsys, monkeypatch):
    # The step never waits for its loss: the losses stay on the device and are reduced and read
    # together at log steps (and before validation and checkpoints), and every step is still logged.
    reads = []
    real = train_gpt.all_reduce_mean
    monkeypatch.setattr(train_gpt, "all_reduce_mean", lambda t: reads.append(t.numel()) or real(t))
    code, out, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path / "a"), "--steps", "7",
                          "--log_every", "3", "--val_every", "100", "--val_at_start=false")
    assert code == 0, err
    assert reads == [3, 3, 1]  # steps 1-3, 4-6 and 7 (the last)
    assert [e["step"] for e in read_log(tmp_path / "a")] == list(range(1, 8))
    assert re.findall(r"^step:(\d+)/7", out, re.M) == ["3", "6", "7"]
    # A non-finite loss found at a later read still names its own step and the last good checkpoint,
    # and no checkpoint is written from the steps after it.
    code, out, _ = run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path / "b"), "--steps", "8",
                        "--log_every", "4", "--checkpoint_every", "2", "--inject_nan_step", "5")
    assert code == 3
    assert "step 5: train loss is nan (not finite); stopping" in out
    # checkpoint.pt (step 4) holds the weights that gave step 5's NaN: the good one is the one before it
    assert f"last good checkpoint is {tmp_path / 'b' / 'checkpoint.prev.pt'} (step 2;" in out
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 4
    log = read_log(tmp_path / "b")
    assert [e["step"] for e in log] == [0, 1, 2, 3, 4, 5] and log[-1]["error"] == "non-finite train loss"


def _copy_data(src, dest):
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.mark.slow
def test_resume_on_other_data_is_refused_unless_allowed(tmp_path, smoke_data, capsys):
    d = _copy_data(smoke_data, tmp_path / "d")
    assert run_smoke(capsys, "--data", str(d), "--out", str(tmp_path / "o"), "--steps", "2", "--stop_after", "1")[0] == 0
    ckpt = tmp_path / "o" / "checkpoint.pt"
    data.write_shard(d / "synthetic_train_000002.bin", np.arange(1000))  # more data appeared
    code, _, err = run_smoke(capsys, "--resume", str(ckpt))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the data differ from the checkpoint's (shards: synthetic_train_000002.bin is new)" in err
    assert "--allow_data_change" in err
    code, out, err = run_smoke(capsys, "--resume", str(ckpt), "--allow_data_change")
    assert code == 0, err
    assert "warning: resuming on other data than the checkpoint's" in out and "resumed at step 1" in out
    # The new checkpoint records the new data, and the permission was for that resume only.
    assert len(torch.load(ckpt, weights_only=True)["data"]["identity"]["shards"]) == 2
    data.write_shard(d / "synthetic_train_000003.bin", np.arange(1000))
    code, _, err = run_smoke(capsys, "--resume", str(ckpt))
    assert code == 2 and "synthetic_train_000003.bin is new" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("file_index, words", [(99, "file_index=99 is outside the 1 shard(s)"),
                                               (-1, "file_index=-1 is outside the 1 shard(s)")])
def test_resume_with_a_bad_data_position_is_a_clear_error(tmp_path, smoke_data, capsys, file_index, words):
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path), "--steps", "1")[0] == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["data"]["file_index"] = file_index
    torch.save(ckpt, tmp_path / "bad.pt")
    code, _, err = run_smoke(capsys, "--resume", str(tmp_path / "bad.pt"), "--steps", "2")
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_resume_rejects_a_changed_model(tmp_path, smoke_data, capsys):
    assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path), "--steps", "1")[0] == 0
    code, _, err = run_smoke(capsys, "--resume", str(tmp_path / "checkpoint.pt"), "--model_dim=64")
    assert code == 2 and "--model_dim=64 differs from the checkpoint's 32" in err
    code, _, err = run_smoke(capsys, "--resume", str(tmp_path / "missing.pt"))
    assert code == 2 and "missing.pt: no such file" in err


def test_missing_data_dir_prints_the_download_command(tmp_path, capsys):
    missing = tmp_path / "fineweb"
    code, _, err = run_smoke(capsys, "--synthetic=false", "--data", str(missing), "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"data dir {missing}: directory does not exist" in err
    assert f"python -m speedrun.data download --shards 8 --dir {missing}" in err


def test_val_tokens_beyond_the_validation_shards_are_refused(tmp_path, smoke_data, capsys):
    code, _, err = run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path), "--val_tokens", "4096")
    assert code == 2 and "--val_tokens=4096: no validation shard" in err and "has 4096" in err


def test_corrupt_shard_is_named(tmp_path, smoke_data, capsys):
    d = tmp_path / "d"
    d.mkdir()
    for f in smoke_data.glob("*.bin"):
        (d / f.name).write_bytes(f.read_bytes())
    shard = d / "synthetic_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    code, _, err = run_smoke(capsys, "--synthetic=false", "--data", str(d), "--out", str(tmp_path / "o"))
    assert code == 2 and str(shard) in err and "truncated or corrupt" in err


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, smoke_data, capsys):
    code, out, _ = run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path), "--steps", "6",
                        "--checkpoint_every", "2", "--inject_nan_step", "5")
    assert code == 3
    assert "step 5: train loss is nan (not finite); stopping" in out
    # checkpoint.pt (step 4) holds the weights whose loss was NaN: the good one is the step before it
    assert f"last good checkpoint is {tmp_path / 'checkpoint.prev.pt'} (step 2;" in out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert read_log(tmp_path)[-1] == {"step": 5, "train_loss": None, "error": "non-finite train loss"}


def _torchrun(nproc, out, smoke_data, *extra, timeout=300):
    env = {**os.environ, "NPROC": str(nproc), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", "run.sh", "--preset", "smoke", "--data", str(smoke_data), "--out", str(out),
                           *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_with_one_and_two_processes(tmp_path, smoke_data):
    # 1 process accumulates two 128-token passes; 2 processes take one each and average the
    # gradients with gloo. Same tokens per step, so the same losses up to float rounding.
    # Validation is 3 sequences: on 2 processes the second round has one (rank 1 idles), and the
    # loss is still the mean over the same 384 tokens.
    one = _torchrun(1, tmp_path / "one", smoke_data, "--val_tokens=384")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, tmp_path / "two", smoke_data, "--val_tokens=384")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x 1 micro-step(s)" in two.stdout and "1 process(es) x 2 micro-step(s)" in one.stdout
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [e["step"] for e in a] == [e["step"] for e in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-4), (key, x, y)
    assert a[-1]["val_loss"] < a[0]["val_loss"] - 1.0


@pytest.mark.slow
def test_compiled_trainer_with_warm_up(tmp_path, smoke_data, capsys):
    # The trainer's compile path (what CUDA runs with inductor), through aot_eager on a CPU: the
    # gradient hooks still feed the buckets, warm-up compiles, and the losses are eager's.
    common = ["--data", str(smoke_data), "--steps", "3", "--val_every", "3"]
    assert run_smoke(capsys, *common, "--out", str(tmp_path / "eager"))[0] == 0
    torch._dynamo.reset()
    code, out, err = run_smoke(capsys, *common, "--out", str(tmp_path / "compiled"), "--compile=aot_eager",
                          "--warmup_steps=1")
    assert code == 0, err
    assert "compile aot_eager, warm-up 1 step(s)" in out
    for a, b in zip(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)


@pytest.mark.slow
def test_plot_draws_runs_and_a_record_style_log(tmp_path, smoke_data, capsys):
    for name in ("a", "b"):
        assert run_smoke(capsys, "--data", str(smoke_data), "--out", str(tmp_path / name), "--steps", "3",
                    "--val_every", "1", "--seed", str(ord(name)))[0] == 0
    record_log = tmp_path / "record.txt"
    record_log.write_text("code...\nstep:0/3 val_loss:10.8258 train_time:0ms step_avg:0.02ms\n"
                          "step:1/3 train_time:900ms step_avg:900.00ms\n"
                          "step:3/3 val_loss:6.0000 train_time:2700ms step_avg:900.00ms\n")
    assert plot.main([str(tmp_path / "a")]) == 0
    png = (tmp_path / "a" / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), str(record_log), "--out",
                      str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    rec = plot.read_run(record_log)
    assert rec["val"] == [(0, 0.0, 10.8258), (3, 2.7, 6.0)] and not rec["train"]
    run = plot.read_run(tmp_path / "a")
    assert [s for s, _, _ in run["val"]] == [0, 1, 2, 3] and len(run["train"]) == len(run["rate"]) == 3
    capsys.readouterr()
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert "missing: no such run directory" in capsys.readouterr().err


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n')
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed (pip install -e '.[bench]'" in err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPEEDRUN_CPU_DEMO") == "0",
                    reason="SPEEDRUN_CPU_DEMO=0: skips the README's main command (about 2 minutes of both cores)")
def test_cpu_demo_reaches_the_source_entropy(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", "run.sh", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
                          "--synthetic=true"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "d" / "synthetic_source.json").read_text())
    final = read_log(tmp_path / "o")[-1]
    assert final["step"] == 150 and final["val_loss"] - info["entropy_nats_per_token"] < 0.3
    assert "source entropy" in res.stdout
    # It says where its log and its picture are, and the picture is there (if run.sh's Python has
    # matplotlib; without it, one line says so and the run still succeeds).
    out = tmp_path / "o"
    python = os.environ.get("PYTHON", "python3")
    if subprocess.run([python, "-c", "import matplotlib"], capture_output=True).returncode == 0:
        assert f"log {out / 'log.jsonl'}, plot {out / 'plot.png'}" in res.stdout
        assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert f"log {out / 'log.jsonl'} (no plot: matplotlib is not installed (pip install -e '.[bench]'" \
            in res.stdout
