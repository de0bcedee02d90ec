"""The latent side every pipeline shares: the VAE's scale factor, images <-> scaled latents, and the VAE's
memory mode (slicing, tiling).

A latent diffusion model samples ``z`` of ``H/f x W/f`` cells and the VAE decodes ``D(z / s)`` to pixels in
[-1, 1]; ``f = 2 ** (levels - 1)`` (8 for Stable Diffusion's kl-f8) and ``s`` is the VAE's ``scaling_factor``
(0.18215 for SD 1.x). :func:`decode_latents` maps the result to [0, 1] and :func:`encode_images` goes the other way.

Both take a :class:`VaeMode`: ``slicing`` runs the VAE one image at a time (the peak no longer grows with the
batch), ``tile`` (a side in latent cells) runs it on overlapping tiles blended linearly over their overlap (the peak
no longer grows with the resolution, at the cost of seams within the blending tolerance). For a diffusers
``AutoencoderKL`` these are its own ``use_slicing`` / ``use_tiling`` paths, switched on for the call only; another
VAE is sliced here and never tiled. Which mode a request gets is chosen by :mod:`common.memory`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch


# diffusers' tiles overlap by a quarter of their side; the estimate in common.memory reads it from here
TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class VaeMode:
    """How the VAE runs: ``slicing`` one image at a time; ``tile``: on tiles of this side in latent cells."""

    slicing: bool = False
    tile: Optional[int] = None

    def describe(self) -> str:
        parts = (["sliced"] if self.slicing else []) + ([f"tiles of {self.tile} latent cells"] if self.tile else [])
        return ", ".join(parts) or "whole batch"


PLAIN = VaeMode()


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` of a diffusers config object or ``config[name]`` of a plain dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell: ``2 ** (len(block_out_channels) - 1)``. ``vae``: a VAE, its config, or a dict."""
    config = getattr(vae, "config", vae)
    return 2 ** (len(config_value(config, "block_out_channels")) - 1)


def scaling_factor_of(vae: Any, scaling_factor: Optional[float] = None) -> float:
    return float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)


def supports_tiling(vae: Any) -> bool:
    """True for a VAE with diffusers' tiled path (``AutoencoderKL``)."""
    return hasattr(vae, "use_tiling") and hasattr(vae, "tile_latent_min_size") and hasattr(vae, "tiled_decode")


@contextlib.contextmanager
def vae_mode(vae: Any, mode: VaeMode = PLAIN) -> Iterator[None]:
    """Switch a diffusers VAE's slicing / tiling to ``mode`` for the body, restoring its own settings after."""
    if not supports_tiling(vae):
        yield
        return
    names = ("use_slicing", "use_tiling", "tile_latent_min_size", "tile_sample_min_size")
    saved = {name: getattr(vae, name) for name in names}
    try:
        vae.use_slicing = bool(mode.slicing)
        vae.use_tiling = mode.tile is not None
        if mode.tile is not None:
            vae.tile_latent_min_size = int(mode.tile)
            vae.tile_sample_min_size = int(mode.tile) * vae_scale_factor(vae)
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def _per_image(vae: Any, mode: VaeMode, run, x: torch.Tensor) -> torch.Tensor:
    """``run(x)``, one image at a time when slicing a VAE that has no slicing of its own."""
    if mode.slicing and not supports_tiling(vae) and x.shape[0] > 1:
        return torch.cat([run(x[i : i + 1]) for i in range(x.shape[0])])
    with vae_mode(vae, mode):
        return run(x)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, scaling_factor: Optional[float] = None,
                   mode: VaeMode = PLAIN) -> torch.Tensor:
    """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1] (float32): ``D(z / s) / 2 + 1/2``."""
    x = latents.to(vae.dtype) / scaling_factor_of(vae, scaling_factor)
    images = _per_image(vae, mode, lambda z: vae.decode(z, return_dict=False)[0], x)
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, scaling_factor: Optional[float] = None, *,
                  generator: Optional[torch.Generator] = None, sample: bool = False,
                  mode: VaeMode = PLAIN) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] -> scaled latents ``s * E(x)``: the posterior mean, or a posterior sample
    with ``sample=True`` (drawn from ``generator``)."""
    x = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)

    def run(pixels: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(pixels).latent_dist
        return dist.sample(generator) if sample else dist.mean

    return _per_image(vae, mode, run, x) * scaling_factor_of(vae, scaling_factor)
