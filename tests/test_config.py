"""Config loading: named configs validate, overrides apply, bad keys/values name what is allowed."""

import dataclasses
import glob
import json
import os
import typing

import pytest

from pipeline import config, paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_named_configs_load(path):
    cfg = config.load(path)
    assert cfg.run.name
    assert cfg.train.batch_size % cfg.train.num_workers == 0


def test_cluster_example_is_cluster_scale():
    cfg = config.load(os.path.join(ROOT, "configs", "cluster_sd256.yaml"))
    assert cfg.data.image_size == 256
    assert cfg.text_encoder.pretrained == "google/t5-v1_1-base"
    assert cfg.vae.pretrained
    assert cfg.train.num_workers >= 8 and cfg.train.use_gpu == "yes" and cfg.train.mixed_precision == "bf16"
    assert cfg.denoiser.block_out_channels == [320, 640, 1280, 1280]


def test_cluster_transformer_example_is_pixart_xl2_sized():
    """configs/cluster_dit256.yaml builds an XL/2 transformer (PixArt-alpha: about 0.6 B parameters) on
    256 px images' 32x32x4 latents, 256 tokens; built on the meta device (no memory, no weights)."""
    import torch

    from pipeline.models.denoiser import build_denoiser_for

    cfg = config.load(os.path.join(ROOT, "configs", "cluster_dit256.yaml"))
    assert (cfg.denoiser.arch, cfg.denoiser.dit_dims(), cfg.schedule.prediction) == ("dit", (28, 16, 72), "flow")
    with torch.device("meta"):
        dit = build_denoiser_for(cfg, {"latent_shape": [4, 32, 32], "text_shape": [77, 768]})
    n = sum(p.numel() for p in dit.parameters())
    assert 5.5e8 < n < 7.0e8, n
    assert (32 // cfg.denoiser.patch_size) ** 2 == 256


def test_overrides_are_typed_and_applied():
    cfg = config.load(os.path.join(ROOT, "configs", "tiny.yaml"),
                      ["train.steps=7", "train.lr=1e-3", "generate.sampler=dpm", "vae.block_out_channels=[8, 16]",
                       "vae.norm_num_groups=8", "fid.enabled=false"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.generate.sampler == "dpm"
    assert cfg.vae.block_out_channels == [8, 16] and cfg.fid.enabled is False


@pytest.mark.parametrize(
    "overrides, must_mention",
    [
        (["train.stepz=5"], ["train.stepz", "steps", "batch_size"]),
        (["trian.steps=5"], ["trian", "train", "generate"]),
        (["generate.sampler=euler"], ["generate.sampler", "ddpm", "ddim", "dpm"]),
        (["train.steps=abc"], ["train.steps", "integer"]),
        (["train.steps=0"], ["train.steps", ">= 1", "got 0"]),
        (["train.num_workers=3"], ["train.batch_size", "train.num_workers"]),
        (["data.source=imagenet"], ["data.source", "emoji", "fashion_mnist", "shards"]),
        (["data.source=shards"], ["data.input_uri"]),
        (["data.source=fashion_mnist", "data.emoji_renders=5"], ["data.emoji_renders", "emoji", "fashion_mnist"]),
        (["data.emoji_renders=0"], ["data.emoji_renders", ">= 1", "got 0"]),
        (["train.cond_dropout=1.5"], ["train.cond_dropout"]),
        (["vae.norm_num_groups=7"], ["vae.norm_num_groups", "block_out_channels"]),
        (["generate.steps=5000"], ["generate.steps", "num_train_timesteps"]),
        (["fid.enabled=maybe"], ["fid.enabled", "true or false"]),
        (["train"], ["section.key=value"]),
    ],
)
def test_bad_config_names_key_and_allowed_values(overrides, must_mention):
    with pytest.raises(config.ConfigError) as e:
        config.load(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    for word in must_mention:
        assert word in str(e.value), (word, str(e.value))


def test_every_field_is_documented():
    text = config.describe()
    for section in ("run", "data", "text_encoder", "vae", "denoiser", "train", "generate", "fid"):
        assert f"**`{section}`**" in text
    # one row per field, none with an empty meaning column
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)


def test_latents_location_depends_on_encoders_not_on_training(tmp_path):
    common = ["vae.source=random", f"run.storage={tmp_path}"]
    base = config.load(os.path.join(ROOT, "configs", "tiny.yaml"), common)
    more_steps = config.load(os.path.join(ROOT, "configs", "tiny.yaml"), common + ["train.steps=99"])
    other_vae = config.load(os.path.join(ROOT, "configs", "tiny.yaml"), common + ["vae.latent_channels=8"])
    assert paths.latents(base) == paths.latents(more_steps)
    assert paths.latents(base) != paths.latents(other_vae)


def test_bad_cli_config_exits_with_message(capsys):
    from pipeline import cli

    with pytest.raises(SystemExit) as e:
        cli.parse("x", ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "train.batch_size=-1"])
    assert e.value.code == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_readme_config_reference_is_current():
    """The README's reference is generated from the dataclasses; regenerate it when a field changes:
    python -c "from pipeline import config; print(config.describe())" """
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert config.describe().strip() in readme


def test_readme_starts_with_the_two_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = f.read().split("```")
    commands = [line for line in blocks[1].splitlines()[1:] if line.strip()]
    assert len(commands) == 2
    assert "jobs.demo --config configs/demo.yaml" in commands[0] and "pytest" in commands[1]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "pytest" in f.read()


def test_fields_added_later_keep_earlier_cache_keys():
    """A field added after runs stored latents under fingerprint() keys must not move those keys
    while it holds its default, or upgrading would re-encode and refuse to resume every run."""
    # The keys commit 73ca990 (before emoji_names / emoji_renders) computed for these configs.
    for name, key in (("fashion_mnist", "f852f9f3b276"), ("tiny", "f8c8caf51320"), ("cluster_sd256", "04a02390ae62")):
        cfg = config.load(os.path.join(ROOT, "configs", f"{name}.yaml"))
        assert cfg.fingerprint("data", "text_encoder", "vae") == key, name
    emoji = config.load(os.path.join(ROOT, "configs", "tiny.yaml"))
    more = config.load(os.path.join(ROOT, "configs", "tiny.yaml"), ["data.emoji_renders=5"])
    assert emoji.fingerprint("data") != more.fingerprint("data")


# --- every field checked up front -------------------------------------------------------------------

# The only fields that declare no constraint: any value of their type is fine here (what they name is
# looked up later, or a cross-field check in config.validate decides). Keep this list short.
FREE_FORM = {
    "data.input_uri",  # any URI; empty: <storage>/datasets/<source> (required for shards: a cross-field check)
    "data.source_dir",  # any folder; empty: the Debian package's
    "data.emoji_names",  # free text, matched against the emoji names by ingest (which has the list)
    "text_encoder.pretrained",  # hub id, path or package:NAME; empty: the random tiny T5
    "vae.pretrained",  # path, URI or hub id; required with vae.source=pretrained (a cross-field check)
    "fid.enabled",  # bools: both values are fine
    "eval.report",
    "schedule.zero_terminal_snr",  # a bool; its pairing with the prediction is a cross-field check
    "train.compile",
    "train.gradient_checkpointing",
}
CONSTRAINTS = ("choices", "range", "nonempty", "pattern")


def _fields():
    """(section.key, type, metadata) of every field of every section of config.Config."""
    hints = typing.get_type_hints(config.Config)
    for sec in dataclasses.fields(config.Config):
        types = typing.get_type_hints(hints[sec.name])
        for f in dataclasses.fields(hints[sec.name]):
            yield f"{sec.name}.{f.name}", types[f.name], f.metadata


def _is_numeric(tp) -> bool:
    return tp in (int, float) or (typing.get_origin(tp) is list and typing.get_args(tp)[0] in (int, float))


def _violations(tp, meta, current):
    """Values that break what the field's metadata declares: below the minimum, above the maximum, NaN,
    not a choice, not matching the pattern (as a list's last entry, for a list), empty."""
    is_list = typing.get_origin(tp) is list
    bad = []
    if meta.get("choices"):
        bad.append("no-such-choice")
    r = meta.get("range")
    if r is not None:
        if r.lo is not None:
            bad.append(r.lo if r.lo_open else r.lo - 1)
        if r.hi is not None:
            bad.append(r.hi if r.hi_open else r.hi + 1)
        if float in (tp, *typing.get_args(tp)):
            bad.append(float("nan"))
    if meta.get("pattern"):
        bad += ["a/b", "../up", "-x"]
    out = [[*current, b] for b in bad] if is_list else bad
    if meta.get("nonempty"):
        out.append([] if is_list else "")
    return out


def _violation_cases():
    tiny = config.load(TINY)
    for key, tp, meta in _fields():
        section, name = key.split(".")
        for value in _violations(tp, meta, getattr(getattr(tiny, section), name)):
            yield pytest.param(key, f"{key}={json.dumps(value).replace('NaN', '.nan')}", id=f"{key}={value!r}")


def test_every_field_declares_what_it_allows():
    """A new field must say what it allows (a number: its range), or be added to FREE_FORM with why."""
    keys = set()
    for key, tp, meta in _fields():
        keys.add(key)
        declared = [c for c in CONSTRAINTS if c in meta]
        if key in FREE_FORM:
            assert not declared and not _is_numeric(tp), f"{key} is in FREE_FORM but declares {declared}"
            continue
        assert declared, f"{key}: declare what it allows (_at_least, _above, _between, _choices, _nonempty, ...)"
        if _is_numeric(tp):
            assert "range" in meta, f"{key}: a number needs a range (_at_least, _above, _between)"
        assert _violations(tp, meta, []), key
    assert FREE_FORM <= keys, FREE_FORM - keys


@pytest.mark.parametrize("key, override", list(_violation_cases()))
def test_a_value_outside_a_fields_constraint_names_the_key(key, override):
    with pytest.raises(config.ConfigError) as e:
        config.load(TINY, [override])
    assert str(e.value).startswith((f"{key}:", f"{key}[")), str(e.value)  # the field's own check, first


def test_range_bounds_themselves_pass_the_field_checks():
    """The closed ends of every range are allowed (no range is tighter than it says)."""
    cfg = config.load(TINY)
    for key, tp, meta in _fields():
        r = meta.get("range")
        ends = [] if r is None else [(r.lo, r.lo_open), (r.hi, r.hi_open)]
        for bound in [b for b, is_open in ends if b is not None and not is_open]:
            section, name = key.split(".")
            value = [bound] if typing.get_origin(tp) is list else bound
            sec = dataclasses.replace(getattr(cfg, section), **{name: value})
            config.check_fields(dataclasses.replace(cfg, **{section: sec}))


@pytest.mark.parametrize(
    "override, message",
    [
        ("generate.batch_size=0", "generate.batch_size: must be >= 1, got 0"),
        ("fid.batch_size=0", "fid.batch_size: must be >= 1, got 0"),
        ("train.num_to_keep=0", "train.num_to_keep: must be >= 1, got 0"),
        ("encode.num_actors=0", "encode.num_actors: must be >= 1, got 0"),
        ("train.warmup_steps=-5", "train.warmup_steps: must be >= 0, got -5"),
        ("text_encoder.max_length=0", "text_encoder.max_length: must be >= 1, got 0"),
        ("data.image_size=4", "data.image_size: must be >= 8, got 4"),
        ("run.storage=", "run.storage: must not be empty"),
        ("run.storage='  '", "run.storage: must not be empty"),
        ("run.name=", "run.name: must not be empty"),
        ("run.name=a/b", "run.name: 'a/b' is not allowed; use letters, digits"),
        ("run.name=..", "run.name: '..' is not allowed"),
        ("run.name=../other", "run.name: '../other' is not allowed"),
        # the diffusion math needs T >= 2; named before the generate.steps <= T comparison
        ("schedule.num_train_timesteps=0", "schedule.num_train_timesteps: must be >= 2, got 0"),
        ("schedule.num_train_timesteps=1", "schedule.num_train_timesteps: must be >= 2, got 1"),
        ("schedule.beta_end=1.0", "schedule.beta_end: must be in (0, 1), got 1.0"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps: must be >= 1, got 0"),
        ("vae_train.max_nonfinite_steps=-1", "vae_train.max_nonfinite_steps: must be >= 1, got -1"),
        ("train.lr=0", "train.lr: must be > 0, got 0.0"),
        ("train.lr=.nan", "train.lr: must be a finite number > 0, got nan"),
        ("train.cond_dropout=1.0", "train.cond_dropout: must be in [0, 1), got 1.0"),
        ("generate.guidance_scale=-1", "generate.guidance_scale: must be >= 0, got -1.0"),
        ("vae.block_out_channels=[]", "vae.block_out_channels: must not be empty"),
        ("denoiser.block_out_channels=[16, 0]", "denoiser.block_out_channels[1]: must be >= 1, got 0"),
        ("eval.sweep_guidance=[1.0, -2.0]", "eval.sweep_guidance[1]: must be >= 0, got -2.0"),
        ("eval.sweep_samplers=[ddim:50, heun:10]", "eval.sweep_samplers[1]: 'heun:10' is not allowed; use sampler:steps"),
        ("eval.sweep_samplers=[ddim:0]", "eval.sweep_samplers[0]: 'ddim:0' is not allowed"),
    ],
)
def test_bad_value_names_its_key_and_what_is_allowed(override, message):
    with pytest.raises(config.ConfigError) as e:
        config.load(TINY, [override])
    assert message in str(e.value), str(e.value)
    assert "generate.steps" not in str(e.value)  # T=0 used to trip the generate.steps comparison instead


@pytest.mark.parametrize(
    "overrides, must_mention",
    [
        (["schedule.beta_start=0.9", "schedule.beta_end=0.5"], ["schedule.beta_start", "schedule.beta_end", "0.9", "0.5"]),
        (["data.image_size=17"], ["data.image_size", "divisible by 2", "vae.block_out_channels", "17"]),
        (["data.image_size=18", "vae.block_out_channels=[16, 32, 32]"], ["data.image_size", "divisible by 4", "18"]),
        (["eval.sweep_samplers=[ddpm:2000]"], ["eval.sweep_samplers", "ddpm:2000", "schedule.num_train_timesteps"]),
        (["text_encoder.num_heads=64"], ["text_encoder.num_heads", "text_encoder.d_model"]),
        # combinations of objective and sampler that do not exist
        (["schedule.prediction=flow"], ["generate.sampler", "'ddim'", "flow", "euler, dpm"]),
        (["generate.sampler=euler"], ["generate.sampler", "'euler'", "'epsilon'", "ddpm, ddim, dpm"]),
        (["schedule.prediction=flow", "generate.sampler=euler", "eval.sweep_images=4"],
         ["eval.sweep_samplers", "'ddpm'", "euler, dpm"]),
        (["schedule.prediction=flow", "generate.sampler=euler", "train.loss_weighting=min_snr"],
         ["train.loss_weighting", "min_snr", "schedule.timestep_sampling"]),
        (["schedule.prediction=flow", "generate.sampler=euler", "eval.vlb_latents=4"], ["eval.vlb_latents", "flow"]),
        (["schedule.zero_terminal_snr=true"], ["schedule.zero_terminal_snr", "v or x0", "'epsilon'"]),
        (["denoiser.arch=dit", "denoiser.patch_size=3"], ["denoiser.patch_size", "latent size 8"]),
    ],
)
def test_cross_field_checks_name_both_keys(overrides, must_mention):
    with pytest.raises(config.ConfigError) as e:
        config.load(TINY, overrides)
    for word in must_mention:
        assert word in str(e.value), (word, str(e.value))


@pytest.mark.parametrize(
    "overrides",
    [
        ["schedule.beta_start=0.01", "schedule.beta_end=0.01"],  # constant betas are allowed
        ["schedule.beta_schedule=squaredcos_cap_v2", "schedule.beta_start=0.9", "schedule.beta_end=0.5"],  # ignored
        ["data.image_size=17", "vae.source=pretrained", "vae.pretrained=some/vae"],  # factor unknown until loaded
        ["text_encoder.pretrained=some/t5", "text_encoder.num_heads=64"],  # the tiny T5's sizes are unused
        ["schedule.num_train_timesteps=10", "eval.sweep_samplers=[ddpm:10]", "train.max_failures=0"],
        ["schedule.prediction=flow", "generate.sampler=euler", "eval.sweep_images=4",
         "eval.sweep_samplers=[euler:10, dpm:5]"],
        ["schedule.prediction=v", "schedule.zero_terminal_snr=true", "train.loss_weighting=min_snr"],
        ["denoiser.arch=dit", "denoiser.block_out_channels=[7]"],  # the UNet's fields are unused by the DiT
    ],
)
def test_cross_field_checks_allow_what_works(overrides):
    config.load(TINY, overrides)


def test_describe_shows_each_fields_constraint():
    text = config.describe()
    assert "Committed checkpoints kept; older ones are deleted only after a newer one is committed. At least 1. |" in text
    assert "(classifier-free guidance). In [0, 1). |" in text
    assert "or a local folder). Must not be empty. |" in text
    assert "Must not be empty. Each entry: at least 1. |" in text
    assert "| `lr` | `0.0002` | AdamW peak learning rate. Greater than 0. |" in text


def test_max_nonfinite_steps_keeps_earlier_fingerprints():
    """max_nonfinite_steps came after checkpoints and latents were keyed by fingerprint(): at its default
    it must not move them. Literals recomputed when train.shuffle_buffer was removed (issue 11; only the
    data/text_encoder/vae key names stored artifacts, and it did not move); max_failures, placement_strategy
    and the io section, added with it, and fid.num_actors, use_gpu, chunk_images (issue 12) are marked
    _ADDED_LATER and leave these literals as they are."""
    cfg = config.load(TINY)
    assert cfg.train.max_nonfinite_steps == cfg.vae_train.max_nonfinite_steps == 10
    assert (cfg.fingerprint(), cfg.fingerprint("train"), cfg.fingerprint("vae_train")) == (
        "dee007f62186", "b945060ef776", "3dc10895ecda")
    assert config.load(os.path.join(ROOT, "configs", "fashion_mnist.yaml")).fingerprint() == "6f5a86dbe92c"
    for override in ("train.max_failures=3", "train.placement_strategy=SPREAD", "io.timeout_s=5", "fid.chunk_images=64"):
        assert config.load(TINY, [override]).fingerprint() != cfg.fingerprint(), override
    changed = config.load(TINY, ["train.max_nonfinite_steps=3"])
    assert changed.fingerprint("train") != cfg.fingerprint("train")
    assert changed.fingerprint("data", "text_encoder", "vae") == cfg.fingerprint("data", "text_encoder", "vae")
