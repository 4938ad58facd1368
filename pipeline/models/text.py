"""The frozen T5 text encoder: a pretrained one by name/path, or a seeded tiny untrained one.

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
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, captions: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden state [B, L, D] (padding positions zeroed) and attention mask [B, L] (int64)."""
        tok = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tok["input_ids"].to(device)
        mask = tok["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask


def build_text_encoder(cfg, seed: int, device: str | torch.device = "cpu") -> TextEncoder:
    """cfg: a TextEncoderSection."""
    from transformers import T5EncoderModel

    if cfg.pretrained:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
        model = T5EncoderModel.from_pretrained(cfg.pretrained)
        identity = {"name": cfg.pretrained, "trained": True}
        log.info("text encoder: pretrained %s", cfg.pretrained)
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
