"""SDG's ADM side: flags -> UNet2DModel (meta-device full size, parameter counts), guided-diffusion checkpoint conversion.

The converter is checked against an independent functional ADM forward written here from guided-diffusion's
``UNetModel`` semantics (ResBlocks with scale-shift norm, legacy per-head qkv attention, res up/down blocks), run on a
synthetic state dict with guided-diffusion's published key layout.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from common.errors import UserError
from common.modules import count_parameters
from sdg.adm import (
    ADMFlags,
    adm_param_shapes,
    adm_parameter_count,
    attention_downsample_rates,
    build_unet,
    channel_mult,
    load_adm_flags,
    noise_schedule,
    sampling_plan,
    unet2d_config,
)
from sdg.convert import convert_adm_state_dict, load_adm_unet
from sdg.tiny import TINY_ADM_FLAGS, tiny_adm_flags


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "sdg"
# guided-diffusion README, "LSUN models" MODEL_FLAGS (the command SDG's README builds on).
LSUN_README_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)


# --------------------------------------------------------------------------------------------------------------
# flags and configs
# --------------------------------------------------------------------------------------------------------------


def test_flags_parse_like_guided_diffusion():
    flags = ADMFlags.from_args(LSUN_README_FLAGS.split() + ["--timestep_respacing", "100"])
    assert flags.num_channels == 256 and flags.learn_sigma is True and flags.class_cond is False
    assert flags.num_heads == 4 and flags.use_new_attention_order is False  # guided-diffusion defaults
    assert channel_mult(flags) == (1, 1, 2, 2, 4, 4)
    assert attention_downsample_rates(flags) == (8, 16, 32)
    paper = load_adm_flags(CONFIGS / "paper.yaml", "lsun")
    assert {k: v for k, v in paper.to_dict().items() if k != "use_fp16"} == {
        k: v for k, v in flags.to_dict().items() if k != "use_fp16"
    }
    with pytest.raises(UserError, match="unknown ADM flag"):
        ADMFlags.from_args(["--num_chanels", "256"])
    with pytest.raises(UserError, match="boolean"):
        ADMFlags.from_dict({"learn_sigma": "maybe"})
    with pytest.raises(UserError, match="no model 'cifar'"):
        load_adm_flags(CONFIGS / "paper.yaml", "cifar")


def test_tiny_config_matches_the_tiny_builder():
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    assert ADMFlags.from_dict(config["models"]["digits"]) == ADMFlags.from_dict(TINY_ADM_FLAGS)


def test_unet_config_follows_the_spec_table():
    lsun = unet2d_config(load_adm_flags(CONFIGS / "paper.yaml", "lsun"))
    assert lsun["block_out_channels"] == (256, 256, 512, 512, 1024, 1024)
    assert lsun["down_block_types"] == ("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3
    assert lsun["up_block_types"] == ("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3
    assert lsun["attn_norm_num_groups"] == 32 and lsun["norm_eps"] == 1e-5 and lsun["out_channels"] == 6
    assert lsun["resnet_time_scale_shift"] == "scale_shift" and lsun["dropout"] == 0.1
    ffhq = unet2d_config(load_adm_flags(CONFIGS / "paper.yaml", "ffhq"))
    r, a = "ResnetDownsampleBlock2D", "AttnDownBlock2D"
    assert ffhq["down_block_types"] == (r, r, r, r, a, r) and ffhq["layers_per_block"] == 1
    assert ffhq["up_block_types"][1] == "AttnUpBlock2D" and ffhq["block_out_channels"][0] == 128


@pytest.mark.parametrize("name, expected", [("lsun", 552_814_086), ("ffhq", 93_563_910)])
def test_full_size_unet_builds_on_meta_with_adm_parameter_count(name, expected):
    flags = load_adm_flags(CONFIGS / "paper.yaml", name)
    unet = build_unet(flags, device="meta")
    n = count_parameters(unet)
    print(f"{name}: UNet2DModel {n:,} parameters (guided-diffusion layout {adm_parameter_count(flags):,})")
    assert next(unet.parameters()).is_meta
    assert n == adm_parameter_count(flags) == expected
    # Full-size key mapping, shapes only: ADM layout -> converter -> exactly the UNet2DModel's keys and shapes.
    adm = {k: torch.empty(s, device="meta") for k, s in adm_param_shapes(flags).items()}
    converted = convert_adm_state_dict(adm, flags, dtype=None)
    target = unet.state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)


def test_unsupported_flags_are_refused():
    with pytest.raises(UserError, match="0.5"):
        unet2d_config(ADMFlags(image_size=512, num_channels=256))
    with pytest.raises(UserError, match="num_head_channels"):  # 4 heads over widths 32 and 64: two head sizes
        unet2d_config(tiny_adm_flags(num_head_channels=-1, num_heads=4, attention_resolutions="32,16"))
    with pytest.raises(UserError, match="multiple of 32"):
        unet2d_config(tiny_adm_flags(num_channels=48))


def test_schedule_and_respacing_follow_adm():
    flags = load_adm_flags(CONFIGS / "paper.yaml", "lsun")
    schedule = noise_schedule(flags)
    assert schedule.betas[0] == pytest.approx(1e-4) and schedule.betas[-1] == pytest.approx(0.02)
    plan = sampling_plan(flags, schedule)
    assert len(plan) == 100
    assert plan.timesteps[:3] == (999, 989, 979) and plan.timesteps[-7:] == (61, 50, 40, 30, 20, 10, 0)


# --------------------------------------------------------------------------------------------------------------
# converter vs an independent ADM forward
# --------------------------------------------------------------------------------------------------------------


def synthetic_adm_state_dict(flags: ADMFlags, seed: int = 0) -> dict:
    """Random weights in guided-diffusion's key layout (fan-in scaled so activations stay O(1)), float64."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in adm_param_shapes(flags).items():
        if len(shape) == 1:
            base = 1.0 if ("norm" in key or "in_layers.0" in key or "out_layers.0" in key or key.startswith("out.0")) \
                and key.endswith("weight") else 0.0
            state[key] = base + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
    return state


def adm_reference_forward(sd, flags, x, t, y=None):
    """guided-diffusion's UNetModel.forward, functionally, from the ADM-keyed state dict."""
    mult, rates = channel_mult(flags), attention_downsample_rates(flags)
    mc, nrb = flags.num_channels, flags.num_res_blocks

    def gn(h, p):
        return F.group_norm(h, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def conv(h, p, stride=1):
        w = sd[f"{p}.weight"]
        return F.conv2d(h, w, sd[f"{p}.bias"], stride=stride, padding=w.shape[-1] // 2)

    half = mc // 2  # ADM computes the sinusoid in float32 whatever the model's dtype
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1).double()
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    def resblock(h, p, up=False, down=False):
        inner = F.silu(gn(h, f"{p}.in_layers.0"))
        if up:
            inner, h = F.interpolate(inner, scale_factor=2, mode="nearest"), F.interpolate(h, scale_factor=2, mode="nearest")
        if down:
            inner, h = F.avg_pool2d(inner, 2), F.avg_pool2d(h, 2)
        inner = conv(inner, f"{p}.in_layers.2")
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[..., None, None]
        if flags.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            inner = gn(inner, f"{p}.out_layers.0") * (1 + scale) + shift
        else:
            inner = gn(inner + e, f"{p}.out_layers.0")
        inner = conv(F.silu(inner), f"{p}.out_layers.3")
        skip = conv(h, f"{p}.skip_connection") if f"{p}.skip_connection.weight" in sd else h
        return skip + inner

    def attention(h, p):
        b, c, hh, ww = h.shape
        flat = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(flat, f"{p}.norm"), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
        heads = c // flags.num_head_channels
        d = c // heads
        if flags.use_new_attention_order:
            q, k, v = (z.reshape(b * heads, d, -1) for z in qkv.chunk(3, dim=1))
        else:  # legacy: split heads first, then q | k | v inside each head
            q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        out = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
        return (flat + out).reshape(b, c, hh, ww)

    h = conv(x, "input_blocks.0.0")
    hs, index, ds = [h], 1, 1
    for level in range(len(mult)):
        for _ in range(nrb):
            h = resblock(h, f"input_blocks.{index}.0")
            if ds in rates:
                h = attention(h, f"input_blocks.{index}.1")
            hs.append(h)
            index += 1
        if level != len(mult) - 1:
            if flags.resblock_updown:
                h = resblock(h, f"input_blocks.{index}.0", down=True)
            else:
                h = conv(h, f"input_blocks.{index}.0.op", stride=2)
            hs.append(h)
            index, ds = index + 1, ds * 2
    h = resblock(attention(resblock(h, "middle_block.0"), "middle_block.1"), "middle_block.2")
    index = 0
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            h = resblock(torch.cat([h, hs.pop()], dim=1), f"output_blocks.{index}.0")
            sub = 1
            if ds in rates:
                h, sub = attention(h, f"output_blocks.{index}.1"), 2
            if level and i == nrb:
                if flags.resblock_updown:
                    h = resblock(h, f"output_blocks.{index}.{sub}", up=True)
                else:
                    h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"output_blocks.{index}.{sub}.conv")
                ds //= 2
            index += 1
    return conv(F.silu(gn(h, "out.0")), "out.2")


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # res up/down, scale-shift norm, legacy multi-head attention (the SDG / LSUN / FFHQ layout)
        {"use_new_attention_order": True},
        {"resblock_updown": False, "use_scale_shift_norm": False, "class_cond": True, "attention_resolutions": "32,16",
         "num_res_blocks": 2, "image_size": 16},
    ],
    ids=["legacy-updown", "new-order", "conv-resample-additive-classcond"],
)
def test_converted_unet_reproduces_adm_forward(overrides, tmp_path):
    flags = tiny_adm_flags(**overrides)
    adm = synthetic_adm_state_dict(flags)
    path = tmp_path / "adm.pt"
    torch.save({k: v.float() for k, v in adm.items()}, path)
    from_file = load_adm_unet(str(path), flags)  # file path -> weights_only load -> convert -> assign into meta
    assert not any(p.is_meta for p in from_file.parameters())
    unet = build_unet(flags, device="meta")
    unet.load_state_dict(convert_adm_state_dict(adm, flags, dtype=None), strict=True, assign=True)
    torch.testing.assert_close(from_file.state_dict(), {k: v.float() for k, v in unet.state_dict().items()})

    size = flags.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([3, 871])
    y = torch.tensor([7, 998]) if flags.class_cond else None
    ours = unet(x, t, class_labels=y).sample
    reference = adm_reference_forward(adm, flags, x, t, y)
    assert ours.shape == (2, 6, size, size)
    assert (ours - reference).abs().max() < 1e-10 * max(1.0, float(reference.abs().max()))


def test_attention_order_matters_for_multi_head_checkpoints():
    """A plain 3-way chunk of a legacy multi-head qkv (diffusers' consistency converter) gives another network."""
    flags = tiny_adm_flags()
    adm = synthetic_adm_state_dict(flags)
    wrong = tiny_adm_flags(use_new_attention_order=True)
    unet = build_unet(flags, device="meta")
    unet.load_state_dict(convert_adm_state_dict(adm, wrong, dtype=None), strict=True, assign=True)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([500])
    assert (unet(x, t).sample - adm_reference_forward(adm, flags, x, t)).abs().max() > 1e-3


def test_converter_refuses_mismatched_checkpoints():
    flags = tiny_adm_flags()
    adm = synthetic_adm_state_dict(flags)
    missing = dict(adm)
    del missing["middle_block.1.qkv.weight"]
    with pytest.raises(UserError, match=r"1 missing key\(s\) \(first: middle_block.1.qkv.weight\).*flags do not match") as err:
        convert_adm_state_dict(missing, flags)
    assert "\n" not in str(err.value)  # one line: what is wrong and which flags to check
    with pytest.raises(UserError, match=r"unexpected key\(s\) \(first: input_blocks.9.0"):
        convert_adm_state_dict({**adm, "input_blocks.9.0.in_layers.0.weight": torch.ones(3)}, flags)
    with pytest.raises(UserError, match=r"out.2.weight has shape \(3, 32, 3, 3\), the flags give \(6, 32, 3, 3\)"):
        convert_adm_state_dict({**adm, "out.2.weight": adm["out.2.weight"][:3], "out.2.bias": adm["out.2.bias"][:3]},
                               flags)
    with pytest.raises(UserError, match="not a state dict"):
        convert_adm_state_dict({"step": 3, "weights": [1, 2]}, flags)
    # DDP prefixes and {"state_dict": ...} wrappers are accepted.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in adm.items()}}
    assert set(convert_adm_state_dict(wrapped, flags)) == set(build_unet(flags, device="meta").state_dict())
