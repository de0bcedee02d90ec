"""Tiny random collaborations for tests and the demo: the real architectures at digits size, built in milliseconds.

Uni-modal models are ``common.tiny.tiny_unet2d_condition`` (8x8x4 latents, 32-d tokens); dynamic diffusers are
the same class at widths 16/32 with one output channel (``configs/codiff/tiny.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from codiff.collaborate import CollaborativeDiffusion
from codiff.dynamic import build_dynamic_diffuser


def tiny_diffuser_config(**overrides: Any) -> dict[str, Any]:
    """The tiny dynamic diffuser: ``(x [B, 4, 8, 8], t, c [B, L, 32]) -> [B, 1, 8, 8]``, ~0.2M parameters."""
    from common.tiny import tiny_unet2d_condition_config

    return tiny_unet2d_condition_config(block_out_channels=(16, 32), out_channels=1, **overrides)


def tiny_diffuser(seed: int = 0, zero_init: bool = True, logit_scale: float = 0.0) -> nn.Module:
    """A tiny dynamic diffuser in eval mode. ``zero_init=False`` with ``logit_scale > 0`` re-draws the output
    convolution ``N(0, logit_scale^2)`` so the influence maps are far from uniform (for tests)."""
    diffuser = build_dynamic_diffuser(tiny_diffuser_config(), zero_init=zero_init, seed=seed)
    if not zero_init and logit_scale > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            nn.init.normal_(diffuser.conv_out.weight, std=logit_scale)
            nn.init.normal_(diffuser.conv_out.bias, std=logit_scale)
    return diffuser.eval()


def tiny_collaboration(
    modalities: Sequence[str] = ("mask", "text"),
    seed: int = 0,
    zero_init: bool = True,
    logit_scale: float = 0.0,
    **kwargs: Any,
) -> CollaborativeDiffusion:
    """One tiny uni-modal UNet and one tiny diffuser per modality, seeds ``seed + 2k`` / ``seed + 2k + 1``."""
    from common.tiny import tiny_unet2d_condition

    unets = {name: tiny_unet2d_condition(seed + 2 * k) for k, name in enumerate(modalities)}
    diffusers = {
        name: tiny_diffuser(seed + 2 * k + 1, zero_init=zero_init, logit_scale=logit_scale)
        for k, name in enumerate(modalities)
    }
    return CollaborativeDiffusion(unets, diffusers, **kwargs).eval()
