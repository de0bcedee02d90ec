"""Versatile Diffusion's context encoders, Optimus text VAE and config files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from versatile.config import TextVAEConfig, VersatileConfig
from versatile.context import ContextEncoders
from versatile.text_vae import build_text_vae, merge_adjacent_duplicates, word_tokenizer
from versatile.tiny import tiny_config, tiny_contexts, tiny_text_vae


@pytest.fixture(scope="module")
def contexts() -> ContextEncoders:
    return tiny_contexts(seed=0)


@pytest.fixture(scope="module")
def text_vae():
    return tiny_text_vae(seed=0)


# ------------------------------------------------------------------------------------------------ CLIP contexts


def test_text_context_is_projection_over_eos_norm(contexts):
    prompts = ["a red handwritten seven", "a blue one"]
    c = contexts.text(prompts)
    assert c.shape == (2, 77, 32)
    model, tok = contexts.text.model, contexts.text.tokenizer
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = (ids == tok.eos_token_id).int().argmax(-1)  # first EOS: where CLIP pools
    eos_tokens = c[torch.arange(2), eos]
    torch.testing.assert_close(eos_tokens.norm(dim=-1), torch.ones(2))  # the EOS token is unit-norm ...
    with torch.no_grad():
        out = model(input_ids=ids)
        raw = model.text_projection(out.last_hidden_state)
    ratio = raw / c  # ... because every token was divided by the SAME scalar, the pooled projection's norm
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ratio[:, 0, 0], out.text_embeds.norm(dim=-1))
    assert not torch.allclose(c[:, 1].norm(dim=-1), torch.ones(2))  # not a per-token normalisation


def test_image_context_cls_is_unit_norm_and_inputs_agree(contexts):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8)
    as_tensor = contexts.image(pixels.permute(0, 3, 1, 2).float() / 255)
    as_pil = contexts.image([Image.fromarray(p.numpy()) for p in pixels])
    assert as_tensor.shape == (2, 17, 32)  # CLS + 16 patches
    torch.testing.assert_close(as_tensor[:, 0].norm(dim=-1), torch.ones(2))
    # float [0, 1] tensors and uint8 PIL images are the same pixels: no second rescale
    torch.testing.assert_close(as_tensor, as_pil)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        contexts.image(torch.full((1, 3, 32, 32), -1.0))


def test_image_preprocess_resizes_short_side_and_centre_crops(contexts):
    wide = torch.zeros(1, 3, 32, 64)
    wide[..., 16:48] = 1.0  # white centre band as wide as the crop
    pixels = contexts.image.preprocess(wide)
    assert pixels.shape == (1, 3, 32, 32)
    white = (1 - contexts.image.mean) / contexts.image.std
    torch.testing.assert_close(pixels[..., 8:24], white.expand(1, 3, 32, 16), atol=1e-3, rtol=0)


def test_null_contexts(contexts):
    zeros = contexts.null("image", 3, "zeros")
    assert zeros.shape == (3, 17, 32) and torch.count_nonzero(zeros) == 0
    grey, black = contexts.null("image", 1, "grey"), contexts.null("image", 1, "black")
    assert grey.shape == black.shape == (1, 17, 32) and not torch.allclose(grey, black)
    torch.testing.assert_close(black, contexts.image(torch.zeros(1, 3, 32, 32)))
    torch.testing.assert_close(contexts.null("text", 2), contexts.text(["", ""]))
    with pytest.raises(UserError, match="zeros, grey, black"):
        contexts.null("image", 1, "white")


# ------------------------------------------------------------------------------------------------ Optimus


def test_word_tokenizer_falls_back_to_characters():
    tok = word_tokenizer(["red", "seven"])
    ids = tok("A RED sevens!").input_ids
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "seven", "##s", "!", "[SEP]"]
    assert tok.decode(ids, skip_special_tokens=True) == "a red sevens!"


def test_encode_is_posterior_mean_of_lowercased_text(text_vae):
    z = text_vae.encode(["a red handwritten seven", "three"])
    assert z.shape == (2, tiny_config().diffuser.text_latent_dim)
    torch.testing.assert_close(text_vae.encode(["A RED Handwritten SEVEN"])[0], z[0])  # [R] lower-cases first
    mu, logvar = text_vae.posterior(["three"])
    torch.testing.assert_close(mu[0], z[1])
    assert not torch.equal(mu, logvar)
    long = " ".join(["seven"] * 100)
    ids, _ = text_vae.tokenize([long])
    assert ids.shape[1] == text_vae.config.optimus_max_length + 2  # truncated to 24 wordpieces + [CLS] [SEP]


def test_decode_is_batched_deterministic_and_uses_the_latent(text_vae):
    z = torch.randn(3, text_vae.latent_dim, generator=torch.Generator().manual_seed(1))
    a = text_vae.decode(z, generator=torch.Generator().manual_seed(7))
    b = text_vae.decode(z, generator=torch.Generator().manual_seed(7))
    assert a == b and len(a) == 3 and all(isinstance(s, str) for s in a)
    # max_length counts <BOS> and <EOS>: at 2 the limit forces EOS right after BOS, as [R] does at 30
    assert text_vae.decode(z, generator=torch.Generator().manual_seed(7), max_length=2) == ["", "", ""]
    ids, mask = text_vae.decoder_inputs(["a red seven"])
    with torch.no_grad():
        base = text_vae.logits(z[:1], ids, mask)
        moved = text_vae.logits(z[:1] + 1.0, ids, mask)
        memory_only = text_vae.logits(z[:1], ids, mask, cache=text_vae.memory(z[:1] + 1.0))
    assert not torch.allclose(base, moved)  # the latent is injected ...
    assert not torch.allclose(base, memory_only)  # ... through the memory slot as well as the embeddings


def test_incremental_decoding_matches_teacher_forcing(text_vae):
    """The 1-slot memory cache and position offsets are right: step-by-step logits = one teacher-forced pass."""
    z = torch.randn(2, text_vae.latent_dim, generator=torch.Generator().manual_seed(2))
    ids, _ = text_vae.decoder_inputs(["a red seven x", "two blue ones"])
    ids = ids[:, :5]
    with torch.no_grad():
        full = text_vae.logits(z, ids)
        cache, steps = text_vae.memory(z), []
        for i in range(ids.shape[1]):
            steps.append(text_vae.logits(z, ids[:, i : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_reconstruction_loss_trains_every_part():
    vae = tiny_text_vae(seed=3).train()
    loss, logs = vae.reconstruction_loss(["a red seven", "a green handwritten three"], beta=0.5,
                                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and logs["kl"] >= 0
    loss.backward()
    for module in (vae.encoder, vae.encoder_head, vae.decoder, vae.latent_to_memory, vae.latent_to_embedding):
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


def test_paper_text_vae_sizes_on_meta():
    cfg = VersatileConfig.load("paper")
    vae = build_text_vae(cfg.text_vae, cfg.diffuser.text_latent_dim, tokenizers=(None, None), device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(vae.encoder) == 108_310_272  # BERT-base-cased with pooler
    assert count(vae.encoder_head) == 768 * 1536
    assert count(vae.decoder) == 124_439_808 + 3 * 768  # GPT-2 (tied head) + <PAD> <BOS> <EOS>
    assert count(vae.latent_to_memory) == 768 * 768 * 12 and count(vae.latent_to_embedding) == 768 * 768


def test_merge_adjacent_duplicates():
    assert merge_adjacent_duplicates("a a red red red seven a") == "a red seven a"


# ------------------------------------------------------------------------------------------------ config


def test_configs_load_and_reject_unknown_keys(tmp_path):
    tiny = VersatileConfig.load("tiny")
    assert tiny.diffuser.model_channels == 32 and dict(tiny.extra)["learning_rate"] == 1e-4
    again = VersatileConfig.from_mapping(tiny.to_mapping(), passthrough=("learning_rate",))
    assert again == tiny
    parsed = VersatileConfig.from_mapping({"group_lr_scale": "global=0.1,data_image=0.2"})
    assert dict(parsed.training.group_lr_scale) == {"global": 0.1, "data_image": 0.2}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_channels: 32\nmodel_chanels: 64\n")
    with pytest.raises(UserError, match="unknown key 'model_chanels'"):
        VersatileConfig.load(bad)
    with pytest.raises(UserError, match="unknown flow"):
        VersatileConfig.from_mapping({"flows": "t2i,x2y"})
    with pytest.raises(UserError, match="text_ratio"):
        VersatileConfig.from_mapping({"text_ratio": 1.5})
    with pytest.raises(UserError, match="uncond_image"):
        VersatileConfig.from_mapping({"uncond_image": "white"})
    assert dataclasses.replace(TextVAEConfig(), optimus_heads=5).optimus_heads == 5
    with pytest.raises(UserError):
        dataclasses.replace(TextVAEConfig(), optimus_heads=5).validate()


def test_image_list_inputs_must_share_size(contexts):
    images = [Image.fromarray(np.zeros((32, 32, 3), np.uint8)), Image.fromarray(np.zeros((16, 32, 3), np.uint8))]
    with pytest.raises(UserError, match="share a size"):
        contexts.image(images)


def test_text_vae_save_and_load_round_trip(tmp_path, text_vae):
    from versatile.text_vae import load_text_vae, save_text_vae

    save_text_vae(text_vae, tmp_path / "text_vae")
    loaded = load_text_vae(tmp_path / "text_vae")
    texts = ["a red handwritten seven", "zebra"]  # "zebra" is not in the word list: character fallback
    torch.testing.assert_close(loaded.encode(texts), text_vae.encode(texts), rtol=0, atol=0)
    z = torch.randn(2, text_vae.latent_dim, generator=torch.Generator().manual_seed(4))
    assert loaded.decode(z, temperature=0) == text_vae.decode(z, temperature=0)
    with pytest.raises(UserError, match="no text_vae_config.json"):
        load_text_vae(tmp_path)
