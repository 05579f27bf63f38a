"""speedrun.data: shard format and reader errors, token streams, the synthetic corpus, the downloader (offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speedrun import data

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shard(path, tokens):
    data.write_shard(path, np.asarray(tokens, dtype=np.int64))
    return path


# ---------------------------------------------------------------------------
# Shard format
# ---------------------------------------------------------------------------

def test_round_trip_and_header_layout(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=1001)
    path = _shard(tmp_path / "x_train_000001.bin", tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    assert header[:3].tolist() == [20240520, 1, 1001] and not header[3:].any()
    assert len(raw) == 1024 + 2 * 1001
    assert data.read_header(path) == 1001
    assert torch.equal(data.read_shard(path).to(torch.int64), torch.from_numpy(tokens))


def _corrupt(path, kind):
    raw = bytearray(path.read_bytes())
    if kind == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif kind == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif kind == "truncated":
        raw = raw[:-10]
    elif kind == "too_long":
        raw += b"\0\0"
    elif kind == "tiny":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind, words", [("magic", "bad magic number 12345"), ("version", "version 7"),
                                         ("truncated", "header says 50 tokens"), ("too_long", "header says 50"),
                                         ("tiny", "shorter than the 1024-byte")])
def test_corrupt_shard_error_names_the_file(tmp_path, kind, words):
    path = _shard(tmp_path / "bad_val_000000.bin", range(50))
    _corrupt(path, kind)
    for reader in (data.read_header, data.read_shard):
        with pytest.raises(data.ShardError) as err:
            reader(path)
        assert str(path) in str(err.value) and words in str(err.value)


def test_missing_shard_and_out_of_vocab_ids(tmp_path):
    with pytest.raises(data.ShardError, match="nope.bin"):
        data.read_header(tmp_path / "nope.bin")
    path = _shard(tmp_path / "v_train_000001.bin", [1, 2, 60000, 3])
    with pytest.raises(data.ShardError, match=r"v_train_000001.bin: token id 60000 is outside .*50257"):
        data.read_shard(path, vocab_size=50257)
    with pytest.raises(ValueError, match="uint16"):
        data.write_shard(tmp_path / "w.bin", [70000])


# ---------------------------------------------------------------------------
# Token streams
# ---------------------------------------------------------------------------

def _stream_files(tmp_path, sizes):
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(_shard(tmp_path / f"s_train_{i + 1:06d}.bin", np.arange(start, start + n) % 60000))
        start += n
    return files


def test_stream_windows_ranks_and_shard_boundaries(tmp_path):
    # Two shards of 37 and 29 tokens, windows of 12 (+1 target): shard 1 gives windows at 0, 12, 24
    # (24+13 = 37 fits exactly), shard 2 at 37+0, 37+12 (its last 4 tokens are skipped), then the
    # stream wraps to shard 1 as epoch 1.
    files = _stream_files(tmp_path, [37, 29])
    expected_starts = [0, 12, 24, 37, 49, 0, 12]
    for world_size in (1, 2, 3):
        streams = [data.TokenStream(files, 12, r, world_size) for r in range(world_size)]
        local = 12 // world_size
        for k, start in enumerate(expected_starts):
            for r, s in enumerate(streams):
                inputs, targets = s.next_batch()
                first = start + r * local
                assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
                assert inputs.tolist() == list(range(first, first + local))
                assert targets.tolist() == list(range(first + 1, first + local + 1))
        assert streams[0].epoch == 1


def test_stream_state_restores_position(tmp_path):
    files = _stream_files(tmp_path, [40, 40, 40])
    a = data.TokenStream(files, 10, 0, 1)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0].tolist() for _ in range(7)]
    b = data.TokenStream(files, 10, 0, 1)
    b.load_state_dict(state)
    assert [b.next_batch()[0].tolist() for _ in range(7)] == expected


def test_stream_without_wrap_runs_out_and_too_small_shards(tmp_path):
    files = _stream_files(tmp_path, [25])
    s = data.TokenStream(files, 10, 0, 1, wrap=False)
    s.next_batch(), s.next_batch()
    with pytest.raises(data.ShardError, match="ran out of tokens"):
        s.next_batch()
    with pytest.raises(data.ShardError, match="shorter than one window of 26"):
        data.TokenStream(files, 25, 0, 1)
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        data.TokenStream(files, 10, 0, 3)


# ---------------------------------------------------------------------------
# Synthetic corpus
# ---------------------------------------------------------------------------

SMALL = data.SyntheticSpec(seed=5, vocab=12, order=2, branching=2, mean_doc_len=20.0, train_tokens=40_000,
                           val_tokens=20_000)


def _context_chain(src):
    """Transition matrix over contexts (prev2, prev1), built with plain loops."""
    n = src.n
    T = np.zeros((n * n, n * n))
    for prev2 in range(n):
        for prev1 in range(n):
            c = prev2 * n + prev1 if src.spec.order == 2 else prev1
            for nxt in range(n):
                T[prev2 * n + prev1, prev1 * n + nxt] += src.Q[c, nxt]
    return T


def _entropy_rate_by_power_iteration(src):
    T = _context_chain(src)
    pi = np.full(T.shape[0], 1.0 / T.shape[0])
    for _ in range(3000):
        pi = pi @ T
    n = src.n
    Q2 = src.Q if src.spec.order == 2 else np.tile(src.Q, (n, 1))  # row prev2*n + prev1
    logs = np.log(np.where(Q2 > 0, Q2, 1.0))
    return float(-(pi[:, None] * Q2 * logs).sum())


def test_synthetic_chain_structure_and_entropy():
    src = data.SyntheticSource(SMALL)
    n, Q = 13, src.Q
    assert Q.shape == (n * n, n) and np.allclose(Q.sum(1), 1.0)
    assert src.token_ids[0] == data.EOT and len(set(src.token_ids.tolist())) == n
    after_eot = np.arange(n * n) % n == 0
    assert (Q[after_eot] == Q[0]).all()                                     # a document start forgets the past
    assert Q[0, 0] == 0 and (Q[0, 1:] > 0).all()                            # documents are never empty
    assert ((Q[~after_eot, 1:] > 0).sum(1) == SMALL.branching).all()        # sparse successors per context
    assert np.allclose(Q[~after_eot, 0], 1 / (SMALL.mean_doc_len - 1))      # end-of-document hazard
    # Successor sets depend on the token two back: order 2 is real.
    assert len({tuple(np.flatnonzero(Q[a * n + 1])) for a in range(n)}) > 1
    assert src.entropy_rate() == pytest.approx(_entropy_rate_by_power_iteration(src), rel=1e-9)
    order1 = data.SyntheticSource(data.SyntheticSpec(**{**SMALL.__dict__, "order": 1}))
    assert order1.Q.shape == (n, n)
    assert order1.entropy_rate() == pytest.approx(_entropy_rate_by_power_iteration(order1), rel=1e-9)
    assert order1.bigram_floor() == pytest.approx(order1.entropy_rate(), rel=1e-9)


def _conditional_entropy(states, n):
    joint = np.zeros((n, n))
    np.add.at(joint, (states[:-1], states[1:]), 1.0)
    cond = joint / joint.sum(1, keepdims=True).clip(1)
    logs = np.log(np.where(cond > 0, cond, 1.0))
    return float(-(joint * logs).sum() / joint.sum())


def test_synthetic_samples_match_the_chain():
    src = data.SyntheticSource(SMALL)
    states = src.sample(200_000, stream=0)
    assert states[0] == 0 and len(states) == 200_000
    # Every transition is one the chain allows, and the empirical loss of the true model
    # converges to the entropy rate (sd of the mean ~ 1/sqrt(n) ~ 0.003 here).
    ctx = src.contexts(states)
    assert (src.Q[ctx[1:], states[1:]] > 0).all()
    assert src.oracle_loss(states) == pytest.approx(src.entropy_rate(), abs=0.02)
    # The best model that sees only the previous token does much worse, as computed.
    assert _conditional_entropy(states, src.n) == pytest.approx(src.bigram_floor(), abs=0.02)
    assert src.bigram_floor() > src.entropy_rate() + 0.3
    # Document lengths (EOT included) have the configured mean: no length bias from the sampler.
    starts = np.flatnonzero(states == 0)
    assert np.diff(starts).mean() == pytest.approx(SMALL.mean_doc_len, rel=0.05)
    # Deterministic per (seed, stream); streams differ.
    assert np.array_equal(src.sample(5000, stream=0), states[:5000])
    assert not np.array_equal(src.sample(5000, stream=1), states[:5000])


def test_ensure_synthetic_writes_once_and_regenerates_on_change(tmp_path):
    info = data.ensure_synthetic(tmp_path, SMALL, log=lambda m: None)
    train, val = data.list_shards(tmp_path, "train"), data.list_shards(tmp_path, "val")
    assert [p.name for p in train] == ["synthetic_train_000001.bin"]
    assert [p.name for p in val] == ["synthetic_val_000000.bin"]
    assert data.read_header(train[0]) == SMALL.train_tokens and data.read_header(val[0]) == SMALL.val_tokens
    on_disk = json.loads((tmp_path / "synthetic_source.json").read_text())
    assert on_disk == info and info["entropy_nats_per_token"] == pytest.approx(data.SyntheticSource(SMALL).entropy_rate())
    assert abs(info["val_oracle_loss"] - info["entropy_nats_per_token"]) < 0.05
    tokens = data.read_shard(val[0]).to(torch.int64)
    assert tokens[0] == data.EOT and set(tokens.tolist()) <= set(info["token_ids"])
    mtime = train[0].stat().st_mtime_ns
    messages = []
    assert data.ensure_synthetic(tmp_path, SMALL, log=messages.append) == info and not messages
    assert train[0].stat().st_mtime_ns == mtime
    other = data.SyntheticSpec(**{**info["spec"], "seed": 6})
    assert data.ensure_synthetic(tmp_path, other, log=messages.append)["spec"]["seed"] == 6 and messages


# ---------------------------------------------------------------------------
# Downloader (never the network: HF_HUB_OFFLINE=1 and a hand-made cache)
# ---------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fill_cache(cache: Path, names):
    repo = cache / "datasets--kjj0--fineweb10B-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for i, name in enumerate(names):
        _shard(snap / name, np.arange(100 + i))


def _download(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "speedrun.data", "download", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_download_from_offline_cache_and_skip_existing(tmp_path):
    _fill_cache(tmp_path / "cache", data.fineweb_names(2))
    dest = tmp_path / "shards"
    dest.mkdir()
    # Already present and valid: must be kept as is (it is not even in the cache).
    _shard(dest / "fineweb_train_000003.bin", np.arange(7))
    res = _download(tmp_path, "--shards", "3", "--dir", str(dest))
    assert res.returncode == 0, res.stderr
    assert "fineweb_train_000003.bin: present, skipped" in res.stdout + res.stderr
    for i, name in enumerate(data.fineweb_names(2)):
        assert data.read_header(dest / name) == 100 + i
    assert data.read_header(dest / "fineweb_train_000003.bin") == 7


def test_download_offline_missing_file_is_a_clear_error(tmp_path):
    _fill_cache(tmp_path / "cache", data.fineweb_names(1))
    res = _download(tmp_path, "--shards", "2", "--dir", str(tmp_path / "shards"))
    assert res.returncode == 1
    assert "cannot fetch fineweb_train_000002.bin" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    assert "Traceback" not in res.stderr
    # The files before the missing one arrived.
    assert data.read_header(tmp_path / "shards" / "fineweb_train_000001.bin") == 101


def test_download_replaces_a_corrupt_local_file(tmp_path):
    _fill_cache(tmp_path / "cache", data.fineweb_names(0))
    dest = tmp_path / "shards"
    dest.mkdir()
    (dest / "fineweb_val_000000.bin").write_bytes(b"garbage")
    res = _download(tmp_path, "--shards", "0", "--dir", str(dest))
    assert res.returncode == 0, res.stderr
    assert "fetching it again" in res.stdout + res.stderr
    assert data.read_header(dest / "fineweb_val_000000.bin") == 100
