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
    root,
    *,
    text_states=None,
    with_text: bool = True,
    resolution: Optional[int] = None,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str], list[dict]]:
    """``(tensors, captions, extras)`` of an image folder (a path) or of any training dataset
    (:func:`common.data_sources.training_dataset`), encoded once by :func:`common.data.encode_once`.

    ``tensors``: ``image_emb [N, D]``, and with captions ``text_emb [N, D]`` (+ ``text_states [N, L, d]`` when a
    :class:`~shifted.embeddings.TextStates` is given). ``extras``: each item's metadata columns (digit, colour...).
    """
    from common.data import encode_once
    from shifted.embeddings import check_texts

    if isinstance(root, (str, Path)):
        dataset = image_folder(root, resolution or clip_resolution(clip), require_captions=with_text)
    else:
        dataset = root
    records = getattr(dataset, "records", None) or []

    def check(captions: list[str], where) -> None:
        for i, text in enumerate(captions):
            if not text.strip():
                raise UserError(f"{where(i)} has an empty caption: give every image a caption, or embed images "
                                "only (--no_text)")
        check_texts(captions)

    if with_text and records:  # an image folder: refuse bad captions before anything is encoded
        check([rec.text for rec in records], lambda i: f"{records[i].image} in {root}/metadata.jsonl")

    def encode(batch):
        out = {"image_emb": clip.encode_image((batch["pixel_values"] + 1) / 2)}
        if with_text:
            # an image folder's first caption of each image (items may draw among several), else the item's
            texts = [records[i].text for i in batch["index"].tolist()] if records else list(batch["text"])
            out["text_emb"] = clip.encode_text(texts)
            out["captions"] = texts
            if text_states is not None:
                out["text_states"] = text_states(texts)
        return out

    encoded, _ = encode_once(dataset, encode, batch_size=batch_size, progress=progress)
    captions = encoded.pop("captions", [])
    if with_text and not records:
        check(captions, lambda i: f"sample {i} of the dataset")
    extras = [dict(rec.extra or {}) for rec in records]
    return encoded, captions, extras
