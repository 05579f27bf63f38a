"""speedrun: attention masks (dense vs FlexAttention), schedules, config, model wiring, and the trainer
(smoke preset: 1 and 2 processes, exact resume, bad inputs, non-finite loss)."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from speedrun import data
from speedrun.attention import block_mask_to_dense, dense_mask, flex_block_mask
from speedrun.config import build_config, parse_overrides
from speedrun.model import GPT
from speedrun.train_gpt import lr_multiplier, main, muon_momentum, window_blocks

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


# ---------------------------------------------------------------------------
# Trainer runs (smoke preset)
# ---------------------------------------------------------------------------

def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("smoke_data")
    cfg = build_config("smoke", {})
    from speedrun.train_gpt import synthetic_spec
    data.ensure_synthetic(d, synthetic_spec(cfg), log=lambda m: None)
    return d


def _run(capsys, *args):
    code = main(["--preset", "smoke", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_smoke_run_log_and_checkpoint(tmp_path, smoke_data, capsys):
    code, out, err = _run(capsys, "--data", str(smoke_data), "--out", str(tmp_path))
    assert code == 0, err
    log = _log(tmp_path)
    assert [e["step"] for e in log] == [0, 1, 2, 3, 4]
    for e in log[1:]:
        assert {"step", "train_loss", "lr", "step_ms", "tokens", "tokens_per_s"} <= set(e)
        assert e["tokens"] == 256 * e["step"] and math.isfinite(e["train_loss"])
    assert [e["step"] for e in log if "val_loss" in e] == [0, 2, 4]
    assert log[1]["train_loss"] == pytest.approx(math.log(50304), rel=1e-6)  # zero-init head
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 1.0  # it learns
    assert "step 4/4" in out and "source entropy" in out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["data"]["pos"] > 0 and ckpt["config"]["preset"] == "smoke"


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, smoke_data, capsys):
    common = ["--data", str(smoke_data), "--steps", "6", "--val_every", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(capsys, *common, "--out", str(full))[0] == 0
    code, out, _ = _run(capsys, *common, "--out", str(part), "--stop_after", "3")
    assert code == 0 and "--resume" in out
    assert [e["step"] for e in _log(part)] == [0, 1, 2, 3]
    code, out, err = _run(capsys, "--resume", str(part / "checkpoint.pt"))
    assert code == 0, err
    assert "resumed at step 3" in out
    want, got = _log(full), _log(part)
    assert [e["step"] for e in got] == [0, 1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got):
        assert a.get("train_loss") == b.get("train_loss") and a.get("val_loss") == b.get("val_loss"), (a, b)
    a, b = torch.load(full / "checkpoint.pt", weights_only=True), torch.load(part / "checkpoint.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.slow
def test_resume_rejects_a_changed_model(tmp_path, smoke_data, capsys):
    assert _run(capsys, "--data", str(smoke_data), "--out", str(tmp_path), "--steps", "1")[0] == 0
    code, _, err = _run(capsys, "--resume", str(tmp_path / "checkpoint.pt"), "--model_dim=64")
    assert code == 2 and "--model_dim=64 differs from the checkpoint's 32" in err
    code, _, err = _run(capsys, "--resume", str(tmp_path / "missing.pt"))
    assert code == 2 and "missing.pt: no such file" in err


def test_missing_data_dir_prints_the_download_command(tmp_path, capsys):
    missing = tmp_path / "fineweb"
    code, _, err = _run(capsys, "--synthetic=false", "--data", str(missing), "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"data dir {missing}: directory does not exist" in err
    assert f"python -m speedrun.data download --shards 8 --dir {missing}" in err


def test_corrupt_shard_is_named(tmp_path, smoke_data, capsys):
    d = tmp_path / "d"
    d.mkdir()
    for f in smoke_data.glob("*.bin"):
        (d / f.name).write_bytes(f.read_bytes())
    shard = d / "synthetic_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    code, _, err = _run(capsys, "--synthetic=false", "--data", str(d), "--out", str(tmp_path / "o"))
    assert code == 2 and str(shard) in err and "truncated or corrupt" in err


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, smoke_data, capsys):
    code, out, _ = _run(capsys, "--data", str(smoke_data), "--out", str(tmp_path), "--steps", "6",
                        "--checkpoint_every", "2", "--inject_nan_step", "5")
    assert code == 3
    assert "step 5: train loss is nan (not finite); stopping" in out
    # checkpoint.pt (step 4) holds the weights whose loss was NaN: the good one is the step before it
    assert f"last good checkpoint is {tmp_path / 'checkpoint.prev.pt'} (step 2;" in out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert _log(tmp_path)[-1] == {"step": 5, "train_loss": None, "error": "non-finite train loss"}


def _torchrun(nproc, out, smoke_data, timeout=300):
    env = {**os.environ, "NPROC": str(nproc), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", "run.sh", "--preset", "smoke", "--data", str(smoke_data), "--out", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_with_one_and_two_processes(tmp_path, smoke_data):
    # 1 process accumulates two 128-token passes; 2 processes take one each and average the
    # gradients with gloo. Same tokens per step, so the same losses up to float rounding.
    one = _torchrun(1, tmp_path / "one", smoke_data)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, tmp_path / "two", smoke_data)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x 1 micro-step(s)" in two.stdout and "1 process(es) x 2 micro-step(s)" in one.stdout
    a, b = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [e["step"] for e in a] == [e["step"] for e in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-4), (key, x, y)
    assert a[-1]["val_loss"] < a[0]["val_loss"] - 1.0


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
    final = _log(tmp_path / "o")[-1]
    assert final["step"] == 150 and final["val_loss"] - info["entropy_nats_per_token"] < 0.3
    assert "source entropy" in res.stdout
