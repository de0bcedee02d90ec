"""Dynamic diffusers and influence functions (Collaborative Diffusion, Huang et al. CVPR 2023, §3.2).

For each modality ``m`` a small UNet ``D_m`` reads the noisy latent, the timestep and that modality's condition
tokens and predicts a one-channel logit map at latent resolution::

    l_m = D_m(x_t, t, c_m)                           [B, 1, h, w]
    I_m(t, p) = exp l_m(p) / sum_j exp l_j(p)        (per-pixel softmax over the M modalities)
    eps_hat = sum_m I_m * eps_m(x_t, t, c_m)         (the 1-channel map broadcasts over latent channels)

``D_m`` is a diffusers ``UNet2DConditionModel`` with ``out_channels=1`` whose output convolution is zero-initialised,
as LDM's ``zero_module`` does (diffusers does not): every logit is 0 at the start, so ``I_m = 1/M`` and the
collaboration starts as the plain average of the uni-modal predictions (METHOD.md, "Influence functions"). By default
the other LDM ``zero_module`` layers (each ResBlock's last convolution, each transformer's ``proj_out``) start at zero
too (:data:`ZERO_INITS`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codiff.batching import run_batched
from common.errors import UserError
from common.io import PathLike, atomic_write_dir, require_file


CONFIDENCE_INPUTS = ("x_t", "unet_output")


def zero_init_output(unet: nn.Module) -> nn.Module:
    """Zero the output convolution of a diffusers UNet in place (LDM ``zero_module`` on ``out``); returns it."""
    conv = getattr(unet, "conv_out", None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected a diffusers UNet with a conv_out layer, got {type(unet).__name__}")
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return unet


# How a UNet trained from scratch starts. ``ldm``: as LDM's ``UNetModel`` (``zero_module`` on the output
# convolution, on the last convolution of every ResBlock and on every SpatialTransformer's ``proj_out``), so every
# residual branch starts as the identity; ``conv_out``: only the output convolution; ``none``: diffusers' init.
ZERO_INITS = ("ldm", "conv_out", "none")


def zero_init_ldm(unet: nn.Module) -> nn.Module:
    """LDM's ``zero_module`` layers of a diffusers UNet, zeroed in place: ``conv_out``, each ResnetBlock2D's
    ``conv2`` (LDM ``out_layers[3]``) and each Transformer2DModel's ``proj_out``; returns it."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    zero_init_output(unet)
    for module in unet.modules():
        layer = (module.conv2 if isinstance(module, ResnetBlock2D) else
                 module.proj_out if isinstance(module, Transformer2DModel) else None)
        if layer is not None:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return unet


def apply_zero_init(unet: nn.Module, scheme: str) -> nn.Module:
    """Zero the layers ``scheme`` (one of :data:`ZERO_INITS`) names; a fresh model only, never loaded weights."""
    if scheme not in ZERO_INITS:
        raise UserError(f"unknown zero_init {scheme!r}: choose one of {', '.join(ZERO_INITS)}")
    if scheme == "ldm":
        return zero_init_ldm(unet)
    return zero_init_output(unet) if scheme == "conv_out" else unet


def build_dynamic_diffuser(config: dict[str, Any], zero_init: bool | str = True, seed: int | None = None) -> nn.Module:
    """A dynamic diffuser: ``UNet2DConditionModel(**config)`` forced to ``out_channels=1``, output zeroed.

    ``config`` is a diffusers UNet config (paper: widths 32/64/96/160, 32 heads, context 640, ~13.1M
    parameters). Called as ``D(x_t [B, C, h, w], t [B], encoder_hidden_states=c [B, L, D]) -> [B, 1, h, w]``.
    ``zero_init``: a scheme of :data:`ZERO_INITS`; ``True`` is ``ldm`` (the release), ``False`` is ``none``.
    """
    from diffusers import UNet2DConditionModel

    scheme = ("ldm" if zero_init else "none") if isinstance(zero_init, bool) else zero_init
    config = {**config, "out_channels": 1}
    if seed is None:
        unet = UNet2DConditionModel(**config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**config)
    return apply_zero_init(unet, scheme)


def influence_maps(logits: torch.Tensor) -> torch.Tensor:
    """Influence functions ``I = softmax(l)`` over the modality axis: ``[B, M, h, w] -> [B, M, h, w]``.

    Computed in float32 at least (a half-precision softmax over two values of similar size loses the partition
    of unity to rounding), returned in the logits' dtype. With ``M = 1`` every map is exactly one.
    """
    if logits.ndim != 4:
        raise ValueError(f"influence logits must be [B, M, h, w], got shape {tuple(logits.shape)}")
    compute = torch.promote_types(logits.dtype, torch.float32)
    return torch.softmax(logits.to(compute), dim=1).to(logits.dtype)


def combine(eps: Sequence[torch.Tensor] | torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The collaborative prediction ``sum_m I_m * eps_m``.

    ``eps``: M tensors ``[B, C, h, w]`` (or one ``[M, B, C, h, w]``); ``weights``: ``[B, M, h, w]``. The sum runs in
    modality order, so it is reproducible bit for bit and, for ``M = 1`` with weight one, returns ``eps_1`` itself.
    """
    eps = list(eps.unbind(0)) if isinstance(eps, torch.Tensor) else list(eps)
    if weights.shape[1] != len(eps):
        raise ValueError(f"{len(eps)} predictions but {weights.shape[1]} influence maps")
    out = eps[0] * weights[:, 0:1].to(eps[0].dtype)
    for m in range(1, len(eps)):
        out = out + eps[m] * weights[:, m : m + 1].to(eps[m].dtype)
    return out


class DynamicDiffusers(nn.Module):
    """All dynamic diffusers of a collaboration as ONE module, the trainable part (what the trainer wraps).

    ``forward(x_t [B, C, h, w], t [B], conds {name: [B, L, D]}, member_eps M x [B, C, h, w]) -> logits [B, M, h, w]``
    in the order of ``nets``. ``confidence_input``: what each ``D_m`` reads, the noisy latent ``x_t`` (released
    configs) or its modality's prediction ``eps_m`` (``unet_output``, the released code's other option).
    """

    def __init__(self, nets: Mapping[str, nn.Module], confidence_input: str = "x_t", batched: bool = True):
        super().__init__()
        if confidence_input not in CONFIDENCE_INPUTS:
            raise UserError(f"unknown confidence_input {confidence_input!r}: choose one of "
                            f"{', '.join(CONFIDENCE_INPUTS)}")
        self.nets = nn.ModuleDict(dict(nets))
        self.confidence_input = confidence_input
        self.batched = batched

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        conds: Mapping[str, torch.Tensor],
        member_eps: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        calls = []
        for m, (name, net) in enumerate(self.nets.items()):
            source = x_t if self.confidence_input == "x_t" else member_eps[m]
            calls.append((net, source, t, conds[name]))
        logits = run_batched(calls, self.batched)
        for name, logit in zip(self.nets, logits):
            if logit.shape[1] != 1 or logit.shape[-2:] != x_t.shape[-2:]:
                raise UserError(f"the {name!r} dynamic diffuser returns shape {tuple(logit.shape)}: it must give one "
                                f"logit channel at the latent resolution {tuple(x_t.shape[-2:])}")
        return torch.cat(logits, dim=1)

    def save_pretrained(self, folder: PathLike) -> Path:
        """``{folder}/dynamic_diffusers.json`` + one diffusers ``save_pretrained`` sub-folder per modality, atomic."""
        with atomic_write_dir(folder) as tmp:
            for name, net in self.nets.items():
                net.save_pretrained(tmp / name, safe_serialization=True)
            meta = {"modalities": list(self.nets), "confidence_input": self.confidence_input}
            (tmp / "dynamic_diffusers.json").write_text(json.dumps(meta, indent=2))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: PathLike, batched: bool = True) -> DynamicDiffusers:
        """Load what :meth:`save_pretrained` wrote (local folders only)."""
        from diffusers import UNet2DConditionModel

        meta = json.loads(require_file(Path(folder) / "dynamic_diffusers.json", "dynamic diffusers index").read_text())
        nets = {name: UNet2DConditionModel.from_pretrained(Path(folder) / name) for name in meta["modalities"]}
        return cls(nets, meta["confidence_input"], batched).eval()
