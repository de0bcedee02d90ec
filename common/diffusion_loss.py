"""The diffusion-loss flags diffusers' ``train_text_to_image.py`` has, for every trainer with a denoising loss.

``--snr_gamma``: Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", eq. 8 and Table 1), computed as diffusers' example does: with ``snr = abar / (1 - abar)``
the per-sample MSE is weighted by ``min(snr, gamma) / snr`` for an epsilon model and ``min(snr, gamma) / (snr + 1)``
for a v model (for an x0 model, ``min(snr, gamma)`` itself). ``--noise_offset``: the noise gets
``offset * N(0, 1)`` per (sample, channel) added, constant over the pixels (Guttenberg 2023, "Diffusion with
offset noise"), so the model can shift an image's mean brightness. ``--prediction_type``: what the network
regresses (``epsilon`` / ``v_prediction``); default: the model folder's scheduler setting.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common.errors import UserError


PREDICTION_TYPE_CHOICES = ("epsilon", "v_prediction")


def add_diffusion_loss_args(parser: argparse.ArgumentParser, *, prediction_type: bool = True) -> None:
    """``--snr_gamma``, ``--noise_offset`` (and ``--prediction_type``) unless the parser has them already."""
    have = set(parser._option_string_actions)
    group = parser.add_argument_group("diffusion loss (common/diffusion_loss.py)")
    if "--snr_gamma" not in have:
        group.add_argument("--snr_gamma", type=float, default=None,
                           help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is their choice); unset: "
                                "plain MSE")
    if "--noise_offset" not in have:
        group.add_argument("--noise_offset", type=float, default=0.0,
                           help="scale of the per-channel offset noise added to the training noise (0: none)")
    if prediction_type and "--prediction_type" not in have:
        group.add_argument("--prediction_type", default=None, choices=PREDICTION_TYPE_CHOICES,
                           help="the network's target (default: the model folder's scheduler setting)")


def check_diffusion_loss_args(args: argparse.Namespace) -> None:
    """One-line errors for impossible values, before anything is loaded."""
    gamma = getattr(args, "snr_gamma", None)
    if gamma is not None and not gamma > 0:
        raise UserError(f"--snr_gamma must be > 0 (5.0 is the paper's choice), got {gamma}")
    offset = getattr(args, "noise_offset", 0.0) or 0.0
    if offset < 0:
        raise UserError(f"--noise_offset must be >= 0, got {offset}")


def training_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """``randn_like(latents)``, plus ``noise_offset * N(0, 1)`` per (sample, channel) when ``noise_offset > 0``."""
    noise = torch.randn_like(latents)
    if noise_offset:
        shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        noise = noise + noise_offset * torch.randn(shape, device=latents.device, dtype=latents.dtype)
    return noise


def min_snr_weights(abar: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR weights ``[B]`` from ``abar_t`` (any shape with B leading elements, one per sample)."""
    abar = abar.reshape(abar.shape[0], -1)[:, 0].float()
    snr = abar / (1.0 - abar)
    weights = torch.clamp(snr, max=snr_gamma)
    if prediction_type in ("epsilon", "eps"):
        return weights / snr
    if prediction_type in ("v_prediction", "v"):
        return weights / (snr + 1.0)
    if prediction_type in ("sample", "x0"):
        return weights
    raise UserError(f"unknown prediction type {prediction_type!r}: choose epsilon, v_prediction or sample")


def diffusion_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    abar: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The denoising loss: mean squared error in float32, Min-SNR weighted per sample when ``snr_gamma`` is set."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    if abar is None:
        raise ValueError("diffusion_mse with snr_gamma needs abar (the batch's abar_t)")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * min_snr_weights(abar, snr_gamma, prediction_type).to(per_sample.device)).mean()
