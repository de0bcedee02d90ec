"""Attention whose memory does not grow with the square of the sequence: queries in chunks.

``softmax(q k^T / sqrt(d)) v`` is row-wise in the queries: each block of query rows needs only its own block of
scores, so computing it ``chunk`` rows at a time gives the same result (to float rounding) while holding at most
``batch x heads x chunk x L`` scores instead of ``L x L``. PyTorch's ``scaled_dot_product_attention`` already avoids
the full matrix where it picks a flash / memory-efficient kernel (on CPU: without a mask); the chunks bound the
other cases (a mask, the math fallback), and each chunk still goes through SDPA.

:class:`ChunkedAttnProcessor` is that attention for a diffusers ``Attention`` module (the UNets' and VAEs'
self- and cross-attention); :func:`chunked_attention_in` installs it on a model for the duration of a call, leaving
processors it does not know (e.g. a method's own sparse-causal one) alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F


def sdpa_avoids_scores(device: torch.device | str, has_mask: bool = False) -> bool:
    """Whether SDPA runs a kernel that never holds the ``L x L`` scores: on CPU the flash kernel (no mask); on CUDA
    the flash / memory-efficient kernels. Otherwise (a mask on CPU, other devices) assume the math path."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and not has_mask


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk: Optional[int] = None,
                      attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` over ``[..., L, d]`` tensors, ``chunk`` query rows at a time (None: all)."""
    length = query.shape[-2]
    if chunk is None or chunk >= length:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    for start in range(0, length, chunk):
        rows = slice(start, start + chunk)
        mask = None
        if attn_mask is not None:
            mask = attn_mask[..., rows, :] if attn_mask.shape[-2] == length else attn_mask
        out[..., rows, :] = F.scaled_dot_product_attention(query[..., rows, :], key, value, attn_mask=mask,
                                                           scale=scale)
    return out


class ChunkedAttnProcessor:
    """A diffusers attention processor (the steps of its default SDPA one) computing attention in query chunks."""

    def __init__(self, chunk: int):
        self.chunk = int(chunk)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None, *args,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, source_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, source_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = chunked_attention(query, key, value, self.chunk, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _replaceable(processor) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return isinstance(processor, (AttnProcessor, AttnProcessor2_0, ChunkedAttnProcessor))


def _diffusers_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model`` when it is a diffusers model (has ``attn_processors``), else its outermost sub-modules that are
    (e.g. the transformer blocks of a method's own network)."""
    if hasattr(model, "attn_processors"):
        return [model]
    found, inside = [], []
    for name, module in model.named_modules():
        if hasattr(module, "attn_processors") and not any(name.startswith(prefix) for prefix in inside):
            found.append(module)
            inside.append(name + ".")
    return found


@contextlib.contextmanager
def chunked_attention_in(model: Optional[torch.nn.Module], chunk: Optional[int]) -> Iterator[None]:
    """For the body, every default attention processor of ``model`` (a diffusers model, or any module holding
    some) computes in query chunks of ``chunk`` rows; ``chunk=None`` or no model: unchanged."""
    targets = [] if chunk is None or model is None else _diffusers_models(model)
    saved = [dict(target.attn_processors) for target in targets]
    for target, processors in zip(targets, saved):
        target.set_attn_processor({name: (ChunkedAttnProcessor(chunk) if _replaceable(p) else p)
                                   for name, p in processors.items()})
    try:
        yield
    finally:
        for target, processors in zip(targets, saved):
            target.set_attn_processor(processors)
