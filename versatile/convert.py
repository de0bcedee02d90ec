"""Weights of the released Versatile Diffusion checkpoints <-> :class:`MultiFlowDiffuser`.

Layouts (all describe the same tensors; only names, nesting and the text 1x1-conv shapes differ):

- ``vd-r0``: [R0] ``model.diffusion_model.{time_embed, unet_image.*, unet_text.*}`` with OpenAI-UNet naming
  (``input_blocks.i.j``, ``middle_block.j``, ``output_blocks.i.j``, ``out``); what diffusers' converter reads.
- ``vd-r1``: [R] ``diffuser.image.{time_embed, data_blocks.k.0, context_blocks.k.0}`` and
  ``diffuser.text.{data_blocks.k.0, context_blocks.k.0}`` (``vd-four-flow-v1-0.pth``).
- ``diffusers``: the hub folder's ``image_unet.*`` (``UNet2DConditionModel``) and ``text_unet.*``
  (``UNetFlatConditionModel``); the time embedding is stored twice (equal copies) and loads into the one global
  module.
- ``sd-unet``: a Stable Diffusion v1 ``UNet2DConditionModel`` state dict, to initialise the global and image data
  layers and (copies of) the context sets, as VD's first training stage starts from SD v1.4.
- ``native``: our own ``state_dict()`` keys.

In every layout the image-context transformers live with the image UNet and the text-context ones with the text
UNet ([R0] ``mixed_run``, [R] ``apply_model``). The mapping is derived from :func:`versatile.multiflow.layer_plan`,
so it holds for any size. Loading is strict: a missing weight is a :class:`UserError` naming the layer groups
(and so the flows) it breaks, an unexpected one under the layout's prefix is a :class:`UserError` too, and a
shape that does not fit the config is reported, never skipped ([R] ``app.py`` loads with ``strict=False``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from common.errors import UserError
from versatile.config import DiffuserConfig
from versatile.multiflow import FLOWS, GROUPS, MultiFlowDiffuser, Step, build_diffuser


LAYOUTS = ("vd-r0", "vd-r1", "diffusers", "sd-unet", "native")
# Keys under these prefixes must all be consumed; keys outside them (VAE, CLIP, EMA, schedule buffers) are ignored.
PREFIXES = {
    "vd-r0": ("model.diffusion_model.",),
    "vd-r1": ("diffuser.",),
    "diffusers": ("image_unet.", "text_unet."),
    "sd-unet": ("",),
    "native": ("",),
}

# Sub-module renames inside one layer: ours -> [R]/[R0] (OpenAI UNet internals) and ours -> diffusers.
_OPENAI_SUBS = {
    ("image", "res"): {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                       "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    ("image", "down"): {"conv": "op"},
    ("image", "up"): {"conv": "conv"},
    ("image", "head"): {"norm": "0", "conv": "2"},
    ("text", "res"): {"norm1": "in_layers.0", "fc1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                      "norm2": "out_layers.0", "fc2": "out_layers.3", "shortcut": "skip_connection"},
    ("text", "head"): {"norm": "0", "linear": "2"},
}
_DIFFUSERS_SUBS = {
    ("text", "res"): {"fc1": "conv1", "fc2": "conv2", "shortcut": "conv_shortcut"},
}
_FC_AS_CONV = {"fc1", "fc2", "shortcut"}  # text ResBlock linears stored as 1x1 convs [out, in, 1, 1] by [R]/[D]
_GLOBAL_OPENAI = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


@dataclass(frozen=True)
class KeyRule:
    """One of our tensors and where it lives in a layout (several places when the layout duplicates it)."""

    ours: str
    theirs: tuple[str, ...]
    group: str
    conv1x1: bool = False  # ours [out, in] <-> theirs [out, in, 1, 1]


@dataclass
class ConversionReport:
    """What a load consumed: ``layout``, ``loaded`` count, keys ``ignored`` (outside the layout's prefixes)."""

    layout: str
    loaded: int
    ignored: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# addresses of each plan step in each layout
# --------------------------------------------------------------------------------------------------------------


def _openai_addresses(plan: tuple[Step, ...]) -> Iterator[tuple[Step, str]]:
    """[R0] module paths: input blocks close at each skip push, output blocks open at each skip pop."""
    block, slot, mid, out_block = 0, 0, 0, -1
    for step in plan:
        if step.op == "S":
            block, slot = block + 1, 0
        elif step.op == "L":
            out_block, slot = out_block + 1, 0
        elif step.phase == "in":
            yield step, f"input_blocks.{block}.{slot}"
            slot += 1
        elif step.phase == "mid":
            yield step, f"middle_block.{mid}"
            mid += 1
        elif step.role == "head":
            yield step, "out"
        else:
            yield step, f"output_blocks.{out_block}.{slot}"
            slot += 1


def _diffusers_address(step: Step, levels: int) -> str:
    """diffusers UNet module paths (``down_blocks.L.resnets.i`` ...)."""
    if step.role == "stem":
        return "conv_in"
    if step.role == "head":
        return ""  # split into conv_norm_out / conv_out by sub-module
    kind = "attentions" if step.op == "c" else "resnets"
    if step.phase == "mid":
        return f"mid_block.{kind}.{step.index}"
    if step.role == "down":
        return f"down_blocks.{step.level}.downsamplers.0"
    if step.role == "up":
        return f"up_blocks.{levels - 1 - step.level}.upsamplers.0"
    if step.phase == "in":
        return f"down_blocks.{step.level}.{kind}.{step.index}"
    return f"up_blocks.{levels - 1 - step.level}.{kind}.{step.index}"


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _rename(sub: str, table: Mapping[str, str]) -> str:
    """Rename the first component(s) of ``sub`` (``norm1.weight`` -> ``in_layers.0.weight``)."""
    for ours, theirs in table.items():
        if sub == ours or sub.startswith(ours + "."):
            return theirs + sub[len(ours):]
    return sub


def key_rules(config: DiffuserConfig, layout: str, model: Optional[MultiFlowDiffuser] = None) -> list[KeyRule]:
    """Every parameter of the diffuser with its name(s) in ``layout`` (in our ``state_dict`` order)."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown checkpoint layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    model = model if model is not None else build_diffuser(config, device="meta")
    plan, levels = model.plan, len(config.channel_mult)
    data_steps = [s for s in plan if s.op == "d"]
    ctx_steps = [s for s in plan if s.op == "c"]
    openai = {id(s): address for s, address in _openai_addresses(plan)}
    rules = []
    for name in model.state_dict():
        parts = name.split(".")
        if parts[0] == "global_layers":
            sub = ".".join(parts[1:])
            rules.append(KeyRule(name, _global_keys(layout, sub), "global"))
            continue
        kind, xtype, k, sub = parts[0], parts[1], int(parts[3]), ".".join(parts[4:])
        step = (data_steps if kind == "data" else ctx_steps)[k]
        group = f"data_{xtype}" if kind == "data" else f"ctx_{xtype}"
        conv1x1 = (kind == "data" and xtype == "text" and step.role == "res" and sub.split(".")[0] in _FC_AS_CONV
                   and sub.endswith(".weight"))
        if layout == "native":
            theirs: tuple[str, ...] = (name,)
            conv1x1 = False
        elif layout in ("vd-r0", "vd-r1"):
            local = sub if kind == "context" else _rename(sub, _OPENAI_SUBS.get((xtype, step.role), {}))
            if layout == "vd-r0":
                theirs = (f"model.diffusion_model.unet_{xtype}.{_join(openai[id(step)], local)}",)
            else:
                blocks = "data_blocks" if kind == "data" else "context_blocks"
                theirs = (f"diffuser.{xtype}.{blocks}.{k}.0.{local}" if local else f"diffuser.{xtype}.{blocks}.{k}.0",)
        else:  # diffusers / sd-unet
            local = sub if kind == "context" else _rename(sub, _DIFFUSERS_SUBS.get((xtype, step.role), {}))
            address = _diffusers_address(step, levels)
            if step.role == "head":
                address, local = ("conv_norm_out", local[len("norm."):]) if local.startswith("norm.") else (
                    "conv_out", local.split(".", 1)[1])
            if layout == "diffusers":
                theirs = (f"{xtype}_unet.{_join(address, local)}",)
            elif group in ("data_image", "ctx_text", "ctx_image"):
                theirs = (_join(address, local),)  # sd-unet: both context sets start from SD's transformers
            else:
                theirs = ()  # sd-unet has no text data layers
            conv1x1 = conv1x1 and layout == "diffusers"
        rules.append(KeyRule(name, theirs, group, conv1x1))
    return rules


def _global_keys(layout: str, sub: str) -> tuple[str, ...]:
    if layout == "native":
        return (f"global_layers.{sub}",)
    if layout in ("vd-r0", "vd-r1"):
        local = _rename(sub, _GLOBAL_OPENAI)
        return (f"model.diffusion_model.{local}",) if layout == "vd-r0" else (f"diffuser.image.{local}",)
    if layout == "diffusers":
        return (f"image_unet.{sub}", f"text_unet.{sub}")  # [D]'s converter writes the same tensors to both
    return (sub,)


# --------------------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------------------


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The layout of a state dict from its key prefixes (``native`` / ``vd-r1`` / ``vd-r0`` / ``diffusers``)."""
    keys = list(state_dict)
    for layout, marker in (("native", "global_layers."), ("vd-r1", "diffuser."),
                           ("vd-r0", "model.diffusion_model."), ("diffusers", "image_unet.")):
        if any(k.startswith(marker) for k in keys):
            return layout
    if any(k.startswith("down_blocks.") for k in keys) and any(k.startswith("time_embedding.") for k in keys):
        return "sd-unet"
    raise UserError("cannot tell the checkpoint layout from its keys: pass layout= one of " + ", ".join(LAYOUTS))


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    layout: str,
    config: DiffuserConfig,
    model: Optional[MultiFlowDiffuser] = None,
    keep: Optional[Mapping[str, torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """A layout's state dict -> our state dict, strictly (module docstring). Returns ``(state_dict, report)``.

    ``keep``: our own tensors for the groups a layout does not hold at all (``sd-unet`` has no text data layers);
    anything else the layout should hold but lacks is a :class:`UserError`, and nothing is returned.
    """
    model = model if model is not None else build_diffuser(config, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: dict[str, list[str]] = {}
    for rule in key_rules(config, layout, model):
        if not rule.theirs and keep is not None and rule.ours in keep:
            out[rule.ours] = keep[rule.ours]
            continue
        absent = [k for k in rule.theirs if k not in state_dict] if rule.theirs else [rule.ours]
        if absent:
            missing.setdefault(rule.group, []).append(absent[0])
            continue
        tensor = state_dict[rule.theirs[0]]
        for other in rule.theirs[1:]:
            if not torch.equal(state_dict[other], tensor):
                raise UserError(f"{other} differs from {rule.theirs[0]}: VD shares ONE time embedding between flows; "
                                "make both copies equal (e.g. copy image_unet's) before loading")
        if rule.conv1x1 and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        if tuple(tensor.shape) != shapes[rule.ours]:
            raise UserError(f"{rule.theirs[0]} has shape {list(tensor.shape)} but this config expects "
                            f"{list(shapes[rule.ours])}: the checkpoint was made with different sizes")
        out[rule.ours] = tensor
        used.update(rule.theirs)
    if missing:
        raise UserError(_missing_message(layout, missing))
    scope = PREFIXES[layout]
    unexpected = [k for k in state_dict if k.startswith(scope) and k not in used]
    if unexpected:
        raise UserError(f"{len(unexpected)} {layout} weights have no place in this diffuser (e.g. {unexpected[0]}): "
                        "the checkpoint is another model or was made with a different config")
    ignored = sorted(k for k in state_dict if not k.startswith(scope))
    return out, ConversionReport(layout, len(used), ignored)


def export_state_dict(model: MultiFlowDiffuser, layout: str) -> dict[str, torch.Tensor]:
    """Our weights written in ``layout`` (the inverse of :func:`convert_state_dict`; duplicates written twice)."""
    if layout == "sd-unet":
        raise UserError("sd-unet is an import-only layout (it has no text data layers)")
    ours = model.state_dict()
    out = {}
    for rule in key_rules(model.config, layout, model):
        tensor = ours[rule.ours]
        if rule.conv1x1:
            tensor = tensor[:, :, None, None]
        for key in rule.theirs:
            out[key] = tensor
    return out


def load_diffuser_weights(
    model: MultiFlowDiffuser,
    source: Union[str, Path, Mapping[str, torch.Tensor]],
    layout: Optional[str] = None,
) -> ConversionReport:
    """Load a checkpoint (file, diffusers folder or state dict) of any layout into ``model``, strictly.

    ``sd-unet`` (an SD v1 UNet) fills the global and image-data layers and BOTH context sets with SD's
    transformers; the text data layers keep their current weights (the plausible stage-1 init: the released code does not say).
    """
    state_dict = read_checkpoint(source) if not isinstance(source, Mapping) else source
    layout = layout or detect_layout(state_dict)
    keep = {k: v for k, v in model.state_dict().items() if k.startswith("data.text.")} if layout == "sd-unet" else None
    converted, report = convert_state_dict(state_dict, layout, model.config, model, keep=keep)
    model.load_state_dict(converted, strict=True)  # complete by construction; strict guards against drift
    return report


def _missing_message(layout: str, missing: Mapping[str, list[str]]) -> str:
    groups = [g for g in GROUPS if g in missing]
    broken = [f.name for f in FLOWS.values() if set(f.groups) & set(groups)]
    count = sum(len(v) for v in missing.values())
    example = missing[groups[0]][0]
    return (f"the {layout} checkpoint lacks {count} weights of {', '.join(groups)} (e.g. {example}), so flows "
            f"{', '.join(broken)} cannot run: pass a complete checkpoint (nothing was loaded)")


def read_checkpoint(source: Union[str, Path]) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a .safetensors / .pth / .ckpt file or a diffusers VD folder.

    A diffusers folder contributes ``image_unet/`` and ``text_unet/`` weights, prefixed accordingly. Pickles are
    read with ``weights_only=True`` (``common.io.safe_torch_load``); a ``{"state_dict": ...}`` wrapper is opened.
    """
    from common.io import load_safetensors, safe_torch_load

    path = Path(source)
    if path.is_dir():
        out = {}
        for sub in ("image_unet", "text_unet"):
            files = sorted((path / sub).glob("diffusion_pytorch_model*.safetensors")) or sorted(
                (path / sub).glob("diffusion_pytorch_model*.bin"))
            if not files:
                raise UserError(f"{path} has no {sub}/diffusion_pytorch_model weights: pass a Versatile Diffusion "
                                "diffusers folder or a checkpoint file")
            for file in files:
                part = load_safetensors(file) if file.suffix == ".safetensors" else safe_torch_load(file)
                out.update({f"{sub}.{k}": v for k, v in part.items()})
        return out
    loaded = safe_torch_load(path)
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a flat name -> tensor state dict")
    return dict(loaded)



# --------------------------------------------------------------------------------------------------------------
# our own folder format
# --------------------------------------------------------------------------------------------------------------

DIFFUSER_CONFIG = "diffuser_config.json"
DIFFUSER_WEIGHTS = "diffuser.safetensors"


def save_diffuser(
    model: MultiFlowDiffuser,
    folder: Union[str, Path],
    dtype: Optional[torch.dtype] = None,
    shard_by_group: bool = False,
) -> Path:
    """Write ``diffuser_config.json`` + native-key weights into ``folder``, atomically.

    One ``diffuser.safetensors``, or with ``shard_by_group`` one ``diffuser-<group>.safetensors`` per layer group
    (``global``, ``data_image``, ``data_text``, ``ctx_image``, ``ctx_text``), so a flow's layers can be shipped,
    replaced or found missing on their own. ``dtype`` (e.g. ``torch.float16``) converts floating tensors for
    storage; :func:`load_diffuser` casts them back to the model's dtype.
    """
    import dataclasses
    import json

    from common.io import atomic_write_dir, save_safetensors

    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_write_dir(folder) as tmp:
        (tmp / DIFFUSER_CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        if not shard_by_group:
            save_safetensors(state, tmp / DIFFUSER_WEIGHTS, metadata={"format": "versatile-native"})
        else:
            owner = {rule.ours: rule.group for rule in key_rules(model.config, "native", model)}
            for group in GROUPS:
                part = {k: v for k, v in state.items() if owner[k] == group}
                save_safetensors(part, tmp / f"diffuser-{group}.safetensors",
                                 metadata={"format": "versatile-native", "group": group})
    return Path(folder)


def read_diffuser_weights(folder: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The native state dict of a :func:`save_diffuser` folder (one file, or the per-group shards merged)."""
    from common.io import load_safetensors

    folder = Path(folder)
    single = folder / DIFFUSER_WEIGHTS
    shards = sorted(folder.glob("diffuser-*.safetensors"))
    if single.is_file():
        return load_safetensors(single)
    if not shards:
        raise UserError(f"{folder} holds no {DIFFUSER_WEIGHTS} nor diffuser-<group>.safetensors shards: "
                        "pass a folder written by versatile.convert.save_diffuser")
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_safetensors(shard))
    return out


def load_diffuser(folder: Union[str, Path], device=None) -> MultiFlowDiffuser:
    """A :class:`MultiFlowDiffuser` from a :func:`save_diffuser` folder (config and weights checked strictly)."""
    import json

    folder = Path(folder)
    config_path = folder / DIFFUSER_CONFIG
    if not config_path.is_file():
        raise UserError(f"{folder} has no {DIFFUSER_CONFIG}: pass a folder written by versatile.convert.save_diffuser")
    try:
        fields = json.loads(config_path.read_text())
        config = DiffuserConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (ValueError, TypeError) as err:
        raise UserError(f"{config_path} is not a valid diffuser config ({' '.join(str(err).split())})") from None
    model = build_diffuser(config, device=device)
    load_diffuser_weights(model, read_diffuser_weights(folder), layout="native")
    return model.eval()
