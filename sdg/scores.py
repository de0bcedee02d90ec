"""SDG's guidance energies F(x_t, y, t) (METHOD.md §2) and the guidance hook that combines them.

Every energy is a *similarity* to increase, evaluated by the noise-aware CLIP ``E'`` (sdg.noisy_clip) directly on the
noisy sample ``x_t`` at its ORIGINAL timestep t; the sampler adds ``Sigma * grad_x sum_i w_i F_i`` to the DDPM mean
(classifier guidance, Dhariwal & Nichol 2021 Alg. 1 with ``log p(y | x_t) ~ w F``; the core's ``guidance`` hook).

- language (eq. F_text):   ``cos(E'(x_t, t), T(l))`` with ``T(l)`` the frozen CLIP text embedding          -> ``[B]``
- content  (eq. F_sem):    ``cos(E'(x_t, t), E'(x'_t, t))``, ``x'_t`` the reference noised to the same t    -> ``[B]``
- style    (eq. F_style):  ``-(s / L) sum_j MSE(G(h_j(x_t, t)), G(h_j(x'_t, t)))`` over L feature maps h_j

The reference is noised with the full training schedule at the original t (``x'_t = sqrt(abar_t) x'_0 +
sqrt(1 - abar_t) eps'``), with fresh noise at every call drawn from the energy's own generator, so the
sampler's noise stream is the same with and without guidance.

Style Gram matrices (METHOD.md §2): ``gram="per_sample"`` (default) gives each sample its own ``C x C`` Gram
``F_i F_i^T / (C H W)`` and its own energy, so a sample's gradient never depends on the other samples;
``gram="batch"`` reproduces the released code, which reshapes the batch to ``(B C) x (H W)`` rows, normalises by
``sqrt(B C H W)`` and compares ``(B C) x (B C)`` Grams: samples are mixed, strength depends on B, and the energy is
one number per batch. With B = 1 the two coincide. Grams are computed in at least float32 (the released code only
worked under fp16 autocast).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from common.errors import UserError
from common.guidance import energy_guidance
from common.process import q_sample_standard
from common.samplers import Generator, randn
from common.schedule import NoiseSchedule
from sdg.noisy_clip import NoisyCLIPOutput


Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Encoder = Callable[[torch.Tensor, torch.Tensor], NoisyCLIPOutput]
GRAM_MODES = ("per_sample", "batch")
STYLE_SCALE = 1e10  # the released code's factor (1e10 / 5 with its 5 feature maps = STYLE_SCALE / L)


def _accurate(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 -> float32 (Grams and cosines near fp16's subnormal range); float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of ``[B, D]`` and ``[B or 1, D]`` -> ``[B]``."""
    a, b = _accurate(a), _accurate(b)
    return F.cosine_similarity(a, b.to(a.dtype).expand_as(a), dim=-1)


def gram_per_sample(h: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, C, C]``: ``G_i = F_i F_i^T / (C H W)`` with ``F_i = h_i`` as ``C x (H W)``."""
    h = _accurate(h)
    b, c = h.shape[:2]
    feats = h.reshape(b, c, -1)
    return feats @ feats.transpose(1, 2) / feats[0].numel()


def gram_batch(h: torch.Tensor) -> torch.Tensor:
    """The released Gram: ``[B, C, H, W] -> [B C, B C]``, ``M M^T`` with ``M = h`` as ``(B C) x (H W) / sqrt(BCHW)``.

    Rows of different samples meet in the off-diagonal blocks: this is the batch mixing of the released Gram.
    """
    h = _accurate(h)
    b, c = h.shape[:2]
    m = h.reshape(b * c, -1) / h.numel() ** 0.5
    return m @ m.T


def noise_reference(
    reference: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, generator: Generator = None
) -> torch.Tensor:
    """``x'_t = sqrt(abar_t) x'_0 + sqrt(1 - abar_t) eps'`` at the ORIGINAL timesteps ``t`` ``[B]``.

    ``reference`` ``[1 or B, 3, H, W]`` in [-1, 1] is repeated to the batch; every sample gets its own noise.
    ``abar`` is the full training schedule's, never a respaced chain's (the released code's ``betas1000``).
    """
    batch = t.shape[0]
    if reference.shape[0] not in (1, batch):
        raise UserError(f"got {reference.shape[0]} reference images for a batch of {batch}: pass 1 or {batch}")
    x0 = reference.expand(batch, *reference.shape[1:])
    noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    return q_sample_standard(x0, schedule.abar(t, like=x0), noise)


def language_energy(text_embedding: torch.Tensor, encode: Encoder) -> Energy:
    """F_text(x_t, t) = cos(E'(x_t, t), T(l)) -> ``[B]``; ``text_embedding`` ``[D]``, ``[1, D]`` or ``[B, D]``."""
    target = text_embedding.detach().reshape(-1, text_embedding.shape[-1])

    def energy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embedding = encode(x_t, t).embedding
        if embedding.shape[-1] != target.shape[-1]:
            raise UserError(
                f"the text embedding has {target.shape[-1]} dimensions but the noise-aware CLIP embeds images in "
                f"{embedding.shape[-1]}: encode the text with the text tower of the CLIP the encoder was made from"
            )
        return cosine(embedding, target.to(x_t.device))

    return energy


def content_energy(reference_features: Encoder, encode: Encoder) -> Energy:
    """F_sem(x_t, t) = cos(E'(x_t, t), E'(x'_t, t)) -> ``[B]``; the reference side carries no gradient.

    ``reference_features(x_t, t)`` returns the encoder's output on the noised reference (``x_t`` gives the batch
    size, device and dtype).
    """

    def energy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        target = reference_features(x_t, t).embedding.detach()
        return cosine(encode(x_t, t).embedding, target)

    return energy


def style_energy(
    reference_features: Encoder,
    encode: Encoder,
    *,
    gram: str = "per_sample",
    layers: Optional[Sequence[int]] = None,
    scale: float = STYLE_SCALE,
) -> Energy:
    """F_style = -(scale / L) sum_j MSE(G(h_j(x_t)), G(h_j(x'_t))) over the feature maps ``layers`` (default all).

    ``gram="per_sample"`` -> ``[B]`` (MSE over each sample's ``C x C`` entries); ``gram="batch"`` -> a 0-dim tensor
    (MSE over the ``(B C)^2`` entries of the released batch-mixing Gram). Identical for B = 1.
    """
    if gram not in GRAM_MODES:
        raise UserError(f"unknown style Gram mode {gram!r}: choose one of {', '.join(GRAM_MODES)}")

    def energy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feats = encode(x_t, t).features
        refs = reference_features(x_t, t).features
        chosen = range(len(feats)) if layers is None else layers
        total = 0.0
        for j in chosen:
            target = refs[j].detach()
            if gram == "batch":
                total = total + F.mse_loss(gram_batch(feats[j]), gram_batch(target))
            else:
                total = total + (gram_per_sample(feats[j]) - gram_per_sample(target)).pow(2).flatten(1).mean(1)
        return -(scale / len(chosen)) * total

    return energy


class SemanticGuidance:
    """SDG's ``cond_fn`` as the core's guidance hook: ``(x_t [B, 3, S, S], t [B]) -> grad_x sum_i w_i F_i``.

    Language, content and style energies are weighted and combinable (a zero weight skips the term entirely and
    touches no RNG). One guidance call runs the encoder once on ``x_t`` and once on the noised reference, whatever
    the number of active terms; both are cached for the duration of the call only.

    Args:
        clip: the noise-aware encoder ``E'`` (``NoiseAwareCLIP``), in eval mode.
        schedule: the model's full training schedule (reference noising at original t).
        text_embedding: frozen CLIP text embedding(s) ``[D]`` / ``[B, D]`` (needed for ``text_weight``).
        reference: reference image(s) ``[1 or B, 3, S, S]`` in [-1, 1] (needed for content / style weights).
        generator: generator for the reference noise (kept apart from the sampler's).
    """

    def __init__(
        self,
        clip: Optional[Encoder],
        schedule: NoiseSchedule,
        *,
        text_embedding: Optional[torch.Tensor] = None,
        reference: Optional[torch.Tensor] = None,
        text_weight: float = 0.0,
        content_weight: float = 0.0,
        style_weight: float = 0.0,
        style_gram: str = "per_sample",
        style_layers: Optional[Sequence[int]] = None,
        style_scale: float = STYLE_SCALE,
        generator: Generator = None,
    ):
        weights = {"text_weight": text_weight, "content_weight": content_weight, "style_weight": style_weight}
        active = {name: float(w) for name, w in weights.items() if float(w) != 0.0}
        if active and clip is None:
            raise UserError(f"{', '.join(active)} given but no noise-aware CLIP: pass --clip_path (or set the weights to 0)")
        if "text_weight" in active and text_embedding is None:
            raise UserError("text_weight is non-zero but no text was given: pass an instruction or set text_weight 0")
        if ("content_weight" in active or "style_weight" in active) and reference is None:
            raise UserError("an image weight is non-zero but no reference image was given: pass --data_dir or set it 0")
        if style_gram not in GRAM_MODES:
            raise UserError(f"unknown style Gram mode {style_gram!r}: choose one of {', '.join(GRAM_MODES)}")
        self.clip, self.schedule, self.reference, self.generator = clip, schedule, reference, generator
        self._cache: dict[str, tuple] = {}
        energies: list[tuple[float, Energy]] = []
        if "text_weight" in active:
            energies.append((active["text_weight"], language_energy(text_embedding, self._encode)))
        if "content_weight" in active:
            energies.append((active["content_weight"], content_energy(self._reference_features, self._encode)))
        if "style_weight" in active:
            energies.append((active["style_weight"], style_energy(
                self._reference_features, self._encode, gram=style_gram, layers=style_layers, scale=style_scale)))
        self.energies = energies
        self._guidance = energy_guidance(energies)

    @property
    def active(self) -> bool:
        return bool(self.energies)

    def _encode(self, x_t: torch.Tensor, t: torch.Tensor) -> NoisyCLIPOutput:
        hit = self._cache.get("x")
        if hit is not None and hit[0] is x_t and hit[1] is t:
            return hit[2]
        out = self.clip(x_t, t)
        self._cache["x"] = (x_t, t, out)
        return out

    def _reference_features(self, x_t: torch.Tensor, t: torch.Tensor) -> NoisyCLIPOutput:
        hit = self._cache.get("ref")
        if hit is not None and hit[0] is t:
            return hit[1]
        reference = self.reference.to(device=x_t.device, dtype=x_t.dtype)
        with torch.no_grad():
            out = self.clip(noise_reference(reference, t, self.schedule, self.generator), t)
        self._cache["ref"] = (t, out)
        return out

    def total_energy(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sum_batch sum_i w_i F_i(x_t, t)`` (0-dim), the objective whose gradient :meth:`__call__` returns.

        Draws the reference noise like a guidance call does (for logging, or finite differences with a reseeded
        generator).
        """
        try:
            total = torch.zeros((), dtype=x_t.dtype, device=x_t.device)
            for weight, energy in self.energies:
                total = total + weight * energy(x_t, t).sum()
            return total
        finally:
            self._cache.clear()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        try:
            return self._guidance(x_t, t)
        finally:
            self._cache.clear()  # frees the graph and features of this step; the next step noises afresh
