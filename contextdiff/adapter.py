"""The relational network r_phi(x0, c) of ContextDiff (METHOD.md, "relational network"): the learned cross-modal bias of the process.

The clean visual sample x0 (an SD latent ``[B, C, H, W]``) is cut into ``p x p`` patches, which become visual tokens;
they attend to themselves and, by cross-attention, to the text tokens (CLIP text tower and/or T5 states); a linear
head maps every token back to its patch, so ``r`` has exactly x0's shape. The head is zero-initialised: ``r == 0``
bit for bit at step 0, so the contextualized process starts as the plain diffusion model it adapts (paper §3,
"r = 0 recovers DDPM").

Deliberate choices (see ``contextdiff/METHOD.md``):

- no timestep input. The paper's figure feeds t into r_phi, but then every identity of the chain (marginal,
  posterior, DDIM) needs r_t and r_{t-1} separately, and the core's shift hook ``mean(x0_hat)`` is t-free; the
  released code's shift is t-free too (METHOD.md, "Decisions where the paper is silent");
- every visual token sees its own position (fixed 2-D sinusoidal code, so any latent size works) and the text.
  The released video adapter attended with identical keys (the one prompt embedding repeated), which made its
  output independent of the video; real token sequences and the tests rule that out here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from common.errors import UserError


TEXT_SOURCES = ("clip", "t5")
LOGSNR_LIMIT = 20.0  # log-SNR is clamped here: the clean end (abar = 1) is +inf
CONFIG_NAME = "config.json"

TextStates = Union[torch.Tensor, Sequence[torch.Tensor]]
TextMasks = Optional[Sequence[Optional[torch.Tensor]]]


def sinusoidal_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code ``[h * w, dim]`` (MAE / DiT): half the channels per axis, row-major."""
    if dim % 4:
        raise ValueError(f"the 2-D position code needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64), torch.arange(w, device=device, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).to(dtype)


class Attention(nn.Module):
    """Multi-head attention ``[B, N, dim] x [B, M, context_dim] -> [B, N, dim]`` (self-attention without context).

    ``key_mask [B, M]`` (True = attend) drops padding tokens, e.g. T5's ``<pad>``; CLIP states in SD are used in
    full (SD conditions on all 77, end-of-text padding included), so they come without a mask.
    """

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None):
        super().__init__()
        if dim % heads:
            raise UserError(f"adapter width {dim} is not divisible by its {heads} heads: pick a multiple")
        self.heads = heads
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, dim] -> [B, heads, L, dim / heads]
            return t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class RelationalBlock(nn.Module):
    """Pre-norm transformer block over visual tokens: self-attention, cross-attention to text, GELU FFN (x4)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)  # text tokens are projected to ``dim`` once, before the blocks
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), text, text_mask)
        return x + self.ff(self.norm3(x))


class RelationalNet(ModelMixin, ConfigMixin):
    """r_phi(x0, c): ``x0 [B, C, H, W]`` and text states ``[B, L_i, D_i]`` (one per source) -> ``r [B, C, H, W]``.

    Args:
        latent_channels: C of the latent it shifts (4 for SD's VAE).
        patch_size: p; H and W must be multiples of it. Tokens = (H / p) (W / p).
        dim, depth, heads: width, number of :class:`RelationalBlock` and heads.
        text_sources: which text encoders feed it, in order: ``"clip"`` (the UNet's own CLIP text states) and/or
            ``"t5"``. Their tokens are concatenated after a per-source ``LayerNorm -> Linear(D_i, dim)``.
        text_dims: hidden width D_i of each source (1024 for SD-2's OpenCLIP-H text tower, 4096 for T5-XXL).
        r_bound: optional soft bound on every element of r, ``r = b tanh(raw / b)`` (None: unbounded, the paper).
            An experiment for the digits finding that |r| grows to the latents' own size (METHOD.md).
        time_aware: feed the noise level to the net, ``r = r_phi(x0, c, t)`` (the paper's figure draws t as an
            input). The level enters as its log-SNR ``log(abar / (1 - abar))`` through sinusoidal features and a
            zero-initialised MLP added to every visual token, so a fresh time-aware net equals the t-free one.
            The process then has a mean per level (METHOD.md, "time-aware r").
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        patch_size: int = 2,
        dim: int = 512,
        depth: int = 4,
        heads: int = 8,
        text_sources: Sequence[str] = ("clip",),
        text_dims: Sequence[int] = (1024,),
        r_bound: Optional[float] = None,
        time_aware: bool = False,
    ):
        super().__init__()
        if r_bound is not None and not float(r_bound) > 0:
            raise UserError(f"adapter r_bound must be > 0 (or unset for no bound), got {r_bound}")
        text_sources, text_dims = tuple(text_sources), tuple(int(d) for d in text_dims)
        bad = [s for s in text_sources if s not in TEXT_SOURCES]
        if bad or not text_sources or len(set(text_sources)) != len(text_sources):
            raise UserError(f"adapter text_sources {list(text_sources)} invalid: use one or both of clip, t5, once each")
        if len(text_dims) != len(text_sources):
            raise UserError(f"adapter has {len(text_sources)} text_sources but {len(text_dims)} text_dims: give one each")
        if dim % 4:
            raise UserError(f"adapter width {dim} must be divisible by 4 (2-D position code)")
        self.patch_embed = nn.Conv2d(latent_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.text_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, dim)) for d in text_dims)
        self.blocks = nn.ModuleList(RelationalBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * latent_channels)
        if time_aware:
            self.level_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            nn.init.zeros_(self.level_embed[-1].weight)  # zero-init: starts as the t-free net
            nn.init.zeros_(self.level_embed[-1].bias)
        # Zero-init head: r == 0 exactly, so training (and sampling) starts from the plain pretrained model.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # ---------------------------------------------------------------------------------------------- checks

    def check_compatible(
        self, latent_channels: Optional[int] = None, text_dims: Optional[Sequence[int]] = None
    ) -> None:
        """Raise a one-line :class:`UserError` unless this adapter fits a model with these latents / text widths."""
        cfg = self.config
        if latent_channels is not None and int(latent_channels) != cfg.latent_channels:
            raise UserError(
                f"adapter expects {cfg.latent_channels}-channel latents but the diffusion model has {latent_channels}: "
                "load an adapter trained for this model (or retrain stage 1)"
            )
        if text_dims is not None and tuple(int(d) for d in text_dims) != tuple(cfg.text_dims):
            raise UserError(
                f"adapter expects text widths {list(cfg.text_dims)} for {list(cfg.text_sources)} but the text encoders "
                f"give {list(text_dims)}: load an adapter trained with these text encoders (or retrain stage 1)"
            )

    def _text_tokens(self, text: TextStates, masks: TextMasks, batch: int):
        states = [text] if isinstance(text, torch.Tensor) else list(text)
        if len(states) != len(self.text_proj):
            raise UserError(
                f"adapter takes {len(self.text_proj)} text inputs ({', '.join(self.config.text_sources)}), "
                f"got {len(states)}: pass one state tensor per source"
            )
        masks = [None] * len(states) if masks is None else list(masks)
        tokens, keep = [], []
        for source, proj, s, m in zip(self.config.text_sources, self.text_proj, states, masks):
            width = proj[0].normalized_shape[0]
            if s.ndim != 3 or s.shape[-1] != width or s.shape[0] != batch:
                raise UserError(
                    f"adapter's {source} text input must be [{batch}, L, {width}], got {tuple(s.shape)}: "
                    "use the text encoder the adapter was trained with"
                )
            tokens.append(proj(s.to(self.dtype)))
            keep.append(torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if m is None else m.to(torch.bool))
        return torch.cat(tokens, dim=1), (None if all(m is None for m in masks) else torch.cat(keep, dim=1))

    # --------------------------------------------------------------------------------------------- forward

    def level_features(self, abar: Union[float, torch.Tensor], batch: int, device) -> torch.Tensor:
        """Sinusoidal features ``[B, dim]`` of the clamped log-SNR ``log(abar / (1 - abar))`` of each row's level."""
        abar = torch.as_tensor(abar, dtype=torch.float64, device=device).reshape(-1)
        if abar.numel() == 1:
            abar = abar.expand(batch)
        if abar.numel() != batch:
            raise ValueError(f"need one noise level per sample ({batch}), got {abar.numel()}")
        logsnr = (abar.clamp(1e-12, 1.0).log() - (1 - abar).clamp(min=1e-12).log()).clamp(-LOGSNR_LIMIT, LOGSNR_LIMIT)
        half = self.config.dim // 2
        freqs = torch.exp(torch.linspace(math.log(1 / 16), math.log(16), half, dtype=torch.float64, device=device))
        angles = logsnr[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1).to(self.dtype)

    def forward(
        self,
        x0: torch.Tensor,
        text: TextStates,
        text_masks: TextMasks = None,
        abar: Union[float, torch.Tensor, None] = None,
    ) -> torch.Tensor:
        """The bias r of paper eq. (forward marginal) ``x_t = sqrt(abar) x0 + k_t r + sqrt(1 - abar) eps``.

        ``x0 [B, C, H, W]`` (clean latent, or the denoiser's x0_hat while sampling); ``text``: one ``[B, L_i, D_i]``
        tensor per entry of ``text_sources`` (a bare tensor for a single source); ``text_masks``: optional
        ``[B, L_i]`` bools per source (True = real token); ``abar``: the noise level of the marginal this r shifts
        (a float or one per sample; required by a ``time_aware`` net, ignored by a t-free one). Returns
        ``r [B, C, H, W]`` in x0's dtype.
        """
        cfg = self.config
        p = cfg.patch_size
        if x0.ndim != 4 or x0.shape[1] != cfg.latent_channels:
            raise UserError(
                f"adapter expects latents [B, {cfg.latent_channels}, H, W], got {tuple(x0.shape)}: "
                "load an adapter trained for this model's latent space"
            )
        b, c, height, width = x0.shape
        if height % p or width % p:
            raise UserError(f"latent size {height}x{width} is not divisible by the adapter's patch size {p}")
        text_tokens, text_mask = self._text_tokens(text, text_masks, b)
        x = self.patch_embed(x0.to(self.dtype))  # [B, dim, H/p, W/p]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + sinusoidal_2d(h, w, cfg.dim, x.device, x.dtype)
        if cfg.time_aware:
            if abar is None:
                raise UserError("this adapter is time-aware (r_phi(x0, c, t)): pass the noise level abar")
            x = x + self.level_embed(self.level_features(abar, b, x.device))[:, None, :]
        for block in self.blocks:
            x = block(x, text_tokens, text_mask)
        x = self.proj_out(self.norm_out(x))  # [B, h w, p p C]
        r = x.view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)
        if cfg.r_bound is not None:
            r = cfg.r_bound * torch.tanh(r / cfg.r_bound)  # ~identity for |r| << bound, so zero-init stays exact
        return r.to(x0.dtype)


def read_adapter_config(path: Union[str, os.PathLike]) -> dict:
    """The ``config.json`` of an adapter folder written by ``save_pretrained`` (one-line UserError otherwise)."""
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    if not folder.is_dir() or not config_file.is_file():
        raise UserError(
            f"no ContextDiff adapter at {folder} (expected a folder with {CONFIG_NAME} and weights): "
            "train one with stage 1 and pass its output folder"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"adapter config {config_file} is unreadable ({' '.join(str(err).split())}): re-save it") from None
    if config.get("_class_name") != RelationalNet.__name__:
        raise UserError(f"{folder} holds a {config.get('_class_name')!r}, not a ContextDiff RelationalNet adapter")
    return config


def load_adapter(
    path: Union[str, os.PathLike],
    latent_channels: Optional[int] = None,
    text_dims: Optional[Sequence[int]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RelationalNet:
    """Load a ``save_pretrained`` adapter folder (safetensors + ``config.json``), checked against the model first.

    The config is read and compared with ``latent_channels`` / ``text_dims`` BEFORE any weight is loaded, so a
    mismatch is a one-line :class:`UserError` rather than a size-mismatch traceback.
    """
    config = read_adapter_config(path)
    if latent_channels is not None and int(config.get("latent_channels", -1)) != int(latent_channels):
        raise UserError(
            f"adapter {path} expects {config.get('latent_channels')}-channel latents but the diffusion model has "
            f"{latent_channels}: load an adapter trained for this model (or retrain stage 1)"
        )
    if text_dims is not None and [int(d) for d in config.get("text_dims", [])] != [int(d) for d in text_dims]:
        raise UserError(
            f"adapter {path} expects text widths {config.get('text_dims')} ({config.get('text_sources')}) but the "
            f"text encoders give {list(text_dims)}: load an adapter trained with these text encoders"
        )
    try:
        adapter = RelationalNet.from_pretrained(str(path), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"could not load the adapter weights in {path}: {' '.join(str(err).split())[:300]}") from None
    return adapter.to(device).eval()





def tiny_adapter(seed: int = 0, head_std: float = 0.0, **overrides) -> RelationalNet:
    """The digits-world adapter of ``configs/contextdiff/tiny.yaml`` (8x8x4 latents, 32-d CLIP text), ~0.14M params.

    ``head_std > 0`` draws the zero-initialised output head from N(0, head_std^2) instead, standing in for a trained
    adapter (r != 0) in tests and demos. Deterministic for a seed; the caller's RNG is untouched.
    """
    config = dict(latent_channels=4, patch_size=2, dim=64, depth=2, heads=4, text_sources=("clip",), text_dims=(32,))
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = RelationalNet(**config)
        if head_std > 0:
            nn.init.normal_(adapter.proj_out.weight, std=head_std)
            nn.init.normal_(adapter.proj_out.bias, std=head_std)
    return adapter.eval()
