"""CLIP context encoders of Versatile Diffusion and the unconditional contexts (spec §2.10, §3.2, §7.1, §7.4-7.5).

Both contexts are CLIP's *projected* token embeddings divided by ONE scalar per sample, the norm of the pooled
projection (paper §3.4: normalised CLIP embeddings bring the two context spaces together):

- text:  ``c = text_projection(h) / ||text_projection(h_eos)||``, all ``L`` tokens (77 incl. padding);
- image: ``c = visual_projection(post_layernorm(h)) / ||that[:, 0]||``, all ``1 + P`` tokens (CLS + patches).

The EOS (text) / CLS (image) token therefore has unit norm; the other tokens do not. Both encoders take
preconstructed transformers models, so tests inject tiny random CLIPs and real runs pass ``from_pretrained`` ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NULL_IMAGE_KINDS = ("zeros", "grey", "black")
# Spec §8.2 defaults mirroring [R] app.py: zero embedding for image variation / dual, CLIP(black) for I2T.
DEFAULT_NULL_IMAGE = {"iv": "zeros", "dual": "zeros", "i2t": "black"}

ImageInput = Union[torch.Tensor, Sequence]


class ClipTextContext(nn.Module):
    """Prompts -> ``[B, L, D]`` normalised CLIP text tokens (spec §2.10, text).

    ``model`` is a ``CLIPTextModelWithProjection``; prompts are padded to ``max_length`` (77) with truncation and
    every position is kept, padding included, as VD was trained.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: Optional[int] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length or tokenizer.model_max_length)
        positions = model.config.max_position_embeddings
        if self.max_length > positions:
            raise UserError(f"text context length {self.max_length} exceeds the CLIP model's {positions} positions")

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be strings")
        device = self.model.text_projection.weight.device
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = self.model(input_ids=ids)
        tokens = self.model.text_projection(out.last_hidden_state)  # [B, L, D]
        # text_embeds = text_projection(pooled EOS state): the per-sample scale, as [R] and [D] _encode_prompt.
        pooled_norm = out.text_embeds.norm(dim=-1, keepdim=True)  # [B, 1]
        return tokens / pooled_norm[:, None]


class ClipImageContext(nn.Module):
    """Images -> ``[B, 1 + P, D]`` normalised CLIP image tokens (spec §2.10, image).

    Input: a float tensor ``[B, 3, H, W]`` in [0, 1], or a list of PIL images / uint8 arrays. Preprocessing is
    CLIP's (shorter side to ``image_size`` bicubic, centre crop, CLIP mean/std) done in torch, so float inputs are
    never rescaled a second time (spec §7.5). ``pre_resize`` first squashes to a square (512 in [R] app.py).
    """

    def __init__(self, model: nn.Module, image_size: Optional[int] = None, pre_resize: Optional[int] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(image_size or model.config.image_size)
        self.pre_resize = pre_resize
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def num_tokens(self) -> int:
        """CLS + patches: 257 for ViT-L/14 at 224 px."""
        return (self.image_size // self.model.config.patch_size) ** 2 + 1

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """``[B, 3, S, S]`` CLIP pixel values from a [0, 1] tensor or a list of PIL images / uint8 arrays."""
        x = images_to_tensor(images).to(self.mean.device)
        if self.pre_resize:
            x = F.interpolate(x, size=(self.pre_resize, self.pre_resize), mode="bicubic", antialias=True,
                              align_corners=False)
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: ImageInput) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.model.visual_projection.weight.dtype)
        hidden = self.model.vision_model(pixel_values=pixels).last_hidden_state  # [B, 1 + P, width]
        tokens = self.model.visual_projection(self.model.vision_model.post_layernorm(hidden))  # [B, 1 + P, D]
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)  # divide by the CLS token's norm


class ContextEncoders(nn.Module):
    """Both context encoders plus the unconditional contexts used by classifier-free guidance.

    ``null("text", B)`` is CLIP-text("") (spec §3.2); ``null("image", B, kind)`` is ``zeros`` (an all-zero
    embedding, [R] app.py for IV and dual), ``grey`` (CLIP of a 0.5 image, [R0] and [D]) or ``black`` (CLIP of a
    black image, [R] for I2T). The choice is a flag because FID and CFG depend on it (spec §7.1); train with the
    same null you sample with.
    """

    def __init__(self, text: ClipTextContext, image: ClipImageContext):
        super().__init__()
        self.text, self.image = text, image
        if text.dim != image.dim:
            raise UserError(f"CLIP text ({text.dim}) and image ({image.dim}) projections differ: use one CLIP model")

    @property
    def dim(self) -> int:
        return self.text.dim

    def encode(self, kind: str, value) -> torch.Tensor:
        if kind == "text":
            return self.text(value)
        if kind == "image":
            return self.image(value)
        raise UserError(f"unknown context type {kind!r}: choose text or image")

    @torch.no_grad()
    def null(self, kind: str, batch: int, image_kind: str = "zeros") -> torch.Tensor:
        """The unconditional context ``[batch, L, D]`` of a context type."""
        if kind == "text":
            return self.text([""]).expand(batch, -1, -1).clone()
        if kind != "image":
            raise UserError(f"unknown context type {kind!r}: choose text or image")
        if image_kind not in NULL_IMAGE_KINDS:
            raise UserError(f"unconditional image {image_kind!r}: choose one of {', '.join(NULL_IMAGE_KINDS)}")
        if image_kind == "zeros":
            return torch.zeros(batch, self.image.num_tokens, self.dim, device=self.image.mean.device)
        size = self.image.pre_resize or self.image.image_size
        value = 0.5 if image_kind == "grey" else 0.0
        tokens = self.image(torch.full((1, 3, size, size), value, device=self.image.mean.device))
        return tokens.expand(batch, -1, -1).clone()


def images_to_tensor(images: ImageInput) -> torch.Tensor:
    """``[B, 3, H, W]`` float in [0, 1] from a tensor (``[3, H, W]`` or ``[B, 3, H, W]``) or a list of PIL / uint8."""
    if isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise UserError(f"images must be [B, 3, H, W] in [0, 1], got {list(images.shape)}")
        if x.dtype == torch.uint8:
            return x.float() / 255.0
        if float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3:
            raise UserError("image tensors must hold values in [0, 1]: convert from [-1, 1] with (x + 1) / 2")
        return x.float()
    if isinstance(images, Sequence) and len(images) > 0:
        import numpy as np

        arrays = []
        for image in images:
            if hasattr(image, "convert"):  # PIL
                image = image.convert("RGB")
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[-1] != 3:
                raise UserError(f"each image must be RGB (H, W, 3), got shape {array.shape}")
            if array.dtype != np.uint8:
                raise UserError("list images must be PIL images or uint8 arrays; pass float images as a [0, 1] tensor")
            arrays.append(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0)
        if len({tuple(a.shape) for a in arrays}) != 1:
            raise UserError("images in one batch must share a size: resize them first")
        return torch.stack(arrays)
    raise UserError("images must be a [B, 3, H, W] tensor in [0, 1] or a non-empty list of PIL images")
