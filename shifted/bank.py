"""The Gaussian bank: statistics of CLIP image embeddings that shifted diffusion diffuses towards (METHOD.md, "Gaussian bank").

The bank holds K diagonal Gaussians ``N(mu_k, diag(sigma_k^2))`` fitted to the (raw, concatenated) CLIP image
embeddings of the training set. The terminal distribution of the shifted process for a text ``c`` is
``N(mu_k, diag(S_k^2))`` with ``k = argmax_j cos(c, mu_j)`` and ``S_k = std_scale * sigma_k`` (``std_scale`` = 5 in the
reference). K = 1 is one dataset-level Gaussian; ``mu = 0, S = 1`` is plain DDPM.

``mean``, ``std`` and ``std_scale`` are registered buffers: the released ``Vocab`` kept them as plain attributes, so a
reloaded model silently sampled with ``std = 0``. Here they travel with ``state_dict`` and with
:meth:`GaussianBank.save`, together with the names of the CLIP models whose space they live in.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from common.errors import UserError


SIMILARITIES = ("concat", "per_block")
FIT_METHODS = ("spherical_kmeans", "gmm_diag")
SELECT_MODES = ("mean", "sample")
BANK_FORMAT = "shifted-diffusion-bank/1"


def block_unit(x: torch.Tensor, block_dims: Sequence[int], similarity: str = "concat") -> torch.Tensor:
    """Map rows ``[N, D]`` to vectors whose dot products are the chosen similarity.

    ``concat``: ``x / |x|``, so ``<u(a), u(b)>`` is the cosine on the whole concatenation (the reference's bank
    selection). ``per_block``: every CLIP block normalised on its own and divided by
    ``sqrt(n_blocks)``, so ``<u(a), u(b)>`` is the mean of the per-model cosines (the paper's similarity).
    """
    if similarity == "concat":
        return nn.functional.normalize(x, dim=-1)
    if similarity == "per_block":
        blocks = torch.split(x, list(block_dims), dim=-1)
        scale = len(blocks) ** -0.5
        return torch.cat([nn.functional.normalize(b, dim=-1) * scale for b in blocks], dim=-1)
    raise UserError(f"unknown similarity {similarity!r}: choose one of {', '.join(SIMILARITIES)}")


def check_clip_models(have: Sequence[str], want: Sequence[str], what: str) -> None:
    """A :class:`UserError` unless two ordered lists of CLIP model names agree (order is part of the space)."""
    have, want = [str(n) for n in have], [str(n) for n in want]
    if have and want and have != want:
        raise UserError(
            f"{what} lives in the embedding space of CLIP models {have} but {want} were given: use the same CLIP "
            "models in the same order, or refit / retrain it on the requested ones"
        )


class GaussianBank(nn.Module):
    """K diagonal Gaussians in CLIP image-embedding space, chosen per text (``Vocab`` in the reference).

    Args:
        mean: ``[K, D]`` cluster means ``mu_k`` (raw embedding scale).
        std: ``[K, D]`` per-dimension standard deviations ``sigma_k`` (not log-std), ``>= 0``.
        std_scale: ``s``; the terminal std is ``S_k = s * sigma_k``.
        clip_models: ordered names of the CLIP models whose concatenated embeddings these are.
        block_dims: embedding width of each CLIP model (sums to D); one block of D when not given.
        similarity: how :meth:`select` compares a text embedding with the means (``concat`` as the reference,
            or ``per_block``). Part of the trained model: the index token a prior saw depends on it.
    """

    mean: torch.Tensor
    std: torch.Tensor
    std_scale: torch.Tensor

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        std_scale: float = 5.0,
        clip_models: Sequence[str] = (),
        block_dims: Optional[Sequence[int]] = None,
        similarity: str = "concat",
    ):
        super().__init__()
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        if mean.ndim != 2 or mean.shape != std.shape or mean.shape[0] < 1:
            raise UserError(
                f"a Gaussian bank needs mean and std of one shape [K, D], got {tuple(mean.shape)} and "
                f"{tuple(std.shape)}"
            )
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()) or bool((std < 0).any()):
            raise UserError("the bank's mean and std must be finite and std non-negative: refit the bank")
        if similarity not in SIMILARITIES:
            raise UserError(f"unknown similarity {similarity!r}: choose one of {', '.join(SIMILARITIES)}")
        dim = mean.shape[1]
        block_dims = tuple(int(b) for b in (block_dims or (dim,)))
        if sum(block_dims) != dim:
            raise UserError(f"the bank's CLIP block widths {list(block_dims)} do not add up to its dimension {dim}")
        if clip_models and len(clip_models) != len(block_dims):
            raise UserError(f"{len(clip_models)} CLIP model names for {len(block_dims)} embedding blocks")
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.register_buffer("std_scale", torch.tensor(float(std_scale)))
        self.clip_models = tuple(str(n) for n in clip_models)
        self.block_dims = block_dims
        self.similarity = similarity

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def standard(cls, dim: int, **kwargs) -> GaussianBank:
        """K = 1, ``mu = 0``, ``sigma = 1``, ``s = 1``: the shifted process reduces to plain DDPM."""
        kwargs.setdefault("std_scale", 1.0)
        return cls(torch.zeros(1, dim), torch.ones(1, dim), **kwargs)

    @classmethod
    def empty(cls, size: int, dim: int, **kwargs) -> GaussianBank:
        """A bank of the right shapes to ``load_state_dict`` into (values are placeholders)."""
        return cls(torch.zeros(size, dim), torch.ones(size, dim), **kwargs)

    @property
    def size(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, std_scale={float(self.std_scale):g}, similarity={self.similarity}"

    # -------------------------------------------------------------------------------------------- checks

    def check_embedding_dim(self, dim: int, what: str) -> None:
        if dim != self.dim:
            raise UserError(
                f"the Gaussian bank is {self.dim}-dimensional but {what} is {dim}-dimensional: fit the bank on "
                "embeddings of the same CLIP models (fit_bank) or pass the matching bank"
            )

    def check_clip_models(self, names: Sequence[str], what: str = "the requested CLIP models") -> None:
        check_clip_models(self.clip_models, names, f"the Gaussian bank (for {what})")

    # ------------------------------------------------------------------------------------------ selection

    def similarity_to_means(self, c: torch.Tensor) -> torch.Tensor:
        """Similarities ``[B, K]`` of embeddings ``c [B, D]`` to every mean, per :attr:`similarity`."""
        self.check_embedding_dim(c.shape[-1], "the conditioning embedding")
        u = block_unit(c.float(), self.block_dims, self.similarity)
        m = block_unit(self.mean, self.block_dims, self.similarity).to(u.device)
        return u @ m.T

    @torch.no_grad()
    def select(
        self,
        c: torch.Tensor,
        mode: str = "mean",
        num_samples: int = 1,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Component index ``k(c)`` per row of ``c [B, D]`` -> ``[B]`` long (``Vocab.get_indices``).

        ``mean`` (reference default ``use_mean=True``): ``argmax_j sim(c, mu_j)``. ``sample`` (``use_mean=False``):
        draw ``num_samples`` points from every component's terminal Gaussian ``N(mu_j, S_j^2)`` and take the
        component whose samples have the largest summed similarity to ``c``. The choice is scale-invariant in
        ``c`` (cosine), so raw and normalised text embeddings pick the same component.
        """
        if mode == "mean":
            return self.similarity_to_means(c).argmax(dim=1)
        if mode != "sample":
            raise UserError(f"unknown bank selection mode {mode!r}: choose one of {', '.join(SELECT_MODES)}")
        self.check_embedding_dim(c.shape[-1], "the conditioning embedding")
        noise = torch.randn((num_samples, self.size, self.dim), generator=generator).to(self.mean.device)
        points = self.mean + noise * (self.std_scale * self.std)  # [n, K, D]
        u = block_unit(c.float(), self.block_dims, self.similarity).to(points.device)
        p = block_unit(points, self.block_dims, self.similarity)
        return torch.einsum("bd,nkd->bk", u, p).argmax(dim=1).to(c.device)

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu [B, D], S [B, D])`` of the chosen components, ``S = std_scale * sigma``."""
        index = index.to(self.mean.device).long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise UserError(
                f"bank index out of range 0..{self.size - 1}: the prior and the bank do not belong together"
            )
        return self.mean[index], self.std_scale * self.std[index]

    # ------------------------------------------------------------------------------------------------ io

    def metadata(self) -> dict[str, str]:
        return {
            "format": BANK_FORMAT,
            "clip_models": json.dumps(list(self.clip_models)),
            "block_dims": json.dumps(list(self.block_dims)),
            "similarity": self.similarity,
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write ``mean``, ``std``, ``std_scale`` and the CLIP-space description to one safetensors file."""
        from common.io import save_safetensors

        return save_safetensors(dict(self.state_dict()), path, metadata=self.metadata())

    @classmethod
    def load(cls, path: Union[str, Path], clip_models: Optional[Sequence[str]] = None) -> GaussianBank:
        """Read a bank written by :meth:`save`; with ``clip_models`` check that it lives in their space."""
        from safetensors import safe_open

        from common.io import load_safetensors

        tensors = load_safetensors(path)
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != BANK_FORMAT or not {"mean", "std", "std_scale"} <= set(tensors):
            raise UserError(f"{path} is not a Gaussian bank written by shifted (GaussianBank.save / fit_bank)")
        bank = cls(
            tensors["mean"],
            tensors["std"],
            float(tensors["std_scale"]),
            clip_models=json.loads(meta.get("clip_models", "[]")),
            block_dims=json.loads(meta.get("block_dims", "null")),
            similarity=meta.get("similarity", "concat"),
        )
        if clip_models is not None:
            bank.check_clip_models(clip_models)
        return bank


# -------------------------------------------------------------------------------------------------- fitting


def _cluster_labels(x: np.ndarray, units: np.ndarray, size: int, method: str, seed: int) -> np.ndarray:
    if method == "spherical_kmeans":
        # k-means on unit vectors: squared distance 2 - 2 cos, so clusters are cones, matching the cosine
        # assignment the bank uses at train and test time.
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if len(units) * size <= 5_000_000:
            model = KMeans(n_clusters=size, n_init=4, random_state=seed)
        else:  # millions of embeddings x 1024 clusters: full Lloyd passes are too slow
            model = MiniBatchKMeans(n_clusters=size, n_init=3, batch_size=4096, random_state=seed)
        return model.fit_predict(units)
    if method == "gmm_diag":
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_components=size, covariance_type="diag", random_state=seed, reg_covar=1e-8)
        return model.fit(x).predict(x)
    raise UserError(f"unknown bank fitting method {method!r}: choose one of {', '.join(FIT_METHODS)}")


def fit_bank(
    embeddings: torch.Tensor,
    size: int = 1024,
    method: str = "spherical_kmeans",
    *,
    std_scale: float = 5.0,
    std_floor: float = 1e-4,
    seed: int = 0,
    clip_models: Sequence[str] = (),
    block_dims: Optional[Sequence[int]] = None,
    similarity: str = "concat",
) -> GaussianBank:
    """Fit a bank of ``size`` diagonal Gaussians to CLIP image embeddings ``[N, D]`` (METHOD.md, "Gaussian bank").

    The clusters come from scikit-learn (``spherical_kmeans``: k-means on the rows mapped by :func:`block_unit`,
    i.e. on directions, because components are chosen by cosine; ``gmm_diag``: ``GaussianMixture`` with diagonal
    covariances on the raw rows, hard assignments). Each component's statistics are then those of its members
    on the RAW scale: ``mu_k`` their mean, ``sigma_k`` their per-dimension std (population, floored at
    ``std_floor``); a component with fewer than two members borrows the global std. ``size = 1`` skips clustering:
    one global Gaussian. Components left empty by the clustering are dropped with a warning.
    """
    x = torch.as_tensor(embeddings).detach().double().cpu()
    if x.ndim != 2 or x.shape[0] == 0:
        raise UserError(f"fit_bank needs embeddings of shape [N, D] with N > 0, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise UserError("the embeddings contain NaN or inf: re-extract them in float32")
    if size < 1:
        raise UserError(f"the bank size must be >= 1, got {size}")
    if x.shape[0] < size:
        raise UserError(f"cannot fit {size} Gaussians to {x.shape[0]} embeddings: lower --size or add images")
    block_dims = tuple(block_dims or (x.shape[1],))
    global_std = x.std(dim=0, unbiased=False).clamp(min=std_floor)
    if size == 1:
        labels = np.zeros(x.shape[0], dtype=np.int64)
    else:
        units = block_unit(x, block_dims, similarity).numpy()
        labels = _cluster_labels(x.numpy(), units, size, method, seed)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    means, stds = [], []
    for k in range(size):
        members = x[labels_t == k]
        if len(members) == 0:
            continue
        means.append(members.mean(dim=0))
        stds.append(members.std(dim=0, unbiased=False).clamp(min=std_floor) if len(members) > 1 else global_std)
    if len(means) < size:
        dropped = size - len(means)
        warnings.warn(f"fit_bank: {dropped} of {size} clusters came out empty and were dropped", stacklevel=2)
    return GaussianBank(
        torch.stack(means).float(),
        torch.stack(stds).float(),
        std_scale,
        clip_models=clip_models,
        block_dims=block_dims,
        similarity=similarity,
    )
