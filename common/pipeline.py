"""Latent text-to-image generation with the core samplers over a Stable-Diffusion-layout folder.

The baseline every method is compared against. It follows ``diffusers.StableDiffusionPipeline``'s conventions one
for one (prompt padding to the tokenizer's max length, ``[uncond; cond]`` CFG batch, initial latents
``randn((B, C, H/f, W/f), generator)``, decoding ``vae.decode(latents / scaling_factor)``), so that with the DDIM
sampler the same seed, steps and guidance scale give the same images as diffusers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from common import memory
from common.denoisers import guided_unet
from common.errors import UserError
from common.latents import PLAIN, VaeMode, decode_latents, vae_scale_factor
from common.process import canonical_prediction_type
from common.samplers import Generator, sample
from common.schedule import NoiseSchedule, plan_like_diffusers


SAMPLERS = ("ddim", "ddpm")


def read_scheduler_config(folder: str) -> dict:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no scheduler/scheduler_config.json: pass a diffusers pipeline folder")
    with open(path) as f:
        return json.load(f)


def encode_clip(text_encoder: torch.nn.Module, tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    """CLIP last hidden states ``[B, L, D]`` of prompts padded to the tokenizer's max length (SD's recipe)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    device = device if device is not None else next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


@dataclass
class TextToImageOutput:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    latents: torch.Tensor  # [B, C, h, w]
    memory_plan: Optional[memory.MemoryPlan] = None  # how it ran within the memory budget


class LatentTextToImage:
    """UNet + VAE + CLIP text encoder + tokenizer + scheduler config, sampled with ``common.samplers``."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.prediction_type = canonical_prediction_type(self.scheduler_config.get("prediction_type", "epsilon"))
        self.vae_scale_factor = vae_scale_factor(vae)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32, device="cpu") -> LatentTextToImage:
        """Load a diffusers Stable-Diffusion-layout folder through the project's local-only loaders."""
        from common.models import load_clip_text, load_unet, load_vae

        if not os.path.isdir(folder):
            raise UserError(f"pipeline folder {folder} does not exist: pass a folder written by save_pretrained")
        config = read_scheduler_config(folder)
        unet = load_unet(folder, subfolder="unet")
        vae = load_vae(folder, subfolder="vae")
        text_encoder, tokenizer = load_clip_text(folder)
        for module in (unet, vae, text_encoder):
            # tiny checkpoints may store a tower in float16 to stay small; compute happens in ``dtype``
            if next(module.parameters()).dtype != dtype or str(device) != "cpu":
                module.to(device=device, dtype=dtype)
            module.eval()
        return cls(unet, vae, text_encoder, tokenizer, config)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states ``[B, L, D]`` of prompts padded to the tokenizer's max length (SD's recipe)."""
        return encode_clip(self.text_encoder, self.tokenizer, prompts, self.device).to(self.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise UserError(f"resolution {height}x{width} is not divisible by the VAE's factor {f}: use a multiple")
        return (batch, self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, mode: VaeMode = PLAIN) -> torch.Tensor:
        return decode_latents(self.vae, latents, mode=mode)

    def memory_plan(self, batch: int, height: Optional[int] = None, width: Optional[int] = None,
                    guidance_scale: float = 7.5, max_memory_gb: Optional[float] = None) -> memory.MemoryPlan:
        """The fastest way to run a request within ``max_memory_gb`` (default: the machine's memory); a
        UserError naming the estimate and the budget when no way fits."""
        size = self.unet.config.sample_size * self.vae_scale_factor
        request = memory.Request(batch, height or size, width or size, guided=guidance_scale != 1.0,
                                 dtype_bytes=torch.finfo(self.dtype).bits // 8, device=str(self.device))
        return memory.plan(self.unet, self.vae, request, memory.budget_bytes(max_memory_gb, str(self.device)),
                           extra_models=(self.text_encoder,))

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        sampler: str = "ddim",
        eta: float = 0.0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: Generator = None,
        latents: Optional[torch.Tensor] = None,
        callback: Optional[Callable] = None,
        progress: bool = True,
        max_memory_gb: Optional[float] = None,
    ) -> TextToImageOutput:
        """``max_memory_gb``: the memory budget (default: the machine's); the VAE mode and the attention chunking
        are chosen to fit it (:mod:`common.memory`), or the request is refused before anything is allocated."""
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        size = self.unet.config.sample_size * self.vae_scale_factor
        shape = self.latent_shape(len(prompts), height or size, width or size)
        memory_plan = self.memory_plan(len(prompts), height, width, guidance_scale, max_memory_gb)
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([negative_prompt] * len(prompts)) if guidance_scale != 1.0 else None
        denoiser = guided_unet(self.unet, cond, uncond, guidance_scale, self.prediction_type)
        plan = plan_like_diffusers(self.schedule, self.scheduler_config, num_inference_steps, sampler)
        clip = float(self.scheduler_config.get("clip_sample_range", 1.0)) if self.scheduler_config.get(
            "clip_sample") else None
        common = dict(x_T=latents, generator=generator, device=self.device, dtype=self.dtype, callback=callback,
                      progress=progress, clip_x0=clip)
        with memory_plan.applied(self.unet):
            out = sample(sampler, denoiser, self.schedule, plan, shape, eta=eta,
                         variance_type=self.scheduler_config.get("variance_type", "fixed_small"), **common)
        with memory_plan.applied(self.vae, split=False):
            images = self.decode(out, memory_plan.vae)
        return TextToImageOutput(images, out, memory_plan)
