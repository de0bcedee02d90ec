"""The comparisons of the paper's claim: fixed-weight combinations of the same frozen members.

:class:`FixedWeightDenoiser` is ``eps = sum_m w_m eps_m(x_t, t, c_m)`` with constant weights (normalised to sum
to one), the same interface as :class:`~codiff.collaborate.CollaborativeDenoiser`:

- ``{"mask": 1}`` / ``{"text": 1}``: one uni-modal model alone (only that member runs);
- ``{"mask": 0.5, "text": 0.5}``: the equal-weight average of the eps predictions, the Composable-Diffusion
  baseline the paper compares with (Liu et al. 2022 combine conditional scores with fixed weights; with CFG per
  member, ``guidance_scales``, each ``eps_m`` is first guided as in :meth:`CollaborativeDiffusion.member_eps`).

``last`` holds constant "influence maps" (the weights, broadcast to ``[B, M, h, w]`` over all the model's
modalities, zero for the members that did not run), so :class:`~codiff.collaborate.InfluenceRecorder` and the
released file set work unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch

from codiff.collaborate import CollaborativeDiffusion, CollaborativeOutput
from common.errors import UserError


VARIANTS = ("collaborative", "average", "mask_only", "text_only")


def variant_weights(variant: str, modalities: tuple[str, ...], kinds: Mapping[str, str]) -> Optional[dict[str, float]]:
    """The fixed weights of a named variant (None: the learned influence maps). ``kinds``: modality -> kind."""
    if variant == "collaborative":
        return None
    if variant == "average":
        return {name: 1.0 / len(modalities) for name in modalities}
    if variant in ("mask_only", "text_only"):
        kind = variant.split("_")[0]
        names = [n for n in modalities if kinds.get(n) == kind]
        if not names:
            raise UserError(f"variant {variant!r} needs a {kind} member but the checkpoint has {', '.join(modalities)}")
        return {names[0]: 1.0}
    raise UserError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")


class FixedWeightDenoiser:
    """The samplers' ``(x_t, t) -> eps`` for ``sum_m w_m eps_m`` with constant weights (module docstring)."""

    prediction_type = "eps"
    learned_variance = False

    def __init__(
        self,
        model: CollaborativeDiffusion,
        conditions: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        *,
        uncond: Optional[Mapping[str, torch.Tensor]] = None,
        guidance_scales: Optional[Mapping[str, float]] = None,
    ):
        model.check_known(weights)
        if any(float(w) < 0 for w in weights.values()):
            raise UserError("fixed combination weights must be >= 0")
        total = sum(float(w) for w in weights.values())
        if not total > 0:
            raise UserError("fixed combination weights must not all be zero")
        self.model = model
        self.weights = {n: float(weights.get(n, 0.0)) / total for n in model.modalities}
        self.active = tuple(n for n in model.modalities if self.weights[n] > 0)
        absent = [n for n in self.active if n not in conditions]
        if absent:
            raise UserError(f"no {absent[0]!r} condition for the {absent[0]!r} model")
        self.conditions = {n: conditions[n] for n in self.active}
        self.uncond = None if uncond is None else {n: v for n, v in uncond.items() if n in self.active}
        self.guidance_scales = {n: g for n, g in (guidance_scales or {}).items() if n in self.active}
        needs_null = [n for n, g in self.guidance_scales.items() if float(g) != 1.0 and n not in (self.uncond or {})]
        if needs_null:
            raise UserError(f"guidance for {needs_null[0]!r} needs its unconditional tokens")
        self.last: Optional[CollaborativeOutput] = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    def _expand(self, conds: Optional[Mapping[str, torch.Tensor]], batch: int) -> Optional[dict]:
        if conds is None:
            return None
        return {n: (c.expand(batch, -1, -1) if c.shape[0] == 1 and batch > 1 else c) for n, c in conds.items()}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        batch = x_t.shape[0]
        eps_list = self.model.member_eps(x_t, t, self._expand(self.conditions, batch),
                                         self._expand(self.uncond, batch), self.guidance_scales, names=self.active)
        eps = eps_list[0] * self.weights[self.active[0]]
        for name, e in zip(self.active[1:], eps_list[1:]):
            eps = eps + e * self.weights[name]
        h, w = x_t.shape[-2:]
        maps = torch.tensor([self.weights[n] for n in self.model.modalities], dtype=torch.float32)
        influence = maps.view(1, -1, 1, 1).expand(batch, -1, h, w)
        by_name = dict(zip(self.active, eps_list))
        member = [by_name.get(n, torch.zeros_like(eps)).detach() for n in self.model.modalities]
        self.last = CollaborativeOutput(eps.detach(), influence, torch.zeros_like(influence), self.model.modalities,
                                        member)
        return eps
