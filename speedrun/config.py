"""Run configuration: one flat dataclass, three presets, command-line overrides.

Every field can be set on the command line as ``--name=value`` (or ``--name
value``); tuples take comma-separated values, booleans true/false (a bare ``--name``
is true).
"""

from __future__ import annotations

import dataclasses
import math
import typing

from kernels._checks import FP32_MAX, FP32_TINY
from kernels.newton_schulz import MAX_STEPS as NS_MAX_STEPS
from speedrun.data import DEFAULT_FINEWEB_DIR, SyntheticSpec


@dataclasses.dataclass
class Config:
    # --- run ---------------------------------------------------------------
    preset: str = "record"
    num_steps: int = 1770
    seed: int = 0
    out: str = ""                       # default: runs/<preset>
    backend: str = "auto"               # kernels backend: auto, reference, triton, cuda
    data_dir: str = DEFAULT_FINEWEB_DIR
    log_every: int = 10                 # progress line (and the one host read of the losses) every k steps;
                                        # log.jsonl still gets every step
    checkpoint_every: int = 0           # also save checkpoint.pt every k steps (0: only at the end)
    stop_after: int = 0                 # stop (with a checkpoint) after this step, as if interrupted; 0: never
    inject_nan_step: int = 0            # test hook: make the loss NaN at this step (0: off)
    allow_data_change: bool = False     # resume on data other than the checkpoint's (applies to one resume)
    plot: bool = True                   # write DIR/plot.png at the end (speedrun.plot; needs matplotlib)
    # --- batch ---------------------------------------------------------------
    seq_len: int = 48 * 1024            # tokens per rank per forward (one packed sequence)
    batch_tokens: int = 8 * 48 * 1024   # tokens per optimizer step, all ranks; the rest is accumulation
    # --- evaluation -----------------------------------------------------------
    val_every: int = 125
    val_tokens: int = 10_485_760
    val_seq_len: int = 4 * 64 * 1024    # tokens per rank per validation forward
    val_at_start: bool = True
    # --- model ------------------------------------------------------------------
    vocab_size: int = 50257             # the head is padded to the next multiple of 128
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_ratio: int = 4
    num_value_embeds: int = 3           # ve_i feeds block i and block L-n+i
    no_attention_layers: tuple = (7,)
    window_pattern: str = "LSSSLSSLSSSL"  # per layer: L = long window, S = short (half)
    window_max_tokens: int = 1728       # window warm-up: next multiple of attn_block >= this * progress
    attn_block: int = 128
    attn_scale: float = 0.12
    softcap: float = 15.0
    dtype: str = "bfloat16"             # activations and embedding tables
    attention: str = "auto"             # flex (GPU), sdpa (dense mask), auto: flex on CUDA
    head_fp8: bool = True               # training head through kernels.fp8_head_loss
    head_rounding: str = "record"       # fp8_head_loss(rounding=): the record's bf16 roundings, or "fp32"
    fp8_scales: str = "static"          # static (the record's, scaled to model_dim) or dynamic
    compile: str = "auto"               # torch.compile the whole model: auto (on CUDA), true, false, or a
                                        # torch.compile backend name (inductor, aot_eager, eager)
    warmup_steps: int = -1              # untimed steps before training (compile, autotune), then the model,
                                        # optimizer and data state are restored; -1: 10 on CUDA, 0 on CPU
    threads: int = 0                    # torch CPU threads (0: torch's default)
    # --- communication (speedrun/grad_sync.py) ------------------------------------
    overlap_comm: bool = True           # reduce-scatter each bucket during backward (false: after backward)
    bucket_mb: float = 25.0             # gradient bucket size, MiB
    dist_timeout_s: float = 300.0       # a collective waiting longer fails (a dead rank stops the others)
    # --- optimisation ---------------------------------------------------------------
    lr_head: float = 0.22
    lr_embed: float = 0.6
    lr_scalar: float = 0.04
    lr_muon: float = 0.05
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    adam_eps: float = 1e-10
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup: int = 300
    ns_steps: int = 5
    cooldown_frac: float = 0.4
    final_lr_frac: float = 0.1
    peak_tflops: float = 989.0          # per GPU, dense bf16 (H100 SXM), for the MFU estimate
    # --- synthetic corpus (written into data_dir when ``synthetic``) ------------
    synthetic: bool = False
    # defaults are SyntheticSpec's, so the CLI and the data module cannot drift apart
    synth_seed: int = SyntheticSpec.seed
    synth_vocab: int = SyntheticSpec.vocab
    synth_order: int = SyntheticSpec.order
    synth_branching: int = SyntheticSpec.branching
    synth_doc_len: float = SyntheticSpec.mean_doc_len
    synth_train_tokens: int = SyntheticSpec.train_tokens
    synth_val_tokens: int = SyntheticSpec.val_tokens

    def validate(self) -> "Config":
        check_fields(self)

        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"--{name}: {msg}, got {getattr(self, name)!r}")

        for name in ("num_steps", "seq_len", "batch_tokens", "val_every", "val_tokens", "val_seq_len",
                     "num_layers", "model_dim", "num_heads", "head_dim", "mlp_ratio", "attn_block",
                     "window_max_tokens", "ns_steps", "log_every", "vocab_size"):
            need(getattr(self, name) >= 1, name, "expected >= 1")
        need(self.ns_steps <= NS_MAX_STEPS, "ns_steps", f"expected <= {NS_MAX_STEPS} (kernels.newton_schulz's cap)")
        need(self.head_dim % 4 == 0, "head_dim", "the half-truncated rotary needs a multiple of 4")
        need(len(self.window_pattern) == self.num_layers and set(self.window_pattern) <= {"L", "S"},
             "window_pattern", f"expected {self.num_layers} letters L/S (one per layer)")
        need(all(0 <= i < self.num_layers for i in self.no_attention_layers), "no_attention_layers",
             f"expected layer indices in [0, {self.num_layers})")
        need(0 <= 2 * self.num_value_embeds <= self.num_layers, "num_value_embeds",
             f"expected 0..{self.num_layers // 2} (each table feeds one early and one late layer)")
        need(self.seq_len % self.attn_block == 0, "seq_len", f"expected a multiple of attn_block={self.attn_block}")
        need(self.val_seq_len % self.attn_block == 0, "val_seq_len",
             f"expected a multiple of attn_block={self.attn_block}")
        need(self.dtype in ("bfloat16", "float32", "float16"), "dtype", "expected bfloat16, float16 or float32")
        need(self.attention in ("auto", "flex", "sdpa"), "attention", "expected auto, flex or sdpa")
        need(self.backend in ("auto", "reference", "triton", "cuda"), "backend",
             "expected auto, reference, triton or cuda")
        need(self.fp8_scales in ("static", "dynamic"), "fp8_scales", "expected static or dynamic")
        need(self.head_rounding in ("record", "fp32"), "head_rounding", "expected record or fp32")
        need(0.0 <= self.cooldown_frac <= 1.0, "cooldown_frac", "expected a fraction in [0, 1]")
        need(self.checkpoint_every >= 0, "checkpoint_every", "expected >= 0")
        need(self.stop_after >= 0, "stop_after", "expected >= 0")
        need(self.val_tokens % self.val_seq_len == 0, "val_tokens",
             f"expected a multiple of val_seq_len={self.val_seq_len} (validation is whole sequences)")
        need(self.compile in COMPILE_CHOICES, "compile", f"expected one of {', '.join(COMPILE_CHOICES)}")
        need(self.warmup_steps >= -1, "warmup_steps", "expected >= 0, or -1 (auto)")
        return self

    def compile_backend(self, device_type: str) -> str | None:
        """The torch.compile backend for this run, or None for eager."""
        if self.compile == "auto":
            return "inductor" if device_type == "cuda" else None
        return {"true": "inductor", "false": None}.get(self.compile, self.compile)

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step, so that the step always holds batch_tokens tokens."""
        per_pass = world_size * self.seq_len
        if self.batch_tokens % per_pass:
            raise ValueError(f"--batch_tokens={self.batch_tokens} is not a multiple of world_size*seq_len = "
                             f"{world_size}*{self.seq_len}; change --seq_len or the number of processes")
        return self.batch_tokens // per_pass

    @property
    def padded_vocab(self) -> int:
        return 128 * math.ceil(self.vocab_size / 128)


COMPILE_CHOICES = ("auto", "true", "false", "inductor", "aot_eager", "eager")

# FP32_MAX / FP32_TINY (kernels._checks): lrs, scales and caps are used in fp32; a smaller eps is 0 in the update.


def _in(lo, hi, lo_open=False, hi_open=False):
    """A range check and its text, e.g. _in(0, 1, hi_open=True) -> 'expected a value in [0, 1)'."""
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if hi == FP32_MAX:
        return ok, f"expected {'>' if lo_open else '>='} {lo:g} and finite in float32 (<= 3.4e38)"
    return ok, f"expected a value in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _positive(v):
    return v > 0


# Ranges of the fields that validate() does not check itself. Every float not named here must
# still be finite; every field's type is checked.
RANGES = {
    "seed": (lambda v: 0 <= v < 2**64, "expected an integer in [0, 2**64)"),
    "inject_nan_step": (lambda v: v >= 0, "expected >= 0 (0: off)"),
    "threads": (lambda v: v >= 0, "expected >= 0 (0: torch's default)"),
    "muon_momentum_warmup": (lambda v: v >= 0, "expected >= 0"),
    "attn_scale": _in(0, FP32_MAX, lo_open=True),
    "softcap": _in(0, FP32_MAX, lo_open=True),
    "bucket_mb": (_positive, "expected > 0 (MiB)"),
    "dist_timeout_s": _in(0, 8.64e13, lo_open=True),              # datetime.timedelta's range, in seconds
    "lr_head": _in(0, FP32_MAX), "lr_embed": _in(0, FP32_MAX), "lr_scalar": _in(0, FP32_MAX),
    "lr_muon": _in(0, FP32_MAX),                                   # a negative lr is gradient ascent
    "adam_beta1": _in(0, 1, hi_open=True), "adam_beta2": _in(0, 1, hi_open=True),
    "adam_eps": (lambda v: FP32_TINY <= v <= 1, "expected a value in [1.2e-38, 1] (a smaller one is 0 in float32)"),
    "muon_momentum": _in(0, 1, hi_open=True), "muon_momentum_start": _in(0, 1, hi_open=True),
    "final_lr_frac": _in(0, 1),
    "peak_tflops": (_positive, "expected > 0 (TFLOP/s per GPU)"),
    "out": (lambda v: bool(v.strip()), "expected a directory name"),
    "data_dir": (lambda v: bool(v.strip()), "expected a directory name"),
    "synth_seed": (lambda v: v >= 0, "expected >= 0"),
    "synth_train_tokens": (lambda v: 2 <= v < 2**31, "expected 2 .. 2**31-1 (a shard's int32 count)"),
    "synth_val_tokens": (lambda v: 2 <= v < 2**31, "expected 2 .. 2**31-1 (a shard's int32 count)"),
}


def check_fields(cfg) -> None:
    """Every field: its type, finiteness for floats, and the ranges in RANGES; ValueError naming the first bad one.

    Values come from the command line (already typed) or from a checkpoint's config (anything).
    """
    for name, kind in field_types().items():
        v = getattr(cfg, name)
        typed = {bool: isinstance(v, bool), str: isinstance(v, str),
                 int: isinstance(v, int) and not isinstance(v, bool),
                 float: isinstance(v, (int, float)) and not isinstance(v, bool),
                 tuple: isinstance(v, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                 }[kind]
        if not typed:
            expected = {bool: "a bool", int: "an int", float: "a float", str: "a string", tuple: "a tuple of ints"}
            raise ValueError(f"--{name}: expected {expected[kind]}, got {v!r}")
        if kind is float and not math.isfinite(v):
            raise ValueError(f"--{name}: expected a finite number, got {v!r}")
        if name in RANGES and not RANGES[name][0](v):
            raise ValueError(f"--{name}: {RANGES[name][1]}, got {v!r}")
    if cfg.synthetic:
        try:
            synthetic_spec(cfg)
        except ValueError as e:
            raise ValueError(f"--synth_*: {e}") from None


def synthetic_spec(cfg) -> SyntheticSpec:
    """The synthetic corpus of a config's synth_* fields (SyntheticSpec checks them)."""
    return SyntheticSpec(seed=cfg.synth_seed, vocab=cfg.synth_vocab, order=cfg.synth_order,
                         branching=cfg.synth_branching, mean_doc_len=cfg.synth_doc_len,
                         train_tokens=cfg.synth_train_tokens, val_tokens=cfg.synth_val_tokens)


def check_device(cfg, device) -> None:
    """What only the run's device can tell, checked at setup instead of failing in the first step."""
    kind = getattr(device, "type", str(device))
    if cfg.attention == "flex" and kind != "cuda":
        raise ValueError(f"--attention=flex: FlexAttention needs a CUDA device, this run is on {kind}; "
                         "use --attention=sdpa (or auto, which picks it here)")


PRESETS: dict[str, dict] = {
    # The record's configuration (record-config.md); gradient accumulation keeps the
    # 393,216-token step on fewer than 8 GPUs.
    "record": {},
    # A tiny model that learns the synthetic order-2 Markov source on one CPU core in about
    # 3 minutes (the record's learning rates; one thread: a second one only helps on an idle machine).
    "cpu-demo": dict(
        num_steps=150, seq_len=256, batch_tokens=256, val_every=75, val_tokens=8192, val_seq_len=2048,
        num_layers=4, model_dim=96, num_heads=2, head_dim=48, num_value_embeds=1, no_attention_layers=(),
        window_pattern="LSSL", window_max_tokens=384, dtype="float32", head_fp8=False, log_every=10,
        muon_momentum_warmup=50, threads=1, data_dir="data/synthetic", synthetic=True,
        synth_train_tokens=1 << 17, synth_val_tokens=1 << 14,
    ),
    # Seconds: exercises every code path (fp8 head, accumulation, masks, eval, checkpoint).
    "smoke": dict(
        num_steps=4, seq_len=128, batch_tokens=256, val_every=2, val_tokens=256, val_seq_len=128,
        num_layers=2, model_dim=32, num_heads=2, head_dim=16, num_value_embeds=1, no_attention_layers=(),
        window_pattern="LS", attn_block=32, window_max_tokens=96, dtype="float32", muon_momentum_warmup=2,
        threads=1, data_dir="data/synthetic-smoke", synthetic=True, synth_train_tokens=1 << 14,
        synth_val_tokens=1 << 12, log_every=1, plot=False,
    ),
}

ALIASES = {"steps": "num_steps", "data": "data_dir"}


def _convert(name: str, kind, text: str):
    try:
        if kind is bool:
            low = text.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return low in ("1", "true", "yes")
        if kind is tuple:
            return tuple(int(v) for v in text.split(",") if v.strip())
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name}: cannot read {text!r} as {kind.__name__}") from None


def field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] if hints[f.name] in (bool, int, float, str) else tuple
            for f in dataclasses.fields(Config)}


def parse_overrides(args: list[str]) -> dict:
    """``["--model_dim=128", "--steps", "10"]`` -> {"model_dim": 128, "num_steps": 10}; unknown names raise."""
    types = field_types()
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --name=value")
        name, eq, value = arg[2:].partition("=")
        name = ALIASES.get(name, name).replace("-", "_")
        if name not in types:
            raise ValueError(f"unknown option --{name}; see --help for the config fields")
        if not eq:
            if types[name] is bool and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                value = "true"  # a bare switch: --allow_data_change
            elif i + 1 >= len(args):
                raise ValueError(f"--{name}: missing value")
            else:
                i += 1
                value = args[i]
        out[name] = _convert(name, types[name], value)
        i += 1
    return out


def build_config(preset: str, overrides: dict, base: dict | None = None) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    # a checkpoint's config (base) lacking a field, e.g. one added since, gets the preset's value
    values = {**PRESETS[preset], "preset": preset, **(base or {})}
    if base is not None:
        # Permission to change the data is given per resume, never inherited from the run that wrote
        # the checkpoint.
        values["allow_data_change"] = False
        if isinstance(values.get("compile"), bool):  # checkpoints from before compile took a backend name
            values["compile"] = "true" if values["compile"] else "false"
    values.update(overrides)
    cfg = Config(**values)
    if not cfg.out:
        cfg.out = f"runs/{cfg.preset}"
    cfg.no_attention_layers = tuple(cfg.no_attention_layers)
    return cfg.validate()
