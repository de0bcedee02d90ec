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
estimate fits the budget. When none does with the whole batch in one denoiser call (the step itself is then the
floor, e.g. CFG doubling the batch at a large resolution), the same ladder is tried with the denoiser in
micro-batches: the CFG halves, then half the batch, down to one sample (:func:`micro_batched`; every sample's output
depends on its own inputs only, so the result is that of one call up to float rounding). If nothing fits, one
UserError names the estimate, the budget and the fix.

Methods whose denoiser phase is not one UNet forward hand :func:`plan` their own ``step_bytes`` built from the same
pieces: several member UNets in turn (:func:`unet_step_bytes` of each, the largest wins), a pixel-space UNet
(``factor`` 1, no VAE), or a guidance gradient through an image encoder (:func:`saved_activation_bytes`: the
activations autograd keeps for the backward pass, counted on the meta device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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


def unet_step_bytes(config: Any, request: Request, factor: int, attention_chunk: Optional[int] = None,
                    micro_batch: Optional[int] = None) -> int:
    """Peak bytes of one denoiser forward (no gradients) beyond the weights, for a ``UNet2DConditionModel`` or
    ``UNet2DModel`` config (or a dict with its keys). ``micro_batch``: the UNet sees this many samples per call
    (None: the whole batch, doubled under CFG); the latents of the whole batch are held either way."""
    widths = list(config_value(config, "block_out_channels"))
    levels = len(widths)
    layers = _per_level(config_value(config, "layers_per_block", 2), levels)
    kinds = list(config_value(config, "down_block_types", ()))
    attends = [("Attn" in kind) for kind in kinds] or [False] * levels
    heads = _per_level(config_value(config, "num_attention_heads") or config_value(config, "attention_head_dim", 8)
                       or 8, levels)
    batch = micro_batch or request.batch * (2 if request.guided else 1)
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


def _saved_bytes(module: torch.nn.Module, inputs: Sequence[Any]) -> int:
    from torch.func import functional_call

    params = {name: p.detach().to("meta").requires_grad_(True) for name, p in module.named_parameters()}
    buffers = {name: b.to("meta") for name, b in module.named_buffers()}
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.setdefault(id(tensor), tensor)
        return tensor

    meta = [x.to("meta").requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        functional_call(module, {**params, **buffers}, tuple(meta))
    return sum(t.numel() * t.element_size() for t in saved.values())


def saved_activation_bytes(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes per sample autograd keeps for the backward pass of ``module(*inputs)``, counted on the meta device.

    The module runs on shape-only copies of its parameters and inputs (``torch.func.functional_call``; nothing is
    allocated or computed) while a saved-tensors hook records every tensor kept for the backward pass, once. Run at
    a batch of one and of two (the inputs' first dimension, repeated), the difference is what one more sample adds:
    the activations, without the views of the weights an op keeps (a transposed matrix), which do not grow with the
    batch. Floating inputs are taken to need a gradient (a guidance gradient with respect to the image)."""

    def batch_of(n: int) -> list:
        return [x[:1].expand(n, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.ndim else x for x in inputs]

    return max(0, _saved_bytes(module, batch_of(2)) - _saved_bytes(module, batch_of(1)))


def weight_bytes(*models: Optional[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in models if m is not None for p in m.parameters())


def _rows(value: Any, rows: slice, batch: int) -> Any:
    """``value[rows]`` for a tensor batched like the input (first dimension ``batch``), else ``value`` itself."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):  # e.g. a UNet's added_cond_kwargs
        return {key: _rows(item, rows, batch) for key, item in value.items()}
    return value


def _concat(parts: list) -> Any:
    """The micro-batches' outputs joined along the batch: tensors, tuples of them or a diffusers output class."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple) and not hasattr(first, "keys"):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if hasattr(first, "keys"):  # diffusers BaseOutput: an ordered dict and a dataclass
        return type(first)(**{key: _concat([p[key] for p in parts]) for key in first.keys()})
    raise TypeError(f"cannot join micro-batch outputs of type {type(first).__name__}")


def split_forward(forward: Callable[..., Any], size: int) -> Callable[..., Any]:
    """``forward(x, t, *args, **kwargs)`` over ``size`` samples at a time: every tensor argument batched like
    ``x`` is sliced with it, everything else (a 0-dim timestep, ``return_dict``) is passed as is, and the outputs
    are concatenated. Each sample's output depends on its own inputs only, so the result equals one call up to
    float rounding; the activations held at once shrink with the micro-batch."""

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch = x.shape[0]
        if batch <= size:
            return forward(x, *args, **kwargs)
        parts = []
        for start in range(0, batch, size):
            rows = slice(start, start + size)
            parts.append(forward(x[rows], *(_rows(a, rows, batch) for a in args),
                                 **{k: _rows(v, rows, batch) for k, v in kwargs.items()}))
        return _concat(parts)

    return run


@contextlib.contextmanager
def micro_batched(model: Optional[torch.nn.Module], size: Optional[int]) -> Iterator[None]:
    """For the body, ``model(x, ...)`` runs ``size`` samples at a time (:func:`split_forward`); ``size=None`` or no
    model: unchanged. The split goes on the instance's ``forward``, so the module, its weights and its hooks are the
    same objects (a CFG wrapper's single ``[uncond; cond]`` call becomes its halves with ``size`` = the batch)."""
    if size is None or model is None:
        yield
        return
    had_own = "forward" in vars(model)
    original = model.forward
    model.forward = split_forward(original, int(size))
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


@dataclass(frozen=True)
class MemoryPlan:
    """How a request runs: the VAE's mode, the attention's query chunk (None: whole), the denoiser's micro-batch
    (samples per call; None: the whole batch in one call) and the estimated peak."""

    vae: Optional[VaeMode]  # None: a pixel-space method (no VAE)
    attention_chunk: Optional[int]
    estimate: int
    budget: int
    micro_batch: Optional[int] = None
    weights: int = 0  # the part of the estimate that is the models' weights

    def describe(self) -> str:
        attention = f"attention in chunks of {self.attention_chunk} queries" if self.attention_chunk else \
            "attention whole"
        split = f", denoiser in micro-batches of {self.micro_batch}" if self.micro_batch else ""
        vae = f"VAE {self.vae.describe()}, " if self.vae is not None else ""
        return f"{vae}{attention}{split}: estimated {gb(self.estimate)} of {gb(self.budget)}"

    @contextlib.contextmanager
    def applied(self, *models: Optional[torch.nn.Module], split: bool = True) -> Iterator[None]:
        """The plan's attention chunking on ``models`` for the body and, with ``split``, its micro-batching of their
        forward calls (the denoisers'; the VAE mode goes to ``decode_latents``)."""
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(chunked_attention_in(model, self.attention_chunk))
                if split:
                    stack.enter_context(micro_batched(model, self.micro_batch))
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


def micro_batches(request: Request) -> list[int]:
    """Samples per denoiser call, beyond the whole (CFG-doubled) batch: first the CFG halves (the batch), then
    halving down to one sample."""
    sizes, size = [], request.batch
    if not request.guided:
        size = (size + 1) // 2 if size > 1 else 0
    while size >= 1:
        sizes.append(size)
        size = (size + 1) // 2 if size > 1 else 0
    return sizes


def estimate(unet_config: Any, vae_config: Any, request: Request, mode: VaeMode = PLAIN,
             attention_chunk: Optional[int] = None, weights: int = 0, micro_batch: Optional[int] = None) -> int:
    """Estimated peak bytes of the request: the weights plus the larger of a denoiser step and the decode."""
    factor = vae_scale_factor(vae_config)
    return weights + max(unet_step_bytes(unet_config, request, factor, attention_chunk, micro_batch),
                         vae_decode_bytes(vae_config, request, mode))


# ``step(attention_chunk, micro_batch) -> bytes``: a method's denoiser phase, for plan() (default: one UNet's).
StepBytes = Callable[[Optional[int], Optional[int]], int]


def plan(unet: Any, vae: Any, request: Request, budget: int, *, weights: Optional[int] = None,
         extra_models: Sequence[Optional[torch.nn.Module]] = (), what: str = "--resolution/--num_images",
         step_bytes: Optional[StepBytes] = None, split: bool = True, size_text: Optional[str] = None
         ) -> MemoryPlan:
    """The fastest :class:`MemoryPlan` whose estimate fits ``budget`` bytes; a UserError when even the most frugal
    one does not. ``unet`` / ``vae``: the models (or their configs, with ``weights`` given).

    Fastest first: the denoiser's whole batch in one call, then micro-batches (:func:`micro_batches`, with ``split``;
    only where no VAE mode and attention chunk fits with the whole batch, since the step is then the floor); within
    each, the VAE's modes (:func:`vae_modes`), and within those, attention whole then in query chunks (only where
    SDPA would hold the scores). A method whose denoiser is not one UNet gives its own ``step_bytes`` (then
    ``unet`` is only counted in the weights, and may be None).
    ``vae=None``: a pixel-space method, no decode phase. ``size_text``: how the refusal names the request's size
    (default ``"B x HxW pixels"``).
    """
    vae_config = getattr(vae, "config", vae)
    if weights is None:
        weights = weight_bytes(*(m for m in (unet, vae, *extra_models) if isinstance(m, torch.nn.Module)))
    if step_bytes is None:
        unet_config = getattr(unet, "config", unet)
        factor = vae_scale_factor(vae_config) if vae_config is not None else 1

        def step_bytes(chunk: Optional[int], micro: Optional[int]) -> int:
            return unet_step_bytes(unet_config, request, factor, chunk, micro)

    chunks: list[Optional[int]] = [None]
    if not sdpa_avoids_scores(request.device):
        chunks += list(ATTENTION_CHUNKS)
    modes: list[Optional[VaeMode]] = [None] if vae_config is None else vae_modes(
        vae_config, request, supports_tiling(vae) or not isinstance(vae, torch.nn.Module))
    splits: list[Optional[int]] = [None] + (micro_batches(request) if split else [])
    best = None
    for micro in splits:
        for mode in modes:
            for chunk in chunks:
                decode = 0 if vae_config is None else vae_decode_bytes(vae_config, request, mode)
                needed = weights + max(step_bytes(chunk, micro), decode)
                if needed <= budget:
                    return MemoryPlan(mode, chunk, needed, budget, micro, weights)
                if best is None or needed <= best[3]:  # ties: the later, more frugal path
                    best = (micro, mode, chunk, needed)
    micro, mode, chunk, needed = best
    attention = f"in chunks of {chunk}" if chunk else "whole"
    path = f"VAE {mode.describe()}, " if vae_config is not None else ""
    path += f"attention {attention}" + (f", denoiser in micro-batches of {micro}" if micro else "")
    raise UserError(
        f"{what} need an estimated {gb(needed)} "
        f"({size_text or f'{request.batch} x {request.height}x{request.width} pixels'}) even "
        f"with the most frugal path ({path}), above the {gb(budget)} limit: lower them, or raise the limit with "
        f"--max_memory_gb"
    )


def budget_bytes(max_memory_gb: Optional[float] = None, device: str = "cpu") -> int:
    """The budget: ``max_memory_gb`` when given, else the memory of the machine (of the GPU on CUDA)."""
    return limits.memory_limit_bytes(max_memory_gb, device)
