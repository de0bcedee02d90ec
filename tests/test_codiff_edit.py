"""Imagic per modality (embedding, then UNet), interpolation, and the collaborative edit's branch swap."""

from __future__ import annotations

import pytest
import torch

from codiff.edit import (
    collaborative_edit,
    edit_conditions,
    finetune_unet,
    imagic,
    interpolate_embedding,
    optimize_embedding,
)
from codiff.tiny import tiny_collaboration
from common.errors import UserError
from common.schedule import NoiseSchedule


SCHEDULE = NoiseSchedule.named("scaled_linear", 1000, 0.0015, 0.0195)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def model():
    return tiny_collaboration(("mask", "text"), seed=31, zero_init=False, logit_scale=0.5)


@pytest.fixture(scope="module")
def edits(model):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    targets = {"mask": torch.randn(1, 2, 32, generator=g), "text": torch.randn(1, 77, 32, generator=g)}
    return {
        name: imagic(model.unets[name], latents, targets[name], SCHEDULE, stage1_steps=3, stage1_lr=1e-2,
                     stage2_steps=2, stage2_lr=1e-3, generator=torch.Generator().manual_seed(1))
        for name in ("mask", "text")
    }


def test_stage_a_changes_only_the_embedding(model):
    unet = model.unets["text"]
    before = _state(unet)
    g = torch.Generator().manual_seed(2)
    latents, e_tgt = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    e_opt, losses = optimize_embedding(unet, latents, e_tgt, SCHEDULE, steps=3, lr=1e-2, generator=g)
    assert len(losses) == 3 and e_opt.shape == e_tgt.shape
    assert not torch.allclose(e_opt, e_tgt)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in unet.parameters())  # frozen flags restored


def test_stage_b_changes_only_a_copy_of_the_unet(model):
    unet = model.unets["mask"]
    before = _state(unet)
    g = torch.Generator().manual_seed(3)
    latents, e_opt = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 2, 32, generator=g)
    e_copy = e_opt.clone()
    tuned, _ = finetune_unet(unet, latents, e_opt, SCHEDULE, steps=2, lr=1e-3, generator=g)
    assert tuned is not unet and not tuned.training
    assert torch.equal(e_opt, e_copy)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in tuned.state_dict().items())


def test_interpolation_endpoints_are_exact(edits):
    r = edits["text"]
    assert torch.equal(interpolate_embedding(r.e_tgt, r.e_opt, 0.0), r.e_opt)
    assert torch.equal(interpolate_embedding(r.e_tgt, r.e_opt, 1.0), r.e_tgt)
    torch.testing.assert_close(interpolate_embedding(r.e_tgt, r.e_opt, 1.5), 1.5 * r.e_tgt - 0.5 * r.e_opt)
    with pytest.raises(UserError, match="differ in shape"):
        interpolate_embedding(r.e_tgt, edits["mask"].e_opt, 0.5)


def test_collaborative_edit_puts_the_tuned_unets_in_their_branches(model, edits):
    edited = collaborative_edit(model, edits)
    for name in ("mask", "text"):
        assert edited.unets[name] is edits[name].unet
        assert edited.diffusers[name] is model.diffusers[name]  # the dynamic diffusers are not re-trained
    assert model.unets["text"] is not edits["text"].unet  # the original collaboration is untouched
    only_text = collaborative_edit(model, {"text": edits["text"]})
    assert only_text.unets["mask"] is model.unets["mask"] and only_text.unets["text"] is edits["text"].unet
    conds = edit_conditions(edits, 0.5)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    out = edited.predict(x, t, conds)
    assert out.eps.shape == x.shape and torch.isfinite(out.eps).all()
    with pytest.raises(UserError, match="'sketch' condition was given"):
        collaborative_edit(model, {"sketch": edits["text"]})
