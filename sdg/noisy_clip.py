"""The noise-aware CLIP image encoder of SDG (Liu et al., WACV 2023, §3 of the paper; METHOD.md §3).

A pretrained CLIP image tower ``E`` is made timestep-aware: the original timestep ``t`` (0..T-1) is embedded with
ADM's sinusoid, passed through a small MLP, and projected to one ``(scale_k, shift_k)`` pair per normalisation layer
``k`` of the tower. Each norm's output ``n_k`` becomes (FiLM, Perez et al. 2018)::

    n_k  <-  n_k * (1 + scale_k(t)) + shift_k(t)                                             (METHOD.md §3, FiLM)

before the following ReLU / residual add. Which layers are modulated:

- open_clip ``ModifiedResNet`` (SDG's RN50x16): the three stem BatchNorms and ``bn1..bn3`` of every bottleneck, not
  the BatchNorm of the ``downsample`` branch (123 sites in RN50x16, 91,200 channels);
- open_clip ``VisionTransformer`` (our extension, SDG only has the ResNet): every LayerNorm (``ln_pre``, ``ln_1`` and
  ``ln_2`` of each block, ``ln_post``).

The modulation is attached with forward hooks on the norm modules instead of a forked ``forward``: open_clip's own code
runs unchanged, every parameter keeps its open_clip name (a pretrained tower's state dict loads as is), and with the
projection zero-initialised (``film_init="zero"``, our default) the encoder *is* the pretrained CLIP at step 0 for
every t (tested bit for bit). ``film_init="default"`` keeps PyTorch's default init, as the released code does.

The state dict of :class:`NoiseAwareCLIP` is ``visual.*`` (the tower) plus ``time_embed.{0,2}.*`` (the MLP) and
``emb_layers.1.*`` (the projection): the names of SDG's released ``CLIP_gd`` checkpoints for the new parts, so their
key map (``sdg.convert.convert_sdg_clip_gd_state_dict``) only renames the tower.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.errors import UserError
from common.modules import timestep_embedding


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FILM_INITS = ("zero", "default")
POS_INITS = ("interp", "random")
FINETUNE_MODES = ("all", "last")
# Keys a noise-aware checkpoint must carry on top of the tower's; a plain CLIP state dict has none of them.
TIME_MODULATION_KEYS = ("time_embed.0.weight", "time_embed.2.weight", "emb_layers.1.weight", "emb_layers.1.bias")




def _tower_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, VisionTransformer):
        if not getattr(visual.transformer, "batch_first", True):
            raise UserError("this open_clip VisionTransformer runs sequence-first; only batch-first towers are supported")
        return "vit"
    raise UserError(
        f"the noise-aware CLIP needs an open_clip ModifiedResNet or VisionTransformer image tower, got "
        f"{type(visual).__name__}: build the model with open_clip (e.g. RN50x16 or ViT-B-32)"
    )


def film_sites(visual: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norm layers to modulate, in forward order: ``[(name, module), ...]``.

    ResNet: every ``BatchNorm2d`` except those of the ``downsample`` shortcut (SDG leaves that branch alone).
    ViT: every ``LayerNorm``. Registration order equals forward order in both open_clip towers, which fixes the
    layout of the projection's output (``[scale_1, shift_1, scale_2, shift_2, ...]``, SDG's layout).
    """
    kind = _tower_kind(visual)
    sites = []
    for name, module in visual.named_modules():
        if kind == "resnet" and isinstance(module, nn.BatchNorm2d) and ".downsample." not in f".{name}.":
            sites.append((name, module))
        elif kind == "vit" and isinstance(module, nn.LayerNorm):
            sites.append((name, module))
    if not sites:
        raise UserError("the image tower has no normalisation layers to modulate with the timestep")
    return sites


def _site_channels(module: nn.Module) -> int:
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    return int(module.normalized_shape[-1])


def _apply_film(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: ``output * (1 + scale) + shift`` with this norm's current ``[B, C]`` modulation, if any.

    A module-level function (no closure) so that ``copy.deepcopy`` of the encoder (EMA) gives hooks that read the
    copy's own modulation. Outside :meth:`NoiseAwareCLIP.forward` no modulation is set and the tower is plain CLIP.
    """
    film = getattr(module, "_sdg_film", None)
    if film is None:
        return output
    scale, shift = film
    if isinstance(module, nn.BatchNorm2d):  # channels at dim 1: [B, C, H, W]
        shape = (scale.shape[0], scale.shape[1]) + (1,) * (output.ndim - 2)
    else:  # LayerNorm: channels last, [B, L, D] or [B, D]
        shape = (scale.shape[0],) + (1,) * (output.ndim - 2) + (scale.shape[1],)
    return output * (1 + scale.reshape(shape).to(output.dtype)) + shift.reshape(shape).to(output.dtype)


def _resize_positional(table: torch.Tensor, old_grid: int, new_grid: int, mode: str, std: float) -> torch.Tensor:
    """A ``[1 + g^2, D]`` positional table (class/mean token first) for a new grid: bicubic resize or fresh random."""
    dim = table.shape[1]
    if mode == "random":  # SDG: the pretrained table is discarded
        return torch.randn(1 + new_grid**2, dim, dtype=table.dtype, device=table.device) * std
    grid = table[1:].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(new_grid**2, dim)
    return torch.cat([table[:1], grid], dim=0)


@dataclass
class NoisyCLIPOutput:
    """``features``: intermediate maps, NCHW (ResNet: stem, layer1..4; ViT: each block's patch tokens as a grid).
    ``embedding``: the image embedding ``[B, D]`` (not normalised)."""

    features: tuple[torch.Tensor, ...]
    embedding: torch.Tensor


class NoiseAwareCLIP(nn.Module):
    """``E'(x_t, t)``: an open_clip image tower whose norm layers are FiLM-modulated by the timestep.

    Args:
        visual: open_clip ``ModifiedResNet`` or ``VisionTransformer`` (e.g. ``model.visual``); used in place, so pass
            ``copy.deepcopy(model.visual)`` when the original must stay the frozen teacher.
        image_size: input resolution (the diffusion model's). If it differs from the tower's, the positional table is
            rebuilt for the new grid: ``pos_init="interp"`` resizes the pretrained one bicubically (our default, a
            better start), ``"random"`` re-draws it as SDG does.
        t_dim, hidden: sinusoid size and MLP width (SDG: 128 and 512).
        film_init: ``"zero"`` (the encoder starts as the plain CLIP) or ``"default"`` (PyTorch init, SDG).
        mean, std: CLIP's input normalisation; inputs are diffusion images in [-1, 1] (noisy ones leave it).

    ``forward(x [B, 3, S, S] in [-1, 1], t [B] original timesteps) -> NoisyCLIPOutput``.
    """

    def __init__(
        self,
        visual: nn.Module,
        *,
        image_size: Optional[int] = None,
        t_dim: int = 128,
        hidden: int = 512,
        film_init: str = "zero",
        pos_init: str = "interp",
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__()
        if film_init not in FILM_INITS:
            raise UserError(f"unknown film_init {film_init!r}: choose one of {', '.join(FILM_INITS)}")
        if pos_init not in POS_INITS:
            raise UserError(f"unknown pos_init {pos_init!r}: choose one of {', '.join(POS_INITS)}")
        self.kind = _tower_kind(visual)
        self.visual = visual
        if image_size is not None:
            self._set_image_size(int(image_size), pos_init)
        self.t_dim = int(t_dim)
        sites = film_sites(visual)
        self.film_site_names = [name for name, _ in sites]
        self.film_channels = [_site_channels(module) for _, module in sites]
        self.time_embed = nn.Sequential(nn.Linear(t_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.emb_layers = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 2 * sum(self.film_channels)))
        if film_init == "zero":
            nn.init.zeros_(self.emb_layers[1].weight)
            nn.init.zeros_(self.emb_layers[1].bias)
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self._sites = [module for _, module in sites]
        for module in self._sites:
            module.register_forward_hook(_apply_film)
        self.finetune_mode = "all"
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------------ building
    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _set_image_size(self, size: int, pos_init: str) -> None:
        visual = self.visual
        if self.kind == "resnet":
            if size % 32:
                raise UserError(f"a ModifiedResNet needs an image size divisible by 32, got {size}")
            old, new = self.image_size // 32, size // 32
            pool = visual.attnpool
            if old != new:
                std = pool.positional_embedding.shape[1] ** -0.5
                table = _resize_positional(pool.positional_embedding.data, old, new, pos_init, std)
                pool.positional_embedding = nn.Parameter(table)
            visual.image_size = size
        else:
            patch = visual.patch_size[0]
            if size % patch:
                raise UserError(f"a ViT with patch size {patch} needs an image size divisible by it, got {size}")
            old, new = visual.grid_size[0], size // patch
            if old != new:
                std = visual.positional_embedding.shape[1] ** -0.5
                table = _resize_positional(visual.positional_embedding.data, old, new, pos_init, std)
                visual.positional_embedding = nn.Parameter(table)
            visual.grid_size = (new, new)
            visual.image_size = (size, size)

    # ------------------------------------------------------------------------------------------------ forward
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] diffusion images -> CLIP-normalised input: ``((x + 1) / 2 - mean) / std`` (no resize)."""
        return ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def modulation(self, t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-site ``(scale, shift)``, each ``[B, C_k]``, from the original timesteps ``t`` ``[B]``."""
        weight = self.emb_layers[1].weight
        emb = timestep_embedding(t, self.t_dim).to(device=weight.device, dtype=weight.dtype)
        out = self.emb_layers(self.time_embed(emb))
        chunks = out.split([c for c in self.film_channels for _ in range(2)], dim=1)
        return [(chunks[2 * k], chunks[2 * k + 1]) for k in range(len(self.film_channels))]

    def forward(self, x: torch.Tensor, t: Union[torch.Tensor, int]) -> NoisyCLIPOutput:
        """Features and embedding of noisy images ``x`` ``[B, 3, S, S]`` at original timesteps ``t`` (``[B]`` or int)."""
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if t.shape[0] != x.shape[0]:
            raise UserError(f"got {t.shape[0]} timesteps for {x.shape[0]} images: pass one per image")
        if getattr(getattr(self.visual, "transformer", None), "grad_checkpointing", False):
            raise UserError("gradient checkpointing of the CLIP tower re-runs blocks after forward and would lose the "
                            "time modulation: disable it (visual.set_grad_checkpointing(False))")
        films = self.modulation(t)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The FiLM hooks read _sdg_film, which exists only during this call: checkpoint the whole tower with
            # the modulation passed in, so the backward's recomputation sets it again.
            flat = [tensor for pair in films for tensor in pair]
            features, embedding = checkpoint(self._tower, x, *flat, use_reentrant=False)
        else:
            features, embedding = self._tower(x, *[tensor for pair in films for tensor in pair])
        return NoisyCLIPOutput(features, embedding)

    def _tower(self, x: torch.Tensor, *flat_films: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The modulated tower: ``flat_films`` are the per-site (scale, shift) pairs, flattened."""
        for k, module in enumerate(self._sites):
            module._sdg_film = (flat_films[2 * k], flat_films[2 * k + 1])
        try:
            out = self.visual.forward_intermediates(self.preprocess(x))
        finally:
            for module in self._sites:
                module._sdg_film = None
        return tuple(out["image_intermediates"]), out["image_features"]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the tower's activations in the backward instead of storing them (``--gradient_checkpointing``)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def embed(self, x: torch.Tensor, t: Union[torch.Tensor, int]) -> torch.Tensor:
        """The image embedding ``[B, D]`` only (SDG's ``encode_image``)."""
        return self(x, t).embedding

    # ------------------------------------------------------------------------------------------------ fine-tuning
    def _last_stage(self) -> list[nn.Module]:
        if self.kind == "resnet":
            return [self.visual.layer4, self.visual.attnpool]
        return [self.visual.transformer.resblocks[-1], self.visual.ln_post]

    def set_finetune_mode(self, mode: str = "all") -> list[nn.Parameter]:
        """Choose the trainable parameters (SDG's ``--finetune_clip_layer``) and return them.

        ``all``: everything, BatchNorms in train mode (running statistics adapt to noisy inputs).
        ``last``: time MLP, projection and the last stage (ResNet: layer4 + attention pool with its positional table;
        ViT: last block, ``ln_post``, ``proj``); the rest is frozen and kept in eval mode by :meth:`train`.
        """
        if mode not in FINETUNE_MODES:
            raise UserError(f"unknown finetune mode {mode!r}: choose one of {', '.join(FINETUNE_MODES)}")
        self.finetune_mode = mode
        for p in self.parameters():
            p.requires_grad_(mode == "all")
        if mode == "last":
            for module in [self.time_embed, self.emb_layers, *self._last_stage()]:
                module.requires_grad_(True)
            if self.kind == "vit" and self.visual.proj is not None:
                self.visual.proj.requires_grad_(True)
        self.train(self.training)
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> NoiseAwareCLIP:
        super().train(mode)
        if mode and self.finetune_mode == "last":
            self.visual.eval()  # frozen BatchNorm statistics stay those of the pretrained tower
            for module in self._last_stage():
                module.train()
        return self


def load_noise_aware_clip(
    model: NoiseAwareCLIP,
    state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    source: Optional[str] = None,
) -> NoiseAwareCLIP:
    """Load a noise-aware CLIP checkpoint (a path to safetensors / a weights-only ``.pt``, or a state dict) into
    ``model``, strictly, refusing a plain CLIP or another architecture with a one-line error."""
    if isinstance(state_dict, (str, os.PathLike)):
        from common.io import safe_torch_load
        from sdg.convert import unwrap_state_dict

        source = source or str(state_dict)
        state_dict = unwrap_state_dict(safe_torch_load(state_dict), source)
    source = source or "checkpoint"
    missing_time = [k for k in TIME_MODULATION_KEYS if k not in state_dict]
    if missing_time:
        looks_plain = any(k.startswith(("visual.", "conv1.", "layer1.", "transformer.")) for k in state_dict)
        what = "a plain (not noise-aware) CLIP image tower" if looks_plain else "not a noise-aware CLIP"
        raise UserError(
            f"{source} is {what}: it lacks the time-modulation weights ({', '.join(missing_time)}); fine-tune a "
            "noise-aware CLIP first (sdg.clip_training) or convert SDG's CLIP_gd file with sdg.convert"
        )
    expected = model.emb_layers[1].weight.shape[0]
    got = state_dict["emb_layers.1.weight"].shape[0]
    if got != expected:
        raise UserError(
            f"{source} modulates {got // 2} norm channels but this image tower has {expected // 2}: it was trained "
            "for a different CLIP architecture, pass the matching --clip_model"
        )
    try:
        result = model.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"{source} does not fit this noise-aware CLIP ({detail}): check --clip_model") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} keys (first: {result.missing_keys[0]})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} keys (first: {result.unexpected_keys[0]})")
        raise UserError(f"{source} does not fit this noise-aware CLIP: {'; '.join(parts)}; check --clip_model")
    return model
