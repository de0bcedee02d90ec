"""DDPM and DDIM sampling, and DDIM inversion, as plain functions over a denoiser.

A *denoiser* is any callable ``denoiser(x_t, t) -> output`` where ``t`` is a LongTensor ``[B]`` of ORIGINAL training
timesteps, with two optional attributes: ``prediction_type`` (``eps`` | ``x0`` | ``v``, default ``eps``) and
``learned_variance`` (True when the output carries ADM's variance interpolant in its second half of channels).
Classifier-free guidance and model combinations are denoiser wrappers (``common.denoisers``), never samplers.

Three hooks, shared by every method:

- ``guidance(x_t, t) -> grad``: the gradient of a log-likelihood / energy w.r.t. x_t (in x coordinates). DDPM adds
  ``variance * grad`` to the mean (Dhariwal & Nichol 2021, Alg. 1; SDG); DDIM shifts the noise estimate by
  ``-sqrt(1 - abar) grad`` (their Alg. 2, "condition_score").
- ``shift``: a :class:`common.process.Shift`; the step is taken in whitened coordinates (process.py) with ``m``
  re-estimated from the current ``x0_hat`` at every step when the shift's mean depends on x0 (ContextDiff).
- ``callback(i, t, x_t, x0_hat)``: called after the model at every step, for progress images, influence maps, ...

Noise: the initial ``x_T`` and every per-step noise are drawn with ``generator`` (one ``torch.Generator``, or one per
sample so that an image does not depend on the batch it was drawn in), in the order diffusers' schedulers draw them,
so the same seed gives the same images as diffusers' pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from common.compile import prepare_denoiser
from common.errors import UserError
from common.process import Shift, canonical_prediction_type, posterior_coefficients, x0_eps_from_output_sqrt
from common.schedule import NoiseSchedule, SamplingPlan


Generator = Union[torch.Generator, Sequence[torch.Generator], None]
Guidance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# ``progress``: True = a tqdm bar, False = silent, or ``report(stage, steps_done, total)`` called after every step
# (what a page draws its progress bar from).
Progress = Union[bool, Callable[[str, int, int], None]]
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
SAMPLERS = ("ddim", "ddpm")


def randn(shape: Sequence[int], generator: Generator = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn like diffusers' ``randn_tensor`` (per-sample when given a list of generators)."""
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise UserError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _denoiser_kind(denoiser, prediction_type: Optional[str]) -> tuple[str, bool]:
    ptype = canonical_prediction_type(prediction_type or getattr(denoiser, "prediction_type", "eps"))
    return ptype, bool(getattr(denoiser, "learned_variance", False))


def _check_shift(shift: Optional[Shift], ptype: str) -> None:
    if shift is not None and shift.mean_depends_on_x0 and ptype != "x0":
        raise UserError(
            "a shift re-estimated from x0 needs an x0-predicting denoiser (eps/v predictions are circular here): "
            "wrap the network so it returns x0, e.g. from its shifted-eps output"
        )


def _initial_noise(shape, x_T, generator, device, dtype, shift, abar_T) -> torch.Tensor:
    if x_T is not None:
        return x_T.to(device=device, dtype=dtype)
    if shape is None:
        raise UserError("give either the sample shape or the initial noise x_T")
    z = randn(shape, generator, device, dtype)
    if shift is None:
        return z
    # The terminal marginal of the shifted chain; a mean that needs x0 is unknown here (k_T ~ 0 by design).
    m = None if shift.mean_depends_on_x0 else shift.resolve_mean(None)
    return shift.unwhiten(z, abar_T, m)


class _Step:
    """Per-step coefficients, computed once before the loop in the sample's dtype.

    The operations follow diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step`` one for one, so float32 runs
    agree with diffusers to rounding (e.g. ``1 - abar_prev`` near 1 loses digits in float32 in both) and float64
    runs are float64-exact.
    """

    __slots__ = ("t", "abar", "abar_prev", "sqrt_a", "sqrt_1ma", "sqrt_ap", "c1", "c2", "post_var", "beta",
                 "sigma", "ddim_dir")

    def __init__(self, t: int, abar: float, abar_prev: float, dtype: torch.dtype, eta: float = 0.0):
        a = torch.tensor(abar, dtype=dtype)
        ap = torch.tensor(abar_prev, dtype=dtype)
        beta_prod, beta_prod_prev = 1 - a, 1 - ap
        cur_alpha = a / ap
        cur_beta = 1 - cur_alpha
        post_var = beta_prod_prev / beta_prod * cur_beta
        sigma = eta * post_var**0.5
        self.t, self.abar, self.abar_prev = t, abar, abar_prev
        self.sqrt_a, self.sqrt_1ma, self.sqrt_ap = float(a**0.5), float(beta_prod**0.5), float(ap**0.5)
        self.c1 = float(ap**0.5 * cur_beta / beta_prod)
        self.c2 = float(cur_alpha**0.5 * beta_prod_prev / beta_prod)
        self.post_var, self.beta, self.sigma = float(post_var), float(cur_beta), float(sigma)
        self.ddim_dir = float((beta_prod_prev - sigma**2).clamp(min=0) ** 0.5)


def _steps(plan: SamplingPlan, schedule: NoiseSchedule, dtype: torch.dtype, eta: float = 0.0) -> list[_Step]:
    abars, prevs = plan.alphas(schedule)
    return [_Step(t, a, p, dtype, eta) for t, a, p in zip(plan.timesteps, abars, prevs)]


class _Predictor:
    """Turns one raw denoiser output into whitened ``(y_t, x0_y, eps_y, m)`` and the variance interpolant."""

    def __init__(self, ptype: str, learned_variance: bool, shift: Optional[Shift], clip_x0: Optional[float]):
        self.ptype, self.learned_variance, self.shift, self.clip_x0 = ptype, learned_variance, shift, clip_x0

    def __call__(self, output: torch.Tensor, x: torch.Tensor, step: _Step):
        abar = step.abar
        var_out = None
        if self.learned_variance:
            output, var_out = output.chunk(2, dim=1)
        shift, m = self.shift, None
        if shift is None:
            y, out_y = x, output
        else:
            m = shift.resolve_mean(output if shift.mean_depends_on_x0 else None)
            y = shift.whiten(x, abar, m)
            out_y = shift.whiten(output, 1.0, m) if self.ptype == "x0" else output
        x0_y, eps_y = x0_eps_from_output_sqrt(out_y, y, step.sqrt_a, step.sqrt_1ma, self.ptype)
        if self.clip_x0 is not None:
            x0 = self.to_data(x0_y).clamp(-self.clip_x0, self.clip_x0)
            x0_y = x0 if shift is None else shift.whiten(x0, 1.0, m)
            eps_y = (y - step.sqrt_a * x0_y) / step.sqrt_1ma
        return y, x0_y, eps_y, m, var_out

    def to_data(self, x0_y: torch.Tensor) -> torch.Tensor:
        if self.shift is None or self.shift.scale is None:
            return x0_y
        return x0_y * self.shift.scale

    def grad_to_whitened(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient w.r.t. x expressed w.r.t. y = (x - k m) / S is ``S * grad``."""
        if self.shift is None or self.shift.scale is None:
            return grad
        return grad * self.shift.scale

    def unwhiten(self, y: torch.Tensor, abar: float, m) -> torch.Tensor:
        return y if self.shift is None else self.shift.unwhiten(y, abar, m)


def _timestep_tensors(plan: SamplingPlan, batch: int, device) -> list[torch.Tensor]:
    return [torch.full((batch,), int(t), device=device, dtype=torch.long) for t in plan.timesteps]


class _Run:
    """The setup every sampler shares: the denoiser's kind, the per-step coefficients, the start point, the
    prediction reader and the timestep tensors."""

    def __init__(self, denoiser, schedule, plan, prediction_type, shift, clip_x0, dtype, eta=0.0, *, x=None,
                 shape=None, x_T=None, generator=None, device=None):
        self.ptype, self.learned = _denoiser_kind(denoiser, prediction_type)
        _check_shift(shift, self.ptype)
        # inside common.compile.compiling() (--compile): its networks are compiled after the first step
        self.denoiser = prepare_denoiser(denoiser)
        self.steps = _steps(plan, schedule, dtype, eta)
        if x is None:
            x = _initial_noise(shape, x_T, generator, device, dtype, shift, self.steps[0].abar)
        self.x = x
        self.predict = _Predictor(self.ptype, self.learned, shift, clip_x0)
        self.ts = _timestep_tensors(plan, x.shape[0], x.device)


def _iterate(indices, total: int, desc: str, progress: Progress):
    """``indices`` with the progress of :data:`Progress`."""
    if callable(progress):
        progress(desc, 0, total)
        for done, i in enumerate(indices, start=1):
            yield i
            progress(desc, done, total)
        return
    yield from tqdm(indices, total=total, desc=desc, disable=not progress, leave=False)


def _learned_range_min_logs(plan: SamplingPlan, schedule: NoiseSchedule) -> list[float]:
    """ADM's clipped posterior log-variance per step: the step onto clean data (variance 0) borrows its neighbour's."""
    abars, prevs = plan.alphas(schedule)
    variances = [posterior_coefficients(a, p)[2] for a, p in zip(abars, prevs)]
    logs = []
    for i, v in enumerate(variances):
        if v <= 0.0:
            v = variances[i - 1] if i > 0 else 1.0 - abars[i] / prevs[i]
        logs.append(math.log(v))
    return logs


@torch.no_grad()
def sample_ddpm(
    denoiser,
    schedule: NoiseSchedule,
    plan: SamplingPlan,
    shape: Optional[Sequence[int]] = None,
    *,
    x_T: Optional[torch.Tensor] = None,
    generator: Generator = None,
    variance_type: str = "fixed_small",
    clip_x0: Optional[float] = None,
    guidance: Optional[Guidance] = None,
    shift: Optional[Shift] = None,
    callback: Optional[Callback] = None,
    prediction_type: Optional[str] = None,
    device=None,
    dtype=torch.float32,
    progress: Progress = True,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) over any plan: full 1000 steps or a respaced chain.

    ``variance_type``: ``fixed_small`` (posterior variance), ``fixed_large`` (beta of the step), or
    ``learned_range`` (ADM, Nichol & Dhariwal 2021 eq. 15: ``exp(f log beta + (1 - f) log var_clipped)``,
    ``f = (v + 1) / 2`` from the model's second output half). Noise is added when the timestep is > 0 (as diffusers
    does). Returns x_0, shape ``[B, ...]``.
    """
    if variance_type not in VARIANCE_TYPES:
        raise UserError(f"unknown variance type {variance_type!r}: choose one of {', '.join(VARIANCE_TYPES)}")
    if variance_type == "learned_range" and not _denoiser_kind(denoiser, prediction_type)[1]:
        raise UserError("variance_type learned_range needs a denoiser with learned_variance=True (2x out channels)")
    run = _Run(denoiser, schedule, plan, prediction_type, shift, clip_x0, dtype, shape=shape, x_T=x_T,
               generator=generator, device=device)
    x, steps, predict, ts, device = run.x, run.steps, run.predict, run.ts, run.x.device
    denoiser = run.denoiser
    min_logs = _learned_range_min_logs(plan, schedule) if variance_type == "learned_range" else None
    scale_sq = None if shift is None or shift.scale is None else shift.scale**2
    for i in _iterate(range(len(plan)), len(plan), "DDPM", progress):
        step = steps[i]
        y, x0_y, eps_y, m, var_out = predict(denoiser(x, ts[i]), x, step)
        if callback is not None:
            callback(i, step.t, x, predict.to_data(x0_y))
        mean = predict.unwhiten(step.c1 * x0_y + step.c2 * y, step.abar_prev, m)
        if variance_type == "fixed_small":
            var = max(step.post_var, 1e-20)
        elif variance_type == "fixed_large":
            var = step.beta
        else:
            frac = (var_out + 1) / 2
            var = torch.exp(frac * math.log(step.beta) + (1 - frac) * min_logs[i])
        # The standard deviation is taken before scaling by S, so S = 1 reproduces the plain chain bit for bit
        # (sqrt of a float32 var * S^2 rounds differently from the float64 sqrt of var).
        std = var.sqrt() if isinstance(var, torch.Tensor) else math.sqrt(var)
        if scale_sq is not None:
            var, std = var * scale_sq, std * shift.scale
        if guidance is not None:
            mean = mean + var * guidance(x, ts[i])
        if step.t > 0:
            noise = randn(x.shape, generator, device, x.dtype)
            mean = mean + std * noise
        x = mean
    return x


@torch.no_grad()
def sample_ddim(
    denoiser,
    schedule: NoiseSchedule,
    plan: SamplingPlan,
    shape: Optional[Sequence[int]] = None,
    *,
    x_T: Optional[torch.Tensor] = None,
    generator: Generator = None,
    eta: float = 0.0,
    clip_x0: Optional[float] = None,
    guidance: Optional[Guidance] = None,
    shift: Optional[Shift] = None,
    callback: Optional[Callback] = None,
    prediction_type: Optional[str] = None,
    device=None,
    dtype=torch.float32,
    progress: Progress = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with ``eta`` in [0, 1]; eta = 0 is deterministic.

    ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z`` with
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)``, all in whitened coordinates.
    With ``clip_x0`` the noise estimate is re-derived from the clipped x0 (guided-diffusion; diffusers'
    ``use_clipped_model_output=True``). Returns x_0.
    """
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must lie in [0, 1], got {eta}")
    run = _Run(denoiser, schedule, plan, prediction_type, shift, clip_x0, dtype, eta, shape=shape, x_T=x_T,
               generator=generator, device=device)
    x, steps, predict, ts, device = run.x, run.steps, run.predict, run.ts, run.x.device
    denoiser = run.denoiser
    for i in _iterate(range(len(plan)), len(plan), "DDIM", progress):
        step = steps[i]
        y, x0_y, eps_y, m, _ = predict(denoiser(x, ts[i]), x, step)
        if guidance is not None:
            eps_y = eps_y - step.sqrt_1ma * predict.grad_to_whitened(guidance(x, ts[i]))
            x0_y = (y - step.sqrt_1ma * eps_y) / step.sqrt_a
        if callback is not None:
            callback(i, step.t, x, predict.to_data(x0_y))
        y_prev = step.sqrt_ap * x0_y + step.ddim_dir * eps_y
        if eta > 0:
            y_prev = y_prev + step.sigma * randn(x.shape, generator, device, x.dtype)
        x = predict.unwhiten(y_prev, step.abar_prev, m)
    return x


def _inversion_step(x, eps_y, m, step: _Step, shift, predict: _Predictor) -> torch.Tensor:
    """The x_t that one eta = 0 DDIM step with noise estimate ``eps_y`` would map onto ``x`` (at abar_prev)."""
    y_cur = x if shift is None else shift.whiten(x, step.abar_prev, m)
    x0_y = (y_cur - math.sqrt(1.0 - step.abar_prev) * eps_y) / step.sqrt_ap
    return predict.unwhiten(step.sqrt_a * x0_y + step.sqrt_1ma * eps_y, step.abar, m)


@torch.no_grad()
def invert_ddim(
    denoiser,
    schedule: NoiseSchedule,
    plan: SamplingPlan,
    x0: torch.Tensor,
    *,
    shift: Optional[Shift] = None,
    callback: Optional[Callback] = None,
    prediction_type: Optional[str] = None,
    return_trajectory: bool = False,
    fixed_point_iters: int = 0,
    progress: Progress = True,
):
    """Deterministic DDIM inversion: clean ``x0`` -> ``x_T`` along ``plan`` walked backwards (eta = 0).

    Each step moves from level ``abar_prev`` to ``abar`` with the model evaluated at the target timestep t (the
    convention of Null-text inversion / Tune-A-Video and diffusers' ``DDIMInverseScheduler``); the model's output is
    read as if x were at t, giving eps_hat, and ``x_next = sqrt(abar) x0_hat + sqrt(1 - abar) eps_hat`` with x0_hat
    re-derived at the current level. That is only a first-order inverse of a sampling step (the model saw the point
    one level early); ``fixed_point_iters > 0`` re-evaluates the model at the new point and solves the implicit
    equation "DDIM sampling from x_t lands on x_prev" by fixed-point iteration, so that sampling back reproduces the
    start far more closely. Returns ``x_T`` (and, if asked, the latents at every level, clean first).
    """
    run = _Run(denoiser, schedule, plan, prediction_type, shift, None, x0.dtype, x=x0)
    x, steps, predict, ts, denoiser = run.x, run.steps, run.predict, run.ts, run.denoiser
    trajectory = [x]
    for i in _iterate(reversed(range(len(plan))), len(plan), "DDIM inversion", progress):
        step = steps[i]
        _, x0_y_at_t, eps_y, m, _ = predict(denoiser(x, ts[i]), x, step)
        if callback is not None:
            callback(i, step.t, x, predict.to_data(x0_y_at_t))
        x_next = _inversion_step(x, eps_y, m, step, shift, predict)
        for _ in range(fixed_point_iters):
            _, _, eps_y, m, _ = predict(denoiser(x_next, ts[i]), x_next, step)
            x_next = _inversion_step(x, eps_y, m, step, shift, predict)
        x = x_next
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


def sample(
    sampler: str,
    denoiser,
    schedule: NoiseSchedule,
    plan: SamplingPlan,
    shape: Optional[Sequence[int]] = None,
    *,
    eta: float = 0.0,
    variance_type: str = "fixed_small",
    **kwargs,
) -> torch.Tensor:
    """The one entry point by name: ``ddim`` -> :func:`sample_ddim` (with ``eta``), ``ddpm`` -> :func:`sample_ddpm`
    (with ``variance_type``; a scheduler config's ``variance_type`` is what callers usually pass). ``kwargs`` are
    the keywords both samplers share (``x_T``, ``generator``, ``guidance``, ``shift``, ``callback``, ``clip_x0``,
    ``device``, ``dtype``, ``progress``, ``prediction_type``)."""
    if sampler == "ddim":
        return sample_ddim(denoiser, schedule, plan, shape, eta=eta, **kwargs)
    if sampler == "ddpm":
        return sample_ddpm(denoiser, schedule, plan, shape, variance_type=variance_type, **kwargs)
    raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
