"""Training the frozen model SDG guides: ADM's hybrid objective for a learn_sigma UNet (Nichol & Dhariwal 2021).

SDG itself trains nothing in the diffusion model; it guides guided-diffusion's released unconditional ADM UNets,
which were trained with ``learn_sigma=True`` and the hybrid loss of Improved DDPM (§3.1, eq. 16)::

    L_hybrid = L_simple + lambda * L_vlb,    lambda = 0.001

- ``L_simple = || eps - eps_theta(x_t, t) ||^2`` (mean over pixels), t ~ U{0..T-1};
- ``L_vlb = sum_t L_t`` estimated as ``T * L_t`` for the sampled t, with
  ``L_t = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))`` for t > 0 and the discretized-Gaussian decoder NLL
  ``-log p_theta(x_0 | x_1)`` for t = 0, both in bits per dimension;
- ``p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta)`` with ``log Sigma = f log beta_t + (1 - f) log beta~_t``
  (``f = (v + 1) / 2``, ``beta~_0`` replaced by ``beta~_1``: ADM's clipped log-variance);
- a STOP-GRADIENT on ``mu_theta`` inside ``L_vlb`` (Improved DDPM §3.1): the VLB term trains only the variance, the
  mean is learned by ``L_simple`` alone (guided-diffusion: ``frozen_out = cat([eps.detach(), v])``).

In guided-diffusion's code the factor is ``vb * T / 1000`` (``RESCALED_MSE``) or ``vb`` (``MSE``, its default); at
T = 1000 both equal ``lambda * T * L_t`` with lambda = 0.001, which is what :class:`HybridLoss` computes for any T.

``HybridLoss(schedule)`` is the ``loss_fn(batch, ctx)`` of the shared trainer (``common.train``) for
``scripts/sdg/train_unconditional.py``; :func:`hybrid_terms` gives the per-sample terms for tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Union

import torch

from common.diffusion_loss import min_snr_weights, training_noise
from common.errors import UserError
from common.process import q_sample_standard
from common.schedule import NoiseSchedule


LAMBDA_VLB = 1e-3  # Improved DDPM's lambda (eq. 16)
LOG2 = math.log(2.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by ADM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of 8-bit images ``x`` in [-1, 1] under a Gaussian discretised to bins of 2/255;
    the two end bins extend to -inf / +inf (Ho et al. 2020 eq. 13; ADM ``discretized_gaussian_log_likelihood``)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class _Tables:
    """Per-timestep float64 coefficients of the full T-step chain, computed as guided-diffusion's
    ``GaussianDiffusion`` does: from the float64 betas with a float64 cumulative product (the core's
    ``NoiseSchedule.alphas_cumprod`` is a float32 product for diffusers parity; at t = 1, where beta ~ 1e-4, its
    rounding would move the KL by ~3e-4 relative)."""

    def __init__(self, schedule: NoiseSchedule):
        betas = schedule.betas.double()
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.log_beta = torch.log(betas)
        self.post_log_var_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.post_c1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.post_c2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)
        self.sqrt_recip_abar = (1.0 / abar).sqrt()
        self.sqrt_recipm1_abar = (1.0 / abar - 1.0).sqrt()

    @staticmethod
    def take(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t.long()].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def hybrid_terms(
    output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
    schedule: NoiseSchedule, tables: Optional[_Tables] = None,
) -> dict[str, torch.Tensor]:
    """Per-sample ``{"mse", "vb"}`` (``[B]`` each) for a learn_sigma output ``[B, 2C, H, W]`` (eps, v).

    ``vb`` is ``L_t`` in bits per dimension (KL for t > 0, decoder NLL for t = 0) with the mean's gradient stopped.
    """
    if output.shape[1] != 2 * x0.shape[1]:
        raise UserError("the hybrid loss needs a learn_sigma model: out_channels = 2 x in_channels (eps, v)")
    tables = tables or _Tables(schedule)
    dtype = torch.float64 if output.dtype == torch.float64 else torch.float32  # fp16 / bf16 outputs: in float32
    eps, v = output.to(dtype).chunk(2, dim=1)
    x0, x_t, noise = x0.to(dtype), x_t.to(dtype), noise.to(dtype)
    mse = _mean_flat((noise - eps) ** 2)

    take = tables.take
    # true posterior q(x_{t-1} | x_t, x0)
    c1, c2 = take(tables.post_c1, t, x0), take(tables.post_c2, t, x0)
    min_log = take(tables.post_log_var_clipped, t, x0)
    true_mean = c1 * x0 + c2 * x_t
    # model p(x_{t-1} | x_t): mean from the detached eps (stop-gradient), learned-range log-variance
    x0_hat = take(tables.sqrt_recip_abar, t, x0) * x_t - take(tables.sqrt_recipm1_abar, t, x0) * eps.detach()
    model_mean = c1 * x0_hat + c2 * x_t
    frac = (v + 1.0) / 2.0
    model_log_var = frac * take(tables.log_beta, t, x0) + (1.0 - frac) * min_log
    kl = _mean_flat(normal_kl(true_mean, min_log.expand_as(true_mean), model_mean, model_log_var)) / LOG2
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / LOG2
    vb = torch.where(t.to(kl.device) == 0, nll, kl)
    return {"mse": mse, "vb": vb}


class HybridLoss:
    """``loss(batch, ctx) -> LossOutput``: ``mean_B(mse + lambda_vlb * T * vb)`` (Improved DDPM's L_hybrid).

    Args:
        unet: the learn_sigma ``UNet2DModel`` (called through ``ctx.models[key]`` under the trainer).
        schedule: the training schedule (``sdg.adm.noise_schedule(flags)``).
        lambda_vlb: 0.001 (ADM); 0 trains the variance channels not at all (L_simple only).
        key: the module's name in the trainer's ``ctx.models``.

    ``batch``: images ``[B, 3, S, S]`` in [-1, 1], or a mapping with ``pixel_values``. t and the noise come from
    the global RNG (checkpointed by the trainer, so resumes stay exact).
    """

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule, *, lambda_vlb: float = LAMBDA_VLB,
                 key: str = "unet", snr_gamma: Optional[float] = None, noise_offset: float = 0.0):
        if lambda_vlb < 0:
            raise UserError(f"--lambda_vlb must be >= 0, got {lambda_vlb}")
        config = getattr(unet, "config", None)
        if config is None or config.out_channels != 2 * config.in_channels:
            raise UserError("the hybrid loss trains a learn_sigma model: build the UNet with --learn_sigma True")
        self.unet, self.schedule, self.lambda_vlb, self.key = unet, schedule, float(lambda_vlb), key
        self.snr_gamma, self.noise_offset = snr_gamma, float(noise_offset or 0.0)
        self.tables = _Tables(schedule)

    def __call__(self, batch: Union[torch.Tensor, Mapping[str, torch.Tensor]], ctx=None):
        from common.train import LossOutput

        x0 = batch if torch.is_tensor(batch) else batch["pixel_values"]
        unet = (getattr(ctx, "models", None) or {}).get(self.key, self.unet)
        device = getattr(ctx, "device", None) or x0.device
        x0 = x0.to(device)
        n = x0.shape[0]
        T = self.schedule.num_train_timesteps
        t = torch.randint(0, T, (n,), device=device)
        noise = training_noise(x0, self.noise_offset)
        abar = self.schedule.abar(t, like=x0)
        x_t = q_sample_standard(x0, abar, noise)
        output = unet(x_t, t).sample
        terms = hybrid_terms(output, x0, x_t, t, noise, self.schedule, self.tables)
        mse = terms["mse"]
        if self.snr_gamma is not None:  # Min-SNR weights the eps term only; the VLB term keeps its own weighting
            mse = mse * min_snr_weights(abar, self.snr_gamma, "epsilon").to(mse.device)
        loss = (mse + self.lambda_vlb * T * terms["vb"]).mean()
        return LossOutput(loss, {"mse": terms["mse"].mean().detach(), "vb_bpd": terms["vb"].mean().detach()})
