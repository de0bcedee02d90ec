"""Checkpoint converters: guided-diffusion ADM UNets -> diffusers ``UNet2DModel``; SDG's ``CLIP_gd`` -> NoiseAwareCLIP.

ADM (``lsun_{bedroom,cat,horse}.pt``, ILVR's ``ffhq_10m.pt``): the module correspondence comes from
``sdg.adm.adm_blocks`` (one walk of ADM's constructor). Per module (the conversion pitfalls):

- ResBlock: ``in_layers.0/2`` -> ``norm1/conv1``, ``emb_layers.1`` -> ``time_emb_proj``, ``out_layers.0/3`` ->
  ``norm2/conv2``, ``skip_connection`` -> ``conv_shortcut``;
- attention: ``norm`` -> ``group_norm``; the 1x1 ``qkv`` Conv1d ``[3C, C, 1]`` -> ``to_q/to_k/to_v`` Linear. With
  ADM's default (legacy) order the output channels are laid out per head as ``[q_h, k_h, v_h]`` blocks of head_dim,
  so the split is ``reshape(H, 3, d, C)[:, i]``; a plain 3-way chunk (as in diffusers' consistency-model converter)
  is right only for ``--use_new_attention_order True`` or a single head. ``proj_out`` -> ``to_out.0``;
- ``time_embed.0/2`` -> ``time_embedding.linear_1/2``, ``input_blocks.0.0`` -> ``conv_in``, ``out.0/2`` ->
  ``conv_norm_out/conv_out``, ``label_emb`` -> ``class_embedding``.

Every key must be accounted for: a missing, unexpected or mis-shaped key is a one-line ``UserError`` naming it
(it almost always means the ADM flags do not match the checkpoint), never a silently random weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional, Union

import torch

from common.errors import UserError
from sdg.adm import ADMBlock, ADMFlags, adm_blocks, adm_param_shapes, attention_head_dim, build_unet


FLAG_HINT = (
    "the ADM flags do not match this checkpoint (check --image_size --num_channels --num_res_blocks "
    "--attention_resolutions --channel_mult --learn_sigma --class_cond --resblock_updown --use_scale_shift_norm)"
)


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` dict from a loaded checkpoint: unwraps ``{"state_dict": ...}`` / ``{"model": ...}``
    and strips DistributedDataParallel's ``module.`` prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{source} is not a state dict of tensors: pass the model weights file")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_adm_keys(state: Mapping[str, torch.Tensor], flags: ADMFlags, source: str) -> None:
    expected = adm_param_shapes(flags)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
        raise UserError(f"{source}: {'; '.join(parts)}: {FLAG_HINT}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"{source}: {key} has shape {tuple(state[key].shape)}, the flags give {shape}: {FLAG_HINT}")


def _split_qkv(tensor: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """ADM's fused qkv (``[3C, C, 1]`` weight or ``[3C]`` bias) -> q, k, v (``[C, C]`` / ``[C]``), head order kept."""
    three_c = tensor.shape[0]
    c = three_c // 3
    d = c // heads
    rest = tensor.shape[1:2]  # (C,) for a weight (the trailing 1x1 kernel dim dropped), () for a bias
    if new_order:  # channels [q (all heads) | k | v]
        blocks = tensor.reshape(3, heads, d, *rest)
        return tuple(blocks[i].reshape(c, *rest) for i in range(3))
    blocks = tensor.reshape(heads, 3, d, *rest)  # legacy: per head [q_h | k_h | v_h]
    return tuple(blocks[:, i].reshape(c, *rest) for i in range(3))


RESBLOCK_KEYS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _convert_block(block: ADMBlock, state: Mapping[str, torch.Tensor], flags: ADMFlags, head_dim: int):
    a, d = block.adm, block.diffusers
    if block.kind in ("linear", "conv", "norm"):
        yield f"{d}.weight", state[f"{a}.weight"]
        yield f"{d}.bias", state[f"{a}.bias"]
    elif block.kind == "embedding":
        yield f"{d}.weight", state[f"{a}.weight"]
    elif block.kind == "resblock":
        for old, new in RESBLOCK_KEYS.items():
            if f"{a}.{old}.weight" in state:
                yield f"{d}.{new}.weight", state[f"{a}.{old}.weight"]
                yield f"{d}.{new}.bias", state[f"{a}.{old}.bias"]
    elif block.kind == "attention":
        heads = block.channels[0] // head_dim
        yield f"{d}.group_norm.weight", state[f"{a}.norm.weight"]
        yield f"{d}.group_norm.bias", state[f"{a}.norm.bias"]
        weights = _split_qkv(state[f"{a}.qkv.weight"][..., 0], heads, flags.use_new_attention_order)
        biases = _split_qkv(state[f"{a}.qkv.bias"], heads, flags.use_new_attention_order)
        for name, w, b in zip(("to_q", "to_k", "to_v"), weights, biases):
            yield f"{d}.{name}.weight", w
            yield f"{d}.{name}.bias", b
        yield f"{d}.to_out.0.weight", state[f"{a}.proj_out.weight"][..., 0]
        yield f"{d}.to_out.0.bias", state[f"{a}.proj_out.bias"]
    else:  # pragma: no cover - adm_blocks yields only the kinds above
        raise AssertionError(block.kind)


def convert_adm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    flags: ADMFlags,
    *,
    dtype: Optional[torch.dtype] = torch.float32,
    source: str = "ADM checkpoint",
) -> dict[str, torch.Tensor]:
    """guided-diffusion ``UNetModel`` state dict -> diffusers ``UNet2DModel`` state dict for ``unet2d_config(flags)``.

    Checks every key and shape against ADM's layout for ``flags`` first (``UserError`` otherwise). ``dtype`` casts the
    weights (ADM fp16 torsos become float32 by default; ``None`` keeps them).
    """
    state = unwrap_state_dict(state_dict, source)
    _check_adm_keys(state, flags, source)
    head_dim = attention_head_dim(flags)
    out: dict[str, torch.Tensor] = {}
    for block in adm_blocks(flags):
        for key, value in _convert_block(block, state, flags, head_dim):
            value = value.contiguous()
            out[key] = value if dtype is None else value.to(dtype)
    return out


def load_adm_unet(
    path_or_state: Union[str, Mapping[str, torch.Tensor]],
    flags: ADMFlags,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A guided-diffusion checkpoint (path or loaded state dict) as a diffusers ``UNet2DModel`` in eval mode.

    The model is built on the meta device and the converted tensors are assigned into it (no second full-size copy).
    """
    from common.io import safe_torch_load

    source = str(path_or_state) if isinstance(path_or_state, str) else "ADM state dict"
    state = safe_torch_load(path_or_state) if isinstance(path_or_state, str) else path_or_state
    converted = convert_adm_state_dict(state, flags, dtype=dtype, source=source)
    model = build_unet(flags, device="meta")
    model.load_state_dict(converted, strict=True, assign=True)  # an internal mapping bug would fail loudly here
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ SDG CLIP_gd

# Released CLIP_gd names (OpenAI RN50x16 wrapped as nn.Sequential "visual_frozen") -> open_clip names.
_CLIP_GD_STEM = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3",
                 "10": "layer1", "11": "layer2", "12": "layer3"}
_CLIP_GD_PATTERN = re.compile(r"^visual_frozen\.(\d+)\.(.+)$")


def convert_sdg_clip_gd_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released SDG ``CLIP_gd`` state dict (``clip_ffhq.pt``, ``clip_lsun_*.pt``) -> ``NoiseAwareCLIP`` names.

    ``visual_frozen.{0,1,3,4,6,7}`` -> stem ``conv1/bn1/conv2/bn2/conv3/bn3``; ``visual_frozen.{10,11,12}`` ->
    ``layer1..3``; ``layer4`` as is; ``attn_pool`` -> ``attnpool`` (all under ``visual.``); ``time_embed.*`` and
    ``emb_layers.*`` keep their names. Load the result with ``sdg.noisy_clip.load_noise_aware_clip`` into a
    ``NoiseAwareCLIP(RN50x16 visual, image_size=256, film_init="default")``.
    """
    state = unwrap_state_dict(state_dict, "CLIP_gd checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _CLIP_GD_PATTERN.match(key)
        if match and match.group(1) in _CLIP_GD_STEM:
            out[f"visual.{_CLIP_GD_STEM[match.group(1)]}.{match.group(2)}"] = value
        elif key.startswith("layer4."):
            out[f"visual.{key}"] = value
        elif key.startswith("attn_pool."):
            out[f"visual.attnpool.{key[len('attn_pool.'):]}"] = value
        elif key.startswith(("time_embed.", "emb_layers.")):
            out[key] = value
        else:
            raise UserError(
                f"unexpected key {key!r} in the CLIP_gd checkpoint: it is not a released SDG noise-aware CLIP "
                "(expected visual_frozen.*, layer4.*, attn_pool.*, time_embed.*, emb_layers.*)"
            )
    return out
