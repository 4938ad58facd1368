"""Config loading: named configs validate, overrides apply, bad keys/values name what is allowed."""

import glob
import os

import pytest

from pipeline import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        (["train.steps=0"], ["train.steps", "> 0"]),
        (["train.num_workers=3"], ["train.batch_size", "train.num_workers"]),
        (["data.source=imagenet"], ["data.source", "emoji", "fashion_mnist", "shards"]),
        (["data.source=shards"], ["data.input_uri"]),
        (["data.source=fashion_mnist", "data.emoji_renders=5"], ["data.emoji_renders", "emoji", "fashion_mnist"]),
        (["data.emoji_renders=0"], ["data.emoji_renders", "> 0"]),
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
    assert base.latents_uri() == more_steps.latents_uri()
    assert base.latents_uri() != other_vae.latents_uri()


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
