"""A mask-to-image member that also SEES the mask at latent resolution (extension; LDM's semantic synthesis).

The paper's mask model reads the mask only through cross-attention to ``K`` class tokens (``conditioning_key:
crossattn``): a token is the whole ``grid x grid`` binary map of one class, projected to the
attention width. For a UNet to paint "stroke here" from that, a pixel's query must know where the pixel is, and a
diffusers UNet has no positional encoding: it must learn position from zero padding. At the paper's scale (404M
parameters, 64x64 latents, 640-wide tokens) that works; at the digits scale (0.8M parameters, 8x8 latents) a
cross-attention-only mask model ignores most of the layout (measured: stroke IoU below that of a random mask of the
same digit, ``bench/results.md``).

:class:`SpatialMaskUNet` keeps the paper's interface (condition = the one-hot class tokens ``[B, K, grid*grid]``,
the mask's Linear encoder feeding cross-attention) and adds LDM's concatenation conditioning (Rombach et al. 2022,
semantic synthesis): the tokens reshaped to ``[B, K, grid, grid]``, average-pooled to the latent size (each latent
cell gets the fraction of its pixels in each class) and concatenated to ``x_t``::

    eps = UNet([x_t ; pool(onehot)], t, encoder_hidden_states = MaskEncoder(onehot))

The null condition (all-zero one-hot, CFG) is then an all-zero map plus the encoder's bias tokens. The wrapped UNet
has ``in_channels = C + K``; the wrapper reports the collaboration-facing config (``in_channels = C``,
``cross_attention_dim = grid*grid``: what the member's condition tokens are, and what its dynamic diffuser attends
to).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from codiff.conditions import MaskEncoder
from common.errors import UserError
from common.modules import WrapsUNet


MASK_CONDITIONINGS = ("crossattn", "concat")


class SpatialMaskUNet(WrapsUNet):
    """``forward(x [B, C, h, w], t, encoder_hidden_states=onehot [B, K, grid^2]) -> (eps [B, C, h, w],)``.

    ``unet``: a diffusers ``UNet2DConditionModel`` with ``in_channels = C + K`` and ``cross_attention_dim`` equal to
    ``encoder.dim``; ``encoder``: the :class:`MaskEncoder` (its format gives ``K`` and ``grid``).
    """

    def __init__(self, unet: nn.Module, encoder: MaskEncoder):
        super().__init__()
        fmt = encoder.fmt
        if unet.config.cross_attention_dim != encoder.dim:
            raise UserError(f"the mask UNet attends to width {unet.config.cross_attention_dim} but the mask encoder "
                            f"gives {encoder.dim}")
        if unet.config.in_channels <= fmt.num_classes:
            raise UserError(f"a concat-conditioned mask UNet needs in_channels = latent channels + {fmt.num_classes} "
                            f"classes, got {unet.config.in_channels}")
        self.unet = unet
        self.encoder = encoder
        latent_channels = unet.config.in_channels - fmt.num_classes
        self._config = SimpleNamespace(
            in_channels=latent_channels, out_channels=unet.config.out_channels, sample_size=unet.config.sample_size,
            cross_attention_dim=fmt.token_dim, mask_conditioning="concat",
        )

    @property
    def config(self) -> SimpleNamespace:
        # The wrapper's own view: the latent channels without the concatenated mask classes.
        return self._config

    def spatial(self, onehot: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One-hot tokens ``[B, K, grid^2]`` -> class fractions per latent cell ``[B, K, h, w]``."""
        grid = self.encoder.fmt.grid
        maps = onehot.reshape(onehot.shape[0], onehot.shape[1], grid, grid)
        return F.adaptive_avg_pool2d(maps.float(), size)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs: Any):
        onehot = encoder_hidden_states
        if onehot.ndim != 3 or onehot.shape[-1] != self.encoder.fmt.token_dim:
            raise UserError(f"the mask member takes one-hot class tokens [B, K, {self.encoder.fmt.token_dim}], got "
                            f"shape {tuple(onehot.shape)}")
        if onehot.shape[0] != sample.shape[0]:
            onehot = onehot.expand(sample.shape[0], -1, -1)
        maps = self.spatial(onehot, tuple(sample.shape[-2:])).to(sample.dtype)
        tokens = self.encoder(onehot).to(sample.dtype)
        out = self.unet(torch.cat([sample, maps], dim=1), timestep, encoder_hidden_states=tokens, return_dict=False,
                        **kwargs)[0]
        return (out,) if not return_dict else SimpleNamespace(sample=out)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        """``{folder}/unet/`` (diffusers) and ``{folder}/mask_encoder/`` (what a member folder holds)."""
        from pathlib import Path

        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=safe_serialization)
        self.encoder.save_pretrained(folder / "mask_encoder")
