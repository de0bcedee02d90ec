"""CLIP embeddings for Shifted Diffusion: several CLIP models concatenated, text states, and an offline cache.

Embedding space (METHOD.md, "Embedding space"): ``x0 = [E_1(img) | E_2(img) | ... ]``, the RAW (not normalised, not rescaled) image
embeddings of an ordered list of CLIP models (the paper: ViT-B/16, ViT-B/32, RN101, 512 each -> 1536); the text
condition ``c`` is the same models' text embeddings in the same order. Similarities between such vectors are taken
per CLIP block and averaged (:func:`mean_block_cosine`), never on the concatenation, because the blocks live on very
different scales (RN101 norms ~2 vs ~7-10 for the ViTs).

A CLIP model here is ``(name, model, tokenizer)``: an ``open_clip`` model (``encode_image`` / ``encode_text``,
``visual.image_size``, ``visual.preprocess_cfg``) and its tokenizer (``open_clip.get_tokenizer``; it truncates long
captions to the context length, which the reference's ``clip.tokenize`` did not).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UserError
from shifted.bank import check_clip_models


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CACHE_FORMAT = "shifted-diffusion-embeddings/1"
ImageLike = Union[Image.Image, torch.Tensor]


def split_blocks(x: torch.Tensor, block_dims: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``[..., D] -> ([..., d_1], [..., d_2], ...)``, one view per CLIP model."""
    if x.shape[-1] != sum(block_dims):
        raise UserError(f"a {x.shape[-1]}-d embedding cannot be split into CLIP blocks {list(block_dims)}")
    return torch.split(x, list(block_dims), dim=-1)


def per_block_cosine(a: torch.Tensor, b: torch.Tensor, block_dims: Sequence[int]) -> torch.Tensor:
    """Row-wise cosine per CLIP model: ``[B, D], [B, D] -> [B, n_models]``."""
    return torch.stack(
        [F.cosine_similarity(x, y, dim=-1) for x, y in zip(split_blocks(a, block_dims), split_blocks(b, block_dims))],
        dim=-1,
    )


def mean_block_cosine(a: torch.Tensor, b: torch.Tensor, block_dims: Sequence[int]) -> torch.Tensor:
    """The paper's CLIP similarity of two concatenated embeddings: per-model cosines averaged -> ``[B]``."""
    return per_block_cosine(a, b, block_dims).mean(dim=-1)


def check_texts(texts: Sequence[str], allow_empty: bool = False) -> list[str]:
    """Captions as a list; an empty list, a non-string or (unless ``allow_empty``) a blank caption is a UserError."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise UserError("no text was given: pass at least one caption")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"caption {i} is a {type(text).__name__}, not a string")
        if not allow_empty and not text.strip():
            raise UserError(
                f"caption {i} is empty: give a caption (the empty-text embedding used as the SD negative is made "
                "by shifted.pipeline.null_image_embedding)"
            )
    return texts


def clip_pixels(
    pixels: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float], center_crop: bool = True
) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> CLIP input ``[B, 3, S, S]``: bicubic resize of the short side, crop, normalise.

    ``center_crop=False`` resizes straight to ``S x S`` (the reference SD scripts' "no crop" path only works on
    square images; cropping is the fix added after issue #5).
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise UserError(f"CLIP expects RGB pixels [B, 3, H, W] in [0, 1], got shape {tuple(pixels.shape)}")
    h, w = pixels.shape[-2:]
    if center_crop:
        scale = image_size / min(h, w)
        size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    else:
        size = (image_size, image_size)
    x = F.interpolate(pixels.float(), size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if center_crop:
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        x = x[..., top : top + image_size, left : left + image_size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def to_pixels(images: Sequence[ImageLike]) -> torch.Tensor:
    """PIL images / ``[3, H, W]`` tensors in [0, 1] of one size -> ``[B, 3, H, W]`` float32."""
    tensors = []
    for image in images:
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            image = torch.from_numpy(array).permute(2, 0, 1)
        tensors.append(image.float())
    if len({tuple(t.shape) for t in tensors}) > 1:
        raise UserError("images in one batch must share a size: resize or center-crop them first (process_img)")
    return torch.stack(tensors)


class MultiCLIP:
    """Several CLIP models as one encoder whose outputs are concatenated in a fixed order (``MultiCLIP`` in the reference).

    Args:
        models: ``[(name, open_clip_model, tokenizer), ...]`` in concatenation order. ``name`` identifies the model
            and its weights (e.g. ``"ViT-B-16/openai"``); it is stored with caches, banks and priors and checked.
    """

    def __init__(self, models: Sequence[tuple[str, torch.nn.Module, Callable]]):
        if not models:
            raise UserError("no CLIP model given: pass at least one (e.g. ViT-B-16/openai)")
        self.models = [(str(name), model.eval(), tokenizer) for name, model, tokenizer in models]
        with torch.no_grad():
            probe = [m.encode_text(tok(["a"]).to(_device(m))) for _, m, tok in self.models]
        self.block_dims = tuple(int(p.shape[-1]) for p in probe)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.models)

    @property
    def dim(self) -> int:
        return sum(self.block_dims)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, center_crop: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> raw concatenated image embeddings ``[B, D]`` float32 (on pixels' device)."""
        out = []
        for _, model, _ in self.models:
            visual = model.visual
            size = visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            cfg = getattr(visual, "preprocess_cfg", None) or {}
            x = clip_pixels(pixels, int(size), cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD), center_crop)
            out.append(model.encode_image(x.to(_device(model))).float().to(pixels.device))
        return torch.cat(out, dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], allow_empty: bool = False) -> torch.Tensor:
        """Captions -> raw concatenated text embeddings ``[B, D]`` float32 (CPU)."""
        texts = check_texts(texts, allow_empty)
        out = [model.encode_text(tok(texts).to(_device(model))).float().cpu() for _, model, tok in self.models]
        return torch.cat(out, dim=-1)


def _device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class TextStates:
    """Text-encoder hidden states for the prior's text tokens (T5-11B in the paper), ``[B, max_length, d]``.

    Any encoder whose forward takes ``input_ids`` and returns ``last_hidden_state`` works (T5, a CLIP text tower).

    Tokenised with ``padding="max_length"`` and truncation, and encoded WITHOUT an attention mask, as the reference
    does: the padding states are genuine inputs of the prior. The CFG null is all zeros, not the states
    of an empty caption (:meth:`null`).
    """

    def __init__(self, encoder: torch.nn.Module, tokenizer: Callable, name: str, max_length: int = 80):
        self.encoder, self.tokenizer, self.name, self.max_length = encoder.eval(), tokenizer, name, int(max_length)

    @property
    def dim(self) -> int:
        config = self.encoder.config  # T5: d_model; a CLIP text tower: hidden_size
        return int(getattr(config, "d_model", None) or config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], allow_empty: bool = False) -> torch.Tensor:
        texts = check_texts(texts, allow_empty)
        ids = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids.to(_device(self.encoder))
        return self.encoder(input_ids=ids).last_hidden_state.float().cpu()

    @staticmethod
    def null(states: torch.Tensor) -> torch.Tensor:
        """The classifier-free-guidance null: zeros like ``states`` (a new tensor, never a view of them)."""
        return torch.zeros_like(states)


class PriorTextEncoder:
    """Everything the prior reads from a caption: ``(CLIP text embedding [B, D], text states [B, L, d])``."""

    def __init__(self, clip: MultiCLIP, text_states: TextStates):
        self.clip, self.text_states = clip, text_states

    def __call__(self, texts: Sequence[str], allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        texts = check_texts(texts, allow_empty)
        return self.clip.encode_text(texts, allow_empty), self.text_states(texts, allow_empty)


# ------------------------------------------------------------------------------------------------------- cache


def fingerprint(texts: Optional[Sequence[str]], count: int) -> str:
    """A short digest of the captions and the item count, to tell a stale cache from a fresh one."""
    digest = hashlib.sha256(str(count).encode())
    for text in texts or ():
        digest.update(b"\x00" + text.encode("utf-8"))
    return digest.hexdigest()[:16]


def extract_embeddings(
    clip: MultiCLIP,
    images: Sequence[ImageLike],
    texts: Optional[Sequence[str]] = None,
    text_states: Optional[TextStates] = None,
    batch_size: int = 64,
    center_crop: bool = True,
) -> dict[str, torch.Tensor]:
    """Embed a dataset once: ``image_emb [N, D]``, and with captions ``text_emb [N, D]`` (+ ``text_states``).

    Computes exactly what training computes on the fly (same :class:`MultiCLIP` calls), batch by batch, so that a
    cached run and an on-the-fly run see identical tensors.
    """
    if texts is not None and len(texts) != len(images):
        raise UserError(f"got {len(images)} images but {len(texts)} captions: they are paired one to one")
    if text_states is not None and texts is None:
        raise UserError("text states need captions: pass texts as well")
    if len(images) == 0:
        raise UserError("no images to embed: check the dataset folder")
    out: dict[str, list[torch.Tensor]] = {"image_emb": []}
    if texts is not None:
        out["text_emb"] = []
    if text_states is not None:
        out["text_states"] = []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        out["image_emb"].append(clip.encode_image(to_pixels(images[start:stop]), center_crop).cpu())
        if texts is not None:
            out["text_emb"].append(clip.encode_text(texts[start:stop]))
        if text_states is not None:
            out["text_states"].append(text_states(texts[start:stop]))
    return {key: torch.cat(chunks) for key, chunks in out.items()}


class EmbeddingDataset(torch.utils.data.Dataset):
    """Loaded cache tensors as a map-style dataset of ``{key: tensor[i]}`` (default collate stacks a batch)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        counts = {key: len(value) for key, value in tensors.items()}
        if len(set(counts.values())) != 1:
            raise UserError(f"cache tensors disagree on the number of items: {counts}; re-run extract_embeddings")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["image_emb"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def save_embedding_cache(
    path: Union[str, Path],
    tensors: dict[str, torch.Tensor],
    clip: MultiCLIP,
    texts: Optional[Sequence[str]] = None,
    text_encoder: Optional[str] = None,
) -> Path:
    """Write extracted embeddings to one safetensors file with the CLIP models, block widths and a fingerprint."""
    from common.io import save_safetensors

    count = len(tensors["image_emb"])
    meta = {
        "format": CACHE_FORMAT,
        "clip_models": json.dumps(list(clip.names)),
        "block_dims": json.dumps(list(clip.block_dims)),
        "count": str(count),
        "fingerprint": fingerprint(texts, count),
        "text_encoder": text_encoder or "",
    }
    return save_safetensors(tensors, path, metadata=meta)


def load_embedding_cache(
    path: Union[str, Path],
    clip_models: Optional[Sequence[str]] = None,
    texts: Optional[Sequence[str]] = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a cache; with ``clip_models`` / ``texts`` check it was made with those models from those captions.

    Returns ``(tensors, meta)`` with ``meta["clip_models"]`` and ``meta["block_dims"]`` decoded.
    """
    from safetensors import safe_open

    from common.io import load_safetensors

    tensors = load_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    if raw.get("format") != CACHE_FORMAT or "image_emb" not in tensors:
        raise UserError(f"{path} is not an embedding cache written by shifted (extract_embeddings)")
    meta = dict(raw, clip_models=json.loads(raw["clip_models"]), block_dims=json.loads(raw["block_dims"]))
    meta["count"] = int(raw["count"])
    if clip_models is not None:
        check_clip_models(meta["clip_models"], clip_models, f"the embedding cache {path}")
    if texts is not None and fingerprint(texts, meta["count"]) != meta["fingerprint"]:
        raise UserError(f"the embedding cache {path} was made from other captions: re-run extract_embeddings")
    return tensors, meta
