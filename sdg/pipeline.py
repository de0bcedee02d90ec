"""SDG sampling (METHOD.md §1): an unconditional ADM-style UNet, guided by the noise-aware CLIP, on the core's DDPM sampler.

One reverse step at respaced index k (original t = s_k), all done by ``common.samplers.sample_ddpm``:

1. ``x0_hat = (x_t - sqrt(1 - abar'_k) eps_hat) / sqrt(abar'_k)``, clamped to [-1, 1]            (``clip_x0=1``)
2. ``mu = c1 x0_hat + c2 x_t``                                                 (posterior mean of the respaced chain)
3. ``log Sigma = f log beta'_k + (1 - f) log beta~'_k`` with ``f = (v + 1) / 2``     (``variance_type="learned_range"``;
   the last step uses beta~'_1, ADM's clipped log-variance)
4. ``mu' = mu + Sigma * grad_x sum_i w_i F_i(x_t, t)``                      (the ``guidance`` hook, scores.SemanticGuidance)
5. ``x_{t-1} = mu' + [t > 0] sqrt(Sigma) z``

The UNet and the energies see the ORIGINAL t (the plan maps k -> s_k). The sampler's generator draws only x_T and z;
the reference noise of image guidance has its own generator, so zero weights reproduce unguided sampling bit for bit
and changing the weights never changes the sampler's noise (unlike the released code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch

from common.denoisers import UNetDenoiser
from common.errors import UserError
from common.samplers import Callback, Generator, sample
from common.schedule import NoiseSchedule, SamplingPlan, make_plan
from sdg.noisy_clip import NoiseAwareCLIP
from sdg.scores import STYLE_SCALE, SemanticGuidance


def sdg_denoiser(unet: torch.nn.Module) -> UNetDenoiser:
    """A learn_sigma ``UNet2DModel`` (``out_channels = 2 x in_channels``: eps then ADM's variance interpolant v)."""
    config = getattr(unet, "config", None)
    if config is None or config.out_channels != 2 * config.in_channels:
        raise UserError(
            "SDG samples with ADM's learned variance: the UNet needs out_channels = 2 x in_channels "
            "(a --learn_sigma True model)"
        )
    return UNetDenoiser(unet, prediction_type="eps", learned_variance=True)


@contextlib.contextmanager
def eval_mode(*modules: object) -> Iterator[None]:
    """Put the given ``nn.Module`` s in eval mode for the body and restore their modes after.

    Sampling must not apply the UNet's dropout (0.1 in the LSUN models) nor let the CLIP's BatchNorms use batch
    statistics, which would also mix the samples of a batch in each other's gradients.
    """
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def encode_text(clip_model: torch.nn.Module, tokenizer, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
    """Frozen CLIP text embeddings ``[N, D]`` for SDG's language guidance (open_clip ``encode_text``, not normalised).

    The text tower is the pretrained one (never the fine-tuned image side), so its space is CLIP's joint space.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(clip_model.parameters()).device
    return clip_model.encode_text(tokenizer(prompts).to(device))


def sample_sdg(
    unet: torch.nn.Module,
    schedule: NoiseSchedule,
    respacing: Union[str, int, SamplingPlan] = "100",
    *,
    batch_size: int = 1,
    clip: Optional[NoiseAwareCLIP] = None,
    text_embedding: Optional[torch.Tensor] = None,
    reference: Optional[torch.Tensor] = None,
    text_weight: float = 0.0,
    content_weight: float = 0.0,
    style_weight: float = 0.0,
    style_gram: str = "per_sample",
    style_layers: Optional[Sequence[int]] = None,
    style_scale: float = STYLE_SCALE,
    generator: Generator = None,
    guidance_generator: Generator = None,
    x_T: Optional[torch.Tensor] = None,
    clip_x0: Optional[float] = 1.0,
    callback: Optional[Callback] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    sampler: str = "ddpm",
    eta: float = 0.0,
) -> torch.Tensor:
    """Semantic-diffusion-guided ancestral sampling; returns x_0 ``[B, C, S, S]`` in (about) [-1, 1].

    Args:
        unet: learn_sigma ``UNet2DModel`` (e.g. ``sdg.convert.load_adm_unet``), eval mode.
        schedule: its full training schedule (``sdg.adm.noise_schedule(flags)``).
        respacing: guided-diffusion respacing (``"100"``, ``"ddim50"``, ``"10,20"``), an int, or a ready plan.
        clip: the noise-aware CLIP (required as soon as a weight is non-zero).
        text_embedding: ``encode_text(...)`` output ``[1 or B, D]`` for ``text_weight`` (language guidance).
        reference: ``[1 or B, C, S, S]`` image(s) in [-1, 1] for ``content_weight`` / ``style_weight``.
        style_gram: ``per_sample`` (default) or ``batch`` (the released batch-mixing Gram).
        generator: the sampler's noise (x_T and every z); ``guidance_generator``: the reference noise.
        sampler: ``ddpm`` (SDG: learned-range ancestral steps, the mean shifted by ``Sigma * grad``) or ``ddim``
            (our composition: the same guidance hook applied as a score shift, ``eps -= sqrt(1 - abar) grad``,
            Dhariwal & Nichol Alg. 2; the learned variance is then unused; ``eta`` as in DDIM).
    """
    if sampler not in ("ddpm", "ddim"):
        raise UserError(f"unknown sampler {sampler!r}: choose ddpm (SDG) or ddim")
    plan = respacing if isinstance(respacing, SamplingPlan) else make_plan(schedule, respacing)
    denoiser = sdg_denoiser(unet)
    guidance = SemanticGuidance(
        clip,
        schedule,
        text_embedding=text_embedding,
        reference=reference,
        text_weight=text_weight,
        content_weight=content_weight,
        style_weight=style_weight,
        style_gram=style_gram,
        style_layers=style_layers,
        style_scale=style_scale,
        generator=guidance_generator,
    )
    config = unet.config
    shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
    if clip is not None and guidance.active and clip.image_size != config.sample_size:
        raise UserError(
            f"the noise-aware CLIP takes {clip.image_size} px images but the UNet makes {config.sample_size} px: "
            "build the CLIP with image_size equal to the diffusion model's"
        )
    if device is None:
        device = next(unet.parameters()).device
    common = dict(x_T=x_T, generator=generator, clip_x0=clip_x0, guidance=guidance if guidance.active else None,
                  callback=callback, device=device, dtype=dtype, progress=progress)
    with eval_mode(unet, clip):
        return sample(sampler, denoiser, schedule, plan, None if x_T is not None else shape, eta=eta,
                      variance_type="learned_range", **common)
