"""Shifted Diffusion's process as a :class:`common.process.Shift` built from a Gaussian bank (equations in METHOD.md).

The process itself lives in the core (``common/process.py``)::

    x_t = sqrt(abar_t) x0 + (1 - sqrt(abar_t)) mu_k + sqrt(1 - abar_t) S_k * eps

i.e. ``Shift(k="prior", mean=mu_k, scale=S_k)``; the core samplers take every DDPM / DDIM step in the whitened
coordinates ``(x - k_t mu) / S`` (METHOD.md, "Whitened view"). This module only says which ``mu`` and ``S`` a batch uses, including the
two behaviours of the released sampler kept behind flags for comparison.
"""

from __future__ import annotations

from typing import Optional

import torch

from common.errors import UserError
from common.process import Shift
from shifted.bank import GaussianBank


PRIOR_NOISE = ("data_std", "zero")
POSTERIOR_COMPONENTS = ("text", "pred_x0")

# ``prior_noise="zero"`` reproduces the released demo, whose bank std was never loaded: x_T = mu and no
# noise at any step. The whitened samplers divide by S, so zero is taken as a limit: a scale this small adds
# noise far below float32 resolution while ``S * (x / S)`` still round-trips (|x - k mu| / S stays < 1e30).
ZERO_NOISE_SCALE = 1e-12


def bank_shift(bank: GaussianBank, index: torch.Tensor) -> Shift:
    """The shift of the components ``index [B]``: ``Shift(k="prior", mean=mu [B, D], scale=S [B, D])``."""
    mean, scale = bank.gather(index)
    return Shift(k="prior", mean=mean, scale=scale)


def sampling_shift(
    bank: GaussianBank,
    index: torch.Tensor,
    *,
    prior_noise: str = "data_std",
    posterior_component: str = "text",
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> tuple[Shift, torch.Tensor]:
    """The shift a sampler uses, and the text-chosen mean ``mu [B, D]`` that centres x_T.

    ``prior_noise``: ``data_std`` (``S = std_scale * sigma``, what training used) or ``zero`` (the released demo).
    ``posterior_component``: ``text`` (the text-chosen component everywhere, a consistent reverse process) or
    ``pred_x0`` (released: the posterior mean's ``mu`` is the component nearest to each step's x0 estimate,
    while x_T, the noise scale and the index token stay text-chosen).
    """
    if prior_noise not in PRIOR_NOISE:
        raise UserError(f"unknown --prior_noise {prior_noise!r}: choose one of {', '.join(PRIOR_NOISE)}")
    if posterior_component not in POSTERIOR_COMPONENTS:
        raise UserError(
            f"unknown --posterior_component {posterior_component!r}: choose one of {', '.join(POSTERIOR_COMPONENTS)}"
        )
    mean, scale = (v.to(device=device, dtype=dtype) for v in bank.gather(index))
    if prior_noise == "zero":
        scale = torch.full_like(scale, ZERO_NOISE_SCALE)
    if posterior_component == "pred_x0":

        def nearest_mean(x0_hat: torch.Tensor) -> torch.Tensor:
            return bank.mean.to(device=x0_hat.device, dtype=x0_hat.dtype)[bank.select(x0_hat).to(x0_hat.device)]

        return Shift(k="prior", mean=nearest_mean, scale=scale), mean
    return Shift(k="prior", mean=mean, scale=scale), mean
