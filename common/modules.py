"""Small pieces of network code that several methods' networks share.

- :func:`timestep_embedding`: the sinusoidal embedding of integer timesteps used by guided-diffusion style networks
  (SDG's noise-aware CLIP and noisy classifier, the Shifted prior).
- :func:`count_parameters` and :func:`print_parameter_counts`: what each config's ``python -m <method>.config``
  prints.
- :class:`WrapsUNet`: a module that wraps a diffusers UNet and presents its ``config``/``dtype``/``device`` so the
  samplers treat the wrapper as the UNet itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding of (original, integer) timesteps: ``[cos(t f_i), sin(t f_i)]``, ``[B, dim]``.

    ``f_i = exp(-ln(max_period) i / (dim / 2))``, cosine half first (guided-diffusion ``nn.timestep_embedding``,
    equal to diffusers' ``get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)``); an odd ``dim``
    gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device, where configs at released sizes are counted)."""
    return sum(p.numel() for p in module.parameters())


def print_parameter_counts(counts: Mapping[str, int]) -> None:
    """One line per part: name, count, millions."""
    for name, count in counts.items():
        print(f"{name:14s} {count:>15,d}  ({count / 1e6:,.2f} M)")


def parameter_count_command(argv, method: str, load_config, parameter_counts) -> dict[str, int]:
    """``python -m <method>.config CONFIG``: parse the config path, print the counts of its parts, return them."""
    import argparse

    parser = argparse.ArgumentParser(description=f"Print the parameter counts of a {method} config.")
    parser.add_argument("config", help=f"configs/{method.lower()}/tiny.yaml or configs/{method.lower()}/paper.yaml")
    counts = parameter_counts(load_config(parser.parse_args(argv).config))
    print_parameter_counts(counts)
    return counts


class WrapsUNet(nn.Module):
    """Base of a module holding ``self.unet``: it answers ``config``, ``dtype`` and ``device`` as the UNet does."""

    unet: nn.Module

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device
