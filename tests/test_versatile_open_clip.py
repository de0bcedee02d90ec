"""Pieces added for the digits run: open_clip context encoders, sharded fp16 diffuser folders, the text latent
scale, the text VAE's collapse guards, and the shipped tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import UserError


REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "ckpt" / "tiny" / "versatile"


@pytest.fixture(scope="module")
def clip():
    import open_clip

    from common.tiny import tiny_open_clip

    return tiny_open_clip(0), open_clip.get_tokenizer("ViT-B-32")


def test_open_clip_text_context_is_projected_tokens_over_the_eot_norm(clip):
    from versatile.context import OpenClipTextContext

    model, tokenizer = clip
    ctx = OpenClipTextContext(model, tokenizer)
    prompts = ["a red handwritten seven", ""]
    tokens = ctx(prompts)
    ids = tokenizer(prompts)
    assert tokens.shape == (2, 77, 64) and ctx.dim == 64
    eot = tokens[torch.arange(2), ids.argmax(-1)]
    pooled = model.encode_text(ids)
    torch.testing.assert_close(eot, pooled / pooled.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)
    # one scalar per sample, not per token: the other tokens are not unit-norm
    assert not torch.allclose(tokens[0, :5].norm(dim=-1), torch.ones(5))


def test_open_clip_image_context_is_all_tokens_over_the_cls_norm(clip):
    from versatile.context import OpenClipImageContext, open_clip_contexts

    model, tokenizer = clip
    ctx = OpenClipImageContext(model)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = ctx(images)
    assert tokens.shape == (2, ctx.num_tokens, 64) == (2, 17, 64)
    pooled = model.encode_image(ctx.preprocess(images))
    torch.testing.assert_close(tokens[:, 0], pooled / pooled.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)
    both = open_clip_contexts(model, tokenizer)
    assert torch.equal(both.null("image", 3, "zeros"), torch.zeros(3, 17, 64))
    assert both.null("image", 2, "black").shape == (2, 17, 64)
    scaled = open_clip_contexts(model, tokenizer, scale=8.0)  # context_scale: one constant on every token
    torch.testing.assert_close(scaled.image(images), 8.0 * tokens)
    torch.testing.assert_close(scaled.null("text", 1), 8.0 * both.null("text", 1))
    assert torch.equal(scaled.null("image", 1, "zeros"), torch.zeros(1, 17, 64))
    with pytest.raises(UserError, match="no plain ViT"):
        OpenClipImageContext(torch.nn.Linear(2, 2))


def test_sharded_fp16_folder_round_trip_and_missing_group(tmp_path):
    from versatile.convert import load_diffuser, save_diffuser
    from versatile.tiny import tiny_diffuser

    model = tiny_diffuser(seed=1, zero_init=False)
    save_diffuser(model, tmp_path / "d", dtype=torch.float16, shard_by_group=True)
    names = sorted(p.name for p in (tmp_path / "d").glob("*.safetensors"))
    assert names == [f"diffuser-{g}.safetensors" for g in sorted(("global", "data_image", "data_text", "ctx_image",
                                                                     "ctx_text"))]
    loaded = load_diffuser(tmp_path / "d")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), name
    (tmp_path / "d" / "diffuser-data_text.safetensors").unlink()
    with pytest.raises(UserError, match="lacks .* data_text .* flows i2t, tv"):
        load_diffuser(tmp_path / "d")


def test_text_latent_scale_is_applied_both_ways():
    import dataclasses

    from versatile.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    vae = pipe.text_vae
    texts = ["a red handwritten seven", "a blue digit two"]
    raw = vae.encode(texts)
    vae.config = dataclasses.replace(vae.config, optimus_scaling_factor=4.0)
    torch.testing.assert_close(pipe.encode_texts(texts), 4.0 * raw)
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert pipe.decode_texts(4.0 * raw, temperature=0) == vae.decode(raw, temperature=0)
    assert pipe.decode_texts(4.0 * raw, generator=g[0]) == vae.decode(raw, generator=g[1])


def test_text_vae_free_bits_and_noise_warmup():
    from versatile.tiny import tiny_text_vae

    vae = tiny_text_vae(seed=0).train()
    texts = ["a red handwritten seven", "the digit 2 written in blue"]
    torch.manual_seed(0)
    full, logs = vae.reconstruction_loss(texts, beta=1.0)
    torch.manual_seed(0)
    freed, logs_freed = vae.reconstruction_loss(texts, beta=1.0, free_bits=1e6)  # every dimension under threshold
    torch.testing.assert_close(freed, logs_freed["recon"])
    torch.testing.assert_close(full, logs["recon"] + logs["kl"])
    vae.eval()  # no dropout: with zero noise the loss is a deterministic autoencoder's
    a, _ = vae.reconstruction_loss(texts, beta=0.0, noise_scale=0.0)
    b, _ = vae.reconstruction_loss(texts, beta=0.0, noise_scale=0.0)
    assert torch.equal(a, b)


def test_shipped_checkpoint_sizes_flows_and_a_sample():
    from versatile.checkpoint import load_pipeline, read_manifest

    assert (SHIPPED / "pipeline" / "versatile.json").is_file(), "ckpt/tiny/versatile is missing (see its README)"
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 5 * 2**20 for p in files)
    assert sum(p.stat().st_size for p in files) < 15 * 2**20
    manifest = read_manifest(SHIPPED / "pipeline")
    assert manifest.trained_flows == ("t2i", "iv", "i2t", "tv")
    assert json.loads((SHIPPED / "text_vae" / "eval.json").read_text())["count"] > 0
    pipe, _ = load_pipeline(SHIPPED / "pipeline")
    out = pipe("t2i", prompt="a red handwritten seven", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)
    texts = pipe("i2t", image=out.images, num_inference_steps=2, text_temperature=0).texts
    assert len(texts) == 1 and isinstance(texts[0], str)
