"""Training objectives: only the dynamic diffusers learn; uni-modal models (and their encoders) train as usual."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from codiff.conditions import MaskEncoder, MaskFormat
from codiff.tiny import tiny_collaboration
from codiff.training import DynamicDiffuserObjective, UniModalObjective, collaborative_loss, noise_batch
from common.errors import UserError
from common.schedule import NoiseSchedule


SCHEDULE = NoiseSchedule.named("scaled_linear", 1000, 0.0015, 0.0195)
DIGITS = MaskFormat.from_config({"classes": "digits", "grid": 16, "image_size": 32})


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_diffusers_get_gradients_and_unimodal_models_stay_bit_identical():
    model = tiny_collaboration(("mask", "text"), seed=0).train()
    unets_before = _snapshot(model.unets)
    diffusers_before = _snapshot(model.diffusers)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    conds = {"mask": torch.randn(4, 2, 32, generator=g), "text": torch.randn(4, 77, 32, generator=g)}
    # Every parameter goes to the optimiser: freezing must come from the model, not from a careful caller.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = collaborative_loss(model, latents, conds, SCHEDULE, generator=g)
    loss.backward()
    assert all(p.grad is None for p in model.unets.parameters())
    assert model.diffusers["mask"].conv_out.weight.grad.abs().sum() > 0
    assert model.diffusers["text"].conv_out.weight.grad.abs().sum() > 0
    assert all(not u.training for u in model.unets.values()) and model.diffusers["mask"].training
    optimizer.step()
    after = model.unets.state_dict()
    assert all(torch.equal(after[k], v) for k, v in unets_before.items())
    changed = [k for k, v in model.diffusers.state_dict().items() if not torch.equal(v, diffusers_before[k])]
    assert any("conv_out" in k for k in changed)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.diffusers.parameters()}


def test_the_loss_is_the_eps_mse_of_the_combined_prediction():
    model = tiny_collaboration(("mask", "text"), seed=1, zero_init=False, logit_scale=0.5)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    conds = {"mask": torch.randn(2, 2, 32, generator=g), "text": torch.randn(2, 77, 32, generator=g)}
    t = torch.tensor([10, 900])
    noise = torch.randn(2, 4, 8, 8, generator=g)
    x_t, _, _ = noise_batch(latents, SCHEDULE, t=t, noise=noise)
    abar = SCHEDULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * latents + (1 - abar).sqrt() * noise)
    expected = ((model.predict(x_t, t, conds).eps - noise) ** 2).mean()
    loss = collaborative_loss(model, latents, conds, SCHEDULE, t=t, noise=noise)
    torch.testing.assert_close(loss, expected)


def test_dynamic_objective_trains_from_raw_batches_and_lowers_the_loss():
    """pixel_values + class-id masks + captions through a frozen VAE and encoders; a few AdamW steps on one batch."""
    from common.tiny import tiny_vae

    torch.manual_seed(0)
    model = tiny_collaboration(("mask", "text"), seed=2).train()
    mask_encoder = MaskEncoder(DIGITS, 32)
    text_tokens = {"a red one": torch.randn(1, 77, 32), "a blue two": torch.randn(1, 77, 32)}
    objective = DynamicDiffuserObjective(
        model, SCHEDULE,
        {"mask": mask_encoder.encode_ids, "text": lambda captions: torch.cat([text_tokens[c] for c in captions])},
        condition_keys={"text": "caption"}, vae=tiny_vae(0), generator=torch.Generator().manual_seed(0),
    )
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 4:28, 12:20] = 1
    masks[1, 8:12, 4:28] = 1
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "mask": masks, "caption": ["a red one", "a blue two"]}
    optimizer = torch.optim.AdamW(objective.trainable_parameters(), lr=3e-3)
    # Fixed t and noise make the loss a deterministic function of the diffusers' weights.
    objective.generator = None
    fixed = {"t": torch.tensor([300, 600]), "noise": torch.randn(2, 4, 8, 8)}
    latents = objective.latents(batch)
    conds = objective.encode(batch)
    losses = []
    for _ in range(8):
        loss = collaborative_loss(model, latents, conds, SCHEDULE, **fixed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.isfinite(objective(batch))
    assert mask_encoder.proj.weight.grad is None  # the encoder is frozen in this stage
    with pytest.raises(UserError, match="no 'caption' entry for the 'text' condition"):
        objective({"latents": latents, "mask": masks})


def test_unimodal_objective_trains_the_mask_unet_and_its_encoder():
    from common.tiny import tiny_unet2d_condition

    unet = tiny_unet2d_condition(3).train()
    encoder = MaskEncoder(DIGITS, 32)
    objective = UniModalObjective(
        unet, encoder, encoder.one_hot, SCHEDULE, "mask", train_encoder=True, cond_dropout=0.5,
        null_input=encoder.null_one_hot, generator=torch.Generator().manual_seed(0),
    )
    assert set(objective.trainable_modules()) == {"unet", "cond_encoder"} and objective.frozen_modules() == {}
    masks = torch.randint(0, 2, (3, 32, 32))
    loss = objective({"latents": torch.randn(3, 4, 8, 8), "mask": masks})
    loss.backward()
    assert encoder.proj.weight.grad.abs().sum() > 0 and unet.conv_out.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="needs the null condition"):
        UniModalObjective(unet, encoder, encoder.one_hot, SCHEDULE, "mask", cond_dropout=0.1)


def test_objectives_call_the_trainers_prepared_modules():
    """With a StepContext the loss runs through ctx.models (DDP wrappers), not the objective's own modules."""
    model = tiny_collaboration(("mask", "text"), seed=4)
    objective = DynamicDiffuserObjective(model, SCHEDULE, {"mask": lambda c: c, "text": lambda c: c})
    assert set(objective.trainable_modules()) == {"dynamic"} and set(objective.frozen_modules()) == {"unets"}

    class Counting(torch.nn.Module):  # stands in for DistributedDataParallel(model.dynamic)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args):
            self.calls += 1
            return self.inner(*args)

    wrapped = Counting(model.dynamic)
    ctx = SimpleNamespace(models={"dynamic": wrapped, "unets": model.unets})
    batch = {"latents": torch.randn(2, 4, 8, 8), "mask": torch.randn(2, 2, 32), "text": torch.randn(2, 77, 32)}
    objective(batch, ctx).backward()
    assert wrapped.calls == 1 and model.diffusers["text"].conv_out.weight.grad.abs().sum() > 0


def test_trained_diffusers_save_and_reload(tmp_path):
    from codiff.dynamic import DynamicDiffusers

    model = tiny_collaboration(("mask", "text"), seed=6, zero_init=False, logit_scale=0.5)
    model.dynamic.save_pretrained(tmp_path / "dynamic")
    loaded = DynamicDiffusers.from_pretrained(tmp_path / "dynamic")
    assert tuple(loaded.nets) == ("mask", "text") and loaded.confidence_input == "x_t"
    saved, reloaded = model.dynamic.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    # Weights read from a file can sit at other memory alignments than freshly allocated ones, and some CPU kernels
    # then take another (equally valid) summation order: copy them into fresh storage before comparing bit for bit.
    for param in loaded.parameters():
        param.data = param.data.clone()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([250])
    conds = {"mask": torch.randn(1, 2, 32), "text": torch.randn(1, 77, 32)}
    assert torch.equal(loaded(x, t, conds), model.dynamic(x, t, conds))
