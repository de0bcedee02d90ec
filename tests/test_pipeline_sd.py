"""Our sampler driving a Stable-Diffusion folder's UNet equals diffusers' StableDiffusionPipeline."""

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from common.errors import UserError
from common.pipeline import LatentTextToImage


@pytest.fixture(scope="module")
def sd_folder(tiny_sd_folder):
    return tiny_sd_folder


PROMPTS = ["a red handwritten seven", "a blue handwritten two"]


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_ddim_matches_stable_diffusion_pipeline(sd_folder, guidance_scale):
    ours = LatentTextToImage.from_pretrained(str(sd_folder))
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance_scale, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    ref_latents = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance_scale, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    out = ours(PROMPTS, num_inference_steps=4, guidance_scale=guidance_scale, sampler="ddim",
               generator=torch.Generator().manual_seed(0), progress=False)
    assert (out.latents - ref_latents).abs().max() < 1e-5
    assert (out.images - ref.images).abs().max() < 1e-4


def test_ddpm_matches_pipeline_with_ddpm_scheduler(sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ours = LatentTextToImage.from_pretrained(str(sd_folder))
    ours.scheduler_config = dict(pipe.scheduler.config)
    ref = pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, output_type="latent",
               generator=torch.Generator().manual_seed(1)).images
    out = ours(PROMPTS, num_inference_steps=5, guidance_scale=3.0, sampler="ddpm",
               generator=torch.Generator().manual_seed(1), progress=False)
    assert (out.latents - ref).abs().max() < 1e-5


def test_tiny_folder_round_trips_through_plain_diffusers(sd_folder, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "again"))
    for a, b in zip(pipe.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "again" / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_bad_resolution_and_sampler_are_clear_errors(sd_folder):
    ours = LatentTextToImage.from_pretrained(str(sd_folder))
    with pytest.raises(UserError, match="not divisible"):
        ours(["x"], height=30, width=32, num_inference_steps=1, progress=False)
    with pytest.raises(UserError, match="unknown sampler"):
        ours(["x"], sampler="euler", num_inference_steps=1, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        LatentTextToImage.from_pretrained(str(sd_folder) + "-missing")
