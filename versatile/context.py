"""CLIP context encoders of Versatile Diffusion and the unconditional contexts (METHOD.md, "Contexts").

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
# Defaults mirroring [R] app.py: zero embedding for image variation / dual, CLIP(black) for I2T.
DEFAULT_NULL_IMAGE = {"iv": "zeros", "dual": "zeros", "i2t": "black"}

ImageInput = Union[torch.Tensor, Sequence]


class ClipTextContext(nn.Module):
    """Prompts -> ``[B, L, D]`` normalised CLIP text tokens (METHOD.md, "Contexts", text).

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
        return tokens / pooled_norm[:, None] * getattr(self, "scale", 1.0)


class ClipImageContext(nn.Module):
    """Images -> ``[B, 1 + P, D]`` normalised CLIP image tokens (METHOD.md, "Contexts", image).

    Input: a float tensor ``[B, 3, H, W]`` in [0, 1], or a list of PIL images / uint8 arrays. Preprocessing is
    CLIP's (shorter side to ``image_size`` bicubic, centre crop, CLIP mean/std) done in torch, so float inputs are
    never rescaled a second time. ``pre_resize`` first squashes to a square (512 in [R] app.py).
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
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True) * getattr(self, "scale", 1.0)  # over the CLS norm


class ContextEncoders(nn.Module):
    """Both context encoders plus the unconditional contexts used by classifier-free guidance.

    ``null("text", B)`` is CLIP-text(""); ``null("image", B, kind)`` is ``zeros`` (an all-zero
    embedding, [R] app.py for IV and dual), ``grey`` (CLIP of a 0.5 image, [R0] and [D]) or ``black`` (CLIP of a
    black image, [R] for I2T). The choice is a flag because FID and CFG depend on it; train with the
    same null you sample with.
    """

    def __init__(self, text: ClipTextContext, image: ClipImageContext, scale: float = 1.0):
        super().__init__()
        self.text, self.image = text, image
        if text.dim != image.dim:
            raise UserError(f"CLIP text ({text.dim}) and image ({image.dim}) projections differ: use one CLIP model")
        self.set_scale(scale)

    def set_scale(self, scale: float) -> None:
        """Multiply every context token by ``scale`` (``context_scale``; VD: 1). Null contexts follow (zeros stay 0)."""
        if not scale > 0:
            raise UserError(f"context scale {scale} must be > 0")
        self.scale = self.text.scale = self.image.scale = float(scale)

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


# --------------------------------------------------------------------------------------------------------------
# open_clip towers (the project's tiny CLIP is an open_clip model: ckpt/tiny/clip)
# --------------------------------------------------------------------------------------------------------------


def _project(x: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection


class OpenClipTextContext(nn.Module):
    """Prompts -> ``[B, L, D]`` normalised tokens from an ``open_clip.CLIP`` text tower (METHOD.md, "Contexts", text).

    The same formula as :class:`ClipTextContext` on open_clip's modules: ``h = ln_final(transformer(tok + pos))``
    over all ``context_length`` positions (padding included), ``c = h @ text_projection / ||pooled @
    text_projection||`` with open_clip's own pooling (``argmax``: the EOT token), so the EOT token has unit norm.
    """

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        tower = model if hasattr(model, "ln_final") else getattr(model, "text", None)
        if tower is None or not hasattr(tower, "token_embedding") or getattr(tower, "cls_emb", None) is not None:
            raise UserError("the open_clip model has no plain text transformer (token_embedding ... ln_final): "
                            "use an open_clip CLIP with a standard text tower")
        self.model = model.eval().requires_grad_(False)
        self.tower = tower
        self.tokenizer = tokenizer
        self.max_length = int(tower.positional_embedding.shape[0])
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))

    @property
    def dim(self) -> int:
        proj = self.tower.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.tower.token_embedding.weight.device

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be strings")
        tower = self.tower
        ids = self.tokenizer(list(prompts)).to(self.device)  # [B, 77], zero padded
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(ids).to(cast) + tower.positional_embedding.to(cast)
        h = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))  # [B, L, width]
        tokens = _project(h, tower.text_projection)  # [B, L, D]
        pooled = _project(text_global_pool(h, ids, self.pool_type, eos_token_id=self.eos_id), tower.text_projection)
        return tokens / pooled.norm(dim=-1, keepdim=True)[:, None] * getattr(self, "scale", 1.0)


class OpenClipImageContext(ClipImageContext):
    """Images -> ``[B, 1 + P, D]`` normalised tokens from an open_clip ``VisionTransformer`` (METHOD.md, "Contexts", image).

    ``c = ln_post(h) @ proj / ||that[:, 0]||`` over the class token and every patch (open_clip's ``forward`` keeps
    only the pooled token; this is the per-token form of the same layers). Preprocessing as
    :class:`ClipImageContext` with the model's own ``preprocess_cfg`` mean / std and image size.
    """

    def __init__(self, model: nn.Module, pre_resize: Optional[int] = None):
        nn.Module.__init__(self)
        visual = getattr(model, "visual", model)
        if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
            raise UserError("the open_clip model has no plain ViT image tower (conv1, class token, ln_post): "
                            "use an open_clip CLIP with a ViT vision tower")
        self.model = model.eval().requires_grad_(False)
        self.visual = visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = visual.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.pre_resize = pre_resize
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        mean, std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return int(self.visual.proj.shape[-1]) if self.visual.proj is not None else int(self.visual.ln_post.weight.shape[0])

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @torch.no_grad()
    def forward(self, images: ImageInput) -> torch.Tensor:
        visual = self.visual
        pixels = self.preprocess(images).to(visual.conv1.weight.device, visual.conv1.weight.dtype)
        h = visual.transformer(visual._embeds(pixels))  # [B, 1 + P, width]
        tokens = _project(visual.ln_post(h), visual.proj)  # [B, 1 + P, D]
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True) * getattr(self, "scale", 1.0)


def open_clip_contexts(model: nn.Module, tokenizer, pre_resize: Optional[int] = None,
                       scale: float = 1.0) -> ContextEncoders:
    """Both context encoders on one open_clip CLIP (``common.models.load_open_clip`` -> model, _, tokenizer)."""
    return ContextEncoders(OpenClipTextContext(model, tokenizer), OpenClipImageContext(model, pre_resize), scale)
