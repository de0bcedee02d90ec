"""Hooks compose: SDG's guidance on another pixel model and through DDIM, with no SDG-specific code
in the samplers."""

import pytest
import torch

from common.denoisers import UNetDenoiser
from common.samplers import sample_ddim, sample_ddpm
from common.schedule import make_plan
from common.tiny import tiny_unet2d
from sdg.adm import noise_schedule
from sdg.pipeline import encode_text, sample_sdg
from sdg.scores import SemanticGuidance, cosine
from sdg.tiny import tiny_adm_flags, tiny_adm_unet, tiny_noise_aware_clip


SCHEDULE = noise_schedule(tiny_adm_flags())


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def guide():
    from open_clip import get_tokenizer

    clip, model = tiny_noise_aware_clip("vit", film_init="default")
    text = encode_text(model, get_tokenizer("RN50"), "a red handwritten seven")
    return clip, text


def final_text_cosine(clip, text, x0):
    with torch.no_grad():
        return cosine(clip(x0, torch.zeros(x0.shape[0], dtype=torch.long)).embedding, text).mean()


def test_sdg_guidance_through_ddim_zero_weight_is_plain_ddim_and_weight_moves_towards_the_text(guide):
    clip, text = guide
    unet = tiny_adm_unet(attention_resolutions="")
    plan = make_plan(SCHEDULE, "5")
    plain = sample_ddim(UNetDenoiser(unet, "eps", learned_variance=True), SCHEDULE, plan, (4, 3, 32, 32),
                        generator=gen(0), clip_x0=1.0, progress=False)
    zero = sample_sdg(unet, SCHEDULE, plan, batch_size=4, clip=clip, text_embedding=text, text_weight=0.0,
                      generator=gen(0), sampler="ddim")
    assert torch.equal(plain, zero)
    guided = sample_sdg(unet, SCHEDULE, plan, batch_size=4, clip=clip, text_embedding=text, text_weight=200.0,
                        generator=gen(0), sampler="ddim")
    assert final_text_cosine(clip, text, guided) > final_text_cosine(clip, text, plain) + 0.05


def test_sdg_guidance_hook_on_another_pixel_model_fixed_variance_ddpm(guide):
    """A plain 3-channel eps UNet2DModel (no learned variance, not ADM): SemanticGuidance is just the core's guidance
    hook, so the core DDPM sampler with fixed_small variance takes it unchanged."""
    clip, text = guide
    unet = tiny_unet2d(sample_size=32, in_channels=3, out_channels=3)
    denoiser = UNetDenoiser(unet, "eps")
    plan = make_plan(SCHEDULE, "5")
    hook = SemanticGuidance(clip, SCHEDULE, text_embedding=text, text_weight=300.0)
    plain = sample_ddpm(denoiser, SCHEDULE, plan, (4, 3, 32, 32), generator=gen(1), clip_x0=1.0, progress=False)
    guided = sample_ddpm(denoiser, SCHEDULE, plan, (4, 3, 32, 32), generator=gen(1), clip_x0=1.0, guidance=hook,
                         progress=False)
    assert final_text_cosine(clip, text, guided) > final_text_cosine(clip, text, plain) + 0.05
