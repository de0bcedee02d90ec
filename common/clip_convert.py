"""Convert an open_clip text tower into a transformers ``CLIPTextModelWithProjection``.

Why: the digits world trains its CLIP with open_clip (real tokenizer, contrastive loss), while a Stable-Diffusion-
layout folder must hold a transformers text encoder so plain ``diffusers.StableDiffusionPipeline`` can load it. The
two architectures are the same pre-LN transformer with a causal mask; only the parameter layout differs
(``in_proj_weight`` holds q, k, v stacked; ``text_projection`` is stored transposed). The outputs agree to float
rounding (tested).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from common.errors import UserError


def _text_config(model) -> CLIPTextConfig:
    blocks = model.transformer.resblocks
    width = model.token_embedding.weight.shape[1]
    act = blocks[0].mlp.gelu if hasattr(blocks[0].mlp, "gelu") else None
    quick = act is not None and type(act).__name__ == "QuickGELU"
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise UserError("only open_clip text towers pooled at the EOT token (text_pool_type='argmax') convert")
    return CLIPTextConfig(
        vocab_size=model.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.weight.shape[0],
        projection_dim=model.text_projection.shape[1],
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act="quick_gelu" if quick else "gelu",
        layer_norm_eps=blocks[0].ln_1.eps,
        bos_token_id=model.token_embedding.weight.shape[0] - 2,
        eos_token_id=model.token_embedding.weight.shape[0] - 1,
        pad_token_id=model.token_embedding.weight.shape[0] - 1,
    )


def open_clip_text_to_transformers(model) -> CLIPTextModelWithProjection:
    """A ``CLIPTextModelWithProjection`` computing the same hidden states and text embeddings as ``model``."""
    config = _text_config(model)
    out = CLIPTextModelWithProjection(config).eval()
    src = model.state_dict()
    state = {
        "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_model.final_layer_norm.weight": src["ln_final.weight"],
        "text_model.final_layer_norm.bias": src["ln_final.bias"],
        "text_projection.weight": src["text_projection"].t().contiguous(),
    }
    for i in range(config.num_hidden_layers):
        a, b = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        q, k, v = src[a + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = src[a + "attn.in_proj_bias"].chunk(3)
        for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            state[f"{b}self_attn.{name}.weight"] = w
            state[f"{b}self_attn.{name}.bias"] = bias
        pairs = {
            "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
            "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
        }
        for dst, s in pairs.items():
            state[f"{b}{dst}.weight"] = src[f"{a}{s}.weight"]
            state[f"{b}{dst}.bias"] = src[f"{a}{s}.bias"]
    expected = set(out.state_dict())
    missing = expected - set(state) - {"text_model.embeddings.position_ids"}
    if missing:
        raise UserError(f"cannot convert this open_clip text tower: no source for {sorted(missing)[:3]}")
    out.load_state_dict(state, strict=False)
    return out.to(torch.float32)
