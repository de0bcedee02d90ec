"""Multi-flow training pieces for the shared trainer (paper §3.5, Algorithm 1 and Table 1).

- :func:`flow_loss`: the simple eps loss of one flow, ``|| eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t,
  c; flow) ||^2`` averaged over latent dimensions then the batch ([R0] ``VD.p_losses``), with optional
  classifier-free-guidance context dropout;
- :func:`multiflow_loss`: Algorithm 1's step, the sum of the active flows' losses (one backward of the sum equals
  the per-flow backward passes accumulated before one optimizer step);
- :class:`FlowSampler`: which flows a step trains (all of them, as Algorithm 1, or one drawn per step);
- :func:`param_groups`: the per-group gradient scales of Table 1 as per-group learning-rate multipliers (Adam is
  nearly invariant to a constant gradient scale, so the LR is the knob that works).

The model is called through ``model(x, t, contexts, xtype)`` (its ``forward``), so a DDP-wrapped diffuser syncs
gradients; DDP needs ``find_unused_parameters=True`` because a flow leaves the other flows' layers unused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import nn

from common.diffusion_loss import diffusion_mse
from common.errors import UserError
from common.process import q_sample_standard
from common.schedule import NoiseSchedule
from versatile.multiflow import GROUPS, Flow, MultiFlowDiffuser, flow_contexts, resolve_flow


FLOW_SAMPLING = ("all", "one")
# Table 1 (four-flow row): Data(I) 0.2, Data(T) 1, Ctx(I) 1, Ctx(T) 1, Global 0.1.
FOUR_FLOW_LR_MULTIPLIERS = {"data_image": 0.2, "data_text": 1.0, "ctx_image": 1.0, "ctx_text": 1.0, "global": 0.1}
# Single / dual-flow row: only Data(I) = 0.1 and Global = 0.1 are reported; the context cells are our guess (the paper leaves them blank).
SINGLE_FLOW_LR_MULTIPLIERS = {"data_image": 0.1, "data_text": 1.0, "ctx_image": 1.0, "ctx_text": 1.0, "global": 0.1}


def check_multipliers(multipliers: Optional[Mapping[str, float]]) -> dict[str, float]:
    """Every group's LR multiplier (missing groups get 1.0); unknown names or negative values are a UserError."""
    out = dict.fromkeys(GROUPS, 1.0)
    for name, value in (multipliers or {}).items():
        if name not in out:
            raise UserError(f"unknown parameter group {name!r} in the LR multipliers: choose from {', '.join(GROUPS)}")
        value = float(value)
        if not value >= 0:
            raise UserError(f"LR multiplier of {name} must be >= 0, got {value}")
        out[name] = value
    return out


def param_groups(model: MultiFlowDiffuser, lr: float, multipliers: Optional[Mapping[str, float]] = None) -> list[dict]:
    """Optimizer parameter groups ``[{"name", "params", "lr", "lr_multiplier"}, ...]``, one per layer group.

    ``lr * multiplier`` per group (default multipliers: 1.0). A group with multiplier 0 is left out (frozen), as
    are parameters with ``requires_grad=False``. LR schedulers (``LambdaLR``) scale each group's own initial LR, so
    the ratios hold through warmup and decay. Pass the result as ``params=`` to ``common.train.Trainer.fit``.
    """
    scales = check_multipliers(multipliers)
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    groups = []
    for name, params in model.parameter_groups().items():
        trainable = [p for p in params if p.requires_grad]
        if scales[name] == 0 or not trainable:
            continue
        groups.append({"name": name, "params": trainable, "lr": lr * scales[name], "lr_multiplier": scales[name]})
    if not groups:
        raise UserError("no trainable parameters: every group is frozen or has LR multiplier 0")
    return groups


def drop_context(
    tokens: torch.Tensor, null: torch.Tensor, p: float, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each row of ``tokens [B, L, D]`` by ``null`` (``[1 or B, L, D]``) with probability ``p``.

    Classifier-free guidance training (Ho & Salimans 2022): returns ``(tokens, dropped [B] bool)``. Use the null
    context you will sample with.
    """
    if not 0.0 <= p < 1.0:
        raise UserError(f"context drop probability {p} must lie in [0, 1)")
    if null.shape[-2:] != tokens.shape[-2:]:
        raise UserError(f"null context {list(null.shape)} does not match the context tokens {list(tokens.shape)}")
    draw = torch.rand(tokens.shape[0], generator=generator, device=generator.device if generator else None)
    dropped = (draw < p).to(tokens.device)
    return torch.where(dropped[:, None, None], null.to(tokens).expand_as(tokens), tokens), dropped


def flow_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    flow: Union[str, Flow],
    *,
    schedule: Optional[NoiseSchedule] = None,
    cond_drop: float = 0.0,
    null_contexts: Optional[Mapping[str, torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    snr_gamma: Optional[float] = None,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """The eps-prediction loss of one flow on one batch (METHOD.md, "Forward process and objective"), a scalar.

    ``snr_gamma``: Min-SNR weighting of the per-sample loss (``common.diffusion_loss``); ``noise_offset``: offset
    noise, per (sample, channel) and constant over the pixels, for image latents only (a text latent is one vector:
    there are no pixels to be constant over).

    ``batch``: ``x0`` (scaled image latents ``[B, 4, h, w]`` or Optimus means ``[B, D]``), the flow's context
    tokens under ``text`` / ``image`` (``[B, L, D]``), optionally ``t`` (``[B]`` long), ``noise`` (like ``x0``)
    and, for ``dual``, ``text_ratio``. ``t`` ~ U{0..T-1} and ``noise`` ~ N(0, I) are drawn with ``generator``
    otherwise. ``cond_drop`` > 0 needs ``null_contexts[kind]`` for each context the flow uses.
    """
    flow = resolve_flow(flow)
    schedule = schedule or _default_schedule()
    if "x0" not in batch:
        raise UserError("a training batch needs 'x0': image latents [B, 4, h, w] or text latents [B, D]")
    x0 = batch["x0"]
    device = x0.device
    t = batch.get("t")
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator,
                          device=generator.device if generator else None).to(device)
    noise = batch.get("noise")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else None,
                            dtype=x0.dtype).to(device)
        if noise_offset and x0.ndim == 4:  # as common.diffusion_loss.training_noise, with this generator
            noise = noise + noise_offset * torch.randn(
                (x0.shape[0], x0.shape[1], 1, 1), generator=generator,
                device=generator.device if generator else None, dtype=x0.dtype).to(device)
    contexts = {}
    for kind in ("text", "image"):
        if kind in flow.ctypes:
            if kind not in batch:
                raise UserError(f"flow {flow.name} needs '{kind}' context tokens in the batch")
            tokens = batch[kind]
            if cond_drop > 0:
                if not null_contexts or kind not in null_contexts:
                    raise UserError(f"cond_drop > 0 needs null_contexts['{kind}'] (the unconditional {kind} context)")
                tokens, _ = drop_context(tokens, null_contexts[kind], cond_drop, generator)
            contexts[kind] = tokens
    abar = schedule.abar(t, like=x0)
    x_t = q_sample_standard(x0, abar, noise)
    ratio = batch.get("text_ratio") if flow.name == "dual" else None
    eps = model(x_t, t, flow_contexts(flow, text_ratio=ratio, **contexts), flow.xtype)
    return diffusion_mse(eps, noise, abar=abar, snr_gamma=snr_gamma, prediction_type="epsilon")


def multiflow_loss(
    model: nn.Module,
    batches: Mapping[str, Mapping[str, torch.Tensor]],
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Algorithm 1's step: the sum of each active flow's :func:`flow_loss` on its own batch, and the parts."""
    if not batches:
        raise UserError("multiflow_loss needs at least one flow's batch")
    parts = {resolve_flow(name).name: flow_loss(model, batch, name, **kwargs) for name, batch in batches.items()}
    total = torch.stack(list(parts.values())).sum()
    return total, {f"loss_{name}": value.detach() for name, value in parts.items()}


class FlowSampler:
    """Which flows a training step runs: ``all`` (Algorithm 1) or ``one`` drawn with ``weights``.

    The draw is a pure function of ``(seed, step)``, so a resumed run trains the same flows at the same steps.
    """

    def __init__(self, flows: Sequence[str], mode: str = "all", weights: Optional[Sequence[float]] = None,
                 seed: int = 0):
        if not flows:
            raise UserError("train at least one flow")
        self.flows = tuple(resolve_flow(f).name for f in flows)
        if mode not in FLOW_SAMPLING:
            raise UserError(f"flow sampling {mode!r}: choose one of {', '.join(FLOW_SAMPLING)}")
        self.mode, self.seed = mode, int(seed)
        w = [1.0] * len(self.flows) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.flows) or any(v < 0 for v in w) or sum(w) <= 0:
            raise UserError("flow weights: one non-negative weight per flow, not all zero")
        self.weights = torch.tensor(w, dtype=torch.float64)

    def __call__(self, step: int) -> tuple[str, ...]:
        if self.mode == "all":
            return self.flows
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        return (self.flows[int(torch.multinomial(self.weights, 1, generator=g))],)


def _default_schedule() -> NoiseSchedule:
    from versatile.pipeline import vd_schedule

    return vd_schedule()
