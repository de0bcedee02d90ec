"""ContextDiff generation and inversion on the core samplers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from common.denoisers import guided_unet
from common.errors import UserError
from common.pipeline import LatentTextToImage, encode_clip
from common.samplers import randn, sample_ddim, sample_ddpm
from common.schedule import NoiseSchedule, plan_like_diffusers
from common.tiny import clip_tokenizer, sd_ddim_scheduler, tiny_clip_text, tiny_unet2d_condition, tiny_vae
from contextdiff.adapter import load_adapter, tiny_adapter
from contextdiff.pipeline import generate, invert
from contextdiff.process import as_x0_denoiser


SCHED_CONFIG = dict(sd_ddim_scheduler().config)
SCHED = NoiseSchedule.from_config(SCHED_CONFIG)
PROMPTS = ["a red handwritten seven", "a blue handwritten one"]


@pytest.fixture(scope="module")
def parts():
    return dict(unet=tiny_unet2d_condition(0), vae=tiny_vae(1), text_encoder=tiny_clip_text(2),
                tokenizer=clip_tokenizer())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _generate(parts, adapter, **kwargs):
    args = dict(steps=6, guidance_scale=3.0, scheduler_config=SCHED_CONFIG, generator=_gen())
    args.update(kwargs)
    return generate(parts["unet"], adapter, parts["vae"], parts["text_encoder"], parts["tokenizer"], PROMPTS, **args)


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_zero_adapter_is_the_plain_core_sampler_bit_for_bit(parts, sampler, eta):
    """With r == 0 the contextualized sampler (CFG, shift hook, shifted-eps wrapper) is the core's
    plain sampler bit for bit; and it matches the core's SD pipeline (eps read directly) to float32 rounding of the
    exact shifted-eps -> x0 -> eps round trip."""
    ours = _generate(parts, tiny_adapter(), sampler=sampler, eta=eta).latents

    unet, te, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    cond, uncond = encode_clip(te, tok, PROMPTS), encode_clip(te, tok, [""] * 2)
    denoiser = as_x0_denoiser(guided_unet(unet, cond, uncond, 3.0, "eps"), "shifted_eps", SCHED)
    plan = plan_like_diffusers(SCHED, SCHED_CONFIG, 6, sampler)
    run = dict(generator=_gen(), progress=False)
    if sampler == "ddim":
        plain = sample_ddim(denoiser, SCHED, plan, ours.shape, eta=eta, **run)
    else:
        plain = sample_ddpm(denoiser, SCHED, plan, ours.shape, **run)
    assert torch.equal(ours, plain)

    base = LatentTextToImage(unet, parts["vae"], te, tok, SCHED_CONFIG)(
        PROMPTS, num_inference_steps=6, guidance_scale=3.0, sampler=sampler, eta=eta, generator=_gen(), progress=False)
    torch.testing.assert_close(ours, base.latents, rtol=0, atol=1e-4)


def test_cfg_then_one_shift_on_the_guided_x0(parts):
    """Per step the adapter runs ONCE, on a batch of B (not 2B), on the guided x0_hat, with the
    conditional text. Checked at the first step against the guided x0 computed by hand."""
    adapter = tiny_adapter(seed=1, head_std=0.1)
    calls = []

    def record(module, args, out):  # args = (x0_hat, [clip states], masks)
        calls.append((args[0].clone(), args[1][0].clone()))

    handle = adapter.register_forward_hook(record)
    try:
        _generate(parts, adapter, steps=4)
    finally:
        handle.remove()
    assert len(calls) == 4 and all(x0.shape[0] == len(PROMPTS) for x0, _ in calls)

    unet, te, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    cond, uncond = encode_clip(te, tok, PROMPTS), encode_clip(te, tok, [""] * 2)
    assert torch.equal(calls[0][1], cond)
    plan = plan_like_diffusers(SCHED, SCHED_CONFIG, 4, "ddim")
    t0 = plan.timesteps[0]
    x_T = randn((2, 4, 8, 8), _gen())
    t = torch.full((2,), t0)
    with torch.no_grad():
        g_u = unet(x_T, t, encoder_hidden_states=uncond).sample
        g_c = unet(x_T, t, encoder_hidden_states=cond).sample
    g = g_u + 3.0 * (g_c - g_u)
    a = float(SCHED.alphas_cumprod[t0])
    torch.testing.assert_close(calls[0][0], (x_T - (1 - a) ** 0.5 * g) / a**0.5, rtol=1e-4, atol=1e-4)


def test_inversion_round_trip_with_the_shift(parts):
    """Contextualized DDIM inversion then DDIM sampling (same prompts, steps, shift) returns the
    latents; inverting without the shift (the released video code) and sampling with it does not."""
    unet = copy.deepcopy(parts["unet"])
    with torch.no_grad():  # a calmer random UNet, so 5 fixed-point iterations solve the implicit inversion step
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    adapter = tiny_adapter(seed=2, head_std=0.1)
    x0 = torch.randn(2, 4, 8, 8, generator=_gen(3))
    run = dict(steps=10, scheduler_config=SCHED_CONFIG, latents=x0, fixed_point_iters=5)
    args = (unet, adapter, parts["vae"], parts["text_encoder"], parts["tokenizer"], PROMPTS)
    x_T = invert(*args, **run).latents
    x_T_plain = invert(*args, no_shift=True, **run).latents
    p = {**parts, "unet": unet}
    back = _generate(p, adapter, steps=10, guidance_scale=1.0, latents=x_T).latents
    wrong = _generate(p, adapter, steps=10, guidance_scale=1.0, latents=x_T_plain).latents
    assert (back - x0).abs().max() < 1e-3
    assert (wrong - x0).abs().max() > 0.1


def test_saved_adapter_reproduces_samples_and_the_shift_matters(parts, tmp_path):
    """A saved and reloaded adapter gives the same images for a fixed seed; they differ from the
    zero adapter's (the shift is used in sampling)."""
    adapter = tiny_adapter(seed=4, head_std=0.1)
    before = _generate(parts, adapter, sampler="ddpm")
    adapter.save_pretrained(tmp_path / "adapter")
    after = _generate(parts, load_adapter(tmp_path / "adapter", latent_channels=4, text_dims=[32]), sampler="ddpm")
    assert torch.equal(before.images, after.images) and before.images.shape == (2, 3, 32, 32)
    plain = _generate(parts, tiny_adapter(), sampler="ddpm")
    assert (plain.latents - before.latents).abs().max() > 1e-2


def test_prior_shift_warns_about_the_terminal_mismatch(parts):
    """k_T of the prior shift (~0.93 on SD's schedule) far exceeds sqrt(abar_T): sampling from N(0, I) is then
    wrong, which a warning says; the quadratic shift (k_T < sqrt(abar_T)) is silent."""
    adapter = tiny_adapter(seed=5, head_std=0.1)
    with pytest.warns(UserWarning, match="k_T"):
        _generate(parts, adapter, steps=4, k_schedule="prior")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _generate(parts, adapter, steps=4)


@pytest.mark.parametrize(
    "kwargs, adapter_kwargs, needle",
    [
        ({"sampler": "euler"}, {}, "sampler"),
        ({"k_schedule": "cubic"}, {}, "cubic"),
        ({}, {"latent_channels": 8}, "8-channel"),
        ({}, {"text_dims": (768,)}, "768"),
        ({}, {"text_sources": ("clip", "t5"), "text_dims": (32, 32)}, "t5"),
        ({"scheduler_config": {**SCHED_CONFIG, "prediction_type": "v_prediction"}}, {}, "v_prediction"),
    ],
)
def test_bad_generation_inputs_are_one_line_user_errors(parts, kwargs, adapter_kwargs, needle):
    with pytest.raises(UserError) as err:
        _generate(parts, tiny_adapter(**adapter_kwargs), steps=2, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
