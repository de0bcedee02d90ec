"""Stable Diffusion conditioned on a CLIP image embedding: projection to cross-attention tokens.

The reference forked diffusers to add ``emb_proj_layers = Linear(1536, 4 * 1024)`` inside the UNet. Here the UNet is
the stock ``UNet2DConditionModel`` and the projection is a separate module whose output ``[B, 4, 1024]`` is passed as
``encoder_hidden_states``, so a fine-tuned UNet still loads in a plain ``StableDiffusionPipeline``.

Classifier-free guidance needs an unconditional input. Fine-tuning drops 10 % of the embeddings to a null
embedding (the reference: the prior's embedding of the empty caption; alternatives zero or learned) and sampling
uses the same null as the negative. The reference wrote the null INTO the batch tensor in place; here
:meth:`ImageEmbProjection.drop` returns a new tensor, so neither the caller's batch nor the null is ever aliased.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from common.denoisers import CFGDenoiser, UNetDenoiser, guided_unet
from common.errors import UserError


class ImageEmbProjection(ModelMixin, ConfigMixin):
    """``Linear(in_dim, n_tokens * cross_attention_dim)``: ``[B, in_dim] -> [B, n_tokens, cross_attention_dim]``.

    Args:
        in_dim: width of the concatenated CLIP image embedding (1536 in the paper).
        n_tokens: number of cross-attention tokens (4).
        cross_attention_dim: the UNet's ``cross_attention_dim`` (1024 for SD-2).
        learned_null: the CFG null embedding is a trained parameter (init zeros); otherwise a buffer, zeros until
            :meth:`set_null_embedding` stores e.g. the prior's empty-caption embedding (the reference's choice).
    """

    @register_to_config
    def __init__(
        self, in_dim: int = 1536, n_tokens: int = 4, cross_attention_dim: int = 1024, learned_null: bool = False
    ):
        super().__init__()
        self.proj = nn.Linear(in_dim, n_tokens * cross_attention_dim)
        if learned_null:
            self.null_embedding = nn.Parameter(torch.zeros(in_dim))
        else:
            self.register_buffer("null_embedding", torch.zeros(in_dim))

    def _check(self, image_emb: torch.Tensor) -> torch.Tensor:
        if image_emb.ndim == 3 and image_emb.shape[1] == 1:  # the reference's [B, 1, D] layout
            image_emb = image_emb[:, 0]
        if image_emb.ndim != 2 or image_emb.shape[1] != self.config.in_dim:
            raise UserError(
                f"the SD projection expects CLIP image embeddings [B, {self.config.in_dim}], got "
                f"{tuple(image_emb.shape)}: use the CLIP models the decoder was fine-tuned with"
            )
        return image_emb

    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` (or ``[B, 1, D]``) -> ``encoder_hidden_states [B, n_tokens, cross_attention_dim]``."""
        image_emb = self._check(image_emb)
        tokens = self.proj(image_emb.to(self.proj.weight.dtype))
        return tokens.view(image_emb.shape[0], self.config.n_tokens, self.config.cross_attention_dim)

    @torch.no_grad()
    def set_null_embedding(self, embedding: torch.Tensor) -> None:
        """Store a fixed null (e.g. ``prior("")``); copied, so later changes to ``embedding`` do not leak in."""
        self.null_embedding.copy_(self._check(embedding.reshape(1, -1))[0])

    def null_batch(self, batch_size: int) -> torch.Tensor:
        """``[B, D]`` copies of the null embedding (a fresh tensor; gradients reach a learned null)."""
        return self.null_embedding.unsqueeze(0).repeat(batch_size, 1)

    def drop(self, image_emb: torch.Tensor, drop_mask: torch.Tensor) -> torch.Tensor:
        """Rows where ``drop_mask [B]`` is True replaced by the null embedding; a new tensor, inputs untouched."""
        image_emb = self._check(image_emb)
        null = self.null_embedding.to(image_emb.dtype).unsqueeze(0)
        return torch.where(drop_mask.to(image_emb.device).view(-1, 1), null, image_emb)

    def training_tokens(
        self, image_emb: torch.Tensor, drop_prob: float = 0.1, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Fine-tuning conditioning: drop each embedding to the null with ``drop_prob`` (CFG training), project."""
        image_emb = self._check(image_emb)
        if drop_prob > 0:
            u = torch.rand(image_emb.shape[0], generator=generator).to(image_emb.device)
            image_emb = self.drop(image_emb, u < drop_prob)
        return self(image_emb)


def image_embedding_denoiser(
    unet: nn.Module,
    projection: ImageEmbProjection,
    image_emb: torch.Tensor,
    guidance_scale: float = 2.0,
    negative_emb: Optional[torch.Tensor] = None,
    prediction_type: str = "eps",
) -> Union[CFGDenoiser, UNetDenoiser]:
    """An SD UNet conditioned on image embeddings ``[B, D]`` as a denoiser for ``common.samplers``.

    The negative defaults to the projection's null embedding (what fine-tuning dropped to), so every guidance
    scale works, including <= 1 (the reference crashed there); at scale 1 only the conditional branch
    runs (no batch doubling).
    """
    batch = len(image_emb)
    with torch.no_grad():
        cond = projection(image_emb)
        if negative_emb is None:
            negative = projection.null_batch(batch)
        else:
            negative = negative_emb.reshape(-1, projection.config.in_dim)
        if len(negative) == 1:  # one negative for the whole batch
            negative = negative.expand(batch, -1)
        if len(negative) != batch:
            raise UserError(f"got {len(negative)} negative embeddings for {batch} image embeddings: pass 1 or {batch}")
        uncond = projection(negative)
    return guided_unet(unet, cond, uncond, guidance_scale, prediction_type)
