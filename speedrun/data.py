"""Token shards: the file format, a validating reader, the training/validation streams,
the FineWeb downloader and the embedded synthetic corpus.

Shard format (the speedrun's, from llm.c): a header of 256 int32 — magic 20240520,
version 1, token count — then the tokens as uint16. Every error names the file.

Command line:
    python -m speedrun.data download --shards 8 --dir data/fineweb10B
    python -m speedrun.data synthetic --dir data/synthetic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from speedrun.checkpoint import fsync_dir, write_durably, write_text_durably

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT = 50256  # GPT-2 <|endoftext|>: the first token of every document

HF_REPO = "kjj0/fineweb10B-gpt2"
DEFAULT_FINEWEB_DIR = "data/fineweb10B"


class ShardError(ValueError):
    """A shard file is missing, truncated or not in the shard format; the message names it."""


class DownloadError(RuntimeError):
    """A shard could not be fetched from the Hugging Face Hub; the message says what to do."""


# ---------------------------------------------------------------------------
# Shard files
# ---------------------------------------------------------------------------

def write_shard(path, tokens) -> None:
    """Write ``tokens`` (ints in [0, 65535]) as a shard; atomic, so a crash leaves no half file."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
        raise ValueError(f"tokens: values must fit uint16, found range [{arr.min()}, {arr.max()}]")
    if arr.size >= 2**31:
        raise ValueError(f"tokens: {arr.size} tokens do not fit the header's int32 count")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, arr.size)

    def save(f):
        f.write(header.tobytes())
        f.write(arr.astype(np.uint16).tobytes())

    # durable before it takes the name (a power cut leaves the old file or the new); the temp file is
    # per process, so two writers of one shard do not collide
    write_durably(path, save, tmp=path.with_name(f"{path.name}.{os.getpid()}.tmp"))


def read_header(path) -> int:
    """Validate a shard's header against its file size; returns the token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard: {e.strerror or e}") from e
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header "
                         "(truncated or not a token shard)")
    header = np.frombuffer(raw, dtype=np.int32)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {MAGIC}): not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ShardError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes "
                         "(truncated or corrupt; delete it and download again)")
    return count


def read_shard(path, vocab_size: int | None = None, pin_memory: bool = False) -> torch.Tensor:
    """All tokens of a shard as a uint16 tensor, after validating the header (and the ids, given vocab_size).

    ``pin_memory``: page-locked, so that copies of its slices to a GPU are asynchronous (a copy from
    pageable memory makes the host wait for the device).
    """
    path = Path(path)
    count = read_header(path)
    tokens = torch.empty(count, dtype=torch.uint16, pin_memory=pin_memory)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        got = f.readinto(tokens.numpy())
    if got != 2 * count:
        raise ShardError(f"{path}: read {got} bytes of tokens, expected {2 * count}")
    if vocab_size is not None and count:
        top = int(tokens.numpy().max())  # one pass per shard (torch has no uint16 max)
        if top >= vocab_size:
            raise ShardError(f"{path}: token id {top} is outside the model's vocabulary [0, {vocab_size})")
    return tokens


def list_shards(data_dir, split: str) -> list[Path]:
    """Sorted shard files of a split ("train" or "val"): ``*_{split}_*.bin`` in data_dir."""
    return sorted(Path(data_dir).glob(f"*_{split}_*.bin"))


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------

class DataStateError(ValueError):
    """A saved stream state does not fit the data here (other shards, another corpus, a bad position)."""


def shard_identity(files) -> list[list]:
    """[[file name, token count], ...]: what a checkpoint remembers of the shards it was trained on."""
    return [[Path(f).name, read_header(f)] for f in files]


def _shard_changes(key: str, saved: list, now: list) -> list[str]:
    saved_n, now_n = dict(map(tuple, saved)), dict(map(tuple, now))
    out = [f"{key}: {name} is gone" for name in saved_n if name not in now_n]
    out += [f"{key}: {name} is new" for name in now_n if name not in saved_n]
    out += [f"{key}: {name} has {now_n[name]} tokens, {saved_n[name]} in the checkpoint"
            for name in saved_n if name in now_n and saved_n[name] != now_n[name]]
    if not out and saved != now:
        out.append(f"{key}: the same files in another order")
    return out


def identity_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two data identities, one short phrase per difference."""
    out = []
    for key in sorted(set(saved) | set(now), key=lambda k: (k != "shards", k)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key.endswith("shards") and isinstance(a, list) and isinstance(b, list):
            out += _shard_changes(key, a, b)
        else:
            out.append(f"{key}: {b!r} here, {a!r} in the checkpoint")
    return out


class TokenStream:
    """A packed token stream taken one optimizer step at a time (the speedrun record's loader rule).

    Step k's tokens are one window of ``step_tokens`` (+1 for the shifted
    targets) of the current shard, starting at the position ``pos``; ``pos``
    then moves on by step_tokens. Before taking a window the stream moves to
    the next shard's start while ``pos + step_tokens + 1 >= len(shard)``: the
    tail of a shard that cannot hold a whole window is skipped, and so is a
    window that would end exactly at the shard's end. The window is cut into
    ``step_tokens // seq_len`` sequences of ``seq_len`` (+1) tokens; sequence i
    belongs to rank ``i % world_size``, so on rank r micro-step m takes sequence
    ``m * world_size + r``. A step's tokens therefore depend only on
    step_tokens, never on how ranks and micro-steps share them; with one
    micro-step per rank, rank r gets the r-th slice, as in the record. If the
    sequences do not divide evenly (validation on many ranks), the last ones
    leave some ranks without one.

    With ``wrap`` the stream restarts at the first shard after the last (an
    epoch); otherwise running out raises. The position (shard, pos, epoch) is
    the whole state; ``state_dict`` stores it with the data's identity (shard
    names and sizes, plus the caller's ``identity`` entries such as the
    synthetic spec), and ``load_state_dict`` refuses another corpus unless
    ``allow_data_change``; the differences it let through are in ``changes``.
    """

    def __init__(self, files, step_tokens: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None, wrap: bool = True, identity: dict | None = None,
                 allow_data_change: bool = False, pin_memory: bool = False):
        if not files:
            raise ShardError("no shard files given")
        for name, value in (("step_tokens", step_tokens), ("seq_len", seq_len), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if step_tokens % seq_len:
            raise ValueError(f"step_tokens: {step_tokens} is not a multiple of seq_len={seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank!r}")
        self.files = [Path(f) for f in files]
        self.step_tokens, self.seq_len = step_tokens, seq_len
        self.rank, self.world_size = rank, world_size
        self.sequences = range(rank, step_tokens // seq_len, world_size)  # this rank's slices of a step
        self.vocab_size, self.wrap, self.pin_memory = vocab_size, wrap, pin_memory
        self.allow_data_change, self.changes = allow_data_change, []
        self.file_index, self.pos, self.epoch = 0, 0, 0
        self._tokens, self._loaded = None, -1
        self.shards = shard_identity(self.files)
        self.identity = {"shards": self.shards, **(identity or {})}
        if not any(n > step_tokens + 1 for _, n in self.shards):
            raise ShardError(f"every shard in {self.files[0].parent} is too short for one step: a window of "
                             f"{step_tokens} (+1) tokens needs a shard of more than {step_tokens + 1} "
                             f"(e.g. {self.files[0]} has {self.shards[0][1]})")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"file_index": self.file_index, "pos": self.pos, "epoch": self.epoch,
                "step_tokens": self.step_tokens, "identity": self.identity}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position; DataStateError if it is malformed or (unless allowed) other data."""
        if not isinstance(state, dict):
            raise DataStateError(f"data position: expected a dict, found {type(state).__name__}")
        for key in ("file_index", "pos", "epoch"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataStateError(f"data position: {key!r} must be an int, found {value!r}")
        saved_step = state.get("step_tokens", self.step_tokens)
        if saved_step != self.step_tokens:
            raise DataStateError(f"data position: saved for steps of {saved_step!r} tokens, this stream takes "
                                 f"{self.step_tokens}")
        saved = state.get("identity")
        if saved is None:
            changes = ["the checkpoint does not record which data it was trained on (an older checkpoint)"]
        elif not isinstance(saved, dict):
            raise DataStateError(f"data position: 'identity' must be a dict, found {type(saved).__name__}")
        else:
            changes = identity_changes(saved, self.identity)
        if changes and not self.allow_data_change:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise DataStateError(f"the data differ from the checkpoint's ({shown}); resume on the same data, or "
                                 "pass --allow_data_change to continue on these")
        file_index, pos, epoch = state["file_index"], state["pos"], state["epoch"]
        if not 0 <= file_index < len(self.files):
            raise DataStateError(f"data position: file_index={file_index} is outside the {len(self.files)} "
                                 f"shard(s) in {self.files[0].parent}")
        n = self.shards[file_index][1]
        if not 0 <= pos < max(n, 1) or pos % self.step_tokens:
            raise DataStateError(f"data position: pos={pos} is not a step start in {self.files[file_index].name} "
                                 f"({n} tokens; expected a multiple of {self.step_tokens} below {n})")
        if epoch < 0:
            raise DataStateError(f"data position: epoch={epoch} is negative")
        self.file_index, self.pos, self.epoch, self.changes = file_index, pos, epoch, changes

    def reset(self) -> None:
        """Back to the first step (the loaded shard stays cached: validation reuses it every time)."""
        self.file_index, self.pos, self.epoch = 0, 0, 0

    # ------------------------------------------------------------------ tokens
    def _current(self) -> torch.Tensor:
        if self._loaded != self.file_index:
            self._tokens = None  # free the old shard before reading the next
            self._tokens = read_shard(self.files[self.file_index], self.vocab_size, self.pin_memory)
            self._loaded = self.file_index
        return self._tokens

    def _advance_file(self) -> None:
        self.file_index, self.pos = self.file_index + 1, 0
        if self.file_index == len(self.files):
            if not self.wrap:
                raise ShardError(f"ran out of tokens after {len(self.files)} shard(s) in {self.files[0].parent}")
            self.file_index, self.epoch = 0, self.epoch + 1

    def next_windows(self) -> list[torch.Tensor]:
        """The next step's sequences of this rank: uint16 views [seq_len + 1] into the shard (no copy)."""
        while self.pos + self.step_tokens + 1 >= self.shards[self.file_index][1]:
            self._advance_file()
        tokens = self._current()
        starts = [self.pos + i * self.seq_len for i in self.sequences]
        self.pos += self.step_tokens
        return [tokens[s:s + self.seq_len + 1] for s in starts]

    def next_step(self, device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> [(inputs int32 [seq_len], targets int64 [seq_len]), ...], one pair per micro-step of this rank."""
        return [to_device(w, device) for w in self.next_windows()]


def to_device(window: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint16 window [n + 1] -> (inputs int32 [n], targets int64 [n]) on ``device``.

    To a GPU the raw 16-bit tokens travel (asynchronously from a pinned shard) and widen there; int16
    is the carrier because every device kernel handles it, and ``& 0xFFFF`` undoes its sign extension.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return window[:-1].to(torch.int32), window[1:].to(torch.int64)
    wide = window.view(torch.int16).to(device, non_blocking=True).to(torch.int32) & 0xFFFF
    return wide[:-1], wide[1:].to(torch.int64)


def count_tokens(files) -> int:
    return sum(read_header(f) for f in files)


# ---------------------------------------------------------------------------
# Downloader
# ---------------------------------------------------------------------------

def fineweb_names(shards: int) -> list[str]:
    """The validation shard and the first ``shards`` training shards of the dataset."""
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, shards + 1)]


def download_command(data_dir, shards: int = 8) -> str:
    return f"python -m speedrun.data download --shards {shards} --dir {data_dir}"


def _hub_errors():
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    return LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError


def _place(src: Path, dest: Path) -> None:
    # A hard link shares the cache's blob (no second copy of ~200 MB); copy across filesystems.
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the cache's blob or the copy: on disk before it takes the shard's name
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def download(shards: int, data_dir, repo_id: str = HF_REPO, cache_dir=None, progress: bool = True) -> list[Path]:
    """Fetch the validation shard and ``shards`` training shards into ``data_dir``.

    Files already in data_dir with a valid header are skipped. Files come
    through the Hugging Face cache (so an offline machine with a filled cache
    works with HF_HUB_OFFLINE=1) and are then linked or copied into data_dir.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 0:
        raise ValueError(f"shards: expected an int >= 0, got {shards!r}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise DownloadError("huggingface_hub is not installed: pip install huggingface_hub") from e
    from tqdm import tqdm

    LocalEntryNotFound, EntryNotFound, RepositoryNotFound = _hub_errors()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = fineweb_names(shards)
    done = []
    bar = tqdm(names, desc="shards", unit="file", disable=not progress)
    for name in bar:
        dest = data_dir / name
        if dest.exists():
            try:
                read_header(dest)
                bar.write(f"{dest}: present, skipped")
                done.append(dest)
                continue
            except ShardError as e:
                bar.write(f"{e}; fetching it again")
        try:
            cached = hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset", cache_dir=cache_dir)
        except LocalEntryNotFound as e:
            raise DownloadError(
                f"cannot fetch {name} from the Hugging Face dataset {repo_id}: the Hub is unreachable "
                f"(offline, or HF_HUB_OFFLINE=1) and the file is not in the local cache. Connect to the "
                f"network and rerun `{download_command(data_dir, shards)}`, or copy the shards into "
                f"{data_dir} by hand.") from e
        except (EntryNotFound, RepositoryNotFound) as e:
            raise DownloadError(f"{name} is not in the Hugging Face dataset {repo_id}: {e}") from e
        except OSError as e:
            raise DownloadError(f"cannot fetch {name} from the Hugging Face dataset {repo_id}: {e}") from e
        read_header(cached)
        _place(Path(cached), dest)
        done.append(dest)
    return done


# ---------------------------------------------------------------------------
# Synthetic corpus
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """A sparse Markov chain of order 1 or 2 over a sub-vocabulary; documents start with EOT.

    State 0 is EOT; states 1..vocab are ``vocab`` distinct GPT-2 token ids.
    The next token depends on the last ``order`` tokens of its document
    (the context). After EOT it is drawn from one dense distribution over the
    sub-vocabulary (documents are never empty, and nothing crosses a document
    boundary); after any other context, from ``branching`` successors chosen
    per context with Dirichlet weights, or EOT (ending the document) with the
    probability that makes the mean document length, EOT included,
    ``mean_doc_len``. With order 2 the successors depend on the token before
    the previous one, so a model must attend to reach the floor: the chain's
    entropy rate, the lowest loss any model can reach on the stream.
    """
    seed: int = 1337
    vocab: int = 12
    order: int = 2
    branching: int = 3
    mean_doc_len: float = 96.0
    train_tokens: int = 1 << 21
    val_tokens: int = 1 << 16

    def __post_init__(self):
        if not 1 <= self.branching <= self.vocab <= 256:
            raise ValueError(f"synthetic spec: need 1 <= branching ({self.branching}) <= vocab ({self.vocab}) <= 256")
        if self.order not in (1, 2):
            raise ValueError(f"synthetic spec: order must be 1 or 2, got {self.order}")
        if not self.mean_doc_len > 2:
            raise ValueError(f"synthetic spec: mean_doc_len must be > 2, got {self.mean_doc_len}")
        if self.train_tokens < 2 or self.val_tokens < 2:
            raise ValueError("synthetic spec: train_tokens and val_tokens must be >= 2")


class SyntheticSource:
    """The seeded chain of a SyntheticSpec: its tokens, next-token table, entropy and samples.

    States are 0 (EOT) .. vocab; a context is the integer c = Σ s_i·n^i over
    the last ``order`` states (n = vocab + 1, the most recent state in the
    lowest digit), and ``Q[c]`` is the next-state distribution.
    """

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        K, n = spec.vocab, spec.vocab + 1
        self.n, self.n_ctx = n, n ** spec.order
        ids = np.sort(rng.choice(EOT, size=K, replace=False))
        self.token_ids = np.concatenate([[EOT], ids]).astype(np.int64)  # state -> token id
        start = np.concatenate([[0.0], rng.dirichlet(np.ones(K))])
        p_end = 1.0 / (spec.mean_doc_len - 1)  # EOT + a geometric number of tokens with mean 1/p_end
        Q = np.zeros((self.n_ctx, n))
        for c in range(self.n_ctx):
            if c % n == 0:  # the last token is EOT: a new document, whatever came before
                Q[c] = start
                continue
            succ = 1 + rng.choice(K, size=spec.branching, replace=False)
            Q[c, succ] = rng.dirichlet(np.ones(spec.branching)) * (1.0 - p_end)
            Q[c, 0] = p_end
        self.Q = Q

    def _next_ctx(self, ctx, state):
        return (ctx * self.n + state) % self.n_ctx

    def stationary(self) -> np.ndarray:
        """π over contexts with πT = π, Σπ = 1 (one recurrent class: every context reaches EOT)."""
        T = np.zeros((self.n_ctx, self.n_ctx))
        ctx = np.arange(self.n_ctx)
        for s in range(self.n):
            T[ctx, self._next_ctx(ctx, s)] += self.Q[:, s]
        A = np.vstack([T.T - np.eye(self.n_ctx), np.ones((1, self.n_ctx))])
        b = np.zeros(self.n_ctx + 1)
        b[-1] = 1.0
        pi = np.linalg.lstsq(A, b, rcond=None)[0]
        return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()

    @staticmethod
    def _row_entropy(P):
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(P > 0, P * np.log(P), 0.0).sum(-1)

    def entropy_rate(self) -> float:
        """Σ_c π_c H(Q_c) in nats per token: the expected loss of the true model."""
        return float(self.stationary() @ self._row_entropy(self.Q))

    def bigram_floor(self) -> float:
        """H(next | previous token only): the best loss of a model that cannot look further back."""
        pi = self.stationary()
        joint = np.zeros((self.n, self.n))  # [previous state, next state]
        np.add.at(joint, np.arange(self.n_ctx) % self.n, pi[:, None] * self.Q)
        marginal = joint.sum(1, keepdims=True)
        cond = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
        return float(marginal[:, 0] @ self._row_entropy(cond))

    def sample(self, n_tokens: int, stream: int, lanes: int = 2048) -> np.ndarray:
        """The first ``n_tokens`` states of a stream of independent whole documents.

        Documents are drawn ``lanes`` at a time, each run until it emits EOT,
        and concatenated in lane order; nothing is cut short except the final
        one, so the stream has exactly the chain's statistics. ``stream``
        selects an independent random stream (train and val use different ones).
        """
        rng = np.random.default_rng([self.spec.seed, 1 + stream])
        cdf = np.cumsum(self.Q, axis=1)
        cdf[:, -1] = 1.0  # guard the last bucket against rounding
        pieces, total = [], 0
        while total < n_tokens:
            ctx = np.zeros(lanes, dtype=np.int64)  # each lane starts a document with EOT
            rows = [ctx.copy()]  # state 0
            alive = np.ones(lanes, dtype=bool)
            while alive.any():
                s = (rng.random(lanes)[:, None] >= cdf[ctx]).sum(1)
                np.minimum(s, self.n - 1, out=s)
                alive &= s != 0  # the EOT that ends a document is the next document's first token
                rows.append(np.where(alive, s, -1))
                ctx = self._next_ctx(ctx, np.where(alive, s, 0))
            docs = np.stack(rows, axis=1).reshape(-1)  # [lanes, steps] row-major: documents in lane order
            docs = docs[docs >= 0]
            pieces.append(docs)
            total += docs.size
        return np.concatenate(pieces)[:n_tokens]

    def contexts(self, states: np.ndarray) -> np.ndarray:
        """The context before each position (positions before the first token see EOTs)."""
        ctx = np.zeros(len(states), dtype=np.int64)
        for back in range(1, self.spec.order + 1):
            prev = np.concatenate([np.zeros(back, dtype=np.int64), states[:-back]])
            ctx += prev * self.n ** (back - 1)
        return ctx

    def oracle_loss(self, states: np.ndarray) -> float:
        """Mean −log Q(next | context) of the true chain over positions 1..: the floor on that data."""
        ctx = self.contexts(states)
        return float(-np.log(self.Q[ctx[1:], states[1:]]).mean())


SOURCE_FILE = "synthetic_source.json"


def ensure_synthetic(data_dir, spec: SyntheticSpec, log=print) -> dict:
    """Write the synthetic corpus into data_dir unless it is there already for the same spec.

    Files: synthetic_train_000001.bin, synthetic_val_000000.bin and
    synthetic_source.json (the spec, the entropy rate and the true model's
    loss on the validation tokens). Returns the json's content.
    """
    data_dir = Path(data_dir)
    info_path = data_dir / SOURCE_FILE
    train, val = data_dir / "synthetic_train_000001.bin", data_dir / "synthetic_val_000000.bin"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
            if info.get("spec") == dataclasses.asdict(spec):
                read_header(train), read_header(val)
                return info
        except (ValueError, OSError):
            pass  # stale or damaged: regenerate below
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"writing the synthetic corpus into {data_dir} ...")
    source = SyntheticSource(spec)
    train_states = source.sample(spec.train_tokens, stream=0)
    val_states = source.sample(spec.val_tokens, stream=1)
    write_shard(train, source.token_ids[train_states])
    write_shard(val, source.token_ids[val_states])
    info = {
        "spec": dataclasses.asdict(spec),
        "entropy_nats_per_token": source.entropy_rate(),
        "bigram_floor": source.bigram_floor(),
        "val_oracle_loss": source.oracle_loss(val_states),
        "train_oracle_loss": source.oracle_loss(train_states),
        "token_ids": source.token_ids.tolist(),
        "eot": EOT,
    }
    write_text_durably(info_path, json.dumps(info, indent=1) + "\n")  # last: it marks the corpus complete
    return info


def read_source_info(data_dir) -> dict | None:
    path = Path(data_dir) / SOURCE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedrun.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help=f"fetch FineWeb shards from the Hugging Face dataset {HF_REPO}")
    dl.add_argument("--shards", type=int, default=8, help="training shards of ~1e8 tokens (the record needs 8)")
    dl.add_argument("--dir", default=DEFAULT_FINEWEB_DIR, help="destination directory")
    dl.add_argument("--repo", default=HF_REPO, help="dataset repository id")
    dl.add_argument("--cache_dir", default=None, help="Hugging Face cache directory (default: the hub's)")
    syn = sub.add_parser("synthetic", help="write the synthetic corpus (the CPU demo's data)")
    syn.add_argument("--dir", default="data/synthetic")
    for field in dataclasses.fields(SyntheticSpec):
        syn.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            files = download(args.shards, args.dir, repo_id=args.repo, cache_dir=args.cache_dir)
            print(f"{len(files)} shard(s) ready in {args.dir}")
        else:
            spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)})
            info = ensure_synthetic(args.dir, spec)
            print(f"synthetic corpus in {args.dir}: entropy {info['entropy_nats_per_token']:.4f} nats/token, "
                  f"true model's val loss {info['val_oracle_loss']:.4f}")
    except (DownloadError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
