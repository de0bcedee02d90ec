"""Denoiser wrappers: a network plus its conditioning as the samplers' ``(x_t, t) -> output`` contract.

Classifier-free guidance (Ho & Salimans 2022) is a wrapper that evaluates conditional and unconditional branches in
ONE batched forward, ``[uncond; cond]`` as diffusers' pipelines order them, so the same seed gives the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from common.process import canonical_prediction_type


class UNetDenoiser:
    """A diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` with fixed conditioning.

    ``cond`` are keyword arguments passed to the UNet at every call (``encoder_hidden_states``, ``class_labels``,
    ``added_cond_kwargs``...), batched like ``x_t``.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        prediction_type: str = "eps",
        learned_variance: bool = False,
        **cond: Any,
    ):
        self.unet = unet
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.learned_variance = learned_variance
        self.cond = cond

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        kwargs = {**self.cond, **extra}
        return self.unet(x_t, t, **kwargs, return_dict=False)[0]


class FunctionDenoiser:
    """Any function ``f(x_t, t) -> output`` with a declared parameterisation."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prediction_type: str = "eps",
                 learned_variance: bool = False):
        self.fn = fn
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.learned_variance = learned_variance

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x_t, t)


class CFGDenoiser:
    """Classifier-free guidance: ``out_u + scale * (out_c - out_u)`` from one batched forward.

    ``model(x, t, **cond)`` is called once with the batch doubled and every conditioning tensor given as
    ``torch.cat([uncond[k], cond[k]])``. With ``scale == 1`` only the conditional branch runs. With a learned
    variance only the first half of the channels is guided and the conditional variance is kept (GLIDE / ADM).
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor],
        scale: float,
        prediction_type: str = "eps",
        learned_variance: bool = False,
    ):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must carry the same keys, got {sorted(cond)} vs {sorted(uncond)}")
        self.model = model
        self.scale = float(scale)
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.learned_variance = learned_variance
        self.cond = cond
        self.both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.model(x_t, t, **self.cond)
        out_u, out_c = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), **self.both).chunk(2)
        if self.learned_variance:
            (eps_u, _), (eps_c, var_c) = out_u.chunk(2, dim=1), out_c.chunk(2, dim=1)
            return torch.cat([eps_u + self.scale * (eps_c - eps_u), var_c], dim=1)
        return out_u + self.scale * (out_c - out_u)


def unet_call(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``(x, t, **cond) -> unet(...).sample`` without the output dataclass, for :class:`CFGDenoiser`."""

    def call(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return unet(x, t, **cond, return_dict=False)[0]

    return call


def guided_unet(
    unet: torch.nn.Module,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: Optional[torch.Tensor],
    guidance_scale: float,
    prediction_type: str = "eps",
) -> CFGDenoiser | UNetDenoiser:
    """A text-conditioned UNet as a denoiser, with CFG when ``guidance_scale != 1`` (Stable Diffusion's recipe)."""
    if uncond_embeddings is None or guidance_scale == 1.0:
        return UNetDenoiser(unet, prediction_type, encoder_hidden_states=cond_embeddings)
    return CFGDenoiser(
        unet_call(unet),
        {"encoder_hidden_states": cond_embeddings},
        {"encoder_hidden_states": uncond_embeddings},
        guidance_scale,
        prediction_type,
    )
