"""The generalised (shifted) Gaussian diffusion process, and conversions between parameterisations.

One forward process serves every method::

    x_t = sqrt(abar_t) * x0 + k_t * m + sqrt(1 - abar_t) * S * eps,      eps ~ N(0, I)

- plain DDPM: ``m = 0``, ``S = 1``;
- ContextDiff: ``m = r_phi(x0, c)`` (a learned cross-modal bias), ``k_t`` a pluggable schedule (quadratic by default);
- Shifted Diffusion: ``m = mu`` (embedding-statistics mean), ``k_t = 1 - sqrt(abar_t)``, ``S = diag(std)``.

The whitening ``y_t = (x_t - k_t m) / S`` turns each of these into a standard DDPM on ``y`` with clean data
``y_0 = x0 / S`` (every k schedule vanishes at ``abar = 1``, so the clean end of the chain is x0 itself). So
every shifted quantity is "whiten, apply the one standard formula, un-whiten"; the samplers do exactly that and the
tests check the identity against the direct formulas of the ContextDiff and Shifted papers.

All coefficient functions take ``abar`` either as a Python float (one sampling step) or as a tensor broadcastable
against the data (a training batch of timesteps, see ``NoiseSchedule.abar``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch

from common.errors import UserError


PREDICTION_TYPES = ("eps", "x0", "v")
_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "eps": "eps", "x0": "x0", "v": "v"}

Abar = Union[float, torch.Tensor]


def canonical_prediction_type(name: str) -> str:
    """Accept diffusers' names (``epsilon``, ``sample``, ``v_prediction``) and ours (``eps``, ``x0``, ``v``)."""
    try:
        return _ALIASES[name]
    except KeyError:
        raise UserError(f"unknown prediction type {name!r}: choose one of eps, x0, v") from None


def _sqrt(a: Abar) -> Abar:
    return a**0.5


# ------------------------------------------------------------------- standard DDPM (whitened coordinates)


def q_sample_standard(x0: torch.Tensor, abar: Abar, noise: torch.Tensor) -> torch.Tensor:
    """``sqrt(abar) x0 + sqrt(1 - abar) noise`` (Ho et al. 2020, eq. 4)."""
    return _sqrt(abar) * x0 + _sqrt(1 - abar) * noise


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: Abar) -> torch.Tensor:
    return (x_t - _sqrt(1 - abar) * eps) / _sqrt(abar)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: Abar) -> torch.Tensor:
    return (x_t - _sqrt(abar) * x0) / _sqrt(1 - abar)


def velocity(x0: torch.Tensor, eps: torch.Tensor, abar: Abar) -> torch.Tensor:
    """The v target ``sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022)."""
    return _sqrt(abar) * eps - _sqrt(1 - abar) * x0


def x0_eps_from_output(output: torch.Tensor, x_t: torch.Tensor, abar: Abar, prediction_type: str):
    """Both ``(x0_hat, eps_hat)`` from a network output of the given parameterisation."""
    return x0_eps_from_output_sqrt(output, x_t, _sqrt(abar), _sqrt(1 - abar), prediction_type)


def x0_eps_from_output_sqrt(output, x_t, sqrt_abar, sqrt_one_minus_abar, prediction_type: str):
    """:func:`x0_eps_from_output` with the square roots given (samplers precompute them per step)."""
    if prediction_type == "eps":
        return (x_t - sqrt_one_minus_abar * output) / sqrt_abar, output
    if prediction_type == "x0":
        return output, (x_t - sqrt_abar * output) / sqrt_one_minus_abar
    if prediction_type == "v":
        return sqrt_abar * x_t - sqrt_one_minus_abar * output, sqrt_abar * output + sqrt_one_minus_abar * x_t
    raise UserError(f"unknown prediction type {prediction_type!r}: choose one of eps, x0, v")


def training_target(x0: torch.Tensor, eps: torch.Tensor, abar: Abar, prediction_type: str) -> torch.Tensor:
    """What a network of the given parameterisation regresses (in whitened coordinates)."""
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        return velocity(x0, eps, abar)
    raise UserError(f"unknown prediction type {prediction_type!r}: choose one of eps, x0, v")


def posterior_coefficients(abar: float, abar_prev: float) -> tuple[float, float, float]:
    """``(c1, c2, var)`` of q(x_prev | x_t, x0) = N(c1 x0 + c2 x_t, var) for one (possibly strided) step.

    With ``beta = 1 - abar / abar_prev`` (the respaced beta): ``c1 = sqrt(abar_prev) beta / (1 - abar)``,
    ``c2 = sqrt(1 - beta) (1 - abar_prev) / (1 - abar)``, ``var = beta (1 - abar_prev) / (1 - abar)`` (Ho et al. eq. 7).
    """
    beta = 1.0 - abar / abar_prev
    c1 = abar_prev**0.5 * beta / (1.0 - abar)
    c2 = (1.0 - beta) ** 0.5 * (1.0 - abar_prev) / (1.0 - abar)
    var = beta * (1.0 - abar_prev) / (1.0 - abar)
    return c1, c2, var


def p2_weight(abar: Abar, gamma: float = 1.0, k: float = 1.0) -> Abar:
    """P2 loss weight ``1 / (k + SNR)^gamma`` (Choi et al. 2022); with k = gamma = 1 it equals ``1 - abar``."""
    snr = abar / (1 - abar)
    return 1.0 / (k + snr) ** gamma


# ----------------------------------------------------------------------------------------------- shift


def _k_quadratic(abar: Abar) -> Abar:
    return _sqrt(abar) * (1 - _sqrt(abar))


def _k_prior(abar: Abar) -> Abar:
    return 1 - _sqrt(abar)


def _k_none(abar: Abar) -> Abar:
    return 0.0 * abar


K_SCHEDULES: dict[str, Callable[[Abar], Abar]] = {
    "none": _k_none,
    "quadratic": _k_quadratic,  # ShiftDDPMs' quadratic shift sqrt(abar)(1 - sqrt(abar)); ContextDiff's default
    "prior": _k_prior,  # 1 - sqrt(abar): the terminal distribution is centred on m (Shifted Diffusion)
}


def k_schedule(name: str) -> Callable[[Abar], Abar]:
    try:
        return K_SCHEDULES[name]
    except KeyError:
        raise UserError(f"unknown k_t schedule {name!r}: choose one of {', '.join(K_SCHEDULES)}") from None


MeanFn = Callable[[torch.Tensor], torch.Tensor]
LevelMeanFn = Callable[[torch.Tensor, float], torch.Tensor]


class LevelMean:
    """A shift mean that also depends on the noise level: ``m_t = f(x0_hat, abar_t)``, evaluated lazily per level.

    A time-aware ContextDiff bias ``r_phi(x0, c, t)`` gives every level of the chain its own mean, so one reverse
    step needs ``m`` at two levels: ``m_t`` to whiten ``x_t`` and ``m_{t-1}`` to un-whiten the result. The whitened
    chain is still a plain DDPM (``y_t = x_t - k_t m_t`` has marginal ``N(sqrt(abar_t) x0, 1 - abar_t)`` for any
    per-level means), so the samplers stay unchanged: :meth:`Shift.whiten` / :meth:`Shift.unwhiten` ask this object
    for the mean at their own level. Levels where ``k`` vanishes (the clean end) never evaluate ``f``.
    """

    def __init__(self, fn: LevelMeanFn, x0_hat: torch.Tensor):
        self._fn, self._x0_hat = fn, x0_hat
        self._cache: dict[float, torch.Tensor] = {}

    def at(self, abar: Abar) -> torch.Tensor:
        if isinstance(abar, torch.Tensor):
            return self._fn(self._x0_hat, abar)
        key = float(abar)
        if key not in self._cache:  # whiten and the next step's checks may ask for the same level twice
            self._cache[key] = self._fn(self._x0_hat, key)
        return self._cache[key]


def _is_zero(value: Abar) -> bool:
    return not isinstance(value, torch.Tensor) and float(value) == 0.0


@dataclass
class Shift:
    """The shift of the generalised process: ``k_t`` (by name or function of abar), ``m`` and ``S``.

    ``mean`` is either a tensor (constant, e.g. Shifted Diffusion's bank mean), or a callable ``x0_hat -> m``
    re-estimated from the denoiser's clean prediction at every reverse step (ContextDiff's ``r_phi(x0_hat, c)``),
    or, with ``mean_depends_on_level``, a callable ``(x0_hat, abar) -> m_t`` (a time-aware ``r_phi(x0_hat, c, t)``;
    see :class:`LevelMean`). ``scale`` is ``S`` (broadcastable to x, e.g. per-dimension std) or None for ``S = 1``.
    """

    k: Union[str, Callable[[Abar], Abar]] = "none"
    mean: Union[torch.Tensor, MeanFn, LevelMeanFn, None] = None
    scale: Union[torch.Tensor, None] = None
    mean_depends_on_level: bool = False

    def __post_init__(self):
        self._k = k_schedule(self.k) if isinstance(self.k, str) else self.k
        if self.mean_depends_on_level and not self.mean_depends_on_x0:
            raise ValueError("a level-dependent shift mean must be a callable (x0_hat, abar) -> m")

    @property
    def mean_depends_on_x0(self) -> bool:
        return callable(self.mean) and not isinstance(self.mean, torch.Tensor)

    def k_at(self, abar: Abar) -> Abar:
        return self._k(abar)

    def resolve_mean(self, x0_hat: torch.Tensor | None) -> torch.Tensor | LevelMean | None:
        if self.mean is None:
            return None
        if self.mean_depends_on_x0:
            if x0_hat is None:
                raise ValueError("this shift's mean depends on x0: pass the x0 estimate")
            if self.mean_depends_on_level:
                return LevelMean(self.mean, x0_hat)
            return self.mean(x0_hat)
        return self.mean

    def offset(self, abar: Abar, m: torch.Tensor | LevelMean | None) -> torch.Tensor | None:
        """``k(abar) m`` at this level (None when there is nothing to add)."""
        if m is None:
            return None
        k = self.k_at(abar)
        if isinstance(m, LevelMean):
            if _is_zero(k):
                return None
            m = m.at(abar)
        return k * m

    def whiten(self, x: torch.Tensor, abar: Abar, m: torch.Tensor | LevelMean | None) -> torch.Tensor:
        """``y = (x - k(abar) m) / S``: a point of the shifted chain at level abar -> the standard chain."""
        offset = self.offset(abar, m)
        if offset is not None:
            x = x - offset
        if self.scale is not None:
            x = x / self.scale
        return x

    def unwhiten(self, y: torch.Tensor, abar: Abar, m: torch.Tensor | LevelMean | None) -> torch.Tensor:
        """Inverse of :meth:`whiten`: ``x = S y + k(abar) m``."""
        if self.scale is not None:
            y = y * self.scale
        offset = self.offset(abar, m)
        if offset is not None:
            y = y + offset
        return y


def q_sample(
    x0: torch.Tensor, abar: Abar, noise: torch.Tensor, shift: Shift | None = None, m: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward marginal ``x_t = sqrt(abar) x0 + k_t m + sqrt(1 - abar) S noise``.

    ``m`` overrides ``shift.mean`` (e.g. the bias computed from the clean x0 during training).
    """
    if shift is None:
        return q_sample_standard(x0, abar, noise)
    if m is None:
        m = shift.resolve_mean(x0)
    y0 = shift.whiten(x0, 1.0, m)
    return shift.unwhiten(q_sample_standard(y0, abar, noise), abar, m)


def shifted_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, abar: float, abar_prev: float, shift: Shift, m: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_prev | x_t, x0) of the shifted process, through the whitening identity.

    Equals ContextDiff's ``c1 x0 + c2 x_t + (k_prev - c2 k_t) r`` (contextdiff/METHOD.md) and Shifted Diffusion's
    ``c1 x0 + c2 x_t + (1 - c1 - c2) mu`` with variance ``var * S^2`` (shifted/METHOD.md); both checked in the tests.
    """
    c1, c2, var = posterior_coefficients(abar, abar_prev)
    y_mean = c1 * shift.whiten(x0, 1.0, m) + c2 * shift.whiten(x_t, abar, m)
    mean = shift.unwhiten(y_mean, abar_prev, m)
    scale_sq = 1.0 if shift.scale is None else shift.scale**2
    return mean, var * scale_sq * torch.ones_like(mean)
