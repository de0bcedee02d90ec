"""The collaboration as a denoiser of the core: frozen uni-modal eps models weighted by influence maps.

:class:`CollaborativeDiffusion` is the trainable module (METHOD.md, "Influence functions")::

    eps_hat(x_t, t, {c_m}) = sum_m I_m(x_t, t, c_m) * eps_m(x_t, t, c_m),   I = softmax_m D_m(x_t, t, c_m)

over any number of modalities ``M >= 1``. Only the dynamic diffusers ``D_m`` have trainable parameters; the
uni-modal models are frozen at construction (``requires_grad=False``, kept in eval mode), so gradients reach the
diffusers through ``I_m`` only.

:class:`CollaborativeDenoiser` binds conditions to it and is the samplers' ``(x_t, t) -> eps`` callable (with
``prediction_type = "eps"``), so the collaboration runs on ``common.samplers.sample_ddim`` / ``sample_ddpm``. It
optionally applies classifier-free guidance per modality (non-paper extension, METHOD.md "CFG") and the released sampler's
inference-only re-weighting (:class:`ReleasedReweighting`, METHOD.md; off by default), and keeps the influence maps
of its last call for :class:`InfluenceRecorder`, a sampler ``callback``.

Batching (``codiff.batching``): all forwards of one network with inputs of one shape run as one call (the CFG
branches of a modality, modalities sharing a UNet); distinct networks run in turn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from codiff.batching import run_batched
from codiff.dynamic import DynamicDiffusers, combine, influence_maps
from common.errors import UserError


SCHEDULES = ("none", "linear_decay", "cosine_decay")


# ------------------------------------------------------------------------------------ released re-weighting


@dataclass(frozen=True)
class ReleasedReweighting:
    """The released sampler's hand-set post-processing of the influence maps (METHOD.md, "Released inference re-weighting").

    Inference only, never in training. With ``E`` the ``emphasised`` (spatial) modalities and ``R`` the others:

    1. schedule ``s(t)`` (per sample; the release used ``t[0]`` for the whole batch):
       ``cosine_decay`` ``s = (cos((1 - t/T) pi) + 1) / 2``, ``linear_decay`` ``s = t/T``, ``none`` ``s = 1``;
       ``I_E <- s I_E`` and ``R`` takes the freed mass ``1 - sum_E I_E``, split in proportion to its own maps
       (with one R modality, the release's ``text = 1 - mask``);
    2. ``I_E <- k I_E`` with ``k = scale_factor``, then all maps divided by their sum;
    3. optionally ``softmax_twice``: ``I <- softmax(boost_factor * I)``.

    For ``[mask, text]`` the net weights are ``w_mask = 2 s m / (1 + s m)``, ``w_text = (1 - s m) / (1 + s m)``.
    The release's defaults (``scale_factor=2``, ``cosine_decay``) are :meth:`released`; ``none`` with scale 1 is
    the identity ("paper-pure"). With no emphasised modality present, or nothing else, the maps are unchanged.
    """

    emphasised: tuple[str, ...] = ("mask",)
    scale_factor: float = 2.0
    schedule: str = "cosine_decay"
    softmax_twice: bool = False
    boost_factor: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown mask schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not self.scale_factor > 0:
            raise UserError(f"the mask scale factor must be > 0, got {self.scale_factor}")
        object.__setattr__(self, "emphasised", tuple(self.emphasised))

    @classmethod
    def released(cls, emphasised: Sequence[str] = ("mask",)) -> ReleasedReweighting:
        """``DDIMConfidenceSampler``'s defaults: mask x2, cosine decay, no second softmax."""
        return cls(tuple(emphasised))

    @property
    def is_identity(self) -> bool:
        """``none`` schedule, scale 1, no second softmax: the maps pass through bit for bit."""
        return self.schedule == "none" and self.scale_factor == 1.0 and not self.softmax_twice

    def schedule_scale(self, t: torch.Tensor) -> torch.Tensor:
        """``s(t)`` per sample, float64 ``[B]``."""
        frac = t.double() / self.num_train_timesteps
        if self.schedule == "cosine_decay":
            return (torch.cos((1.0 - frac) * math.pi) + 1.0) / 2.0
        if self.schedule == "linear_decay":
            return frac
        return torch.ones_like(frac)

    def __call__(self, weights: torch.Tensor, t: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Re-weight influence maps ``[B, M, h, w]`` (modalities ordered as ``names``) at timesteps ``t [B]``."""
        emph = [i for i, name in enumerate(names) if name in self.emphasised]
        rest = [i for i in range(len(names)) if i not in emph]
        if not emph or not rest or self.is_identity:
            return weights
        w = weights.double()
        e, r = w[:, emph], w[:, rest]
        if self.schedule != "none":
            e = e * self.schedule_scale(t).to(w.device).view(-1, 1, 1, 1)
            freed = 1.0 - e.sum(1, keepdim=True)
            r_sum = r.sum(1, keepdim=True)
            # Split the freed mass in proportion to R's maps; evenly where they are all zero.
            share = torch.where(r_sum > 0, r / r_sum.clamp_min(1e-300), torch.full_like(r, 1.0 / len(rest)))
            r = freed * share
        e = e * self.scale_factor
        total = e.sum(1, keepdim=True) + r.sum(1, keepdim=True)
        out = torch.empty_like(w)
        out[:, emph], out[:, rest] = e / total, r / total
        if self.softmax_twice:
            out = torch.softmax(self.boost_factor * out, dim=1)
        return out.to(weights.dtype)


# ------------------------------------------------------------------------------------------------- the model


@dataclass
class CollaborativeOutput:
    """One collaborative prediction. Shapes: ``eps [B, C, h, w]``, ``influence``/``logits`` ``[B, M, h, w]``
    (``influence`` is what weighted ``eps``, after any re-weighting), ``member_eps`` M x ``[B, C, h, w]``."""

    eps: torch.Tensor
    influence: torch.Tensor
    logits: torch.Tensor
    modalities: tuple[str, ...]
    member_eps: list[torch.Tensor] = field(default_factory=list)


class CollaborativeDiffusion(nn.Module):
    """Frozen uni-modal eps models + one trainable dynamic diffuser per modality.

    ``unets`` / ``diffusers``: name -> module, both called as ``net(x [B, C, h, w], t [B],
    encoder_hidden_states=c [B, L, D], return_dict=False)[0]``; the diffusers return ``[B, 1, h, w]`` logits. The
    order of ``unets`` is the modality order of the maps (the paper's is ``[mask, text]``). One UNet object may
    serve several modalities (its forwards are then batched). ``confidence_input``: what the diffusers read, the
    noisy latent ``x_t`` (released configs) or the modality's own prediction ``unet_output`` (the code's other
    option).
    """

    def __init__(
        self,
        unets: Mapping[str, nn.Module],
        diffusers: Mapping[str, nn.Module],
        *,
        confidence_input: str = "x_t",
        batch_members: bool = True,
    ):
        super().__init__()
        names = tuple(unets)
        if not names:
            raise UserError("a collaboration needs at least one uni-modal model")
        missing = [n for n in names if n not in diffusers]
        extra = [n for n in diffusers if n not in unets]
        if missing:
            raise UserError(f"no dynamic diffuser for modality {missing[0]!r}: build or load one per uni-modal model")
        if extra:
            raise UserError(f"a dynamic diffuser for {extra[0]!r} but no uni-modal model for it: load that modality's "
                            "model or drop its diffuser")
        self.modalities = names
        self.unets = nn.ModuleDict(dict(unets))
        self.dynamic = DynamicDiffusers({n: diffusers[n] for n in names}, confidence_input, batch_members)
        self.batch_members = batch_members
        for unet in self.unets.values():
            unet.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> CollaborativeDiffusion:
        """Train mode reaches the diffusers only; the frozen uni-modal models stay in eval mode (no dropout)."""
        super().train(mode)
        for unet in self.unets.values():
            unet.eval()
        return self

    @property
    def diffusers(self) -> nn.ModuleDict:
        """name -> dynamic diffuser."""
        return self.dynamic.nets

    @property
    def confidence_input(self) -> str:
        return self.dynamic.confidence_input

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The dynamic diffusers' parameters: what the optimiser gets (METHOD.md, "Training the diffusers")."""
        return [p for p in self.dynamic.parameters() if p.requires_grad]

    def check_known(self, names) -> None:
        """A condition for a modality without a uni-modal model is a :class:`UserError` naming the fix."""
        unknown = [n for n in names if n not in self.unets]
        if unknown:
            raise UserError(
                f"a {unknown[0]!r} condition was given but no {unknown[0]!r} uni-modal model is loaded (modalities: "
                f"{', '.join(self.modalities)}): load that model and its dynamic diffuser, or drop the condition"
            )

    def check_conditions(self, conds: Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """The conditions in modality order; a condition without a model or a model without a condition is an
        error, as is a batch size other than ``batch`` (or 1, which is repeated)."""
        self.check_known(conds)
        absent = [n for n in self.modalities if n not in conds]
        if absent:
            raise UserError(f"no {absent[0]!r} condition for the {absent[0]!r} model: give one per modality "
                            f"({', '.join(self.modalities)})")
        out = {}
        for name in self.modalities:
            cond = conds[name]
            if cond.ndim != 3:
                raise UserError(f"the {name!r} condition must be tokens [B, L, D], got shape {tuple(cond.shape)}")
            if cond.shape[0] == 1 and batch > 1:
                cond = cond.expand(batch, -1, -1)
            elif cond.shape[0] != batch:
                raise UserError(f"the {name!r} condition has batch {cond.shape[0]} but x_t has {batch}")
            out[name] = cond
        return out

    def member_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        conds: Mapping[str, torch.Tensor],
        uncond: Optional[Mapping[str, torch.Tensor]] = None,
        guidance_scales: Optional[Mapping[str, float]] = None,
        names: Optional[Sequence[str]] = None,
    ) -> list[torch.Tensor]:
        """``eps_m`` for every modality (or those in ``names``, in that order), ``[B, C, h, w]`` each; with CFG for
        modality m (``uncond[m]`` given and scale ``g_m != 1``): ``eps_m = eps_m(null) + g_m (eps_m(c_m) -
        eps_m(null))``."""
        calls, plan = [], []
        for name in (self.modalities if names is None else names):
            unet = self.unets[name]
            scale = float((guidance_scales or {}).get(name, 1.0))
            if uncond is not None and name in uncond and scale != 1.0:
                plan.append((name, scale, len(calls)))
                calls.append((unet, x_t, t, uncond[name]))
            else:
                plan.append((name, 1.0, None))
            calls.append((unet, x_t, t, conds[name]))
        outs = run_batched(calls, self.batch_members)
        eps, cursor = [], 0
        for _name, scale, u_index in plan:
            if u_index is None:
                eps.append(outs[cursor])
                cursor += 1
            else:
                e_u, e_c = outs[cursor], outs[cursor + 1]
                eps.append(e_u + scale * (e_c - e_u))
                cursor += 2
        return eps

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        conds: Mapping[str, torch.Tensor],
        *,
        uncond: Optional[Mapping[str, torch.Tensor]] = None,
        guidance_scales: Optional[Mapping[str, float]] = None,
        reweighting: Optional[ReleasedReweighting] = None,
        dynamic: Optional[nn.Module] = None,
    ) -> CollaborativeOutput:
        """The collaborative prediction with its influence maps (METHOD.md; plus the re-weighting / CFG when asked).

        ``dynamic``: the module to call for the logits instead of ``self.dynamic``, e.g. the trainer's prepared
        (DDP-wrapped) copy, so that gradients are synchronised across processes.
        """
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        conds = self.check_conditions(conds, x_t.shape[0])
        if uncond is not None:
            uncond = {k: v for k, v in self.check_conditions({**conds, **uncond}, x_t.shape[0]).items() if k in uncond}
        # The frozen members build no graph unless an input needs one (x_t for guidance, embeddings for editing).
        eps = self.member_eps(x_t, t, conds, uncond, guidance_scales)
        logits = (dynamic or self.dynamic)(x_t, t, conds, eps)
        weights = influence_maps(logits)
        if reweighting is not None:
            weights = reweighting(weights, t, self.modalities)
        return CollaborativeOutput(combine(eps, weights), weights, logits, self.modalities, eps)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **conds: torch.Tensor) -> torch.Tensor:
        """``eps_hat [B, C, h, w]`` with conditions as keywords by modality name (composes with the core's
        ``CFGDenoiser``, which calls ``model(x, t, **cond)``)."""
        return self.predict(x_t, t, conds).eps


# ---------------------------------------------------------------------------------------- sampler interface


class CollaborativeDenoiser:
    """The samplers' denoiser: ``(x_t, t) -> eps`` of a :class:`CollaborativeDiffusion` with bound conditions.

    ``conditions``: name -> tokens ``[B or 1, L, D]``. ``uncond`` + ``guidance_scales``: per-modality CFG (an
    extension: the released models have no null condition). ``reweighting``: the released sampler's schedule, None
    for the learned maps as trained. After every call, ``last`` holds the :class:`CollaborativeOutput` (detached).
    """

    prediction_type = "eps"
    learned_variance = False

    def __init__(
        self,
        model: CollaborativeDiffusion,
        conditions: Mapping[str, torch.Tensor],
        *,
        uncond: Optional[Mapping[str, torch.Tensor]] = None,
        guidance_scales: Optional[Mapping[str, float]] = None,
        reweighting: Optional[ReleasedReweighting] = None,
    ):
        unknown = [n for n in (guidance_scales or {}) if n not in model.modalities]
        if unknown:
            raise UserError(f"a guidance scale for {unknown[0]!r} but no such modality ({', '.join(model.modalities)})")
        needs_null = [n for n, g in (guidance_scales or {}).items() if float(g) != 1.0 and n not in (uncond or {})]
        if needs_null:
            raise UserError(f"guidance for {needs_null[0]!r} needs its unconditional tokens: pass uncond[{needs_null[0]!r}]")
        self.model = model
        self.conditions = dict(conditions)
        self.uncond = None if uncond is None else dict(uncond)
        self.guidance_scales = dict(guidance_scales or {})
        self.reweighting = reweighting
        self.last: Optional[CollaborativeOutput] = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.model.predict(
            x_t, t, self.conditions, uncond=self.uncond, guidance_scales=self.guidance_scales,
            reweighting=self.reweighting,
        )
        self.last = CollaborativeOutput(
            out.eps.detach(), out.influence.detach(), out.logits.detach(), out.modalities,
            [e.detach() for e in out.member_eps],
        )
        return out.eps


class InfluenceRecorder:
    """A sampler ``callback(i, t, x_t, x0_hat)`` keeping, per step, the influence maps of ``denoiser.last`` and
    (optionally) the model input ``x_t`` and the x0 prediction, on the CPU.

    After sampling: ``influence`` ``[S, B, M, h, w]``, ``pred_x0`` / ``x_t`` ``[S, B, C, h, w]``, ``timesteps``.
    """

    def __init__(self, denoiser: CollaborativeDenoiser, keep_latents: bool = True):
        self.denoiser = denoiser
        self.keep_latents = keep_latents
        self.steps: list[int] = []
        self._maps: list[torch.Tensor] = []
        self._x0: list[torch.Tensor] = []
        self._xt: list[torch.Tensor] = []

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0_hat: torch.Tensor) -> None:
        if self.denoiser.last is None:
            raise RuntimeError("InfluenceRecorder was called before its denoiser ran: pass the same denoiser to the "
                               "sampler")
        self.steps.append(int(t))
        self._maps.append(self.denoiser.last.influence.float().cpu())
        if self.keep_latents:
            self._x0.append(x0_hat.detach().float().cpu())
            self._xt.append(x_t.detach().float().cpu())

    @property
    def timesteps(self) -> list[int]:
        return list(self.steps)

    @property
    def influence(self) -> torch.Tensor:
        return torch.stack(self._maps)

    @property
    def pred_x0(self) -> torch.Tensor:
        return torch.stack(self._x0)

    @property
    def x_t(self) -> torch.Tensor:
        return torch.stack(self._xt)
