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

def _stream_files(tmp_path, sizes, split="train"):
    """Shards whose tokens are their global positions (mod 60000), so a token says where it came from."""
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(_shard(tmp_path / f"s_{split}_{i + 1:06d}.bin", np.arange(start, start + n) % 60000))
        start += n
    return files


def _record_windows(sizes, step_tokens):
    """The record's loader rule, written out independently: every step's window as a list of global positions.

    Within a shard the windows start at 0, B, 2B, ... and a window is used only if the shard
    still has a token after its last target, i.e. start + B + 1 < len; then the next shard;
    after the last shard, the first again (an epoch).
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    while True:
        for k, n in enumerate(sizes):
            start = 0
            while start + step_tokens + 1 < n:
                yield list(range(offsets[k] + start, offsets[k] + start + step_tokens + 1))
                start += step_tokens


# B = 48: 145 = 3B+1 (the third window would end exactly at the end: skipped), 49 = B+1 (no window at
# all), 50 = B+2 (one), 211 (four, odd tail), 97 = 2B+1 (the second window is an exact fit: one).
SIZES, B = [145, 49, 50, 211, 97], 48
LAYOUTS = [(1, 1), (1, 4), (2, 1), (2, 3), (4, 1), (4, 2), (8, 1), (8, 2), (2, 8)]  # (world_size, micro-steps)


def _step_tokens(streams, world_size, accum):
    """All ranks' sequences of one step, put back in sequence order: (inputs, targets) as flat lists."""
    per_rank = [s.next_step() for s in streams]
    assert all(len(batches) == accum for batches in per_rank)
    seqs = {}
    for r, batches in enumerate(per_rank):
        for m, (inputs, targets) in enumerate(batches):
            assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
            seqs[m * world_size + r] = (inputs.tolist(), targets.tolist())  # micro-step m on rank r
    assert sorted(seqs) == list(range(world_size * accum))
    return ([t for i in sorted(seqs) for t in seqs[i][0]], [t for i in sorted(seqs) for t in seqs[i][1]])


@pytest.mark.parametrize("world_size, accum", LAYOUTS)
def test_stream_steps_follow_the_record_rule_at_every_world_size(tmp_path, world_size, accum):
    files = _stream_files(tmp_path, SIZES)
    seq_len = B // (world_size * accum)
    streams = [data.TokenStream(files, B, seq_len, r, world_size) for r in range(world_size)]
    oracle = _record_windows(SIZES, B)
    for k in range(20):  # 8 windows per epoch: two wraps
        window = next(oracle)
        inputs, targets = _step_tokens(streams, world_size, accum)
        assert inputs == window[:-1] and targets == window[1:], f"step {k}"
    assert streams[0].epoch == 2 and all(s.state_dict() == streams[0].state_dict() for s in streams)


def test_stream_position_is_world_size_independent(tmp_path):
    # A position saved by one process continues on eight (and back): the state is the step's, not a rank's.
    files = _stream_files(tmp_path, SIZES)
    one = data.TokenStream(files, B, B, 0, 1)
    for _ in range(6):
        one.next_step()
    state = one.state_dict()
    oracle = _record_windows(SIZES, B)
    for _ in range(6):
        next(oracle)
    eight = [data.TokenStream(files, B, 3, r, 8) for r in range(8)]
    for s in eight:
        s.load_state_dict(state)
    for _ in range(5):
        window = next(oracle)
        assert _step_tokens(eight, 8, 2) == (window[:-1], window[1:])
    back = data.TokenStream(files, B, 12, 0, 1)
    back.load_state_dict(eight[0].state_dict())
    window = next(oracle)
    assert _step_tokens([back], 1, 4) == (window[:-1], window[1:])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8, 16])
def test_validation_covers_exactly_val_tokens_at_every_world_size(tmp_path, world_size):
    # 5 sequences of 8 tokens: on 2, 3, 4, 8 or 16 ranks the last round is partial (some ranks idle).
    # The first shard is an exact fit (41 = val_tokens + 1): the rule skips it, as in training.
    V, S = 40, 8
    files = _stream_files(tmp_path, [41, 100], split="val")
    seen = {}
    for r in range(world_size):
        s = data.TokenStream(files, V, S, r, world_size, wrap=False)
        for _ in range(2):  # reset() gives the same validation set every time
            s.reset()
            windows = s.next_windows()
            assert len(windows) == len(range(r, 5, world_size))
        for i, w in zip(range(r, 5, world_size), windows):
            assert i not in seen
            seen[i] = w.to(torch.int64).tolist()
    assert sorted(seen) == list(range(5))
    assert [t for i in range(5) for t in seen[i][:-1]] == list(range(41, 41 + V))
    assert all(seen[i][-1] == seen[i + 1][0] for i in range(4))  # each target run continues into the next


def test_stream_to_device_keeps_ids_above_32767(tmp_path):
    files = [_shard(tmp_path / "h_train_000001.bin", [50256, 32768, 65535, 1, 2, 3, 4, 5, 6, 7])]
    (inputs, targets), = data.TokenStream(files, 4, 4).next_step()
    assert inputs.tolist() == [50256, 32768, 65535, 1] and targets.tolist() == [32768, 65535, 1, 2]


def test_stream_state_restores_position(tmp_path):
    files = _stream_files(tmp_path, [40, 40, 40])
    a = data.TokenStream(files, 10, 5, 0, 1)
    for _ in range(5):
        a.next_step()
    state = a.state_dict()
    expected = [a.next_step()[1][0].tolist() for _ in range(7)]
    b = data.TokenStream(files, 10, 5, 0, 1)
    b.load_state_dict(state)
    assert [b.next_step()[1][0].tolist() for _ in range(7)] == expected
    assert b.changes == []


def test_stream_without_wrap_runs_out_and_too_small_shards(tmp_path):
    files = _stream_files(tmp_path, [25])
    s = data.TokenStream(files, 10, 10, 0, 1, wrap=False)
    s.next_step(), s.next_step()  # windows at 0 and 10; 20 + 11 > 25
    with pytest.raises(data.ShardError, match="ran out of tokens"):
        s.next_step()
    with pytest.raises(data.ShardError, match="a shard of more than 25"):
        data.TokenStream(files, 24, 24, 0, 1)  # 24 + 1 == 25: an exact fit is not used
    with pytest.raises(ValueError, match="not a multiple of seq_len=3"):
        data.TokenStream(files, 10, 3, 0, 1)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size=2"):
        data.TokenStream(files, 10, 5, 2, 2)


# ---------------------------------------------------------------------------
# The data's identity and the saved position (issue 15, item 5)
# ---------------------------------------------------------------------------

SPEC = {"seed": 1, "vocab": 12}


def _saved(tmp_path, sizes=(40, 40, 40), steps=3):
    files = _stream_files(tmp_path, sizes)
    s = data.TokenStream(files, 10, 5, identity={"synthetic": SPEC})
    for _ in range(steps):
        s.next_step()
    return files, s.state_dict()


def test_state_holds_the_data_identity(tmp_path):
    files, state = _saved(tmp_path)
    assert state["identity"] == {"shards": [[f.name, 40] for f in files], "synthetic": SPEC}
    assert state["step_tokens"] == 10 and (state["file_index"], state["pos"], state["epoch"]) == (0, 30, 0)


@pytest.mark.parametrize("change, words", [
    ("resized", "s_train_000002.bin has 41 tokens, 40 in the checkpoint"),
    ("added", "s_train_000004.bin is new"),
    ("removed", "s_train_000003.bin is gone"),
    ("spec", "synthetic: {'seed': 2, 'vocab': 12} here"),
])
def test_resume_on_other_data_is_refused_unless_allowed(tmp_path, change, words):
    files, state = _saved(tmp_path)
    spec = SPEC
    if change == "resized":
        _shard(files[1], np.arange(41))
    elif change == "added":
        files.append(_shard(tmp_path / "s_train_000004.bin", np.arange(40)))
    elif change == "removed":
        files = files[:2]
    else:
        spec = {"seed": 2, "vocab": 12}
    fresh = data.TokenStream(files, 10, 5, identity={"synthetic": spec})
    with pytest.raises(data.DataStateError) as err:
        fresh.load_state_dict(state)
    assert words in str(err.value) and "--allow_data_change" in str(err.value)
    assert fresh.state_dict()["pos"] == 0  # nothing was taken from the refused state
    allowed = data.TokenStream(files, 10, 5, identity={"synthetic": spec}, allow_data_change=True)
    allowed.load_state_dict(state)
    assert any(words in c for c in allowed.changes) and allowed.state_dict()["pos"] == 30


def test_old_state_without_identity_needs_permission(tmp_path):
    files, state = _saved(tmp_path)
    old = {k: state[k] for k in ("file_index", "pos", "epoch")}
    with pytest.raises(data.DataStateError, match="does not record which data"):
        data.TokenStream(files, 10, 5, identity={"synthetic": SPEC}).load_state_dict(old)
    s = data.TokenStream(files, 10, 5, identity={"synthetic": SPEC}, allow_data_change=True)
    s.load_state_dict(old)
    assert s.state_dict()["pos"] == 30


@pytest.mark.parametrize("key, value, words", [
    ("file_index", 99, "file_index=99 is outside the 3 shard"),
    ("file_index", -1, "file_index=-1 is outside"),
    ("file_index", "0", "'file_index' must be an int, found '0'"),
    ("file_index", True, "'file_index' must be an int, found True"),
    ("pos", 40, "pos=40 is not a step start in s_train_000001.bin (40 tokens"),
    ("pos", -10, "pos=-10 is not a step start"),
    ("pos", 15, "pos=15 is not a step start"),
    ("pos", 2.5, "'pos' must be an int, found 2.5"),
    ("pos", None, "'pos' must be an int, found None"),
    ("epoch", -1, "epoch=-1 is negative"),
    ("step_tokens", 20, "saved for steps of 20 tokens, this stream takes 10"),
    ("identity", [1], "'identity' must be a dict, found list"),
])
def test_bad_saved_position_is_a_clear_error(tmp_path, key, value, words):
    files, state = _saved(tmp_path)
    state[key] = value
    s = data.TokenStream(files, 10, 5, identity={"synthetic": SPEC}, allow_data_change=True)
    with pytest.raises(data.DataStateError) as err:
        s.load_state_dict(state)
    assert words in str(err.value)
    with pytest.raises(data.DataStateError, match="expected a dict, found list"):
        s.load_state_dict([1, 2])


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
