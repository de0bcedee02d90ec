"""Temporal consistency of a generated / edited video clip (the ContextDiff / Tune-A-Video / FateZero protocol).

- CLIP mode (the papers' metric): mean cosine between CLIP image embeddings of frame pairs, per CLIP model,
  then averaged over models. ``pairs="consecutive"`` is FateZero's ``frame_acc_tem_con.py`` (frames t, t+1);
  ``pairs="all"`` is Tune-A-Video's (every unordered pair).
- Pixel mode (no network): ``1 - mean |f_i - f_j|`` over the same pairs, pixels in ``[0, 1]``; 1 for a still
  clip. It measures flicker, and also penalises real motion, so compare it only between runs of one clip.
"""

from __future__ import annotations

import itertools

import torch

from common.errors import UserError
from common.metrics.clip import (
    ClipModels,
    average_over_models,
    clip_image_embeddings,
    named_clip_models,
    paired_cosine,
)
from common.metrics.images import ImageSource, iter_uint8_batches


PAIRINGS = ("consecutive", "all")


def frame_pairs(num_frames: int, pairs: str = "consecutive") -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``: ``(t, t+1)`` for ``consecutive``, every ``i < j`` for ``all``."""
    if pairs not in PAIRINGS:
        raise UserError(f"pairs must be one of {PAIRINGS}, got {pairs!r}")
    if num_frames < 2:
        raise UserError(f"frame consistency needs at least 2 frames, got {num_frames}")
    if pairs == "consecutive":
        return [(t, t + 1) for t in range(num_frames - 1)]
    return list(itertools.combinations(range(num_frames), 2))


def load_frames(frames: ImageSource) -> torch.Tensor:
    """All frames as float ``[T, 3, H, W]`` in ``[0, 1]``; UserError when frame sizes differ."""
    tensors = [frame for batch in iter_uint8_batches(frames, 64) for frame in batch]
    sizes = sorted({tuple(frame.shape[1:]) for frame in tensors})
    if len(sizes) > 1:
        raise UserError(f"frames of one clip must share one size, got sizes {sizes}; resize the frames")
    return torch.stack(tensors).double() / 255.0


def pixel_frame_consistency(frames: ImageSource, pairs: str = "consecutive") -> dict:
    """``1 - mean_{(i,j)} mean |f_i - f_j|`` for frames in ``[0, 1]``; returns ``{"mean", "pixel_l1", ...}``."""
    video = load_frames(frames)
    index = frame_pairs(video.shape[0], pairs)
    first, second = zip(*index)
    l1 = (video[list(first)] - video[list(second)]).abs().mean().item()
    return {"method": "pixel", "mean": 1.0 - l1, "pixel_l1": l1, "num_frames": video.shape[0], "num_pairs": len(index)}


def clip_frame_consistency(frames: ImageSource, clip_models: ClipModels, pairs: str = "consecutive") -> dict:
    """Mean CLIP image-embedding cosine over frame pairs, per model, then averaged over models."""
    per_model, index, num_frames = {}, [], 0
    for name, (model, preprocess, _tokenizer) in named_clip_models(clip_models):
        embeddings = clip_image_embeddings(frames, model, preprocess)
        num_frames = embeddings.shape[0]
        index = frame_pairs(num_frames, pairs)
        first, second = zip(*index)
        per_model[name] = float(paired_cosine(embeddings[list(first)], embeddings[list(second)]).mean())
    return {"method": "clip", **average_over_models(per_model), "num_frames": num_frames, "num_pairs": len(index)}


def frame_consistency(frames: ImageSource, clip_models: ClipModels | None = None, pairs: str = "consecutive") -> dict:
    """Frame consistency of one clip ``frames`` (T >= 2 images in temporal order; a folder is read sorted).

    With ``clip_models`` the CLIP metric of the papers, else the pixel-level alternative. Always returns a dict
    with ``"mean"`` (1 = identical frames), ``"method"``, ``"num_frames"`` and ``"num_pairs"``.
    """
    if clip_models is None:
        return pixel_frame_consistency(frames, pairs)
    return clip_frame_consistency(frames, clip_models, pairs)
