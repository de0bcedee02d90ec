"""Image folders -> CLIP embeddings (the prior's training pairs, the bank's statistics, the decoder's condition).

The folder format is the project's (``common.data``: images + ``metadata.jsonl``; unreadable files are skipped and
counted). Pixels are taken as the dataset yields them (resize of the short side + centre crop to ``resolution``,
in [-1, 1]) and handed to :class:`~shifted.embeddings.MultiCLIP` as ``(x + 1) / 2``, which resizes to each CLIP's
input size: the same call the decoder's fine-tuning makes on its training crops, so a cached embedding
and an on-the-fly one are the same tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from common.errors import UserError


def clip_resolution(clip) -> int:
    """The largest input size among the CLIP models (the dataset is read at that size, then resized per model)."""
    sizes = []
    for _, model, _ in clip.models:
        size = model.visual.image_size
        sizes.append(int(size[0] if isinstance(size, (tuple, list)) else size))
    return max(sizes)


def image_folder(root: Union[str, Path], resolution: int, require_captions: bool = True):
    from common.data import image_text_dataset

    return image_text_dataset(root, resolution=resolution, require_captions=require_captions)


@torch.no_grad()
def embed_folder(
    clip,
    root: Union[str, Path],
    *,
    text_states=None,
    with_text: bool = True,
    resolution: Optional[int] = None,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str], list[dict]]:
    """``(tensors, captions, extras)`` of an image folder.

    ``tensors``: ``image_emb [N, D]``, and with captions ``text_emb [N, D]`` (+ ``text_states [N, L, d]`` when a
    :class:`~shifted.embeddings.TextStates` is given). ``extras``: each item's metadata columns (digit, colour...).
    """
    from tqdm.auto import tqdm

    from shifted.embeddings import check_texts

    dataset = image_folder(root, resolution or clip_resolution(clip), require_captions=with_text)
    captions = [rec.text for rec in dataset.records]
    if with_text:
        for i, text in enumerate(captions):
            if not text.strip():
                raise UserError(f"{dataset.records[i].image} has an empty caption in {root}/metadata.jsonl: "
                                "give every image a caption, or embed images only (--no_text)")
        check_texts(captions)
    out: dict[str, list[torch.Tensor]] = {"image_emb": []}
    if with_text:
        out["text_emb"] = []
        if text_states is not None:
            out["text_states"] = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="CLIP embeddings", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        pixels = (torch.stack([it["pixel_values"] for it in items]) + 1) / 2
        out["image_emb"].append(clip.encode_image(pixels).cpu())
        if with_text:
            texts = captions[start:start + len(items)]
            out["text_emb"].append(clip.encode_text(texts))
            if text_states is not None:
                out["text_states"].append(text_states(texts))
    extras = [dict(rec.extra or {}) for rec in dataset.records]
    return {key: torch.cat(chunks) for key, chunks in out.items()}, (captions if with_text else []), extras
