"""Member forwards, batched where shapes allow.

All forwards of one network that see inputs of one shape (the ``[uncond; cond]`` branches of CFG, modalities that
share a UNet) run as ONE call on the concatenated batch: one large kernel instead of several small ones, the same
numbers up to float reassociation. Distinct networks cannot share a kernel and run in turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn


def call_unet(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A diffusers-style conditional UNet forward without the output dataclass."""
    return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]


def run_batched(calls: Sequence[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]], batched: bool = True):
    """Outputs of ``call_unet(module, x, t, cond)`` for every call, in order.

    With ``batched``, calls to the same module object whose ``x`` and ``cond`` agree in every dimension but the
    batch are concatenated into one forward (the point of CFG's ``[uncond; cond]``): one large kernel instead of
    several small ones, the same numbers up to float reassociation.
    """
    outputs: list[Optional[torch.Tensor]] = [None] * len(calls)
    groups: dict[tuple, list[int]] = {}
    for index, (module, x, _t, cond) in enumerate(calls):
        key = (id(module), tuple(x.shape[1:]), tuple(cond.shape[1:]), cond.dtype) if batched else (index,)
        groups.setdefault(key, []).append(index)
    for members in groups.values():
        module = calls[members[0]][0]
        if len(members) == 1:
            _, x, t, cond = calls[members[0]]
            outputs[members[0]] = call_unet(module, x, t, cond)
            continue
        x = torch.cat([calls[i][1] for i in members])
        t = torch.cat([calls[i][2] for i in members])
        cond = torch.cat([calls[i][3] for i in members])
        sizes = [calls[i][1].shape[0] for i in members]
        for index, out in zip(members, call_unet(module, x, t, cond).split(sizes)):
            outputs[index] = out
    return outputs
