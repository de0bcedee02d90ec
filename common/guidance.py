"""Gradient guidance for the samplers' ``guidance`` hook: energies -> ``grad_x sum_i w_i F_i(x_t, t)``.

An *energy* is ``F(x_t, t) -> [B]`` (a log-likelihood or similarity per sample, to be increased). The guidance
function differentiates the weighted sum at ``x_t`` itself (as ADM's ``cond_fn`` and SDG do); a zero weight skips
its energy entirely, so zero weights reproduce unguided sampling bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def energy_guidance(energies: Sequence[tuple[float, Energy]]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Guidance hook from ``[(weight, energy), ...]``: the gradient of ``sum_batch sum_i weight_i * F_i``.

    Each sample's gradient depends only on that sample when every energy is per-sample.
    """
    active = [(float(w), f) for w, f in energies if float(w) != 0.0]

    def guidance(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not active:
            return torch.zeros_like(x_t)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            total = sum(w * f(x, t).sum() for w, f in active)
            (grad,) = torch.autograd.grad(total, x)
        return grad.to(x_t.dtype)

    return guidance
