"""How much memory a latent generation needs, and the cheapest way to run it within a budget.

The peak of a latent text-to-image request is one of two phases, on top of the weights:

- **a denoiser step** at latent resolution ``h x w = H/f x W/f``: the UNet's skip connections (every level's
  feature maps are kept for the decoder half), the working set of its widest block (a transformer block's GEGLU
  feed-forward holds ``~13 c`` channels, a ResNet block ``~5 c``) and, when SDPA falls back to its math kernel, the
  attention scores ``heads x L x L`` of its largest self-attention (``L = h w``). The batch is doubled under
  classifier-free guidance (one forward over ``[uncond; cond]``).
- **the VAE decode**: the decoder's working set at each level (``~4 c`` channels of the level's size, ``2 c`` more
  while upsampling), ``L x L`` scores of its single-head mid-block attention on the math kernel, and the images
  themselves (the decoded batch, its concatenation and the mapping to [0, 1]).

Each term is ``elements x bytes per element``, read from the models' configs; the constants were fitted against
peak resident memory measured on small models (``tests/test_memory.py`` holds the estimate to within a factor of
the measured peak, and never far below it).

:func:`plan` tries, from fastest to most frugal, the plain path, attention in query chunks (only where SDPA would
hold the scores), the VAE one image at a time, then the VAE on tiles of decreasing size, and returns the first whose
estimate fits the budget; if none does, one UserError names the estimate, the budget and the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from common import limits
from common.attention import chunked_attention_in, sdpa_avoids_scores
from common.errors import UserError
from common.latents import PLAIN, TILE_OVERLAP, VaeMode, config_value, supports_tiling, vae_scale_factor


ATTENTION_CHUNKS = (1024, 256, 64)
MIN_TILE = 8  # latent cells: smaller tiles are mostly overlap
# Working-set widths, in multiples of a level's channels (see the module docstring).
UNET_TRANSFORMER_WORK = 13
UNET_RESNET_WORK = 5
VAE_WORK = 4
VAE_UPSAMPLE_WORK = 2
IMAGE_COPIES = 3  # decoded batch + concatenation + the [0, 1] mapping
LATENT_COPIES = 8  # x_t, the noise prediction, x_0, the guidance halves: per latent element of the batch
TEXT_TOKENS = 77


def _per_level(value: Any, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


@dataclass(frozen=True)
class Request:
    """One generation: ``batch`` outputs of ``height x width`` pixels; ``guided``: CFG doubles the UNet batch."""

    batch: int
    height: int
    width: int
    guided: bool = True
    dtype_bytes: int = 4
    device: str = "cpu"


def unet_step_bytes(config: Any, request: Request, factor: int, attention_chunk: Optional[int] = None) -> int:
    """Peak bytes of one denoiser forward (no gradients) beyond the weights, for a ``UNet2DConditionModel`` or
    ``UNet2DModel`` config."""
    widths = list(config_value(config, "block_out_channels"))
    levels = len(widths)
    layers = _per_level(config_value(config, "layers_per_block", 2), levels)
    kinds = list(config_value(config, "down_block_types", ()))
    attends = [("Attn" in kind) for kind in kinds] or [False] * levels
    heads = _per_level(config_value(config, "num_attention_heads") or config_value(config, "attention_head_dim", 8)
                       or 8, levels)
    batch = request.batch * (2 if request.guided else 1)
    h, w = request.height // factor, request.width // factor
    pixels = [max(1, (h >> level) * (w >> level)) for level in range(levels)]
    skips = pixels[0] * widths[0] + sum(pixels[i] * widths[i] * (layers[i] + (i < levels - 1)) for i in range(levels))
    work = max(pixels[i] * 2 * widths[i] * (UNET_TRANSFORMER_WORK if attends[i] else UNET_RESNET_WORK)
               for i in range(levels))
    scores = 0
    if not sdpa_avoids_scores(request.device):
        for i in range(levels):
            if attends[i]:
                rows = pixels[i] if attention_chunk is None else min(attention_chunk, pixels[i])
                scores = max(scores, int(heads[i]) * rows * (pixels[i] + TEXT_TOKENS))
    latents = LATENT_COPIES * request.batch * int(config_value(config, "in_channels", 4)) * h * w
    return request.dtype_bytes * (batch * (skips + work + scores) + latents)


def vae_decode_bytes(config: Any, request: Request, mode: VaeMode = PLAIN) -> int:
    """Peak bytes of decoding the batch to [0, 1] images (no gradients) beyond the weights, for an
    ``AutoencoderKL`` config, including the images themselves."""
    widths = list(reversed(config_value(config, "block_out_channels")))
    factor = 2 ** (len(widths) - 1)
    h, w = request.height // factor, request.width // factor
    if mode.tile is not None:
        h, w = min(h, mode.tile), min(w, mode.tile)
    per_pass = 1 if mode.slicing else request.batch
    top = h * w
    work = top * widths[0] * (VAE_WORK + 1)
    if not sdpa_avoids_scores(request.device) and config_value(config, "mid_block_add_attention", True):
        work += top * top
    previous = widths[0]
    for level, width in enumerate(widths):
        cells = top * 4**level
        work = max(work, cells * max(previous, width) * VAE_WORK)
        if level < len(widths) - 1:
            work = max(work, cells * 4 * width * VAE_UPSAMPLE_WORK)
        previous = width
    image = 3 * request.height * request.width
    held = IMAGE_COPIES * request.batch * image
    if mode.tile is not None:  # one image's overlapping tiles are kept until they are blended into rows
        held += int(image / (1 - TILE_OVERLAP) ** 2)
    return 4 * held + request.dtype_bytes * per_pass * work


def weight_bytes(*models: Optional[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in models if m is not None for p in m.parameters())


@dataclass(frozen=True)
class MemoryPlan:
    """How a request runs: the VAE's mode, the attention's query chunk (None: whole), and the estimated peak."""

    vae: VaeMode
    attention_chunk: Optional[int]
    estimate: int
    budget: int

    def describe(self) -> str:
        attention = f"attention in chunks of {self.attention_chunk} queries" if self.attention_chunk else \
            "attention whole"
        return f"VAE {self.vae.describe()}, {attention}: estimated {gb(self.estimate)} of {gb(self.budget)}"

    @contextlib.contextmanager
    def applied(self, *models: Optional[torch.nn.Module]) -> Iterator[None]:
        """The plan's attention chunking on ``models`` for the body (the VAE mode goes to ``decode_latents``)."""
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(chunked_attention_in(model, self.attention_chunk))
            yield


def gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def vae_modes(vae_config: Any, request: Request, tiling: bool) -> list[VaeMode]:
    """The VAE's modes, fastest first: whole batch, one image at a time, then tiles halving down to MIN_TILE."""
    modes = [PLAIN] + ([VaeMode(slicing=True)] if request.batch > 1 else [])
    if tiling:
        factor = vae_scale_factor(vae_config)
        side = max(request.height, request.width) // factor
        tile = int(config_value(vae_config, "sample_size", 512)) // factor
        while tile >= MIN_TILE:
            if tile < side:
                modes.append(VaeMode(slicing=True, tile=tile))
            tile //= 2
    return modes


def estimate(unet_config: Any, vae_config: Any, request: Request, mode: VaeMode = PLAIN,
             attention_chunk: Optional[int] = None, weights: int = 0) -> int:
    """Estimated peak bytes of the request: the weights plus the larger of a denoiser step and the decode."""
    factor = vae_scale_factor(vae_config)
    return weights + max(unet_step_bytes(unet_config, request, factor, attention_chunk),
                         vae_decode_bytes(vae_config, request, mode))


def plan(unet: Any, vae: Any, request: Request, budget: int, *, weights: Optional[int] = None,
         extra_models: Sequence[Optional[torch.nn.Module]] = (), what: str = "--resolution/--num_images"
         ) -> MemoryPlan:
    """The fastest :class:`MemoryPlan` whose estimate fits ``budget`` bytes; a UserError when even the most frugal
    one does not. ``unet`` / ``vae``: the models (or their configs, with ``weights`` given)."""
    unet_config, vae_config = getattr(unet, "config", unet), getattr(vae, "config", vae)
    if weights is None:
        weights = weight_bytes(*(m for m in (unet, vae, *extra_models) if isinstance(m, torch.nn.Module)))
    chunks: list[Optional[int]] = [None]
    if not sdpa_avoids_scores(request.device):
        chunks += list(ATTENTION_CHUNKS)
    candidates = [(mode, chunk) for mode in vae_modes(vae_config, request, supports_tiling(vae) or
                                                      not isinstance(vae, torch.nn.Module))
                  for chunk in chunks]
    best = None
    for mode, chunk in candidates:
        needed = estimate(unet_config, vae_config, request, mode, chunk, weights)
        if needed <= budget:
            return MemoryPlan(mode, chunk, needed, budget)
        if best is None or needed < best[2]:
            best = (mode, chunk, needed)
    mode, chunk, needed = best
    attention = f"in chunks of {chunk}" if chunk else "whole"
    raise UserError(
        f"{what} need an estimated {gb(needed)} ({request.batch} x {request.height}x{request.width} pixels) even "
        f"with the most frugal path (VAE {mode.describe()}, attention {attention}), above the {gb(budget)} limit: "
        f"lower them, or raise the limit with --max_memory_gb"
    )


def budget_bytes(max_memory_gb: Optional[float] = None, device: str = "cpu") -> int:
    """The budget: ``max_memory_gb`` when given, else the memory of the machine (of the GPU on CUDA)."""
    return limits.memory_limit_bytes(max_memory_gb, device)
