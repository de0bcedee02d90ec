"""The released Collaborative Diffusion checkpoints (LDM / PyTorch-Lightning ``.ckpt``) <-> the project's folders.

The release ships ``{256,512}_{vae,text,mask,codiff_mask_text}.ckpt`` with the official ``configs/*.yaml``. Each
``.ckpt`` is a Lightning checkpoint: a dict whose ``state_dict`` holds the weights (the other entries, ``epoch``,
``optimizer_states``, ``callbacks``, ... are ignored). The weights are read with ``torch.load(weights_only=True)``
and an allow-list of plain-data globals (:data:`LIGHTNING_SAFE_GLOBALS`); a file that needs anything else is refused
with one line, never unpickled with arbitrary code.

Every network has a diffusers / project twin of the same structure; only names differ (``codiff/METHOD.md``,
"Released checkpoints", lists the maps). The maps here are generated from the project module's own key names, so
one map serves both directions: :func:`load_released_weights` (released -> project, strict: a missing, unexpected
or mis-shaped key is one :class:`~common.errors.UserError` naming it) and :func:`export_released_weights` (project
-> released layout, what the round-trip tests use). The UNet and VAE maps agree with diffusers' own LDM converters
(``diffusers.loaders.single_file_utils.convert_ldm_{unet,vae}_checkpoint``); the tests check that.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from common.errors import UserError, one_line
from common.io import PathLike, require_file


# ------------------------------------------------------------------------------------------- reading files

# Plain-data classes a Lightning checkpoint's extra entries may pickle (hparams as an argparse Namespace, numpy
# scalars in callback states). None of them runs code when rebuilt; everything else is refused.
def _lightning_safe_globals() -> list:
    import numpy as np

    allowed: list = [argparse.Namespace, np.dtype, type(np.dtype("float32")), type(np.dtype("float64")),
                     type(np.dtype("int64"))]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
        except ImportError:
            continue
        allowed.append(module.scalar)
        break
    return allowed


LIGHTNING_SAFE_GLOBALS = _lightning_safe_globals()


def read_lightning_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning ``.ckpt`` (or a plain state dict / ``.safetensors``), tensors only."""
    from common.io import safe_torch_load

    path = require_file(path, "checkpoint")
    with torch.serialization.safe_globals(LIGHTNING_SAFE_GLOBALS):
        obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path} holds no state dict (a Lightning .ckpt has one under 'state_dict'): pass a released "
                        "Collaborative Diffusion checkpoint")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{path}: state dict entry {bad!r} is not a tensor: this is not an LDM checkpoint")
    return dict(obj)


def read_official_config(path: PathLike) -> dict[str, Any]:
    """An official ``configs/*.yaml`` (``yaml.safe_load``): the ``model`` section's ``target`` and ``params``."""
    path = require_file(path, "official config")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML ({one_line(str(err))[:200]})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or "target" not in model or not isinstance(model.get("params"), dict):
        raise UserError(f"{path} has no model.target / model.params: pass one of the official configs/*.yaml")
    return model


# ------------------------------------------------------------------------------------------ config parsing

VAE_TARGET = "ldm.models.autoencoder.AutoencoderKL"
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
COLLABORATION_TARGET = "ldm.models.diffusion.ddpm_compose.LatentDiffusionCompose"
TEXT_ENCODER_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
MASK_ENCODER_TARGET = "ldm.modules.encoders.modules.SegMaskEncoder"


def _require(params: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in params:
        raise UserError(f"{where} has no {key!r}: pass the official config that goes with the checkpoint")
    return params[key]


def unet_config_from_ldm(params: Mapping[str, Any], where: str = "unet_config") -> dict[str, Any]:
    """LDM ``UNetModel`` params -> the ``UNet2DConditionModel`` config of the same network.

    ``attention_resolutions`` are downsampling factors (1 = the first level); ``num_heads`` is the head COUNT,
    which diffusers' ``attention_head_dim`` means for this model class (its legacy naming)."""
    supported = {"image_size", "in_channels", "out_channels", "model_channels", "attention_resolutions",
                 "num_res_blocks", "channel_mult", "num_heads", "use_spatial_transformer", "transformer_depth",
                 "context_dim", "use_checkpoint", "legacy", "dropout", "num_head_channels", "conv_resample"}
    unknown = sorted(set(params) - supported)
    if unknown:
        raise UserError(f"{where}: option {unknown[0]!r} is not one the released models use and is not converted")
    if not params.get("use_spatial_transformer", False) or params.get("context_dim") is None:
        raise UserError(f"{where}: only cross-attention UNets (use_spatial_transformer, context_dim) are converted")
    if params.get("num_head_channels", -1) != -1 or params.get("legacy", False):
        raise UserError(f"{where}: num_head_channels / legacy heads are not the released setting (num_heads, "
                        "legacy: False)")
    mults = list(_require(params, "channel_mult", where))
    ch = int(_require(params, "model_channels", where))
    attention = {int(r) for r in _require(params, "attention_resolutions", where)}
    down, up, factor = [], [], 1
    for level in range(len(mults)):
        down.append("CrossAttnDownBlock2D" if factor in attention else "DownBlock2D")
        if level < len(mults) - 1:
            factor *= 2
    for _ in mults:
        up.append("CrossAttnUpBlock2D" if factor in attention else "UpBlock2D")
        factor //= 2
    return {
        "sample_size": int(_require(params, "image_size", where)),
        "in_channels": int(_require(params, "in_channels", where)),
        "out_channels": int(_require(params, "out_channels", where)),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [ch * m for m in mults],
        "layers_per_block": int(_require(params, "num_res_blocks", where)),
        "cross_attention_dim": int(params["context_dim"]),
        "attention_head_dim": int(_require(params, "num_heads", where)),
        "transformer_layers_per_block": int(params.get("transformer_depth", 1)),
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,
    }


def vae_config_from_ldm(ddconfig: Mapping[str, Any], embed_dim: int, scale_factor: float) -> dict[str, Any]:
    """LDM ``AutoencoderKL`` ``ddconfig`` -> the diffusers ``AutoencoderKL`` config of the same network."""
    if ddconfig.get("attn_resolutions"):
        raise UserError("the VAE has attention inside its levels (attn_resolutions): not the released setting")
    if not ddconfig.get("double_z", True) or int(ddconfig["z_channels"]) != int(embed_dim):
        raise UserError("the VAE must have double_z and z_channels == embed_dim (the released setting)")
    levels = len(ddconfig["ch_mult"])
    return {
        "in_channels": int(ddconfig["in_channels"]),
        "out_channels": int(ddconfig["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]],
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "latent_channels": int(embed_dim),
        "norm_num_groups": 32,
        "sample_size": int(ddconfig["resolution"]),
        "scaling_factor": float(scale_factor),
    }


def scheduler_config_from_ldm(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The diffusers DDIM scheduler config of an LDM noise schedule (LDM's ``linear`` is diffusers'
    ``scaled_linear``: linear in sqrt(beta))."""
    from codiff.data import LDM_SCHEDULER_CONFIG

    if params.get("beta_schedule", "linear") != "linear":
        raise UserError(f"{where}: beta_schedule {params['beta_schedule']!r} is not converted (released: linear)")
    if params.get("parameterization", "eps") != "eps":
        raise UserError(f"{where}: parameterization {params['parameterization']!r} is not converted (released: eps)")
    return {**LDM_SCHEDULER_CONFIG, "num_train_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", 1e-4)), "beta_end": float(params.get("linear_end", 2e-2))}


@dataclass
class OfficialMember:
    """What an official uni-modal config (``configs/*_{text,mask}.yaml``) describes."""

    kind: str
    unet_config: dict
    vae_config: dict
    scheduler_config: dict
    text_encoder_args: dict = field(default_factory=dict)
    mask_token_dim: int = 0
    mask_dim: int = 0

    @property
    def image_size(self) -> int:
        return int(self.vae_config["sample_size"])


def parse_member_config(model: Mapping[str, Any], where: str) -> OfficialMember:
    if model["target"] != LDM_TARGET:
        raise UserError(f"{where} describes {model['target']}, not a uni-modal {LDM_TARGET}")
    params = model["params"]
    if params.get("conditioning_key", "crossattn") != "crossattn":
        raise UserError(f"{where}: conditioning_key {params['conditioning_key']!r} is not converted (released: "
                        "crossattn)")
    unet_config = unet_config_from_ldm(_require(params, "unet_config", where)["params"], f"{where} unet_config")
    first = _require(params, "first_stage_config", where)["params"]
    vae_config = vae_config_from_ldm(first["ddconfig"], int(first["embed_dim"]), float(params.get("scale_factor", 1.0)))
    schedule = scheduler_config_from_ldm(params, where)
    cond = _require(params, "cond_stage_config", where)
    if cond["target"] == TEXT_ENCODER_TARGET:
        args = cond.get("params", {})
        text_args = {"vocab_size": int(args.get("vocab_size", 30522)), "max_length": int(args.get("max_seq_len", 77)),
                     "dim": int(args["n_embed"]), "depth": int(args["n_layer"]), "heads": 8, "head_dim": 64,
                     "ff_mult": 4}  # x-transformers' Encoder defaults, which BERTEmbedder keeps
        return OfficialMember("text", unet_config, vae_config, schedule, text_encoder_args=text_args)
    if cond["target"] == MASK_ENCODER_TARGET:
        args = cond.get("params", {})
        return OfficialMember("mask", unet_config, vae_config, schedule,
                              mask_token_dim=int(args.get("mask_embed_dim", 1024)),
                              mask_dim=int(args.get("context_dim", 640)))
    raise UserError(f"{where}: condition encoder {cond['target']} is not one of the released ones (BERTEmbedder, "
                    "SegMaskEncoder)")


def resolve_member_config(collab_config: PathLike, named: str) -> Path:
    """A member config named inside a collaboration config (``configs/512_mask.yaml``, relative to the official
    repository's root): tried as given, from the root above the collaboration config, and beside it."""
    collab_config = Path(collab_config)
    p = Path(named)
    for candidate in (p, collab_config.parent.parent / p, collab_config.parent / p.name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{collab_config} names the member config {named}, which is neither there nor beside it: put the "
                    "official configs/ folder together")


# --------------------------------------------------------------------------------------------- key maps
#
# Each map goes from a project (diffusers) key to its released (LDM) key, built from the project module's keys.

_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                  ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _rename_first(rest: str, table: Sequence[tuple[str, str]]) -> str:
    for old, new in table:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key_map(unet: nn.Module) -> dict[str, str]:
    """``UNet2DConditionModel`` key -> LDM ``UNetModel`` key (``input_blocks.i.j`` / ``middle_block.j`` /
    ``output_blocks.i.j``, without the ``model.diffusion_model.`` prefix)."""
    config = unet.config
    per_level = int(config.layers_per_block) + 1
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key in unet.state_dict():
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            out[key] = f"{fixed[head]}.{leaf}"
            continue
        parts = key.split(".")
        if parts[0] == "down_blocks":
            level, sub = int(parts[1]), parts[2]
            if sub == "downsamplers":
                out[key] = f"input_blocks.{(level + 1) * per_level}.0.op." + ".".join(parts[5:])
                continue
            index, rest = 1 + level * per_level + int(parts[3]), ".".join(parts[4:])
            slot = "0" if sub == "resnets" else "1"
            rest = _rename_first(rest, _RESNET_TO_LDM) if sub == "resnets" else rest
            out[key] = f"input_blocks.{index}.{slot}.{rest}"
        elif parts[0] == "mid_block":
            sub, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if sub == "resnets":
                out[key] = f"middle_block.{2 * j}.{_rename_first(rest, _RESNET_TO_LDM)}"
            else:
                out[key] = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            level, sub = int(parts[1]), parts[2]
            if sub == "upsamplers":
                slot = 2 if up_has_attention[level] else 1
                out[key] = f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv." + ".".join(parts[5:])
                continue
            index, rest = level * per_level + int(parts[3]), ".".join(parts[4:])
            slot = "0" if sub == "resnets" else "1"
            rest = _rename_first(rest, _RESNET_TO_LDM) if sub == "resnets" else rest
            out[key] = f"output_blocks.{index}.{slot}.{rest}"
        else:
            raise UserError(f"the UNet has a parameter {key} with no released counterpart: not an LDM-shaped UNet")
    return out


_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_key_map(vae: nn.Module) -> dict[str, str]:
    """diffusers ``AutoencoderKL`` key -> LDM ``AutoencoderKL`` key (without ``first_stage_model.``)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key in vae.state_dict():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = key
            continue
        sub = parts[1]
        if sub in ("conv_in", "conv_out"):
            out[key] = key
        elif sub == "conv_norm_out":
            out[key] = f"{side}.norm_out." + ".".join(parts[2:])
        elif sub == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                out[key] = f"{side}.mid.block_{j + 1}.{_rename_first(rest, _VAE_RESNET)}"
            else:
                out[key] = f"{side}.mid.attn_1.{_rename_first(rest, _VAE_ATTENTION)}"
        elif sub in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            ldm_level, ldm_sub = (level, "down") if sub == "down_blocks" else (levels - 1 - level, "up")
            if parts[3] == "resnets":
                rest = _rename_first(".".join(parts[5:]), _VAE_RESNET)
                out[key] = f"{side}.{ldm_sub}.{ldm_level}.block.{parts[4]}.{rest}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                name = "downsample" if sub == "down_blocks" else "upsample"
                out[key] = f"{side}.{ldm_sub}.{ldm_level}.{name}.conv." + ".".join(parts[6:])
        else:
            raise UserError(f"the VAE has a parameter {key} with no released counterpart")
    return out


def text_encoder_key_map(encoder: nn.Module) -> dict[str, str]:
    """:class:`~codiff.text_encoder.LDMTextEncoder` key -> ``BERTEmbedder`` key (without ``cond_stage_model.``).

    x-transformers stores block ``i`` as two layers: ``layers.{2i}`` = (LayerNorm, Attention, Residual) and
    ``layers.{2i+1}`` = (LayerNorm, FeedForward, Residual); the FeedForward is ``net = (Sequential(Linear, GELU),
    Dropout, Linear)``."""
    block_rules = (("norm_attn", "{a}.0"), ("attn", "{a}.1"), ("norm_ff", "{f}.0"), ("ff.0", "{f}.1.net.0.0"),
                   ("ff.2", "{f}.1.net.2"))
    out = {}
    for key in encoder.state_dict():
        if key == "token_emb.weight":
            out[key] = "transformer.token_emb.weight"
        elif key == "pos_emb.weight":
            out[key] = "transformer.pos_emb.emb.weight"
        elif key.startswith("norm."):
            out[key] = "transformer." + key
        else:
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
            if match is None:
                raise UserError(f"the text encoder has a parameter {key} with no released counterpart")
            i, rest = int(match.group(1)), match.group(2)
            for old, new in block_rules:
                if rest.startswith(old + "."):
                    layer = new.format(a=2 * i, f=2 * i + 1)
                    out[key] = f"transformer.attn_layers.layers.{layer}{rest[len(old):]}"
                    break
            else:
                raise UserError(f"the text encoder has a parameter {key} with no released counterpart")
    return out


MASK_ENCODER_KEY_MAP = {"proj.weight": "linear.weight", "proj.bias": "linear.bias"}

# Released entries that hold no weights of a network we keep: the DDPM schedule buffers (recomputed from the
# scheduler config; ``betas`` is checked against it) and the text encoder's unused token-prediction head.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "scale_factor", "logvar")
TEXT_HEAD_KEYS = ("transformer.to_logits.weight", "transformer.to_logits.bias")


# ------------------------------------------------------------------------------------------ moving tensors


def _fit(tensor: torch.Tensor, shape: torch.Size) -> Optional[torch.Tensor]:
    """``tensor`` in ``shape`` when they differ only by trailing 1x1 dims (LDM's 1x1 conv vs diffusers' Linear)."""
    if tensor.shape == shape:
        return tensor
    if tensor.numel() == math.prod(shape):
        squeeze_a = [d for d in tensor.shape if d != 1]
        squeeze_b = [d for d in shape if d != 1]
        if squeeze_a == squeeze_b and tensor.shape[:2] == shape[:2]:
            return tensor.reshape(shape)
    return None


def take_weights(
    state: Mapping[str, torch.Tensor], prefix: str, key_map: Mapping[str, str], module: nn.Module, what: str,
    source: str,
) -> set[str]:
    """Load ``module`` strictly from ``state[prefix + key_map[k]]``; returns the released keys it consumed.

    A missing or mis-shaped key is a UserError naming it (unexpected keys are judged by the caller, who knows
    every prefix of the file). The module's dtype is kept (float32 for the converted folders)."""
    target = module.state_dict()
    loaded, used = {}, set()
    for key, released in key_map.items():
        full = prefix + released
        if full not in state:
            raise UserError(f"{source} has no {full} ({what}): the file is not the checkpoint its config describes")
        value = _fit(state[full], target[key].shape)
        if value is None:
            raise UserError(f"{source}: {full} has shape {tuple(state[full].shape)} but the {what} of the config "
                            f"needs {tuple(target[key].shape)}: pass the config that goes with this checkpoint")
        loaded[key] = value.to(target[key].dtype)
        used.add(full)
    module.load_state_dict(loaded, strict=True, assign=any(t.is_meta for t in target.values()))
    left = next((name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta), None)
    if left is not None:
        raise RuntimeError(f"{what}: {left} has no stored value (the key map misses it)")
    return used


def export_weights(module: nn.Module, key_map: Mapping[str, str], prefix: str,
                   ldm_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> dict[str, torch.Tensor]:
    """``module``'s weights under their released names (``prefix`` + LDM key)."""
    out = {}
    for key, value in module.state_dict().items():
        released = key_map[key]
        if ldm_shapes and released in ldm_shapes:
            value = value.reshape(ldm_shapes[released])
        out[prefix + released] = value.detach().clone()
    return out


def vae_ldm_shapes(vae: nn.Module, key_map: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """The LDM VAE's mid attention projections are 1x1 convolutions where diffusers has Linear layers."""
    shapes = {}
    for key, value in vae.state_dict().items():
        if ".mid_block.attentions." in key and key.endswith("weight") and value.ndim == 2:
            shapes[key_map[key]] = (*value.shape, 1, 1)
    return shapes


def check_schedule_buffer(state: Mapping[str, torch.Tensor], prefix: str, scheduler_config: Mapping[str, Any],
                          source: str) -> set[str]:
    """The released ``betas`` must be the config's schedule; returns the schedule buffer keys present."""
    from common.schedule import NoiseSchedule

    present = {prefix + name for name in SCHEDULE_BUFFERS if prefix + name in state}
    if prefix + "betas" in state:
        ours = torch.as_tensor(NoiseSchedule.from_config(dict(scheduler_config)).betas, dtype=torch.float64)
        theirs = state[prefix + "betas"].double()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
            raise UserError(f"{source}: the stored noise schedule ({prefix}betas) is not the config's (timesteps, "
                            "linear_start, linear_end): pass the config that goes with this checkpoint")
    return present


def refuse_unexpected(state: Mapping[str, torch.Tensor], used: set[str], source: str) -> None:
    extra = sorted(set(state) - used)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{source} has an unexpected entry {extra[0]}{more}: it holds weights the config does not "
                        "describe; pass the config that goes with this checkpoint")


# ------------------------------------------------------------------------------------- building modules


def build_unet(config: Mapping[str, Any], device: str = "cpu") -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**dict(config))


def build_vae(config: Mapping[str, Any], device: str = "cpu") -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**dict(config))


def build_member_encoder(member: OfficialMember, device: str = "cpu") -> nn.Module:
    from codiff.conditions import MaskEncoder, MaskFormat
    from codiff.text_encoder import LDMTextEncoder

    with torch.device(device):
        if member.kind == "text":
            return LDMTextEncoder(**member.text_encoder_args)
        grid = math.isqrt(member.mask_token_dim)
        if grid * grid != member.mask_token_dim:
            raise UserError(f"mask_embed_dim {member.mask_token_dim} is not a square grid of pixels")
        return MaskEncoder(MaskFormat.celebamask_hq(image_size=member.image_size, grid=grid), member.mask_dim)


def encoder_key_map(encoder: nn.Module) -> dict[str, str]:
    from codiff.conditions import MaskEncoder

    return dict(MASK_ENCODER_KEY_MAP) if isinstance(encoder, MaskEncoder) else text_encoder_key_map(encoder)


def _present(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def take_component(
    state: Mapping[str, torch.Tensor], prefixes: Sequence[str], key_map: Mapping[str, str], module: nn.Module,
    what: str, source: str,
) -> set[str]:
    """Load ``module`` from the first of ``prefixes`` the file has. Lightning saves a module shared by several
    parents once per parent (the collaboration file holds each frozen member under two names): every other copy
    present must be identical, and counts as read."""
    present = [p for p in prefixes if _present(state, p)]
    if not present:
        raise UserError(f"{source} has no {what} (no key starts with {' or '.join(prefixes)}): pass the checkpoint "
                        "its config describes")
    used = take_weights(state, present[0], key_map, module, what, source)
    for other in present[1:]:
        for released in key_map.values():
            a, b = state.get(present[0] + released), state.get(other + released)
            if b is None or not torch.equal(a, b.reshape(a.shape) if b.numel() == a.numel() else b):
                raise UserError(f"{source}: {other}{released} differs from {present[0]}{released} (two copies of "
                                f"the {what} that should be one module): the file is inconsistent")
            used.add(other + released)
    return used


def convert_member_weights(
    state: Mapping[str, torch.Tensor], member: OfficialMember, source: str, *, unet_prefixes: Sequence[str],
    encoder_prefixes: Sequence[str], device: str = "meta",
) -> tuple[nn.Module, nn.Module, set[str]]:
    """The member's UNet and condition encoder with the released weights; returns them and the keys read.

    Built on the meta device by default: the file's tensors become the parameters (no random init of 400M
    parameters that would be overwritten anyway)."""
    unet = build_unet(member.unet_config, device)
    encoder = build_member_encoder(member, device)
    used = take_component(state, unet_prefixes, unet_key_map(unet), unet, f"{member.kind} UNet", source)
    used |= take_component(state, encoder_prefixes, encoder_key_map(encoder), encoder,
                           f"{member.kind} condition encoder", source)
    if member.kind == "text":
        used |= {p + k for p in encoder_prefixes for k in TEXT_HEAD_KEYS if p + k in state}
    return unet, encoder, used


def convert_vae_weights(state: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any], source: str,
                        prefixes: Sequence[str], device: str = "meta") -> tuple[nn.Module, set[str]]:
    vae = build_vae(vae_config, device)
    return vae, take_component(state, prefixes, vae_key_map(vae), vae, "VAE", source)


def export_member_state(unet: nn.Module, encoder: nn.Module, vae: Optional[nn.Module] = None,
                        scheduler_config: Optional[Mapping[str, Any]] = None) -> dict[str, torch.Tensor]:
    """A uni-modal model in the released ``LatentDiffusion`` layout (what ``512_{text,mask}.ckpt`` hold)."""
    state = export_weights(unet, unet_key_map(unet), "model.diffusion_model.")
    state.update(export_weights(encoder, encoder_key_map(encoder), "cond_stage_model."))
    if vae is not None:
        vae_map = vae_key_map(vae)
        state.update(export_weights(vae, vae_map, "first_stage_model.", vae_ldm_shapes(vae, vae_map)))
    if scheduler_config is not None:
        from common.schedule import NoiseSchedule

        state["betas"] = torch.as_tensor(NoiseSchedule.from_config(dict(scheduler_config)).betas, dtype=torch.float32)
    return state


def export_vae_state(vae: nn.Module) -> dict[str, torch.Tensor]:
    """The VAE in the released ``AutoencoderKL`` layout (``512_vae.ckpt``, without its training loss)."""
    vae_map = vae_key_map(vae)
    return export_weights(vae, vae_map, "", vae_ldm_shapes(vae, vae_map))


# Where each part of the collaboration file lives. The members' own names come first: they are what the frozen
# members were loaded under; the ``model.*_unet`` / ``cond_stage_model.*`` / ``first_stage_model`` names are the
# same modules seen from the composed model.
COLLABORATION_NAMES = {"mask": "seg_mask", "text": "text"}


def collaboration_prefixes(modality: str) -> dict[str, tuple[str, ...]]:
    name = COLLABORATION_NAMES[modality]
    return {
        "unet": (f"{name}_ldm.model.diffusion_model.", f"model.{name}_unet.diffusion_model."),
        "encoder": (f"{name}_ldm.cond_stage_model.", f"cond_stage_model.{name}_cond_stage_model."),
        "diffuser": (f"model.{name}_confidence_predictor.diffusion_model.",),
        "vae": (f"{name}_ldm.first_stage_model.",),
        "buffers": (f"{name}_ldm.",),
    }


def export_collaboration_state(
    members: Mapping[str, tuple[nn.Module, nn.Module]], diffusers: Mapping[str, nn.Module], vae: nn.Module,
    scheduler_config: Optional[Mapping[str, Any]] = None,
) -> dict[str, torch.Tensor]:
    """A collaboration in the released ``LatentDiffusionCompose`` layout (``512_codiff_mask_text.ckpt``): each
    frozen member under both of its names, the VAE under each member and as ``first_stage_model``."""
    state: dict[str, torch.Tensor] = {}
    vae_map = vae_key_map(vae)
    shapes = vae_ldm_shapes(vae, vae_map)
    for modality, (unet, encoder) in members.items():
        names = collaboration_prefixes(modality)
        for prefix in names["unet"]:
            state.update(export_weights(unet, unet_key_map(unet), prefix))
        for prefix in names["encoder"]:
            state.update(export_weights(encoder, encoder_key_map(encoder), prefix))
        state.update(export_weights(vae, vae_map, names["vae"][0], shapes))
        net = diffusers[modality]
        state.update(export_weights(net, unet_key_map(net), names["diffuser"][0]))
    state.update(export_weights(vae, vae_map, "first_stage_model.", shapes))
    if scheduler_config is not None:
        from common.schedule import NoiseSchedule

        betas = torch.as_tensor(NoiseSchedule.from_config(dict(scheduler_config)).betas, dtype=torch.float32)
        state["betas"] = betas
        for modality in members:
            state[collaboration_prefixes(modality)["buffers"][0] + "betas"] = betas.clone()
    return state


# ----------------------------------------------------------------------------------------- whole files


@dataclass
class ConvertedMember:
    member: OfficialMember
    unet: nn.Module
    encoder: nn.Module


@dataclass
class ConvertedRelease:
    """Everything read from one released file, in project modules (nothing written yet)."""

    kind: str  # "vae", "member" or "collaboration"
    vae: nn.Module
    scheduler_config: Optional[dict] = None
    members: dict[str, ConvertedMember] = field(default_factory=dict)
    diffusers: dict[str, nn.Module] = field(default_factory=dict)
    confidence_input: str = "x_t"


# Released scale factors of the two face VAEs (in the LDM configs; the VAE's own config does not carry one).
RELEASED_SCALE_FACTORS = {512: 0.141, 256: 0.058}


def convert_vae_file(state: Mapping[str, torch.Tensor], model: Mapping[str, Any], source: str,
                     scale_factor: Optional[float]) -> ConvertedRelease:
    params = model["params"]
    ddconfig = _require(params, "ddconfig", source)
    if scale_factor is None:
        scale_factor = RELEASED_SCALE_FACTORS.get(int(ddconfig["resolution"]))
        if scale_factor is None:
            raise UserError(f"{source}: a {ddconfig['resolution']}px VAE has no released latent scale factor: pass "
                            "--scale_factor (the scale_factor of the LDM configs that use it)")
    config = vae_config_from_ldm(ddconfig, int(params["embed_dim"]), scale_factor)
    vae, used = convert_vae_weights(state, config, source, ("",))
    used |= {k for k in state if k.startswith("loss.")}  # the training loss (LPIPS, discriminator): not a network
    refuse_unexpected(state, used, source)
    return ConvertedRelease("vae", vae)


def convert_member_file(state: Mapping[str, torch.Tensor], model: Mapping[str, Any], source: str) -> ConvertedRelease:
    member = parse_member_config(model, source)
    unet, encoder, used = convert_member_weights(state, member, source, unet_prefixes=("model.diffusion_model.",),
                                                 encoder_prefixes=("cond_stage_model.",))
    vae, vae_used = convert_vae_weights(state, member.vae_config, source, ("first_stage_model.",))
    used |= vae_used | check_schedule_buffer(state, "", member.scheduler_config, source)
    refuse_unexpected(state, used, source)
    return ConvertedRelease("member", vae, member.scheduler_config, {member.kind: ConvertedMember(member, unet, encoder)})


def convert_collaboration_file(state: Mapping[str, torch.Tensor], model: Mapping[str, Any], source: str,
                               config_path: PathLike) -> ConvertedRelease:
    from codiff.checkpoint import schedules_agree

    params = model["params"]
    compose = _require(params, "compose_unet_config", source)["params"]
    if compose.get("confidence_conditioning_key", "crossattn") != "crossattn":
        raise UserError(f"{source}: confidence_conditioning_key must be crossattn (the released setting)")
    confidence_input = compose.get("confidence_input", "unet_output")
    diffuser_config = {**unet_config_from_ldm(_require(compose, "confidence_map_predictor_config", source)["params"],
                                              f"{source} confidence_map_predictor_config")}
    scheduler_config = scheduler_config_from_ldm(params, source)
    members: dict[str, ConvertedMember] = {}
    diffusers: dict[str, nn.Module] = {}
    used: set[str] = set()
    for modality, name in COLLABORATION_NAMES.items():
        named = params.get(f"{name}_ldm_config_path")
        if named is None:
            raise UserError(f"{config_path} has no {name}_ldm_config_path: the released collaboration has both the "
                            "mask and the text member")
        member_config = resolve_member_config(config_path, named)
        member = parse_member_config(read_official_config(member_config), str(member_config))
        if member.kind != modality:
            raise UserError(f"{member_config} is a {member.kind} model but the collaboration uses it as {modality}")
        if not schedules_agree(member.scheduler_config, scheduler_config):
            raise UserError(f"{member_config} has another noise schedule than {config_path}: the files do not belong "
                            "together")
        prefixes = collaboration_prefixes(modality)
        unet, encoder, member_used = convert_member_weights(state, member, source, unet_prefixes=prefixes["unet"],
                                                            encoder_prefixes=prefixes["encoder"])
        used |= member_used
        members[modality] = ConvertedMember(member, unet, encoder)
        net = build_unet(diffuser_config, "meta")
        used |= take_component(state, prefixes["diffuser"], unet_key_map(net), net, f"{modality} dynamic diffuser",
                               source)
        diffusers[modality] = net
        used |= check_schedule_buffer(state, prefixes["buffers"][0], scheduler_config, source)
    text_member = members["text"].member
    vae_prefixes = ("first_stage_model.",) + tuple(collaboration_prefixes(m)["vae"][0] for m in ("text", "mask"))
    vae, vae_used = convert_vae_weights(state, text_member.vae_config, source, vae_prefixes)
    used |= vae_used | check_schedule_buffer(state, "", scheduler_config, source)
    refuse_unexpected(state, used, source)
    return ConvertedRelease("collaboration", vae, scheduler_config, members, diffusers, confidence_input)


def needs_tokenizer(config: PathLike) -> bool:
    """Whether the model of an official config reads text (so its conversion needs the BERT tokenizer)."""
    model = read_official_config(config)
    if model["target"] == COLLABORATION_TARGET:
        return True
    cond = model["params"].get("cond_stage_config")
    return model["target"] == LDM_TARGET and isinstance(cond, dict) and cond.get("target") == TEXT_ENCODER_TARGET


def convert_release(checkpoint: PathLike, config: PathLike, scale_factor: Optional[float] = None) -> ConvertedRelease:
    """Read a released ``.ckpt`` with its official config into project modules (strict; writes nothing)."""
    model = read_official_config(config)
    state = read_lightning_state_dict(checkpoint)
    source = str(checkpoint)
    if model["target"] == VAE_TARGET:
        return convert_vae_file(state, model, source, scale_factor)
    if model["target"] == LDM_TARGET:
        return convert_member_file(state, model, source)
    if model["target"] == COLLABORATION_TARGET:
        return convert_collaboration_file(state, model, source, config)
    raise UserError(f"{config} describes {model['target']}, which is not a released Collaborative Diffusion model "
                    "(VAE, uni-modal LatentDiffusion or LatentDiffusionCompose)")


# ------------------------------------------------------------------------------------------------ writing


def load_bert_tokenizer(path: PathLike, vocab_size: int):
    """A local BERT tokenizer folder (``bert-base-uncased``: ``vocab.txt`` / ``tokenizer.json``), offline."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"tokenizer folder {folder} does not exist: pass a local bert-base-uncased folder (the "
                        "released text encoder reads BERT token ids)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder} is not a tokenizer folder ({one_line(str(err))[:200]}): pass a local "
                        "bert-base-uncased folder") from None
    if len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the text encoder only {vocab_size}: "
                        "pass the bert-base-uncased tokenizer")
    return tokenizer


def _save_member(folder: Path, converted: ConvertedMember, scheduler_config: Mapping[str, Any], vae_path: Path,
                 tokenizer, source: str) -> None:
    from codiff.checkpoint import save_member

    info = {"source": Path(source).name, "converted_from": "released LDM checkpoint"}
    if converted.member.kind == "mask":
        save_member(folder, "mask", converted.unet, scheduler_config=scheduler_config, vae_path=vae_path,
                    mask_encoder=converted.encoder, info=info)
    else:
        save_member(folder, "text", converted.unet, scheduler_config=scheduler_config, vae_path=vae_path,
                    text_encoder=converted.encoder, tokenizer=tokenizer,
                    info={**info, "max_length": int(converted.member.text_encoder_args["max_length"])})


def write_converted(converted: ConvertedRelease, output: PathLike, source: str, tokenizer_path: Optional[PathLike]
                    = None) -> Path:
    """Write the project folders of a converted release to ``output``, all or nothing.

    - VAE: a diffusers ``AutoencoderKL`` folder;
    - uni-modal model: a member folder (``codiff_member.json``, ``unet/``, ``mask_encoder/`` or ``text_encoder/`` +
      ``tokenizer/``) with its VAE in ``vae/``;
    - collaboration: a checkpoint folder (``codiff.json``, ``dynamic_diffusers/``) holding ``vae/``, ``mask/`` and
      ``text/``, what ``scripts/codiff/generate.py --model_dir`` and ``scripts/sample.py --method codiff`` load.
    """
    from codiff.checkpoint import save_checkpoint
    from codiff.dynamic import DynamicDiffusers
    from common.io import atomic_write_dir

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output {output} already exists: pass a new folder (converted folders are never merged into "
                        "existing ones)")
    tokenizer = None
    if any(m.member.kind == "text" for m in converted.members.values()):
        if tokenizer_path is None:
            raise UserError("the released text model reads BERT token ids: pass --tokenizer <a local "
                            "bert-base-uncased folder>")
        vocab = next(m.member.text_encoder_args["vocab_size"] for m in converted.members.values()
                     if m.member.kind == "text")
        tokenizer = load_bert_tokenizer(tokenizer_path, vocab)
    with atomic_write_dir(output) as tmp:
        if converted.kind == "vae":
            converted.vae.save_pretrained(tmp, safe_serialization=True)
            return output
        converted.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        if converted.kind == "member":
            (only,) = converted.members.values()
            # the member folder is ``tmp`` itself: write it beside, then move its entries in
            staging = tmp / ".member"
            _save_member(staging, only, converted.scheduler_config, tmp / "vae", tokenizer, source)
            for entry in staging.iterdir():
                entry.rename(tmp / entry.name)
            staging.rmdir()
            _fix_member_vae_path(tmp)
            return output
        for modality, member in converted.members.items():
            _save_member(tmp / modality, member, converted.scheduler_config, tmp / "vae", tokenizer, source)
        dynamic = DynamicDiffusers(converted.diffusers, converted.confidence_input)
        save_checkpoint(tmp, {m: tmp / m for m in converted.members}, dynamic, vae_path=tmp / "vae",
                        scheduler_config=converted.scheduler_config,
                        sampling={"ddim_steps": 50, "eta": 1.0, "guidance_scale": 1.0},
                        info={"source": Path(source).name, "converted_from": "released LDM checkpoint"})
    return output


def _fix_member_vae_path(folder: Path) -> None:
    """A member written one level down and moved up references its VAE as ``../vae``: make it ``vae``."""
    import json

    from codiff.checkpoint import MEMBER_FILE

    meta = json.loads((folder / MEMBER_FILE).read_text())
    meta["vae"] = "vae"
    (folder / MEMBER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
