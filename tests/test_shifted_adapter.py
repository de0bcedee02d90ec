"""SD conditioned on CLIP image embeddings: projection to 4 tokens, CFG drop without aliasing."""

import pytest
import torch

from common.errors import UserError
from common.tiny import tiny_unet2d_condition
from shifted.projection import ImageEmbProjection, image_embedding_denoiser


D = 24


def projection(learned_null=False, seed=0):
    torch.manual_seed(seed)
    return ImageEmbProjection(in_dim=D, n_tokens=4, cross_attention_dim=32, learned_null=learned_null)


def test_projection_makes_four_cross_attention_tokens():
    proj = projection()
    emb = torch.randn(3, D)
    tokens = proj(emb)
    assert tokens.shape == (3, 4, 32)
    expected = (emb @ proj.proj.weight.T + proj.proj.bias).view(3, 4, 32)
    assert torch.allclose(tokens, expected, atol=1e-6)
    assert torch.equal(proj(emb[:, None]), tokens)  # the reference's [B, 1, D] layout is accepted
    with pytest.raises(UserError, match=r"\[B, 24\]") as err:
        proj(torch.randn(3, 1536))
    assert "\n" not in str(err.value)


def test_cfg_drop_replaces_exactly_the_masked_rows_and_aliases_nothing():
    """The reference wrote the null into the batch in place. Here inputs, null and output are
    separate storage, and each dropped row is its own copy."""
    proj = projection()
    null = torch.randn(D)
    proj.set_null_embedding(null)
    null.add_(100.0)  # set_null_embedding copied it: later edits of the source do not leak in
    assert not torch.allclose(proj.null_embedding, null)
    emb = torch.randn(4, D)
    before = emb.clone()
    mask = torch.tensor([True, False, True, False])
    out = proj.drop(emb, mask)
    assert torch.equal(emb, before)  # the caller's batch is untouched
    assert torch.equal(out[1], emb[1]) and torch.equal(out[3], emb[3])
    assert torch.equal(out[0], proj.null_embedding) and torch.equal(out[2], proj.null_embedding)
    storages = {t.untyped_storage().data_ptr() for t in (out, emb, proj.null_embedding)}
    assert len(storages) == 3
    out[0] += 1.0  # writing into one dropped row touches neither the other dropped row nor the null
    assert torch.equal(out[2], proj.null_embedding) and not torch.equal(out[0], proj.null_embedding)
    assert torch.equal(emb, before)


def test_learned_null_gets_gradients_only_through_dropped_rows():
    proj = projection(learned_null=True)
    assert isinstance(proj.null_embedding, torch.nn.Parameter)
    emb = torch.randn(3, D, requires_grad=True)
    proj.drop(emb, torch.tensor([False, True, False])).pow(2).sum().backward()
    assert torch.allclose(proj.null_embedding.grad, 2 * proj.null_embedding.detach())  # one dropped row
    assert torch.equal(emb.grad[1], torch.zeros(D)) and bool((emb.grad[0] != 0).any())
    all_dropped = proj.training_tokens(torch.randn(5, D), drop_prob=1.0)
    assert torch.allclose(all_dropped, proj(proj.null_batch(5)), atol=1e-6)
    none_dropped_input = torch.randn(5, D)
    assert torch.equal(proj.training_tokens(none_dropped_input, drop_prob=0.0), proj(none_dropped_input))


def test_sd_denoiser_guides_with_the_null_and_never_doubles_at_scale_one(tmp_path):
    unet = tiny_unet2d_condition()
    proj = projection()
    proj.set_null_embedding(torch.randn(D))
    batches = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(args[0].shape[0]), with_kwargs=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    emb = torch.randn(2, D)
    with torch.no_grad():
        cond = image_embedding_denoiser(unet, proj, emb, guidance_scale=1.0)(x, t)
        assert batches == [2]  # scale 1: one conditional forward
        for scale in (0.5, 2.0):  # <= 1 works too (the reference crashed there)
            out = image_embedding_denoiser(unet, proj, emb, guidance_scale=scale)(x, t)
            assert batches[-1] == 4 and out.shape == x.shape
        uncond = unet(x, t, encoder_hidden_states=proj(proj.null_batch(2))).sample
        assert torch.allclose(out, uncond + 2.0 * (cond - uncond), atol=1e-5)
        neg = torch.randn(1, D)  # one negative broadcast to the batch
        with_neg = image_embedding_denoiser(unet, proj, emb, guidance_scale=2.0, negative_emb=neg)(x, t)
        assert not torch.allclose(with_neg, out, atol=1e-5)
    with pytest.raises(UserError, match="pass 1 or 2"):
        image_embedding_denoiser(unet, proj, emb, negative_emb=torch.randn(3, D))
    # fine-tuning path: gradients reach the projection through the UNet's cross-attention
    unet.train()
    loss = unet(x, t, encoder_hidden_states=proj.training_tokens(emb, drop_prob=0.5)).sample.pow(2).mean()
    loss.backward()
    assert proj.proj.weight.grad is not None and bool((proj.proj.weight.grad != 0).any())
    # the projection (with its fixed null) saves and loads like any diffusers model
    proj.save_pretrained(tmp_path / "projection")
    loaded = ImageEmbProjection.from_pretrained(tmp_path / "projection")
    assert torch.equal(loaded.null_embedding, proj.null_embedding) and torch.equal(loaded(emb), proj(emb))
