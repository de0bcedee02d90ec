"""Checkpoint layouts of Versatile Diffusion -> MultiFlowDiffuser: strict, lossless, and checked against diffusers."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from common.io import save_safetensors
from versatile.convert import (
    LAYOUTS,
    convert_state_dict,
    detect_layout,
    export_state_dict,
    load_diffuser_weights,
    read_checkpoint,
)
from versatile.multiflow import Context
from versatile.tiny import tiny_config, tiny_diffuser


pytestmark = pytest.mark.filterwarnings("ignore:`scale` is deprecated:FutureWarning")  # diffusers' own Flat blocks


def diffusers_unets(seed: int = 0):
    """The [D] hub pair at tiny size: ``UNet2DConditionModel`` + ``UNetFlatConditionModel`` (random weights)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    cfg = tiny_config().diffuser
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    common = dict(block_out_channels=widths, layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                  attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_num_groups, norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=down,
                                     up_block_types=up, **common).eval()
        text = UNetFlatConditionModel(
            in_channels=(cfg.text_latent_dim, 1, 1), out_channels=(cfg.text_latent_dim, 1, 1),
            down_block_types=tuple(b.replace("2D", "Flat") for b in down),
            up_block_types=tuple(b.replace("2D", "Flat") for b in up), **common).eval()
    text.time_embedding.load_state_dict(image.time_embedding.state_dict())  # [D]'s converter copies the same tensors
    return image, text


def hub_state_dict(image, text):
    return {**{f"image_unet.{k}": v for k, v in image.state_dict().items()},
            **{f"text_unet.{k}": v for k, v in text.state_dict().items()}}


@pytest.fixture(scope="module")
def unets():
    return diffusers_unets()


@pytest.fixture(scope="module")
def source():
    return tiny_diffuser(seed=7, zero_init=False)


def test_hub_layout_reproduces_diffusers_outputs(unets):
    """The [D] hub weights in our diffuser give diffusers' own eps for image variation and text variation."""
    image_unet, text_unet = unets
    model = tiny_diffuser(seed=1)
    report = load_diffuser_weights(model, hub_state_dict(image_unet, text_unet))
    assert report.layout == "diffusers" and report.ignored == []
    assert report.loaded == len(image_unet.state_dict()) + len(text_unet.state_dict())  # both time embeddings read
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, cfg.text_latent_dim, generator=g)
    c, t = torch.randn(2, 5, cfg.context_dim, generator=g), torch.tensor([3, 640])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, [Context("image", c)], "image"), image_unet(x, t, c).sample,
                                   rtol=1e-5, atol=1e-5)
        theirs = text_unet(z[:, :, None, None], t, c).sample[:, :, 0, 0]  # [D] feeds the latent as [B, D, 1, 1]
        torch.testing.assert_close(model(z, t, [Context("text", c)], "text"), theirs, rtol=1e-5, atol=1e-5)
    # both UNets' time embeddings land in the ONE global module
    torch.testing.assert_close(model.global_layers.time_embedding.linear_1.weight,
                               text_unet.time_embedding.linear_1.weight)


@pytest.mark.parametrize("layout", ["vd-r0", "vd-r1", "diffusers", "native"])
def test_round_trip_is_lossless_and_strict(source, layout):
    exported = export_state_dict(source, layout)
    assert detect_layout(exported) == layout
    n_params = len(source.state_dict())
    assert len(exported) == n_params + (4 if layout == "diffusers" else 0)  # time embedding stored twice in [D]
    target = tiny_diffuser(seed=99, zero_init=False)
    load_diffuser_weights(target, exported)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_published_key_names_and_shapes(source):
    """Spot checks of key names / shapes the released code produces (verified against [R0]/[R] module code)."""
    r0, r1, hub = (export_state_dict(source, layout) for layout in ("vd-r0", "vd-r1", "diffusers"))
    c = source.config.model_channels
    expected = {
        # [R0]: time_embed at the top, OpenAI-UNet blocks; the text stem is Linear_MultiDim([768, 1, 1] -> [320, 4, 1])
        "model.diffusion_model.time_embed.0.weight": (4 * c, c),
        "model.diffusion_model.unet_image.input_blocks.0.0.weight": (c, 4, 3, 3),
        "model.diffusion_model.unet_image.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (c, 32),
        "model.diffusion_model.unet_image.input_blocks.2.0.op.weight": (c, c, 3, 3),
        "model.diffusion_model.unet_image.output_blocks.1.1.conv.weight": (2 * c, 2 * c, 3, 3),  # up, no attention
        "model.diffusion_model.unet_image.out.2.weight": (4, c, 3, 3),
        "model.diffusion_model.unet_text.input_blocks.0.0.weight": (4 * c, 16),
        "model.diffusion_model.unet_text.input_blocks.1.0.in_layers.2.weight": (4 * c, 4 * c, 1, 1),
        "model.diffusion_model.unet_text.output_blocks.1.1.weight": (8 * c, 8 * c),  # Linear "upsampler"
        "model.diffusion_model.unet_text.middle_block.1.proj_in.weight": (2 * c, 2 * c, 1, 1),
        "model.diffusion_model.unet_text.out.0.weight": (c,),  # GroupNorm over C0 channels, not C0 * 4
        # [R]: one TimestepEmbedSequential per module, time_embed in the image diffuser
        "diffuser.image.time_embed.2.bias": (4 * c,),
        "diffuser.image.data_blocks.11.0.2.weight": (4, c, 3, 3),
        "diffuser.text.data_blocks.11.0.2.weight": (16, 4 * c),
        "diffuser.text.context_blocks.0.0.norm.weight": (c,),
        "diffuser.image.context_blocks.3.0.proj_out.weight": (c, c, 1, 1),
        # diffusers hub
        "text_unet.time_embedding.linear_1.weight": (4 * c, c),
        "text_unet.down_blocks.0.downsamplers.0.weight": (4 * c, 4 * c),
        "text_unet.down_blocks.0.resnets.0.conv1.weight": (4 * c, 4 * c, 1, 1),
        "image_unet.up_blocks.0.upsamplers.0.conv.weight": (2 * c, 2 * c, 3, 3),
        "image_unet.conv_norm_out.weight": (c,),
    }
    merged = {**r0, **r1, **hub}
    for key, shape in expected.items():
        assert tuple(merged[key].shape) == shape, key


def test_missing_flow_layers_are_one_line_errors_and_load_nothing(source):
    r1 = export_state_dict(source, "vd-r1")
    no_text = {k: v for k, v in r1.items() if not k.startswith("diffuser.text.")}  # e.g. a dual-context checkpoint
    target = tiny_diffuser(seed=5, zero_init=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_diffuser_weights(target, no_text)
    message = str(err.value)
    assert "\n" not in message and "data_text, ctx_text" in message and "t2i, i2t, tv, dual" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded


def test_unexpected_mismatched_and_unequal_keys_are_refused(source, unets):
    r0 = export_state_dict(source, "vd-r0")
    with pytest.raises(UserError, match="no place in this diffuser"):
        convert_state_dict({**r0, "model.diffusion_model.unet_text.extra.weight": torch.zeros(1)}, "vd-r0",
                           source.config)
    # keys outside the layout's prefix (VAE, CLIP, EMA, schedule buffers) are reported, not loaded
    _, report = convert_state_dict({**r0, "betas": torch.zeros(3), "model_ema.decay": torch.ones(())}, "vd-r0",
                                   source.config)
    assert report.ignored == ["betas", "model_ema.decay"]
    bad = dict(r0)
    key = "model.diffusion_model.unet_image.input_blocks.0.0.weight"
    bad[key] = torch.zeros(8, 4, 3, 3)
    with pytest.raises(UserError, match="different sizes"):
        convert_state_dict(bad, "vd-r0", source.config)
    hub = hub_state_dict(*unets)
    hub["text_unet.time_embedding.linear_2.bias"] = hub["text_unet.time_embedding.linear_2.bias"] + 1
    with pytest.raises(UserError, match="ONE time embedding"):
        convert_state_dict(hub, "diffusers", source.config)
    with pytest.raises(UserError, match="cannot tell the checkpoint layout"):
        detect_layout({"foo.weight": torch.zeros(1)})
    assert set(LAYOUTS) == {"vd-r0", "vd-r1", "diffusers", "sd-unet", "native"}


def test_sd_unet_initialises_image_flows_and_both_context_sets(unets):
    image_unet, _ = unets
    model = tiny_diffuser(seed=2, zero_init=False)
    text_data = {k: v.clone() for k, v in model.data["text"].state_dict().items()}
    report = load_diffuser_weights(model, image_unet.state_dict(), layout="sd-unet")
    assert report.loaded == len(image_unet.state_dict())
    g = torch.Generator().manual_seed(1)
    x, c, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g), torch.tensor([250])
    with torch.no_grad():
        sd_eps = image_unet(x, t, c).sample
        torch.testing.assert_close(model.apply_flow(x, t, "t2i", text=c), sd_eps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.apply_flow(x, t, "iv", image=c), sd_eps, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(model.data["text"].state_dict()[k], v) for k, v in text_data.items())  # kept as it was


def test_files_and_diffusers_folders(tmp_path, source, unets):
    file = save_safetensors(export_state_dict(source, "vd-r1"), tmp_path / "vd-four-flow.safetensors")
    target = tiny_diffuser(seed=3)
    assert load_diffuser_weights(target, file).layout == "vd-r1"
    assert torch.equal(target.data["text"].layers[1].fc1.weight, source.data["text"].layers[1].fc1.weight)
    image_unet, text_unet = unets
    image_unet.save_pretrained(tmp_path / "hub" / "image_unet")
    text_unet.save_pretrained(tmp_path / "hub" / "text_unet")
    assert detect_layout(read_checkpoint(tmp_path / "hub")) == "diffusers"
    assert load_diffuser_weights(tiny_diffuser(seed=3), tmp_path / "hub").loaded > 0
    with pytest.raises(UserError, match="no image_unet"):
        read_checkpoint(tmp_path)


def test_native_folder_round_trip(tmp_path, source):
    from versatile.convert import load_diffuser, save_diffuser

    save_diffuser(source, tmp_path / "diffuser")
    loaded = load_diffuser(tmp_path / "diffuser")
    assert loaded.config == source.config
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(UserError, match="no diffuser_config.json"):
        load_diffuser(tmp_path)
