"""How good are a prior's embeddings (the paper's prior-vs-prior comparison, measured on held-out captions).

For each held-out (caption, image) pair the prior samples an image embedding from the caption; then

- ``frechet``: Fréchet distance between the generated embeddings and the real image embeddings of the held-out
  images (``common.metrics.fid_from_features``: Gaussian fits, FID's formula on CLIP-embedding features); lower
  is closer to the real image-embedding distribution;
- ``cosine``: mean per-CLIP-block cosine between each generated embedding and its paired real image embedding
  (the paper's CLIP image-image similarity in embedding space); higher is better.

References printed next to them: the same numbers for the captions' CLIP *text* embeddings used as if they were
image embeddings, and the Fréchet distance between training and held-out real image embeddings (the floor set
by the sample size).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

import torch

from shifted.embeddings import mean_block_cosine


def embedding_metrics(generated: torch.Tensor, real: torch.Tensor, block_dims: Sequence[int]) -> dict:
    from common.metrics import fid_from_features

    return {
        "frechet": float(fid_from_features(generated.double(), real.double())),
        "cosine": float(mean_block_cosine(generated.float(), real.float(), block_dims).mean()),
    }


@torch.no_grad()
def evaluate_prior(
    prior,
    bank,
    tensors: dict,
    *,
    seed: int = 0,
    batch_size: int = 512,
    **sample_kwargs,
) -> dict:
    """Metrics of ``prior`` on held-out ``tensors`` (``image_emb``, ``text_emb``, ``text_states``), plus seconds."""
    from shifted.pipeline import sample_prior

    generator = torch.Generator().manual_seed(seed)
    chunks = []
    start = time.perf_counter()
    n = len(tensors["image_emb"])
    for i in range(0, n, batch_size):
        chunks.append(sample_prior(prior, bank, tensors["text_emb"][i:i + batch_size],
                                   tensors["text_states"][i:i + batch_size], generator=generator,
                                   **sample_kwargs).cpu())
    seconds = time.perf_counter() - start
    generated = torch.cat(chunks)
    out = embedding_metrics(generated, tensors["image_emb"], prior.config.clip_dims)
    out.update(seconds=seconds, count=n)
    return out


def reference_metrics(test: dict, block_dims: Sequence[int], train_image_emb: Optional[torch.Tensor] = None) -> dict:
    """The text embeddings taken as image embeddings, and (given training images) the real-vs-real floor."""
    out = {"text_as_image": embedding_metrics(test["text_emb"], test["image_emb"], block_dims)}
    if train_image_emb is not None:
        from common.metrics import fid_from_features

        out["train_vs_test_frechet"] = float(fid_from_features(train_image_emb.double(), test["image_emb"].double()))
    return out
