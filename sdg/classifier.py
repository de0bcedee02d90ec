"""A supervised noisy classifier p(y | x_t, t) for classifier guidance: the control of SDG's language guidance.

SDG guides with ``grad_x cos(E'(x_t, t), T(text))`` from a noise-aware CLIP. If that guidance is weak, either the
guidance path (sampler, learned variance, the hook) or the encoder is to blame. ADM-style classifier guidance
(Dhariwal & Nichol 2021, Alg. 1: ``mu' = mu + s Sigma grad_x log p(y | x_t, t)``) through the *same* hook separates
the two: a classifier trained with labels on noised images is the strongest guide the data allows, so if it steers
the same unconditional model well, the sampler is cleared and the CLIP is the limit.

The network is small and ADM-shaped: a sinusoidal timestep embedding, residual blocks whose GroupNorm is modulated
by the embedding (scale-shift, as ADM's ``use_scale_shift_norm``), three downsamplings, mean pooling, a linear head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.modules import timestep_embedding
from common.process import q_sample_standard
from common.schedule import NoiseSchedule


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, cin), nn.GroupNorm(8, cout)
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class NoisyClassifier(nn.Module):
    """``(x_t [B, C, S, S] in [-1, 1] scale, t [B]) -> logits [B, num_classes]``; S divisible by 8 (~0.2M params)."""

    def __init__(self, in_channels: int = 3, channels: int = 16, num_classes: int = 10, emb_dim: int = 128):
        super().__init__()
        self.emb_dim = emb_dim
        self.time = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = (channels, 2 * channels, 4 * channels, 4 * channels)
        self.blocks = nn.ModuleList(_Block(a, b, emb_dim) for a, b in zip(widths[:-1], widths[1:]))
        self.norm = nn.GroupNorm(8, widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.emb_dim).to(x.dtype))
        h = self.stem(x)
        for block in self.blocks:  # pool first: the blocks run at S/2, S/4, S/8 (cheap on a CPU)
            h = block(F.avg_pool2d(h, 2), emb)
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))


def noisy_classification_loss(model: NoisyClassifier, x0: torch.Tensor, labels: torch.Tensor,
                              schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of the labels from ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, t ~ U{0..T-1} (ADM's recipe)."""
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = q_sample_standard(x0, schedule.abar(t, like=x0), noise)
    return F.cross_entropy(model(x_t, t), labels)


def log_probability_energy(model: NoisyClassifier, labels: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                      torch.Tensor]:
    """``F(x_t, t) = log p(y | x_t, t)`` per sample, for ``common.guidance.energy_guidance`` (weight = the scale s)."""

    def energy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(model(x_t, t), dim=-1)
        return logp.gather(1, labels.to(x_t.device).view(-1, 1)).squeeze(1)

    return energy
