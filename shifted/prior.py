"""The Shifted Diffusion prior network: a causal transformer predicting the clean CLIP image embedding.

Token sequence (length ``text_len + 5``, or ``+ 4`` without the bank token), in this order::

    [ text states (text_len) | CLIP text emb | timestep | bank index | noisy x_t | learned query ]

Each token comes from its own small projection (``t5_proj``, ``clip_sentence_proj``, sinusoidal + MLP for the
timestep and for the bank index, ``x_proj``); a decoder-only transformer with causal self-attention reads the
sequence and the hidden state at the query position, through ``out_proj``, is ``x0_hat`` (x0 parameterisation).
The transformer mirrors x-transformers 0.28.4 ``Decoder(use_rmsnorm=True, ff_glu=True)`` as the
reference instantiates it: pre-RMSNorm, causal attention with bias-free q/k/v and output projection, GEGLU
feed-forward (x4), no positional embedding, no final norm. ``attn_out_bias=True`` adds a bias to
each attention output projection: priors trained here before the network matched the release (the shipped tiny
ones) record it in their ``config.json`` and keep loading bit for bit. Causality plus the fixed token
order lets the text tokens be computed once per prompt; positions are implicit in causal attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from common.errors import UserError
from common.modules import timestep_embedding
from common.schedule import NoiseSchedule


PAPER_CLIP_MODELS = ("ViT-B-16/openai", "ViT-B-32/openai", "RN101/openai")




class RMSNorm(nn.Module):
    """x-transformers 0.28.4 ``RMSNorm``: ``x / max(|x| d^-1/2, eps) * g``."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.scale, self.eps = dim**-0.5, eps
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention ``[B, N, W] -> [B, N, W]``; q/k/v and (by default) the output bias-free."""

    def __init__(self, width: int, heads: int, dim_head: int, out_bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(width, inner, bias=False)
        self.to_v = nn.Linear(width, inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLUFeedForward(nn.Module):
    """``Linear(W, 2 mW) -> a * gelu(gate) -> Linear(mW, W)`` (Shazeer 2020; x-transformers ``ff_glu=True``)."""

    def __init__(self, width: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(width, 2 * mult * width)
        self.proj_out = nn.Linear(mult * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class PriorBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + ff(norm(x))``."""

    def __init__(self, width: int, heads: int, dim_head: int, ff_mult: int, attn_out_bias: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(width)
        self.attn = CausalSelfAttention(width, heads, dim_head, attn_out_bias)
        self.ff_norm = RMSNorm(width)
        self.ff = GEGLUFeedForward(width, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


def _layer_norm(dim: int) -> nn.LayerNorm:
    # The reference's LayerNorm has a learnable gain and a fixed zero bias.
    return nn.LayerNorm(dim, bias=False)


def embedding_projection(in_dim: int, width: int) -> nn.Sequential:
    """``Linear(in, W) -> SiLU -> LN(W) -> Linear(W, W)`` (``clip_sentence_proj`` / ``x_proj``)."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.SiLU(), _layer_norm(width), nn.Linear(width, width))


def sinusoidal_mlp(width: int) -> nn.Sequential:
    """``Linear(W, W) -> SiLU -> Linear(W, W)`` applied to :func:`timestep_embedding`."""
    return nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))


class ShiftedPrior(ModelMixin, ConfigMixin):
    """``x0_hat = f(x_t, t, c, text_states, k)``: the CLIP-image-embedding prior of Shifted Diffusion (METHOD.md, "The prior network").

    Args (saved in ``config.json``):
        emb_dim: D, width of the concatenated CLIP embeddings (image target and text condition; 1536 in the paper).
        text_dim / text_len: width and (fixed, padded) length of the text-encoder states (T5-11B: 1024 / 80).
        width, layers, heads, dim_head, ff_mult: transformer sizes (paper: 2048 / 8|16|20 / 32 / 64 / 4).
        use_bank_token: add the bank-index token (shifted); False is the baseline DDPM prior (no bank).
        clip_models, clip_dims: ordered names and widths of the CLIP models whose embeddings are concatenated;
            checked against the CLIP models a user passes at sampling time.
        text_encoder: name of the text encoder the states came from (a prior trained on t5-11b states does not
            work with t5-large ones, issue #3).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the diffusion schedule it was trained with.
        attn_out_bias: a bias on each attention output projection. False is the released network (x-transformers
            ``Attention`` has ``bias=False``); True only for priors trained here before that was fixed.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        emb_dim: int = 1536,
        text_dim: int = 1024,
        text_len: int = 80,
        width: int = 2048,
        layers: int = 8,
        heads: int = 32,
        dim_head: int = 64,
        ff_mult: int = 4,
        use_bank_token: bool = True,
        clip_models: Sequence[str] = PAPER_CLIP_MODELS,
        clip_dims: Sequence[int] = (512, 512, 512),
        text_encoder: str = "t5-11b",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        attn_out_bias: bool = False,
    ):
        super().__init__()
        if sum(clip_dims) != emb_dim or len(clip_dims) != len(clip_models):
            raise UserError(
                f"prior config: CLIP models {list(clip_models)} with widths {list(clip_dims)} do not make the "
                f"{emb_dim}-d embedding: list one width per model, summing to emb_dim"
            )
        self.t5_proj = nn.Sequential(
            _layer_norm(text_dim), nn.Linear(text_dim, width), nn.SiLU(), _layer_norm(width), nn.Linear(width, width)
        )
        self.clip_sentence_proj = embedding_projection(emb_dim, width)
        self.time_embed = sinusoidal_mlp(width)
        self.index_embed = sinusoidal_mlp(width) if use_bank_token else None
        self.x_proj = embedding_projection(emb_dim, width)
        self.query = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.ModuleList(
            PriorBlock(width, heads, dim_head, ff_mult, attn_out_bias) for _ in range(layers)
        )
        self.out_proj = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    # ---------------------------------------------------------------------------------------------- helpers

    @property
    def seq_len(self) -> int:
        return self.config.text_len + (5 if self.config.use_bank_token else 4)

    def noise_schedule(self) -> NoiseSchedule:
        cfg = self.config
        return NoiseSchedule.named(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)

    def _check_inputs(self, x_t, timesteps, clip_text, text_states, bank_index) -> None:
        cfg = self.config
        b = x_t.shape[0]
        if x_t.shape != (b, cfg.emb_dim) or clip_text.shape != (b, cfg.emb_dim):
            raise UserError(
                f"the prior expects {cfg.emb_dim}-d embeddings [B, {cfg.emb_dim}] "
                f"(CLIP models {list(cfg.clip_models)}),"
                f" got x_t {tuple(x_t.shape)} and CLIP text {tuple(clip_text.shape)}"
            )
        if text_states.shape != (b, cfg.text_len, cfg.text_dim):
            raise UserError(
                f"the prior expects text states [B, {cfg.text_len}, {cfg.text_dim}] from {cfg.text_encoder} "
                f"(padded to {cfg.text_len}), got {tuple(text_states.shape)}"
            )
        if timesteps.shape != (b,):
            raise UserError(f"timesteps must be [B] = [{b}], got {tuple(timesteps.shape)}")
        if cfg.use_bank_token and (bank_index is None or bank_index.shape != (b,)):
            raise UserError("this prior was trained with a Gaussian bank: pass bank_index [B] (the chosen components)")
        if not cfg.use_bank_token and bank_index is not None:
            raise UserError("this prior is the no-bank baseline: sample it without a Gaussian bank")

    def tokens(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        clip_text: torch.Tensor,
        text_states: torch.Tensor,
        bank_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The input sequence ``[B, seq_len, W]`` in the order of the module docstring."""
        self._check_inputs(x_t, timesteps, clip_text, text_states, bank_index)
        width = self.config.width
        dtype = self.query.dtype
        parts = [
            self.t5_proj(text_states.to(dtype)),
            self.clip_sentence_proj(clip_text.to(dtype))[:, None],
            self.time_embed(timestep_embedding(timesteps, width).to(dtype))[:, None],
        ]
        if self.index_embed is not None:
            parts.append(self.index_embed(timestep_embedding(bank_index, width).to(dtype))[:, None])
        parts.append(self.x_proj(x_t.to(dtype))[:, None])
        parts.append(self.query.expand(x_t.shape[0], -1, -1))
        return torch.cat(parts, dim=1)

    def hidden_states(self, *args, **kwargs) -> torch.Tensor:
        """Transformer outputs at every position ``[B, seq_len, W]`` (for causality checks and probing)."""
        h = self.tokens(*args, **kwargs)
        for block in self.blocks:
            h = block(h)
        return h

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        clip_text: torch.Tensor,
        text_states: torch.Tensor,
        bank_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x0_hat [B, D]`` from ``x_t [B, D]``, ``timesteps [B]`` (original 0..T-1), ``clip_text [B, D]``,
        ``text_states [B, text_len, text_dim]`` (all-zero = the CFG null) and ``bank_index [B]``."""
        h = self.hidden_states(x_t, timesteps, clip_text, text_states, bank_index)
        return self.out_proj(h[:, -1])


def prior_parameter_count(
    emb_dim: int, text_dim: int, width: int, layers: int, heads: int, dim_head: int = 64, ff_mult: int = 4,
    use_bank_token: bool = True, attn_out_bias: bool = False,
) -> int:
    """Closed-form parameter count of :class:`ShiftedPrior` (the paper's sizes: 0.58B / 1.12B / 1.39B at 8 / 16 / 20 layers)."""
    inner, w, e = heads * dim_head, width, emb_dim
    block = 2 * w + 4 * w * inner + (w if attn_out_bias else 0) + (2 * ff_mult * w) * (w + 1) + ff_mult * w * w + w
    text = text_dim + text_dim * w + w + w + w * w + w
    emb_proj = e * w + w + w + w * w + w
    mlp = 2 * (w * w + w)
    out = w * e + e + e * e + e
    return layers * block + text + 2 * emb_proj + mlp * (2 if use_bank_token else 1) + w + out
