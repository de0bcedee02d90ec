"""ContextDiff's contextualized process on the core's shift hook, its parameterisations and its training loss.

Paper (equations in METHOD.md): forward marginal ``x_t = sqrt(abar_t) x0 + k_t r + sqrt(1 - abar_t) eps`` with
``r = r_phi(x0, c)`` (:class:`contextdiff.adapter.RelationalNet`) and a schedule ``k_t`` (``k_0 = 0``, ``k_T ~ 0``).
The core (``common.process.Shift``) implements exactly this with ``m = r``; its samplers take the step in whitened
coordinates ``y = x - k r`` and re-estimate ``r_hat = r_phi(x0_hat, c)`` from the denoiser's x0 prediction at every
step, which is the paper's reverse process (DDPM, DDIM, DDIM inversion). Nothing here re-implements sampling maths:

- :func:`contextual_shift` builds that ``Shift`` from an adapter and the text;
- :class:`ShiftedEpsToX0` presents a shifted-eps network (METHOD.md) to the core as an x0-predicting denoiser;
- :func:`contextual_loss` is the training objective (METHOD.md, "loss") for stage 1 (adapter, denoiser frozen or joint)
  and stage 2 (denoiser, with the trained adapter frozen and used), with the released code's ``--detach_xt``
  behind a flag.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.process import K_SCHEDULES, Abar, Shift, k_schedule, p2_weight, q_sample, x0_from_eps
from common.schedule import NoiseSchedule


PARAMETERIZATIONS = ("shifted_eps", "x0")
# simple: the regression of METHOD.md eq. (loss) with an optional separate r term; elbo: the variational bound of the
# shifted process, one joint term per step (METHOD.md, "The ELBO objective").
OBJECTIVES = ("simple", "elbo")
STAGES = (1, 2)
# What a diffusers scheduler config must say for each parameterisation (a saved stage-2 model carries it).
SCHEDULER_PREDICTION_TYPE = {"shifted_eps": "epsilon", "x0": "sample"}


def check_parameterization(name: str) -> str:
    if name not in PARAMETERIZATIONS:
        raise UserError(f"unknown parameterization {name!r}: choose one of {', '.join(PARAMETERIZATIONS)}")
    return name


def parameterization_from_prediction_type(prediction_type: str) -> str:
    """``epsilon`` -> ``shifted_eps`` (an SD UNet's eps head regresses the shifted eps), ``sample`` -> ``x0``."""
    table = {"epsilon": "shifted_eps", "eps": "shifted_eps", "sample": "x0", "x0": "x0"}
    if prediction_type not in table:
        raise UserError(
            f"ContextDiff needs an eps- or x0-predicting model, the scheduler says {prediction_type!r}: "
            "fine-tune with --parameterization shifted_eps (epsilon) or x0 (sample)"
        )
    return table[prediction_type]


def contextual_k(name: str = "quadratic", scale: float = 1.0) -> Callable[[Abar], Abar]:
    """The k_t schedule as a function of abar: ``quadratic`` sqrt(abar)(1 - sqrt(abar)) (default; ShiftDDPMs),
    ``prior`` 1 - sqrt(abar) (the released T2I code), ``none`` 0; times ``scale``. Unknown name -> UserError."""
    base = k_schedule(name)
    if scale == 1.0:
        return base
    return lambda abar: scale * base(abar)


def is_time_aware(adapter: Optional[nn.Module]) -> bool:
    """True for a relational net that takes the noise level, ``r_phi(x0, c, t)``."""
    config = getattr(_unwrap(adapter), "config", None) if adapter is not None else None
    return bool(getattr(config, "time_aware", False))


def contextual_shift(
    adapter: nn.Module,
    text: Any,
    *,
    k: str = "quadratic",
    k_scale: float = 1.0,
    text_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> Shift:
    """The core ``Shift`` of ContextDiff: ``m = r_phi(x0_hat, c)`` re-estimated from x0_hat, ``k_t`` by name.

    ``text`` (and ``text_masks``) are the adapter's conditional text inputs for the batch, ``[B, L_i, D_i]`` per
    source. Under classifier-free guidance the core calls ``mean`` once per step on the *guided* x0_hat (one r_hat,
    never one per branch), because guidance happens inside the denoiser wrapper.
    """

    if is_time_aware(adapter):
        # One r per level: the core whitens x_t with r_phi(x0_hat, c, t) and un-whitens with r_phi(x0_hat, c, t-1).
        def level_mean(x0_hat: torch.Tensor, abar) -> torch.Tensor:
            return adapter(x0_hat, text, text_masks, abar=abar)

        return Shift(k=contextual_k(k, k_scale), mean=level_mean, mean_depends_on_level=True)

    def mean(x0_hat: torch.Tensor) -> torch.Tensor:
        return adapter(x0_hat, text, text_masks)

    return Shift(k=contextual_k(k, k_scale), mean=mean)


class ShiftedEpsToX0:
    """Present a shifted-eps network (``g ~ eps + k_t r / sqrt(1 - abar)``) to the core as an x0-predicting denoiser.

    The network output ``g [B, C, H, W]`` regresses ``(x_t - sqrt(abar) x0) / sqrt(1 - abar) = eps + k_t r /
    sqrt(1 - abar)``, so ``x0_hat = (x_t - sqrt(1 - abar) g) / sqrt(abar)`` needs no r (no circularity); the core
    then computes ``r_hat`` from x0_hat and ``eps_hat = g - k_t r_hat / sqrt(1 - abar)`` through its whitening. The
    map g -> x0_hat is affine, so wrapping a ``CFGDenoiser`` (guided g) gives exactly the guided x0_hat.

    ``model``: any ``(x_t, t) -> g`` callable (``UNetDenoiser``, ``CFGDenoiser``); ``t`` are original timesteps.
    """

    prediction_type = "x0"
    learned_variance = False

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule):
        self.model, self.schedule = model, schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = self.model(x_t, t)
        return x0_from_eps(x_t, g, self.schedule.abar(t, like=x_t))


def as_x0_denoiser(model, parameterization: str, schedule: NoiseSchedule):
    """The core-facing x0 denoiser for a network of either parameterisation (``model``'s own type otherwise)."""
    if check_parameterization(parameterization) == "shifted_eps":
        return ShiftedEpsToX0(model, schedule)
    return model


# ----------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class ContextLossConfig:
    """The method's training flags (both stages), validated on construction (one-line UserError).

    stage: 1 trains the adapter (the denoiser too unless ``freeze_unet``); 2 fine-tunes the denoiser with the
        trained adapter frozen and used to build x_t and the target.
    parameterization: ``shifted_eps`` (target eps + k_t r / sqrt(1 - abar); an SD UNet's eps head) or ``x0``.
    k_schedule, k_scale: see :func:`contextual_k`.
    freeze_unet: stage 1 only: the denoiser's weights stay fixed, gradients still flow THROUGH it into x_t.
    detach_xt: the released T2I code's ``q_sample(...).detach()``: off by default; with ``x0`` it
        starves the adapter of every gradient, with ``shifted_eps`` only the target's r path is left.
    cfg_drop_prob: rows whose UNet text is replaced by the null text (classifier-free guidance training). The
        process itself (x_t, target) keeps r of the true caption: at sampling both CFG branches see the same x_t,
        shifted by the conditional r_hat, so the unconditional branch must learn to denoise that same process.
    p2_gamma: P2 weight ``1 / (1 + SNR)^gamma`` (0 = unweighted MSE).
    lambda_r: weight of the ELBO's r term ``|(k_{t-1} - c2_t k_t)(r_phi(x0) - r_phi(x0_hat))|^2`` (METHOD.md, "loss").
    snr_gamma: Min-SNR-gamma weighting of the MSE (``common.diffusion_loss``; a shifted_eps model is weighted as an
        eps model, an x0 model as a sample model); None = unweighted. Exclusive with p2_gamma.
    noise_offset: per-(sample, channel) offset noise added to eps (``common.diffusion_loss.training_noise``).
    objective: ``simple`` (the regression above) or ``elbo``: the shifted process's variational bound, one joint
        term ``|c1 (x0 - x0_hat) + (k_{t-1} r_{t-1} - c2 k_t r_t) - (same with r_hat)|^2 / (2 beta_tilde_t)`` per
        step with its exact weight, plus the prior term L_T (METHOD.md, "The ELBO objective"). It already holds
        the r term, so ``lambda_r``, ``p2_gamma`` and ``snr_gamma`` must stay unset with it.
    """

    stage: int = 1
    parameterization: str = "shifted_eps"
    k_schedule: str = "quadratic"
    k_scale: float = 1.0
    freeze_unet: bool = False
    detach_xt: bool = False
    cfg_drop_prob: float = 0.0
    p2_gamma: float = 0.0
    lambda_r: float = 0.0
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    objective: str = "simple"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "elbo" and (self.lambda_r > 0 or self.p2_gamma > 0 or self.snr_gamma is not None
                                         or self.noise_offset):
            raise UserError(
                "--objective elbo already weights every step and holds the r term, and assumes standard Gaussian "
                "noise: leave --lambda_r, --p2_gamma, --snr_gamma and --noise_offset unset"
            )
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}: 1 trains the adapter, 2 fine-tunes the diffusion model")
        check_parameterization(self.parameterization)
        k_schedule(self.k_schedule)  # unknown name -> one-line UserError now, not at the first step
        if not 0.0 <= self.cfg_drop_prob < 1.0:
            raise UserError(f"cfg_drop_prob must lie in [0, 1), got {self.cfg_drop_prob}")
        if self.lambda_r < 0 or self.p2_gamma < 0:
            raise UserError("lambda_r and p2_gamma must be >= 0")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"--snr_gamma must be > 0, got {self.snr_gamma}")
        if self.snr_gamma is not None and self.p2_gamma > 0:
            raise UserError("--snr_gamma and --p2_gamma are two loss weightings: pass one of them")
        if self.noise_offset < 0:
            raise UserError(f"--noise_offset must be >= 0, got {self.noise_offset}")
        if self.stage == 2 and self.freeze_unet:
            raise UserError("--freeze_unet with stage 2 leaves nothing to train: stage 2 fine-tunes the UNet")
        if self.stage == 1 and self.freeze_unet and self.detach_xt and self.parameterization == "x0":
            raise UserError(
                "--detach_xt with --parameterization x0 cuts every path from the adapter to the loss, and "
                "--freeze_unet leaves nothing else to train: drop --detach_xt (it only reproduces the released bug)"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ContextLossConfig:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})


def add_contextdiff_args(parser: argparse.ArgumentParser, stage: int = 1) -> None:
    """The method's flags for a training script (the trainer's own flags come from ``common.train``)."""
    d = ContextLossConfig(stage=stage)
    parser.set_defaults(stage=stage)
    parser.add_argument("--parameterization", choices=PARAMETERIZATIONS, default=d.parameterization,
                        help="shifted_eps: the UNet regresses eps + k_t r / sqrt(1 - abar) (an SD eps head); x0")
    parser.add_argument("--k_schedule", default=d.k_schedule, help=f"k_t schedule, one of {', '.join(K_SCHEDULES)}")
    parser.add_argument("--k_scale", type=float, default=d.k_scale, help="multiplies k_t")
    if stage == 1:
        parser.add_argument("--freeze_unet", action=argparse.BooleanOptionalAction, default=True,
                            help="train the adapter only, UNet weights fixed (gradients still flow through the UNet "
                                 "into x_t); --no-freeze_unet trains both jointly")
    parser.add_argument("--detach_xt", action=argparse.BooleanOptionalAction, default=False,
                        help="released-code bug, for parity only: no gradient into the adapter through x_t")
    parser.add_argument("--cfg_drop_prob", type=float, default=0.1,
                        help="fraction of captions replaced by the empty prompt in the UNet (classifier-free guidance)")
    parser.add_argument("--p2_gamma", type=float, default=d.p2_gamma, help="P2 weight 1/(1+SNR)^gamma (0: plain MSE)")
    parser.add_argument("--lambda_r", type=float, default=d.lambda_r, help="weight of the ELBO's r term")
    parser.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                        help="simple: (weighted) MSE on the target (+ lambda_r r term); elbo: the shifted process's "
                             "variational bound with its exact per-step weights and joint x0/r term")


def _require_adapter(adapter: Optional[nn.Module], stage: int) -> None:
    if adapter is None:
        how = "build one (zero-initialised)" if stage == 1 else "pass --adapter_path <the stage-1 output folder>"
        raise UserError(f"stage {stage} needs the ContextDiff relational adapter, none was given: {how}")


def trainable_modules(
    config: ContextLossConfig, unet: nn.Module, adapter: Optional[nn.Module]
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(trainable, frozen)`` modules for ``Trainer.fit`` per stage; sets ``requires_grad`` accordingly.

    Stage 1: the adapter, plus the UNet unless ``freeze_unet``. Stage 2: the UNet; the adapter is required and
    frozen (it was trained in stage 1 and now defines the process the UNet is fine-tuned on).
    """
    _require_adapter(adapter, config.stage)
    if config.stage == 2:
        adapter.requires_grad_(False)
        return {"unet": unet}, {"adapter": adapter}
    adapter.requires_grad_(True)
    if config.freeze_unet:
        unet.requires_grad_(False)
        return {"adapter": adapter}, {"unet": unet}
    unet.requires_grad_(True)
    return {"adapter": adapter, "unet": unet}, {}


@dataclass
class ContextLossOutput:
    """``loss`` (scalar) plus numbers to log; accepted by ``common.train.Trainer`` as a LossOutput."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 for the loss (mixed precision); float32 / float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP / accelerate wrappers


def default_adapter_text(adapter: nn.Module, batch: dict[str, Any]):
    """The adapter's text inputs: ``batch["adapter_text"]`` or, for a CLIP-only adapter, the UNet's CLIP states."""
    if "adapter_text" in batch:
        return batch["adapter_text"], batch.get("adapter_text_mask")
    sources = tuple(_unwrap(adapter).config.text_sources)
    if sources != ("clip",):
        raise UserError(f"the adapter reads {list(sources)}: put its text states in batch['adapter_text']")
    return batch["encoder_hidden_states"], None


def _previous_abar(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``abar_{t-1}`` per sample with ``abar_{-1} = 1`` (the step from t = 0 lands on clean data)."""
    return torch.where(
        (t > 0).view(-1, *([1] * (like.ndim - 1))),
        schedule.abar((t - 1).clamp(min=0), like=like),
        torch.ones((), dtype=like.dtype, device=like.device),
    )


def _posterior_r_coefficient(schedule: NoiseSchedule, t: torch.Tensor, k, like: torch.Tensor) -> torch.Tensor:
    """``k_{t-1} - c2_t k_t`` per sample (r's coefficient in the posterior mean), with ``abar_{-1} = 1`` so the t = 0 term vanishes."""
    abar = schedule.abar(t, like=like).double()
    abar_prev = _previous_abar(schedule, t, abar)
    alpha = abar / abar_prev
    c2 = alpha.sqrt() * (1 - abar_prev) / (1 - abar)
    return (k(abar_prev) - c2 * k(abar)).to(like.dtype)


def elbo_step_coefficients(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    """``(abar_t, abar_{t-1}, c1, c2, var)`` per sample in float64 for the ELBO's step term.

    ``var`` is the posterior variance beta_tilde_t; at t = 0 it is 0 (the step lands on data), and the bound's
    decoder term uses the next variance instead, as ADM's clipped posterior variance does.
    """
    abar = schedule.abar(t, like=like).double()
    abar_prev = _previous_abar(schedule, t, abar)
    beta = 1 - abar / abar_prev
    c1 = abar_prev.sqrt() * beta / (1 - abar)
    c2 = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
    var = beta * (1 - abar_prev) / (1 - abar)
    if (t == 0).any():
        a1 = float(schedule.alphas_cumprod[1].double())
        a0 = float(schedule.alphas_cumprod[0].double())
        var_1 = (1 - a1 / a0) * (1 - a0) / (1 - a1)
        var = torch.where((t == 0).view_as(var), torch.full_like(var, var_1), var)
    return abar, abar_prev, c1, c2, var


def _relational(adapter: nn.Module, x: torch.Tensor, text, text_mask, abar, time_aware: bool, grad: bool = True):
    """``r_phi(x, c)`` or, for a time-aware net, ``r_phi(x, c, abar)``; without a graph when ``grad`` is False."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if time_aware:
            return adapter(x, text, text_mask, abar=abar.reshape(-1) if isinstance(abar, torch.Tensor) else abar)
        return adapter(x, text, text_mask)


def elbo_terms(
    x0: torch.Tensor,
    x0_hat: torch.Tensor,
    relational: Callable[[torch.Tensor, Any], torch.Tensor],
    r_t: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: NoiseSchedule,
    k: Callable,
    *,
    time_aware: bool,
    relational_clean: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(L_{t-1}, L_T)`` of the shifted process in nats per dimension (METHOD.md, the ELBO objective).

    ``L_{t-1} = |c1 (x0 - x0_hat) + (k_{t-1} r_{t-1} - c2 k_t r_t) - (k_{t-1} r_hat_{t-1} - c2 k_t r_hat_t)|^2
    / (2 var_t)``: the KL between the true posterior of the shifted chain and the model's step, which uses the same
    posterior with x0_hat and ``r_hat = r_phi(x0_hat, c)`` in place of x0 and r. The x0 and r parts share one
    square, cross term included. ``L_T = KL(N(sqrt(abar_T) x0 + k_T r_T, 1 - abar_T) || N(0, 1))``.
    ``relational(x, abar)`` evaluates r on the model's estimate (with a graph), ``relational_clean`` on the clean
    x0 (without one in stage 2; defaults to ``relational``); ``r_t`` is the r that built x_t.
    """
    relational_clean = relational if relational_clean is None else relational_clean
    abar, abar_prev, c1, c2, var = elbo_step_coefficients(schedule, timesteps, x0)
    f32 = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x0u, x0_hat_u = x0.to(f32), x0_hat.to(f32)
    k_t, k_prev = k(abar).to(f32), k(abar_prev).to(f32)
    r_t_hat = relational(x0_hat, abar).to(f32)
    if time_aware:
        r_prev, r_prev_hat = relational_clean(x0, abar_prev).to(f32), relational(x0_hat, abar_prev).to(f32)
    else:
        r_prev, r_prev_hat = r_t.to(f32), r_t_hat
    c1, c2, var = c1.to(f32), c2.to(f32), var.to(f32)
    diff = c1 * (x0u - x0_hat_u) + k_prev * (r_prev - r_prev_hat) - c2 * k_t * (r_t.to(f32) - r_t_hat)
    dims = tuple(range(1, x0.ndim))
    step = (diff**2 / (2 * var)).mean(dim=dims)

    abar_T = float(schedule.alphas_cumprod[-1].double())
    r_T = relational_clean(x0, abar_T).to(f32) if time_aware else r_t.to(f32)
    mean_T = abar_T**0.5 * x0u + float(k(torch.tensor(abar_T, dtype=torch.float64))) * r_T
    prior = 0.5 * ((1 - abar_T) + mean_T**2 - 1 - math.log(1 - abar_T))
    return step, prior.mean(dim=dims)


def contextual_loss(
    batch: dict[str, Any],
    unet: nn.Module,
    adapter: Optional[nn.Module],
    schedule: NoiseSchedule,
    config: Optional[ContextLossConfig] = None,
    *,
    null_text: Optional[torch.Tensor] = None,
    timesteps: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> ContextLossOutput:
    """One batch of ContextDiff's objective (METHOD.md, "loss"): ``w_t |target - net(x_t, c, t)|^2 (+ lambda_r term)``.

    batch:
        ``latents`` x0 ``[B, C, H, W]`` (scaled VAE latents); ``encoder_hidden_states`` the UNet's text ``[B, L, D]``;
        optionally ``adapter_text`` / ``adapter_text_mask`` (one ``[B, L_i, D_i]`` / ``[B, L_i]`` per adapter
        source; default: the UNet's CLIP states).
    Forward: ``r = r_phi(x0, c)``, ``x_t = sqrt(abar) x0 + k_t r + sqrt(1 - abar) eps`` (core ``q_sample``), NOT
    detached, so the adapter learns through the denoiser's input (the released code detached it: ``detach_xt``).
    Target: ``eps + k_t r / sqrt(1 - abar)`` (shifted_eps) or ``x0``. Stage 2 computes r without a graph: the
    adapter is fixed there, and it is required (one-line UserError without it).
    ``timesteps`` ``[B]`` / ``noise`` override the random draws (tests, parity checks).
    """
    config = ContextLossConfig() if config is None else config
    _require_adapter(adapter, config.stage)
    x0 = batch["latents"]
    cond = batch["encoder_hidden_states"]
    b = x0.shape[0]
    if timesteps is None:  # a CPU generator draws on the CPU (reproducible across devices), else on the device
        timesteps = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator,
                                  device="cpu" if generator is not None else x0.device)
    timesteps = timesteps.to(x0.device).long()
    if noise is None:
        noise = (torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) if generator is not None
                 else torch.randn_like(x0))
        if config.noise_offset:
            shape = x0.shape[:2] + (1,) * (x0.ndim - 2)
            offset = (torch.randn(shape, generator=generator, dtype=x0.dtype).to(x0.device) if generator is not None
                      else torch.randn(shape, device=x0.device, dtype=x0.dtype))
            noise = noise + config.noise_offset * offset

    text, text_mask = default_adapter_text(adapter, batch)
    time_aware = is_time_aware(adapter)
    k = contextual_k(config.k_schedule, config.k_scale)
    abar = schedule.abar(timesteps, like=x0)
    # Stage 2 keeps the adapter fixed: r on the clean x0 needs no graph (r on x0_hat still passes gradients to x0_hat).
    r = _relational(adapter, x0, text, text_mask, abar, time_aware, grad=config.stage != 2)
    x_t = q_sample(x0, abar, noise, Shift(k=k), m=r)
    if config.detach_xt:
        x_t = x_t.detach()

    if config.cfg_drop_prob > 0:
        if null_text is None:
            raise UserError("cfg_drop_prob > 0 needs the null (empty-prompt) text states: pass null_text")
        u = torch.rand(b, generator=generator) if generator is not None else torch.rand(b, device=x0.device)
        drop = u.to(x0.device) < config.cfg_drop_prob
        cond = torch.where(drop.view(-1, 1, 1), null_text.to(cond.dtype).expand_as(cond), cond)

    out = unet(x_t, timesteps, encoder_hidden_states=cond, return_dict=False)[0]
    if config.parameterization == "shifted_eps":
        # Written from eps and r (not from x_t), so --detach_xt cuts only the x_t path, as in the released code.
        target = noise + k(abar) * r / (1 - abar) ** 0.5
    else:
        target = x0

    if config.objective == "elbo":
        x0_hat = x0_from_eps(x_t, out, abar) if config.parameterization == "shifted_eps" else out
        step, prior = elbo_terms(
            x0, x0_hat,
            lambda x, level: _relational(adapter, x, text, text_mask, level, time_aware),
            r, timesteps, schedule, k, time_aware=time_aware,
            relational_clean=lambda x, level: _relational(adapter, x, text, text_mask, level, time_aware,
                                                          grad=config.stage != 2),
        )
        # Uniform t: T * L_{t-1} estimates the sum over steps; L_T is added once per sample.
        loss = (schedule.num_train_timesteps * step + prior).mean()
        logs = {"elbo": loss.detach(), "prior": prior.detach().mean(), "r_abs": r.detach().abs().mean()}
        return ContextLossOutput(loss, logs)

    if config.p2_gamma > 0:
        per_sample = F.mse_loss(_upcast(out), _upcast(target), reduction="none").mean(dim=tuple(range(1, x0.ndim)))
        loss = (per_sample * p2_weight(_upcast(abar.flatten()), config.p2_gamma)).mean()
    elif config.snr_gamma is not None:
        from common.diffusion_loss import min_snr_weights

        per_sample = F.mse_loss(_upcast(out), _upcast(target), reduction="none").mean(dim=tuple(range(1, x0.ndim)))
        ptype = "epsilon" if config.parameterization == "shifted_eps" else "sample"
        loss = (per_sample * min_snr_weights(abar, config.snr_gamma, ptype).to(per_sample.device)).mean()
    else:  # diffusers' train_text_to_image reduction, so r == 0 reproduces its loss bit for bit
        loss = F.mse_loss(_upcast(out), _upcast(target))
    logs = {"mse": loss.detach(), "r_abs": r.detach().abs().mean()}  # tensors: no device sync per step

    if config.lambda_r > 0:
        if time_aware:
            raise UserError("--lambda_r's r term is written for a t-free adapter: use --objective elbo with a "
                            "time-aware one (it holds the exact r term)")
        x0_hat = x0_from_eps(x_t, out, abar) if config.parameterization == "shifted_eps" else out
        r_hat = _relational(adapter, x0_hat, text, text_mask, abar, time_aware)
        coef = _posterior_r_coefficient(schedule, timesteps, k, x0)
        r_term = (_upcast(coef * (r - r_hat)) ** 2).mean()
        loss = loss + config.lambda_r * r_term
        logs["r_term"] = r_term.detach()
    return ContextLossOutput(loss, logs)
