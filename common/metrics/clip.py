"""CLIP-based metrics averaged over several CLIP models (Shifted Diffusion's evaluation protocol).

A CLIP model is a triple ``(model, preprocess, tokenizer)`` as returned by open_clip
(``create_model_and_transforms`` -> model and its eval ``preprocess``; ``get_tokenizer``): ``model`` has
``encode_image([B, 3, S, S]) -> [B, D]`` and ``encode_text([B, L]) -> [B, D]``, ``preprocess`` maps a PIL image to
``[3, S, S]`` and ``tokenizer`` maps a list of strings to ``[B, L]`` token ids. Pass several as a mapping
``{name: triple}`` (names appear in the results) or a sequence of triples (named ``clip0``, ``clip1``, ...).

Every score is computed *per model* (cosine between the L2-normalised embeddings of that model, no x100 and no
CLIPScore 2.5 factor), then the per-model values are averaged with equal weight. Embeddings of different
models are never concatenated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Union

import numpy as np
import torch

from common.errors import UserError
from common.metrics.images import ImageSource, count_images, iter_pil_batches
from common.metrics.stats import fid_from_features


ClipTriple = tuple[torch.nn.Module, Callable, Callable]
ClipModels = Union[Mapping[str, ClipTriple], Sequence[ClipTriple]]


def named_clip_models(clip_models: ClipModels) -> list[tuple[str, ClipTriple]]:
    """``[(name, (model, preprocess, tokenizer)), ...]`` from a mapping or a sequence of triples."""
    items = (
        list(clip_models.items())
        if isinstance(clip_models, Mapping)
        else [(f"clip{i}", triple) for i, triple in enumerate(clip_models)]
    )
    if not items:
        raise UserError("no CLIP model given; pass at least one --clip MODEL_NAME=WEIGHTS_PATH")
    for name, triple in items:
        if len(triple) != 3:
            raise UserError(
                f"CLIP model {name} must be a (model, preprocess, tokenizer) triple, got {len(triple)} items"
            )
    return items


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.inference_mode()
def clip_image_embeddings(images: ImageSource, model, preprocess, batch_size: int = 32) -> torch.Tensor:
    """Raw (unnormalised) CLIP image embeddings ``[N, D]`` float32 on CPU; runs on the model's device in eval mode."""
    model.eval()
    device = _model_device(model)
    chunks = []
    for batch in iter_pil_batches(images, batch_size):
        pixels = torch.stack([preprocess(image) for image in batch]).to(device)
        chunks.append(model.encode_image(pixels).float().cpu())
    return torch.cat(chunks)


@torch.inference_mode()
def clip_text_embeddings(texts: Sequence[str], model, tokenizer, batch_size: int = 256) -> torch.Tensor:
    """Raw CLIP text embeddings ``[N, D]`` float32 on CPU."""
    if len(texts) == 0:
        raise UserError("no texts were given; pass one caption per image")
    model.eval()
    device = _model_device(model)
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        chunks.append(model.encode_text(tokens).float().cpu())
    return torch.cat(chunks)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine ``<a_i/|a_i|, b_i/|b_i|>`` of ``[N, D]`` and ``[N, D]`` -> ``[N]`` float64."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a * b).sum(dim=-1)


def average_over_models(per_model: dict[str, float]) -> dict:
    """``{"per_model": {name: value}, "mean": equal-weight mean over models}``."""
    return {"per_model": dict(per_model), "mean": float(np.mean(list(per_model.values())))}


def _check_pairs(n_a: int, n_b: int, what: str) -> None:
    if n_a != n_b:
        raise UserError(f"{what}: got {n_a} images but {n_b} counterparts; they are paired one to one")


def clip_scores(images: ImageSource, texts: Sequence[str], clip_models: ClipModels, batch_size: int = 32) -> dict:
    """Image-text CLIP similarity: ``mean_i cos(E_img(x_i), E_txt(c_i))`` per model, then averaged over models.

    ``images``: N images; ``texts``: N captions, paired by position. Returns
    ``{"per_model": {name: score}, "mean": score, "count": N}``.
    """
    _check_pairs(count_images(images), len(texts), "CLIP image-text score")
    per_model = {}
    for name, (model, preprocess, tokenizer) in named_clip_models(clip_models):
        image_emb = clip_image_embeddings(images, model, preprocess, batch_size)
        text_emb = clip_text_embeddings(texts, model, tokenizer)
        per_model[name] = float(paired_cosine(image_emb, text_emb).mean())
    return {**average_over_models(per_model), "count": len(texts)}


def clip_image_similarity(images: ImageSource, references: ImageSource, clip_models: ClipModels, batch_size: int = 32):
    """Image-image CLIP similarity: ``mean_i cos(E_img(x_i), E_img(y_i))`` per model, then averaged over models.

    Shifted Diffusion's "CLIP img-img": generated image vs the ground-truth image of the same caption.
    """
    count = count_images(images)
    _check_pairs(count, count_images(references), "CLIP image-image similarity")
    per_model = {}
    for name, (model, preprocess, _tokenizer) in named_clip_models(clip_models):
        emb_a = clip_image_embeddings(images, model, preprocess, batch_size)
        emb_b = clip_image_embeddings(references, model, preprocess, batch_size)
        per_model[name] = float(paired_cosine(emb_a, emb_b).mean())
    return {**average_over_models(per_model), "count": count}


def clip_frechet_distance(
    images_a: ImageSource,
    images_b: ImageSource,
    clip_models: ClipModels,
    batch_size: int = 32,
    normalize: bool = False,
) -> dict:
    """Fréchet distance between Gaussians fitted to the CLIP image embeddings of two sets, per model, then averaged.

    Same formula as FID (``||mu1-mu2||^2 + Tr(S1+S2-2(S1S2)^{1/2})``) in CLIP space instead of Inception pool3
    (Kynkäänniemi et al. 2023 "FD_CLIP"); raw ``encode_image`` outputs unless ``normalize`` (then unit vectors).
    Sets need not be paired; each needs >= 2 images. Values of different models live on different scales.
    """
    per_model = {}
    for name, (model, preprocess, _tokenizer) in named_clip_models(clip_models):
        emb_a = clip_image_embeddings(images_a, model, preprocess, batch_size)
        emb_b = clip_image_embeddings(images_b, model, preprocess, batch_size)
        if normalize:
            emb_a, emb_b = (torch.nn.functional.normalize(e, dim=-1) for e in (emb_a, emb_b))
        per_model[name] = fid_from_features(emb_a, emb_b)
    return average_over_models(per_model)
