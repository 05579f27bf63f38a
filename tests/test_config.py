"""speedrun/config.py: every field is checked, each bad value is refused with its name (issue 15 item 7)."""

import math

import pytest

from speedrun.config import PRESETS, Config, build_config, check_device, field_types, parse_overrides

# (field, bad value, part of the message)
BAD = [
    ("threads", -1, "expected >= 0"),
    ("bucket_mb", math.inf, "expected a finite number"),
    ("bucket_mb", math.nan, "expected a finite number"),
    ("bucket_mb", 0.0, "expected > 0"),
    ("dist_timeout_s", math.inf, "expected a finite number"),
    ("dist_timeout_s", 0.0, "expected a value in (0, 8.64e+13]"),
    ("dist_timeout_s", 1e300, "expected a value in (0, 8.64e+13]"),
    ("lr_head", -0.1, "expected >= 0 and finite in float32"),   # gradient ascent
    ("lr_embed", math.nan, "expected a finite number"),
    ("lr_scalar", math.inf, "expected a finite number"),
    ("lr_muon", 1e39, "expected >= 0 and finite in float32"),
    ("lr_muon", -1e-3, "expected >= 0"),
    ("final_lr_frac", 1.5, "expected a value in [0, 1]"),
    ("final_lr_frac", -0.1, "expected a value in [0, 1]"),
    ("final_lr_frac", math.nan, "expected a finite number"),
    ("adam_eps", 0.0, "expected a value in [1.2e-38, 1]"),
    ("adam_eps", -1e-8, "expected a value in [1.2e-38, 1]"),
    ("adam_eps", 1e-45, "a smaller one is 0 in float32"),
    ("adam_beta1", 1.0, "expected a value in [0, 1)"),
    ("adam_beta2", -0.5, "expected a value in [0, 1)"),
    ("muon_momentum", 1.0, "expected a value in [0, 1)"),
    ("muon_momentum_start", math.nan, "expected a finite number"),
    ("muon_momentum_warmup", -1, "expected >= 0"),
    ("peak_tflops", 0.0, "expected > 0"),
    ("peak_tflops", -989.0, "expected > 0"),
    ("peak_tflops", math.inf, "expected a finite number"),
    ("stop_after", -1, "expected >= 0"),
    ("checkpoint_every", -2, "expected >= 0"),
    ("inject_nan_step", -1, "expected >= 0"),
    ("seed", -1, "expected an integer in [0, 2**64)"),
    ("seed", 2**64, "expected an integer in [0, 2**64)"),
    ("softcap", 0.0, "expected > 0 and finite in float32"),
    ("softcap", 1e300, "expected > 0 and finite in float32"),
    ("attn_scale", -0.12, "expected > 0"),
    ("cooldown_frac", 1.5, "expected a fraction in [0, 1]"),
    ("out", " ", "expected a directory name"),
    ("data_dir", "", "expected a directory name"),
    ("synth_doc_len", 1.0, "mean_doc_len must be > 2"),
    ("synth_train_tokens", 2**31, "a shard's int32 count"),
    ("synth_seed", -3, "expected >= 0"),
    ("num_steps", 0, "expected >= 1"),
    ("ns_steps", 0, "expected >= 1"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_value_is_refused_with_its_name(name, value, message):
    with pytest.raises(ValueError) as info:
        build_config("smoke", {name: value})
    text = str(info.value)
    assert text.startswith(f"--{name}: ") or name.startswith("synth_") and text.startswith("--synth_*"), text
    assert message in text, text


def test_stop_after_is_checked_on_its_own():
    with pytest.raises(ValueError, match=r"^--stop_after: expected >= 0, got -1$"):
        build_config("smoke", parse_overrides(["--stop_after=-1"]))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_passes(preset):
    build_config(preset, {})


def test_the_issue_s_divergent_learning_rate_is_accepted():
    # finite in float32: a valid (if reckless) setting; the trainer's non-finite stop handles it
    assert build_config("smoke", {"lr_muon": 1.5e38}).lr_muon == 1.5e38


# Values of the wrong type, as a checkpoint's config could hold them (the command line types its values).
WRONG_TYPE = {bool: "yes", int: 3.5, float: "fast", str: 7, tuple: ("a",)}


@pytest.mark.parametrize("name", sorted(field_types()))
def test_every_field_has_its_type_checked(name):
    kind = field_types()[name]
    with pytest.raises(ValueError, match=f"^--{name}: expected a"):
        if name == "allow_data_change":  # never taken from a checkpoint's config: only from the command line
            build_config("smoke", {name: WRONG_TYPE[kind]})
        else:
            build_config("smoke", {}, base={**vars(build_config("smoke", {})), name: WRONG_TYPE[kind]})


@pytest.mark.parametrize("name", sorted(n for n, k in field_types().items() if k is float))
def test_every_float_field_must_be_finite(name):
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=f"^--{name}: expected a finite number"):
            build_config("smoke", {name: value})


def test_bools_are_not_ints_and_ints_pass_as_floats():
    with pytest.raises(ValueError, match="^--num_steps: expected an int, got True"):
        build_config("smoke", {"num_steps": True})
    assert build_config("smoke", {"lr_muon": 1}).lr_muon == 1


def test_attention_flex_needs_a_cuda_device():
    import torch
    cfg = build_config("smoke", {"attention": "flex"})
    with pytest.raises(ValueError, match="--attention=flex: FlexAttention needs a CUDA device, this run is on cpu"):
        check_device(cfg, torch.device("cpu"))
    check_device(cfg, torch.device("cuda", 0))  # no CUDA call: the device's type decides
    check_device(build_config("smoke", {}), torch.device("cpu"))


def test_a_checkpoint_config_missing_a_field_gets_the_preset_s_value():
    base = vars(build_config("smoke", {}))
    del base["window_pattern"]
    assert build_config("smoke", {}, base=base).window_pattern == PRESETS["smoke"]["window_pattern"]
    assert Config().window_pattern != PRESETS["smoke"]["window_pattern"]
