"""ADM ("guided-diffusion", Dhariwal & Nichol 2021) flags -> diffusers ``UNet2DModel``, schedule and sampling plan.

SDG guides frozen, unconditional pixel-space ADM models (LSUN cat/horse/bedroom from OpenAI, FFHQ from ILVR) given by
guided-diffusion's command-line flags (METHOD.md §5). This module reads those flags with guided-diffusion's defaults,
builds the equivalent diffusers ``UNet2DModel`` (on the meta device for the full-size models: no memory), the
noise schedule and the respaced plan, and lays out the guided-diffusion checkpoint keys for the same flags
(:func:`adm_blocks`, used by ``sdg.convert`` and to count ADM's parameters independently of diffusers).

The equivalence: ``ResBlock`` = ``ResnetBlock2D`` (``scale_shift`` = ``use_scale_shift_norm``), res
up/down blocks = ``Resnet{Down,Up}sampleBlock2D`` / ``downsample_type="resnet"``, attention = diffusers ``Attention``
with GroupNorm(32) (``attn_norm_num_groups=32`` is required: without it the middle block's attention has no norm),
``norm_eps=1e-5``, positional time embedding with cosine first and no frequency shift.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

import torch

from common.errors import UserError
from common.schedule import NoiseSchedule, SamplingPlan, make_plan


NUM_CLASSES = 1000  # guided-diffusion's class-conditional models are ImageNet's
ADM_NORM_GROUPS = 32  # guided-diffusion's GroupNorm32


def str2bool(value: Union[str, bool]) -> bool:
    """guided-diffusion's boolean flag parser (``True/False``, ``yes/no``, ``t/f``, ``y/n``, ``1/0``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise UserError(f"expected a boolean flag value (True/False), got {value!r}")


@dataclass
class ADMFlags:
    """guided-diffusion's model and diffusion flags, with its defaults (``model_and_diffusion_defaults()``)."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    dropout: float = 0.0
    class_cond: bool = False
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ADMFlags:
        """Flags from a mapping (a YAML section, parsed argparse ``vars``); unknown names are an error."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"unknown ADM flag(s) {', '.join(unknown)}: valid flags are {', '.join(known)}")
        parsed = {}
        for name, value in values.items():
            kind = known[name]
            try:
                if kind == "bool":
                    parsed[name] = str2bool(value)
                elif kind == "int":
                    parsed[name] = int(value)
                elif kind == "float":
                    parsed[name] = float(value)
                elif isinstance(value, (list, tuple)):  # YAML lists for "32,16,8"-style flags
                    parsed[name] = ",".join(str(int(v)) for v in value)
                else:
                    parsed[name] = "" if value is None else str(value)
            except (TypeError, ValueError):
                raise UserError(f"ADM flag --{name}: cannot read {value!r} as {kind}") from None
        return cls(**parsed)

    @classmethod
    def from_args(cls, argv: Sequence[str]) -> ADMFlags:
        """Flags from a guided-diffusion command line, e.g. ``["--num_channels", "256", "--learn_sigma", "True"]``."""
        parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
        add_adm_arguments(parser)
        try:
            namespace, rest = parser.parse_known_args(list(argv))
        except argparse.ArgumentError as err:
            raise UserError(f"bad ADM flag: {err}") from None
        if rest:
            raise UserError(f"unknown ADM flag(s): {' '.join(rest)}")
        return cls.from_dict(vars(namespace))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_adm_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ADM flag with guided-diffusion's name, default and parsing (``add_dict_to_argparser``)."""
    for f in fields(ADMFlags):
        kind = {"bool": str2bool, "int": int, "float": float}.get(f.type, str)
        parser.add_argument(f"--{f.name}", default=f.default, type=kind)


# ------------------------------------------------------------------------------------------------ derived layout


def channel_mult(flags: ADMFlags) -> tuple[int, ...]:
    """guided-diffusion's per-resolution default multipliers, or the explicit ``--channel_mult``."""
    if flags.channel_mult:
        try:
            return tuple(int(m) for m in flags.channel_mult.split(","))
        except ValueError:
            raise UserError(f"--channel_mult must be integers like 1,1,2,2,4,4, got {flags.channel_mult!r}") from None
    defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if flags.image_size == 512:
        raise UserError("ADM's 512 px default channel_mult starts at 0.5, which diffusers' UNet2DModel cannot express")
    if flags.image_size not in defaults:
        raise UserError(f"no default channel_mult for image size {flags.image_size}: pass --channel_mult")
    return defaults[flags.image_size]


def attention_downsample_rates(flags: ADMFlags) -> tuple[int, ...]:
    """``--attention_resolutions`` (feature-map sizes) as downsample rates ``image_size // r`` (as ADM does)."""
    try:
        return tuple(flags.image_size // int(r) for r in flags.attention_resolutions.split(",") if r.strip())
    except ValueError:
        raise UserError(f"--attention_resolutions must be sizes like 32,16,8, got {flags.attention_resolutions!r}") from None


def _widths(flags: ADMFlags) -> list[int]:
    return [m * flags.num_channels for m in channel_mult(flags)]


def _attention_levels(flags: ADMFlags) -> list[bool]:
    rates = attention_downsample_rates(flags)
    return [2**level in rates for level in range(len(channel_mult(flags)))]


def attention_head_dim(flags: ADMFlags) -> int:
    """One attention head size for every attention layer (diffusers has a single ``attention_head_dim``)."""
    widths = _widths(flags)
    attended = [w for w, a in zip(widths, _attention_levels(flags)) if a] + [widths[-1]]  # + the middle block
    if flags.num_head_channels != -1:
        bad = [w for w in attended if w % flags.num_head_channels]
        if bad:
            raise UserError(f"attention width {bad[0]} is not divisible by --num_head_channels {flags.num_head_channels}")
        return flags.num_head_channels
    dims = {w // flags.num_heads for w in attended}
    if any(w % flags.num_heads for w in attended) or len(dims) != 1:
        raise UserError(
            f"--num_heads {flags.num_heads} gives different head sizes at attention widths {sorted(set(attended))}, "
            "which diffusers' UNet2DModel (one attention_head_dim) cannot express: use --num_head_channels"
        )
    return dims.pop()


def check_supported(flags: ADMFlags) -> None:
    """Refuse flag combinations our UNet2DModel equivalent does not reproduce, with the reason."""
    mult = channel_mult(flags)
    if mult[0] != 1:
        raise UserError(f"channel_mult must start at 1 (the time embedding is sized by it), got {mult[0]}")
    bad = [w for w in _widths(flags) if w % ADM_NORM_GROUPS]
    if bad:
        raise UserError(f"ADM normalises with GroupNorm(32): every width must be a multiple of 32, got {bad[0]}")
    if flags.num_heads_upsample not in (-1, flags.num_heads):
        raise UserError("--num_heads_upsample differs from --num_heads: deprecated in ADM and not supported here")
    if flags.rescale_timesteps and flags.diffusion_steps != 1000:
        raise UserError("--rescale_timesteps with diffusion_steps != 1000 feeds the model fractional t: not supported")
    if flags.noise_schedule not in ("linear", "cosine"):
        raise UserError(f"unknown --noise_schedule {flags.noise_schedule!r}: ADM has linear and cosine")
    attention_head_dim(flags)


def unet2d_config(flags: ADMFlags) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` keyword arguments equivalent to ADM ``flags``."""
    check_supported(flags)
    attn = _attention_levels(flags)
    down_plain = "ResnetDownsampleBlock2D" if flags.resblock_updown else "DownBlock2D"
    up_plain = "ResnetUpsampleBlock2D" if flags.resblock_updown else "UpBlock2D"
    config: dict[str, Any] = dict(
        sample_size=flags.image_size,
        in_channels=3,
        out_channels=6 if flags.learn_sigma else 3,
        layers_per_block=flags.num_res_blocks,
        block_out_channels=tuple(_widths(flags)),
        down_block_types=tuple("AttnDownBlock2D" if a else down_plain for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else up_plain for a in reversed(attn)),
        downsample_type="resnet" if flags.resblock_updown else "conv",
        upsample_type="resnet" if flags.resblock_updown else "conv",
        resnet_time_scale_shift="scale_shift" if flags.use_scale_shift_norm else "default",
        attention_head_dim=attention_head_dim(flags),
        norm_num_groups=ADM_NORM_GROUPS,
        attn_norm_num_groups=ADM_NORM_GROUPS,
        norm_eps=1e-5,
        act_fn="silu",
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        dropout=flags.dropout,
    )
    if flags.class_cond:
        config["num_class_embeds"] = NUM_CLASSES
    return config


def build_unet(flags: ADMFlags, device: Optional[Union[str, torch.device]] = None):
    """The ``UNet2DModel`` for ``flags``, randomly initialised, in eval mode.

    ``device="meta"`` builds shapes only (no memory, well under a second for the 552M-parameter LSUN model): count
    parameters, check a checkpoint's keys and shapes, or ``load_state_dict(..., assign=True)`` real weights into it.
    """
    from diffusers import UNet2DModel

    config = unet2d_config(flags)
    if device is None:
        return UNet2DModel(**config).eval()
    with torch.device(device):
        return UNet2DModel(**config).eval()




def noise_schedule(flags: ADMFlags) -> NoiseSchedule:
    """ADM's ``get_named_beta_schedule``: linear scaled by 1000/T (1e-4..0.02 at T=1000) or cosine (eq. 17)."""
    steps = flags.diffusion_steps
    if flags.noise_schedule == "linear":
        scale = 1000 / steps
        return NoiseSchedule.named("linear", steps, beta_start=scale * 1e-4, beta_end=scale * 0.02)
    if flags.noise_schedule == "cosine":
        return NoiseSchedule.named("squaredcos_cap_v2", steps)
    raise UserError(f"unknown --noise_schedule {flags.noise_schedule!r}: ADM has linear and cosine")


def sampling_plan(flags: ADMFlags, schedule: Optional[NoiseSchedule] = None) -> SamplingPlan:
    """The respaced chain of ``--timestep_respacing`` (empty = every step); the network sees original t."""
    schedule = schedule or noise_schedule(flags)
    return make_plan(schedule, flags.timestep_respacing or str(flags.diffusion_steps))


# ------------------------------------------------------------------------------------------------ checkpoint layout


@dataclass(frozen=True)
class ADMBlock:
    """One module of guided-diffusion's ``UNetModel`` and its diffusers counterpart.

    ``kind``: ``resblock`` | ``attention`` | ``conv`` | ``norm`` | ``linear`` | ``embedding``; ``adm`` and ``diffusers``
    are module prefixes (``input_blocks.1.0`` <-> ``down_blocks.0.resnets.0``); ``channels`` are (in, out).
    """

    kind: str
    adm: str
    diffusers: str
    channels: tuple[int, int]
    kernel: int = 3


def adm_blocks(flags: ADMFlags) -> Iterator[ADMBlock]:
    """guided-diffusion's ``UNetModel`` module by module, in its construction order, for ``flags``.

    Walks the same loops as ADM's constructor: ``input_blocks`` (conv_in, per level ``num_res_blocks`` ResBlocks with
    attention where ``2^level`` is an attention rate, then a down ResBlock or strided conv), ``middle_block``
    (ResBlock, attention, ResBlock), ``output_blocks`` (per level ``num_res_blocks + 1`` ResBlocks on the
    concatenated skip, attention, then an up ResBlock or conv), ``out`` (GroupNorm, conv).
    """
    check_supported(flags)
    widths, attn = _widths(flags), _attention_levels(flags)
    mc, emb = flags.num_channels, 4 * flags.num_channels
    yield ADMBlock("linear", "time_embed.0", "time_embedding.linear_1", (mc, emb))
    yield ADMBlock("linear", "time_embed.2", "time_embedding.linear_2", (emb, emb))
    if flags.class_cond:
        yield ADMBlock("embedding", "label_emb", "class_embedding", (NUM_CLASSES, emb))
    ch = widths[0]
    yield ADMBlock("conv", "input_blocks.0.0", "conv_in", (3, ch))
    skips, index = [ch], 1
    for level, width in enumerate(widths):
        for i in range(flags.num_res_blocks):
            yield ADMBlock("resblock", f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{i}", (ch, width))
            ch = width
            if attn[level]:
                yield ADMBlock("attention", f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{i}", (ch, ch))
            skips.append(ch)
            index += 1
        if level != len(widths) - 1:
            target = f"down_blocks.{level}.downsamplers.0"
            if flags.resblock_updown:
                yield ADMBlock("resblock", f"input_blocks.{index}.0", target, (ch, ch))
            else:
                yield ADMBlock("conv", f"input_blocks.{index}.0.op", f"{target}.conv", (ch, ch))
            skips.append(ch)
            index += 1
    yield ADMBlock("resblock", "middle_block.0", "mid_block.resnets.0", (ch, ch))
    yield ADMBlock("attention", "middle_block.1", "mid_block.attentions.0", (ch, ch))
    yield ADMBlock("resblock", "middle_block.2", "mid_block.resnets.1", (ch, ch))
    index = 0
    for up, level in enumerate(reversed(range(len(widths)))):
        width = widths[level]
        for i in range(flags.num_res_blocks + 1):
            skip = skips.pop()
            yield ADMBlock("resblock", f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{i}", (ch + skip, width))
            ch, sub = width, 1
            if attn[level]:
                yield ADMBlock("attention", f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{i}", (ch, ch))
                sub = 2
            if level and i == flags.num_res_blocks:
                target = f"up_blocks.{up}.upsamplers.0"
                if flags.resblock_updown:
                    yield ADMBlock("resblock", f"output_blocks.{index}.{sub}", target, (ch, ch))
                else:
                    yield ADMBlock("conv", f"output_blocks.{index}.{sub}.conv", f"{target}.conv", (ch, ch))
            index += 1
    yield ADMBlock("norm", "out.0", "conv_norm_out", (ch, ch))
    yield ADMBlock("conv", "out.2", "conv_out", (widths[0], 6 if flags.learn_sigma else 3))


def _adm_block_shapes(block: ADMBlock, flags: ADMFlags) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one guided-diffusion module, keyed by its full ADM name."""
    c_in, c_out = block.channels
    p = block.adm
    if block.kind == "linear":
        return {f"{p}.weight": (c_out, c_in), f"{p}.bias": (c_out,)}
    if block.kind == "embedding":
        return {f"{p}.weight": (c_in, c_out)}
    if block.kind == "conv":
        return {f"{p}.weight": (c_out, c_in, block.kernel, block.kernel), f"{p}.bias": (c_out,)}
    if block.kind == "norm":
        return {f"{p}.weight": (c_out,), f"{p}.bias": (c_out,)}
    if block.kind == "attention":
        return {
            f"{p}.norm.weight": (c_in,), f"{p}.norm.bias": (c_in,),
            f"{p}.qkv.weight": (3 * c_in, c_in, 1), f"{p}.qkv.bias": (3 * c_in,),
            f"{p}.proj_out.weight": (c_in, c_in, 1), f"{p}.proj_out.bias": (c_in,),
        }
    emb = 4 * flags.num_channels
    shapes = {
        f"{p}.in_layers.0.weight": (c_in,), f"{p}.in_layers.0.bias": (c_in,),
        f"{p}.in_layers.2.weight": (c_out, c_in, 3, 3), f"{p}.in_layers.2.bias": (c_out,),
        f"{p}.emb_layers.1.weight": ((2 if flags.use_scale_shift_norm else 1) * c_out, emb),
        f"{p}.emb_layers.1.bias": ((2 if flags.use_scale_shift_norm else 1) * c_out,),
        f"{p}.out_layers.0.weight": (c_out,), f"{p}.out_layers.0.bias": (c_out,),
        f"{p}.out_layers.3.weight": (c_out, c_out, 3, 3), f"{p}.out_layers.3.bias": (c_out,),
    }
    if c_in != c_out:  # ADM's 1x1 skip convolution (use_conv=False in UNetModel)
        shapes[f"{p}.skip_connection.weight"] = (c_out, c_in, 1, 1)
        shapes[f"{p}.skip_connection.bias"] = (c_out,)
    return shapes


def adm_param_shapes(flags: ADMFlags) -> dict[str, tuple[int, ...]]:
    """Every key of a guided-diffusion ``UNetModel`` state dict for ``flags`` with its shape (the checkpoint layout)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for block in adm_blocks(flags):
        shapes.update(_adm_block_shapes(block, flags))
    return shapes


def adm_parameter_count(flags: ADMFlags) -> int:
    """ADM's parameter count for ``flags``, from its own layout (independent of diffusers)."""
    total = 0
    for shape in adm_param_shapes(flags).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def load_adm_flags(config_path, model: Optional[str] = None) -> ADMFlags:
    """ADM flags of ``models.<model>`` (default ``default_model``) in an SDG YAML config (``configs/sdg/*.yaml``)."""
    import yaml

    from common.io import require_file

    path = require_file(config_path, "SDG config")
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    models = config.get("models") or {}
    name = model or config.get("default_model")
    if name not in models:
        raise UserError(f"{path} has no model {name!r}: choose one of {', '.join(models) or '(none)'}")
    return ADMFlags.from_dict(models[name])
