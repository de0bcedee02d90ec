"""ContextDiff's training objective: stage 1 (adapter), stage 2 (UNet with the adapter used).

The detach regression: the released T2I code built x_t with ``q_sample(...).detach()`` and regressed x0, so the
shift layer never received a gradient. Here the adapter learns THROUGH the denoiser's input x_t.
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from common.schedule import NoiseSchedule
from common.tiny import sd_ddim_scheduler, tiny_unet2d_condition
from contextdiff.adapter import load_adapter, tiny_adapter
from contextdiff.process import (
    ContextLossConfig,
    add_contextdiff_args,
    contextual_k,
    contextual_loss,
    trainable_modules,
)


SCHED_CONFIG = dict(sd_ddim_scheduler().config)
SCHED = NoiseSchedule.from_config(SCHED_CONFIG)


@pytest.fixture(scope="module")
def base_unet():
    return tiny_unet2d_condition(seed=0)


@pytest.fixture
def unet(base_unet):
    return copy.deepcopy(base_unet)


def _batch(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(b, 77, 32, generator=g)}


T = torch.tensor([120, 700])
NOISE = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_zero_adapter_loss_is_the_vanilla_diffusers_loss(unet):
    """With r == 0 (zero-init adapter) the loss is diffusers' eps loss for the same (t, eps), bit for bit;
    the x0 parameterisation likewise regresses x0 from the plain x_t."""
    from diffusers import DDPMScheduler

    batch, adapter = _batch(), tiny_adapter()
    x_t = DDPMScheduler.from_config(SCHED_CONFIG).add_noise(batch["latents"], NOISE, T)
    with torch.no_grad():
        out = unet(x_t, T, encoder_hidden_states=batch["encoder_hidden_states"]).sample
        ours = contextual_loss(batch, unet, adapter, SCHED, timesteps=T, noise=NOISE).loss
        ours_x0 = contextual_loss(batch, unet, adapter, SCHED, ContextLossConfig(parameterization="x0"),
                                  timesteps=T, noise=NOISE).loss
    assert torch.equal(ours, F.mse_loss(out, NOISE))
    assert torch.equal(ours_x0, F.mse_loss(out, batch["latents"]))


def test_frozen_unet_adapter_gets_gradients_through_xt(unet):
    """The detach-bug regression: x0 parameterisation, UNet frozen, so the ONLY path from r to the loss
    is x_t -> UNet -> x0_hat. Every adapter parameter must get a nonzero gradient: an implementation that detaches
    x_t gives none and fails here."""
    adapter = tiny_adapter(seed=1, head_std=0.05)
    config = ContextLossConfig(parameterization="x0", freeze_unet=True)
    trainable, frozen = trainable_modules(config, unet, adapter)
    assert list(trainable) == ["adapter"] and list(frozen) == ["unet"]
    assert not any(p.requires_grad for p in unet.parameters())
    contextual_loss(_batch(), unet, adapter, SCHED, config, timesteps=T, noise=NOISE).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in unet.parameters())  # frozen: a path for gradients, no weight update


def test_detach_xt_reproduces_the_released_bug(unet):
    """--detach_xt (released behaviour) with the x0 target: the UNet still learns, the adapter gets no gradient at
    all; with the UNet frozen as well nothing could train, which is refused up front (one-line UserError)."""
    adapter = tiny_adapter(seed=1, head_std=0.05)
    config = ContextLossConfig(parameterization="x0", detach_xt=True)
    trainable_modules(config, unet, adapter)
    contextual_loss(_batch(), unet, adapter, SCHED, config, timesteps=T, noise=NOISE).loss.backward()
    assert all(p.grad is None for p in adapter.parameters())
    assert any(p.grad is not None and p.grad.any() for p in unet.parameters())
    with pytest.raises(UserError, match="detach_xt"):
        ContextLossConfig(parameterization="x0", detach_xt=True, freeze_unet=True)


def test_shifted_eps_xt_path_adds_to_the_target_path(unet):
    """With the shifted-eps target, r also reaches the loss through the target (the video code's route); the x_t
    path is a separate, nonzero part of the adapter's gradient, which --detach_xt removes."""
    adapter = tiny_adapter(seed=1, head_std=0.05)
    unet.requires_grad_(False)
    flat = {}
    for detach in (False, True):
        adapter.zero_grad(set_to_none=True)
        config = ContextLossConfig(freeze_unet=True, detach_xt=detach)
        contextual_loss(_batch(), unet, adapter, SCHED, config, timesteps=T, noise=NOISE).loss.backward()
        flat[detach] = torch.cat([g.flatten() for g in _grads(adapter)])
    assert flat[True].abs().sum() > 0  # the target path alone
    assert (flat[False] - flat[True]).norm() > 1e-2 * flat[False].norm()


def test_adapter_trains_off_zero_init_and_reads_image_and_text(unet):
    """r == 0 at init; the first step reaches only the zero-init head; after a few Adam steps every
    parameter has a nonzero gradient and r changes when the image alone or the text alone changes (the released
    video adapter ignored its visual input)."""
    adapter = tiny_adapter(seed=2).train()
    config = ContextLossConfig(freeze_unet=True)
    trainable_modules(config, unet, adapter)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    batch = _batch(1, b=4)
    with torch.no_grad():
        assert not adapter(batch["latents"], batch["encoder_hidden_states"]).any()
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        contextual_loss(batch, unet, adapter, SCHED, config, generator=gen).loss.backward()
        nonzero = {name: p.grad is not None and bool(p.grad.any()) for name, p in adapter.named_parameters()}
        if step == 0:
            assert {name for name, ok in nonzero.items() if ok} == {"proj_out.weight", "proj_out.bias"}
        opt.step()
    assert all(nonzero.values()), [name for name, ok in nonzero.items() if not ok]
    adapter.eval()
    x, c = batch["latents"], batch["encoder_hidden_states"]
    with torch.no_grad():
        r = adapter(x, c)
        r_other_image = adapter(x.flip(0), c)
        r_other_text = adapter(x, c.flip(0))
    assert r.abs().mean() > 1e-3
    assert (r - r_other_image).abs().max() > 1e-3 * r.abs().max()
    assert (r - r_other_text).abs().max() > 1e-3 * r.abs().max()


def test_stage2_uses_the_loaded_adapter_and_trains_only_the_unet(unet, tmp_path):
    """Stage 2 (the released stage 2 ignored the adapter): the adapter saved by stage 1 is loaded, it
    defines x_t and the target (loss = the hand-written formula with its r), it gets no gradient, the UNet does."""
    trained = tiny_adapter(seed=4, head_std=0.1)
    trained.save_pretrained(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter", latent_channels=4, text_dims=[32])
    config = ContextLossConfig(stage=2)
    trainable, frozen = trainable_modules(config, unet, adapter)
    assert list(trainable) == ["unet"] and list(frozen) == ["adapter"]
    batch = _batch()
    loss = contextual_loss(batch, unet, adapter, SCHED, config, timesteps=T, noise=NOISE).loss
    loss.backward()
    assert all(p.grad is None for p in adapter.parameters())
    assert any(p.grad is not None and p.grad.any() for p in unet.parameters())

    x0, c = batch["latents"], batch["encoder_hidden_states"]
    with torch.no_grad():
        r = trained(x0, c)
        abar = SCHED.abar(T, like=x0)
        k = contextual_k("quadratic")(abar)
        x_t = abar.sqrt() * x0 + k * r + (1 - abar).sqrt() * NOISE
        target = NOISE + k * r / (1 - abar).sqrt()
        by_hand = F.mse_loss(unet(x_t, T, encoder_hidden_states=c).sample, target)
        plain = contextual_loss(batch, unet, tiny_adapter(), SCHED, config, timesteps=T, noise=NOISE).loss
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-6)
    assert (loss.detach() - plain).abs() > 1e-3  # the adapter changes the objective


def test_missing_adapter_in_stage2_is_a_one_line_user_error(unet, tmp_path):
    for call in (
        lambda: contextual_loss(_batch(), unet, None, SCHED, ContextLossConfig(stage=2)),
        lambda: trainable_modules(ContextLossConfig(stage=2), unet, None),
        lambda: load_adapter(tmp_path / "no-such-adapter", latent_channels=4),
    ):
        with pytest.raises(UserError) as err:
            call()
        assert "adapter" in str(err.value) and "\n" not in str(err.value)


def test_lambda_r_adds_the_elbo_r_term(unet):
    """lambda_r |(k_{t-1} - c2_t k_t)(r_phi(x0) - r_phi(x0_hat))|^2, x0_hat from the shifted-eps output.
    The coefficient is O(beta_t) (~1e-3), so the term is tiny next to the MSE: float64 to see it exactly."""
    unet.double()
    adapter = tiny_adapter(seed=5, head_std=0.1).double()
    batch = {key: value.double() for key, value in _batch().items()}
    noise = NOISE.double()
    base = contextual_loss(batch, unet, adapter, SCHED, ContextLossConfig(), timesteps=T, noise=noise)
    with_r = contextual_loss(batch, unet, adapter, SCHED, ContextLossConfig(lambda_r=0.5), timesteps=T, noise=noise)
    x0, c = batch["latents"], batch["encoder_hidden_states"]
    k = contextual_k("quadratic")
    with torch.no_grad():
        r = adapter(x0, c)
        abar = SCHED.abar(T, like=x0)
        x_t = abar.sqrt() * x0 + k(abar) * r + (1 - abar).sqrt() * noise
        g = unet(x_t, T, encoder_hidden_states=c).sample
        r_hat = adapter((x_t - (1 - abar).sqrt() * g) / abar.sqrt(), c)
        coef = []
        for t in T.tolist():
            a, ap = float(SCHED.alphas_cumprod[t]), float(SCHED.alphas_cumprod[t - 1])
            coef.append(k(ap) - math.sqrt(a / ap) * (1 - ap) / (1 - a) * k(a))
        coef = torch.tensor(coef, dtype=x0.dtype).view(-1, 1, 1, 1)
        term = ((coef * (r - r_hat)) ** 2).mean()
    assert term > 0
    torch.testing.assert_close(with_r.loss.detach() - base.loss.detach(), 0.5 * term, rtol=1e-6, atol=0)
    assert float(with_r.logs["r_term"]) == pytest.approx(float(term), rel=1e-6)


def test_cfg_dropout_replaces_only_the_unet_text(unet):
    """Dropped rows see the null text in the UNet; the process keeps the caption's r (both CFG branches share x_t at
    sampling). Without null text the flag is a one-line UserError."""
    adapter, batch = tiny_adapter(seed=6, head_std=0.1), _batch()
    null = torch.zeros(1, 77, 32)
    with pytest.raises(UserError, match="null"):
        contextual_loss(batch, unet, adapter, SCHED, ContextLossConfig(cfg_drop_prob=0.5), timesteps=T, noise=NOISE)
    with torch.no_grad():
        dropped = contextual_loss(batch, unet, adapter, SCHED, ContextLossConfig(cfg_drop_prob=0.999999),
                                  null_text=null, timesteps=T, noise=NOISE, generator=torch.Generator().manual_seed(0))
        by_hand_batch = {**batch, "encoder_hidden_states": null.expand(2, -1, -1),
                         "adapter_text": batch["encoder_hidden_states"]}
        by_hand = contextual_loss(by_hand_batch, unet, adapter, SCHED, timesteps=T, noise=NOISE)
    assert torch.equal(dropped.loss, by_hand.loss)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"k_schedule": "cubic"}, "k_t schedule"),
        ({"parameterization": "v"}, "parameterization"),
        ({"stage": 3}, "stage"),
        ({"stage": 2, "freeze_unet": True}, "freeze_unet"),
        ({"cfg_drop_prob": 1.0}, "cfg_drop_prob"),
    ],
)
def test_bad_flags_are_one_line_user_errors(kwargs, needle):
    with pytest.raises(UserError) as err:
        ContextLossConfig(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_flags_round_trip_into_the_config():
    parser = argparse.ArgumentParser()
    add_contextdiff_args(parser, stage=1)
    args = parser.parse_args(["--freeze_unet", "--detach_xt", "--k_schedule", "prior", "--lambda_r", "2"])
    config = ContextLossConfig.from_args(args)
    assert config == ContextLossConfig(stage=1, parameterization="shifted_eps", k_schedule="prior", freeze_unet=True,
                                       detach_xt=True, cfg_drop_prob=0.1, lambda_r=2.0)
    with pytest.raises(UserError, match="cubic"):
        ContextLossConfig.from_args(parser.parse_args(["--k_schedule", "cubic"]))
    parser2 = argparse.ArgumentParser()
    add_contextdiff_args(parser2, stage=2)
    assert ContextLossConfig.from_args(parser2.parse_args([])).stage == 2
