"""Building blocks of the multi-flow diffuser that diffusers does not ship (or ships only in a deprecated module).

Image data layers reuse diffusers' ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` and context layers reuse
``Transformer2DModel``; what is here is the *text* side ([R] ``FCBlock_MultiDim`` / ``Linear_MultiDim``,
[D] ``ResnetBlockFlat`` / ``LinearMultiDim``) and the two heads. The text hidden state is ``[B, C, S, 1]`` with
``S = second_dim`` pseudo-tokens (4 in VD), so context layers see S tokens of width C, exactly as they see H*W
tokens of an image; the fully-connected layers act on the flattened ``C * S`` features.

The released code builds these fully-connected layers as 1x1 convolutions (weights ``[out, in, 1, 1]``); here they
are ``nn.Linear`` (weights ``[out, in]``), which is the same map; ``versatile.convert`` reshapes between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


RESNET_EPS = 1e-5  # [R] normalization() = GroupNorm32 with torch's default eps (SD's norm_eps)


class LinearMultiDim(nn.Linear):
    """A linear map between multi-dimensional feature shapes: ``[B, *in_shape] -> [B, *out_shape]``.

    The text stem is ``(D,) -> (C, S, 1)``, the text "down/up-samplers" are ``(C, S, 1) -> (C, S, 1)`` (no change
    of the pseudo-token count) and the text head's projection is ``(C, S, 1) -> (D,)``.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], bias: bool = True):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        super().__init__(_prod(self.in_shape), _prod(self.out_shape), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[: x.ndim - len(self.in_shape)]
        return super().forward(x.reshape(*batch, self.in_features)).reshape(*batch, *self.out_shape)


class FlatResBlock(nn.Module):
    """Fully-connected ResBlock on the text hidden state, ``[B, C_in, S, 1] -> [B, C_out, S, 1]``.

    ``h = fc1(SiLU(GN(x))) + time_emb_proj(SiLU(emb)); out = skip(x) + fc2(Dropout(SiLU(GN(h))))``: the ADM/SD
    ResBlock (Ho et al. 2020 App. B; no scale-shift) with every 3x3 conv replaced by a linear map on the flattened
    ``C * S`` features and both GroupNorms taken over ``C * S`` channels, as [R] ``FCBlock_MultiDim`` does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        second_dim: int,
        groups: int,
        dropout: float = 0.0,
        eps: float = RESNET_EPS,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.second_dim = in_channels, out_channels, second_dim
        width_in, width_out = in_channels * second_dim, out_channels * second_dim
        self.norm1 = nn.GroupNorm(groups, width_in, eps=eps)
        self.fc1 = nn.Linear(width_in, width_out)
        self.time_emb_proj = nn.Linear(temb_channels, width_out)
        self.norm2 = nn.GroupNorm(groups, width_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width_out, width_out)
        self.shortcut = nn.Linear(width_in, width_out) if width_in != width_out else None
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        flat = x.reshape(batch, -1)  # channel-major: feature index c * S + s, as [R]'s view(-1, C*S, 1, 1)
        h = self.fc1(self.act(self.norm1(flat)))
        h = h + self.time_emb_proj(self.act(emb))
        h = self.fc2(self.dropout(self.act(self.norm2(h))))
        skip = flat if self.shortcut is None else self.shortcut(flat)
        return (skip + h).reshape(batch, self.out_channels, self.second_dim, 1)


class ImageHead(nn.Module):
    """``GN -> SiLU -> conv3x3``: ``[B, C0, h, w] -> [B, latent_channels, h, w]`` (SD's ``out`` / ``conv_out``)."""

    def __init__(self, channels: int, out_channels: int, groups: int, eps: float = RESNET_EPS):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class TextHead(nn.Module):
    """``GN(C0) -> SiLU -> linear``: ``[B, C0, S, 1] -> [B, D]``.

    Unlike every other text GroupNorm this one normalises over the C0 channels of the un-flattened hidden state
    (the S pseudo-tokens act as the spatial axis), as [R] ``normalization(current_channel[0])`` and [D]
    ``conv_norm_out`` do.
    """

    def __init__(self, channels: int, second_dim: int, out_features: int, groups: int, eps: float = RESNET_EPS):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.act = nn.SiLU()
        self.linear = LinearMultiDim((channels, second_dim, 1), (out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(self.norm(x)))


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for size in shape:
        out *= int(size)
    return out
