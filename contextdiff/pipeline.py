"""ContextDiff text-to-image generation and DDIM inversion on the core samplers (METHOD.md: reverse DDPM / DDIM, DDIM inversion).

One step of either sampler, for a text-conditioned UNet with classifier-free guidance:

1. the core's batched ``CFGDenoiser`` runs ``[uncond; cond]`` in ONE forward and guides the network output;
2. :class:`contextdiff.process.ShiftedEpsToX0` turns the guided output into the guided ``x0_hat`` (affine map, so
   guiding g or x0 is the same thing); an x0-parameterised UNet is guided directly;
3. the core's ``shift`` hook evaluates ``r_hat = r_phi(x0_hat, c)`` ONCE on that guided x0_hat (with the
   conditional text) and takes the DDPM / DDIM step in whitened coordinates ``y = x - k_t r_hat``.

With a zero-initialised adapter (r == 0) this is the core's plain sampler bit for bit (``tests/
test_contextdiff_pipeline.py``). The conventions are Stable Diffusion's (``common.pipeline``): prompts padded to 77
CLIP tokens, ``randn((B, C, h, w), generator)`` initial latents, ``vae.decode(latents / scaling_factor)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from common import memory
from common.denoisers import guided_unet
from common.errors import UserError
from common.latents import decode_latents, encode_images, vae_scale_factor
from common.pipeline import encode_clip
from common.samplers import Generator, invert_ddim, sample
from common.schedule import NoiseSchedule, SamplingPlan, plan_like_diffusers
from contextdiff.process import as_x0_denoiser, contextual_k, contextual_shift, parameterization_from_prediction_type


SAMPLERS = ("ddim", "ddpm")
# stabilityai/stable-diffusion-2-1-base scheduler/scheduler_config.json (the keys the core reads).
SD21_BASE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass
class ContextDiffOutput:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    latents: torch.Tensor  # [B, C, h, w], the sampled x0 (unscaled model space)
    memory_plan: Optional[memory.MemoryPlan] = None  # how it ran within the memory budget


@dataclass
class InversionOutput:
    latents: torch.Tensor  # x_T [B, C, h, w]
    trajectory: Optional[list[torch.Tensor]]  # x at every level, clean first (return_trajectory=True)


# ------------------------------------------------------------------------------------------------------ text


@torch.no_grad()
@torch.no_grad()
def encode_t5(encoder: nn.Module, tokenizer, prompts: Sequence[str], max_length: int = 77, device=None):
    """T5 encoder states ``[B, L, D]`` and the padding mask ``[B, L]`` (True = real token)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    device = device if device is not None else next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    states = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return states, mask.bool()


def adapter_text(
    adapter: nn.Module, clip_states: torch.Tensor, prompts: Sequence[str], t5: Optional[tuple] = None,
    t5_max_length: int = 77,
) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """The adapter's text inputs in its ``text_sources`` order: the UNet's CLIP states and/or T5 states + mask."""
    states, masks = [], []
    for source in adapter.config.text_sources:
        if source == "clip":
            states.append(clip_states)
            masks.append(None)
        else:
            if t5 is None:
                raise UserError("this adapter reads T5 text states: pass t5=(t5_encoder, t5_tokenizer)")
            s, m = encode_t5(t5[0], t5[1], prompts, t5_max_length, clip_states.device)
            states.append(s)
            masks.append(m)
    adapter.check_compatible(text_dims=[s.shape[-1] for s in states])
    return states, masks


# ------------------------------------------------------------------------------------------------------ setup


@dataclass
class SamplingSetup:
    """What generation and inversion share: the schedule, the plan, the x0-facing denoiser, the shift, the config."""

    schedule: NoiseSchedule
    plan: SamplingPlan
    denoiser: Any
    shift: Any
    config: dict


def sampling_setup(
    unet, adapter, text_encoder, tokenizer, prompts, *, steps, guidance_scale, sampler, scheduler_config,
    parameterization, k_schedule, k_scale, negative_prompt, t5, t5_max_length, no_shift,
) -> SamplingSetup:
    """Schedule, plan, the x0-facing (CFG-)denoiser and the contextual shift shared by generate and invert."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    config = dict(SD21_BASE_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
    if parameterization is None:
        parameterization = parameterization_from_prediction_type(config.get("prediction_type", "epsilon"))
    k_fn = contextual_k(k_schedule, k_scale)  # validates the name before any model runs
    schedule = NoiseSchedule.from_config(config)
    plan = plan_like_diffusers(schedule, config, steps, sampler)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    cond = encode_clip(text_encoder, tokenizer, prompts, device).to(dtype)
    uncond = None
    if guidance_scale != 1.0:
        uncond = encode_clip(text_encoder, tokenizer, [negative_prompt] * len(prompts), device).to(dtype)
    # The network output is an eps (shifted-eps) or x0; CFG guides it in one batched forward (core wrapper).
    ptype = "eps" if parameterization == "shifted_eps" else "x0"
    denoiser = as_x0_denoiser(guided_unet(unet, cond, uncond, guidance_scale, ptype), parameterization, schedule)
    shift = None
    if adapter is not None and not no_shift:
        adapter.check_compatible(unet.config.in_channels)
        states, masks = adapter_text(adapter, cond, prompts, t5, t5_max_length)
        shift = contextual_shift(adapter, states, k=k_schedule, k_scale=k_scale, text_masks=masks)
        # Sampling starts from N(0, I) although x_T ~ N(sqrt(abar_T) x0 + k_T r, I): r needs x0. The base model
        # already accepts the sqrt(abar_T) x0 leak (SD: 0.07 at t = 999); warn when the shift leaks more than that.
        abar_T = float(schedule.alphas_cumprod[plan.timesteps[0]])
        k_T = float(k_fn(abar_T))
        if abs(k_T) > abar_T**0.5:
            warnings.warn(
                f"k_T = {k_T:.3f} ({k_schedule!r} schedule) exceeds sqrt(abar_T) = {abar_T**0.5:.3f}: x_T ~ N(k_T r, I) "
                "is far from the N(0, I) sampling starts from; prefer the quadratic schedule (k_T < sqrt(abar_T))",
                stacklevel=4,
            )
    return SamplingSetup(schedule, plan, denoiser, shift, config)


# ------------------------------------------------------------------------------------------------- generation


def plan_memory(unet: nn.Module, vae: nn.Module, others: Sequence[Optional[nn.Module]], batch: int, height: int,
                width: int, guidance_scale: float, max_memory_gb: Optional[float] = None) -> memory.MemoryPlan:
    """The fastest VAE mode / attention chunking that fits ``max_memory_gb`` (default: the machine's memory) for a
    batch at ``height x width`` px (CFG doubles the UNet batch); a one-line UserError when nothing fits."""
    param = next(unet.parameters())
    request = memory.Request(batch, height, width, guided=guidance_scale != 1.0,
                             dtype_bytes=torch.finfo(param.dtype).bits // 8, device=str(param.device))
    return memory.plan(unet, vae, request, memory.budget_bytes(max_memory_gb, str(param.device)),
                       extra_models=tuple(m for m in others if m is not None))


@torch.no_grad()
def generate(
    unet: nn.Module,
    adapter: Optional[nn.Module],
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "ddim",
    generator: Generator = None,
    *,
    eta: float = 0.0,
    scheduler_config: Optional[dict] = None,
    parameterization: Optional[str] = None,
    k_schedule: str = "quadratic",
    k_scale: float = 1.0,
    negative_prompt: str = "",
    t5: Optional[tuple] = None,
    t5_max_length: int = 77,
    latents: Optional[torch.Tensor] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    no_shift: bool = False,
    callback: Optional[Callable] = None,
    progress: bool = False,
    max_memory_gb: Optional[float] = None,
) -> ContextDiffOutput:
    """Sample images for ``prompts`` with the contextualized reverse process (METHOD.md: reverse DDPM / DDIM).

    ``steps``: diffusers-style count over ``scheduler_config`` (default SD-2.1-base's); ``sampler`` ``ddim`` (with
    ``eta``) or ``ddpm`` (the config's ``variance_type``). ``parameterization`` defaults from the config's
    ``prediction_type`` (epsilon -> shifted_eps, sample -> x0). ``adapter=None`` or ``no_shift=True`` is the
    ablation without the shift. ``t5=(encoder, tokenizer)`` when the adapter reads T5 states. ``latents`` =
    initial x_T (e.g. from :func:`invert`). ``max_memory_gb``: the budget (default: the machine's memory) the VAE
    mode and attention chunking are chosen to fit (:mod:`common.memory`), or the request is refused up front.
    Returns images ``[B, 3, H, W]`` in [0, 1], the final latents and the memory plan taken.
    """
    s = sampling_setup(unet, adapter, text_encoder, tokenizer, prompts, steps=steps, guidance_scale=guidance_scale,
               sampler=sampler, scheduler_config=scheduler_config, parameterization=parameterization,
               k_schedule=k_schedule, k_scale=k_scale, negative_prompt=negative_prompt, t5=t5,
               t5_max_length=t5_max_length, no_shift=no_shift)
    factor = vae_scale_factor(vae)
    size = unet.config.sample_size * factor
    height, width = height or size, width or size
    if height % factor or width % factor:
        raise UserError(f"resolution {height}x{width} is not divisible by the VAE's factor {factor}: use a multiple")
    shape = (len(prompts), unet.config.in_channels, height // factor, width // factor)
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    clip = float(s.config.get("clip_sample_range", 1.0)) if s.config.get("clip_sample") else None
    common = dict(x_T=latents, generator=generator, shift=s.shift, clip_x0=clip, callback=callback,
                  device=device, dtype=dtype, progress=progress)
    memory_plan = plan_memory(unet, vae, (text_encoder, adapter), len(prompts), height, width, guidance_scale,
                              max_memory_gb)
    with memory_plan.applied(unet):
        out = sample(sampler, s.denoiser, s.schedule, s.plan, shape, eta=eta,
                     variance_type=s.config.get("variance_type", "fixed_small"), **common)
    with memory_plan.applied(vae, split=False):
        images = decode_latents(vae, out, mode=memory_plan.vae)
    return ContextDiffOutput(images, out, memory_plan)


@torch.no_grad()
def invert(
    unet: nn.Module,
    adapter: Optional[nn.Module],
    vae: Optional[nn.Module],
    text_encoder: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    steps: int = 50,
    *,
    images: Optional[torch.Tensor] = None,
    latents: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    scheduler_config: Optional[dict] = None,
    parameterization: Optional[str] = None,
    k_schedule: str = "quadratic",
    k_scale: float = 1.0,
    negative_prompt: str = "",
    t5: Optional[tuple] = None,
    t5_max_length: int = 77,
    fixed_point_iters: int = 0,
    return_trajectory: bool = False,
    no_shift: bool = False,
    progress: bool = False,
) -> InversionOutput:
    """Contextualized DDIM inversion (METHOD.md, "DDIM inversion"): clean ``images`` (or ``latents``) -> x_T, with r_hat in every step.

    The source prompt conditions the model (Tune-A-Video / FateZero: ``guidance_scale = 1``, conditional only).
    Sampling :func:`generate` with ``sampler="ddim"``, ``eta=0``, the same steps, prompts, shift and
    ``latents=<this x_T>`` walks back to the start; ``fixed_point_iters`` tightens that round trip.
    """
    if (images is None) == (latents is None):
        raise UserError("give exactly one of images (in [0, 1]) or latents to invert")
    if latents is None:
        if vae is None:
            raise UserError("inverting images needs the VAE: pass vae, or pass latents instead")
        latents = encode_images(vae, images)
    s = sampling_setup(unet, adapter, text_encoder, tokenizer, prompts, steps=steps, guidance_scale=guidance_scale,
               sampler="ddim", scheduler_config=scheduler_config, parameterization=parameterization,
               k_schedule=k_schedule, k_scale=k_scale, negative_prompt=negative_prompt, t5=t5,
               t5_max_length=t5_max_length, no_shift=no_shift)
    dtype = next(unet.parameters()).dtype
    out = invert_ddim(s.denoiser, s.schedule, s.plan, latents.to(dtype), shift=s.shift,
                      fixed_point_iters=fixed_point_iters, return_trajectory=return_trajectory, progress=progress)
    if return_trajectory:
        return InversionOutput(out[0], out[1])
    return InversionOutput(out, None)
