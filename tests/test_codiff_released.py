"""Released Collaborative Diffusion checkpoints (LDM Lightning ``.ckpt``) -> the project's folders.

The reference networks below are transcriptions, written here, of the official modules' structure and forward
(LDM ``openaimodel.UNetModel`` with ``SpatialTransformer`` blocks, and x-transformers' ``TransformerWrapper`` with an
``Encoder`` as ``BERTEmbedder`` builds it): their parameter names are the released checkpoints' names. Key sets are
checked at the released sizes on the meta device, outputs at reduced width with random weights.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from script_loading import load_script
from torch import nn

from codiff import convert as released
from common.errors import UserError


# ------------------------------------------------------------------------- transcription: LDM UNetModel


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch=None):
        super().__init__()
        out_ch = out_ch or ch
        self.in_layers = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner, context_dim = heads * dim_head, context_dim or query_dim
        self.scale, self.heads = dim_head ** -0.5, heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = x.shape[0], self.heads
        q, k, v = (t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(b * h, t.shape[1], -1) for t in (q, k, v))
        attn = (torch.einsum("bid,bjd->bij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bij,bjd->bid", attn, v)
        out = out.reshape(b, h, out.shape[1], -1).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, dim_head, context_dim):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, dim_head, context_dim)])
        self.proj_out = nn.Conv2d(inner, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.proj_out(x) + x_in


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class LDMUNetModel(nn.Module):
    """openaimodel.UNetModel with use_spatial_transformer, legacy False, num_heads given, depth 1."""

    def __init__(self, in_channels, out_channels, model_channels, attention_resolutions, num_res_blocks,
                 channel_mult, num_heads, context_dim, **_):
        super().__init__()
        self.model_channels = model_channels
        emb = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3,
                                                                             padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(SpatialTransformer(ch, num_heads, ch // num_heads, context_dim))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb), SpatialTransformer(ch, num_heads, ch // num_heads,
                                                                                          context_dim), ResBlock(ch, emb))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(SpatialTransformer(ch, num_heads, ch // num_heads, context_dim))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


# ---------------------------------------------------------- transcription: x-transformers BERTEmbedder


class XAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class XFeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class Residual(nn.Module):
    def forward(self, x, residual):
        return x + residual


class AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim, max_seq_len):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x):
        return self.emb(torch.arange(x.shape[1], device=x.device))[None]


class XEncoder(nn.Module):
    def __init__(self, dim, depth, heads=8):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), XAttention(dim, heads), Residual()]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), XFeedForward(dim), Residual()]))

    def forward(self, x):
        for norm, block, residual in self.layers:
            x = residual(block(norm(x)), x)
        return x


class TransformerWrapper(nn.Module):
    def __init__(self, num_tokens, max_seq_len, dim, depth):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.attn_layers = XEncoder(dim, depth)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens):  # return_embeddings=True
        x = self.token_emb(tokens)
        x = x + self.pos_emb(x)
        return self.norm(self.attn_layers(x))


class BERTEmbedder(nn.Module):
    def __init__(self, n_embed, n_layer, vocab_size=30522, max_seq_len=77):
        super().__init__()
        self.transformer = TransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer)


# ---------------------------------------------------------------------------------------------- configs

PAPER_UNET = dict(image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
                  num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=32, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=640, use_checkpoint=True, legacy=False)
PAPER_DIFFUSER = {**PAPER_UNET, "out_channels": 1, "model_channels": 32}
TINY_UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2, 4],
                 num_res_blocks=2, channel_mult=[1, 2, 2], num_heads=4, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=32, use_checkpoint=True, legacy=False)
# attention only at the first level: an up level that upsamples without attention (``output_blocks.i.1.conv``)
TINY_DIFFUSER = {**TINY_UNET, "out_channels": 1, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [1]}


def meta_state(module_factory):
    with torch.device("meta"):
        return module_factory().state_dict()


def seeded_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (no zero convolutions), so every key matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@pytest.mark.parametrize("params, keys", [(PAPER_DIFFUSER, 688), (PAPER_UNET, None)], ids=["diffuser", "member"])
def test_released_unet_key_set_and_shapes_at_paper_size(params, keys):
    official = meta_state(lambda: LDMUNetModel(**params))
    unet = released.build_unet(released.unet_config_from_ldm(params), "meta")
    key_map = released.unet_key_map(unet)
    ours = unet.state_dict()
    assert sorted(key_map.values()) == sorted(official)
    assert len(set(key_map.values())) == len(key_map) == len(ours)
    for key, ldm_key in key_map.items():
        assert ours[key].shape == official[ldm_key].shape, key
    if keys is not None:
        assert len(official) == keys
        assert abs(sum(v.numel() for v in official.values()) / 1e6 - 13.1) < 0.05
    else:
        assert abs(sum(v.numel() for v in official.values()) / 1e6 - 403.6) < 0.1


def test_text_and_mask_encoder_key_sets_at_paper_size():
    from codiff.text_encoder import LDMTextEncoder

    official = meta_state(lambda: BERTEmbedder(640, 32))
    with torch.device("meta"):
        ours = LDMTextEncoder(dim=640, depth=32)
    key_map = released.text_encoder_key_map(ours)
    assert sorted(key_map.values()) == sorted(set(official) - set(released.TEXT_HEAD_KEYS))
    for key, ldm_key in key_map.items():
        assert ours.state_dict()[key].shape == official[ldm_key].shape
    assert abs(sum(v.numel() for k, v in official.items() if "to_logits" not in k) / 1e6 - 166.6) < 0.1


def test_unet_and_vae_maps_agree_with_diffusers_converters():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for params in (PAPER_UNET, PAPER_DIFFUSER, TINY_UNET, TINY_DIFFUSER):
        config = released.unet_config_from_ldm(params)
        unet = released.build_unet(config, "meta")
        key_map = released.unet_key_map(unet)
        sentinel = {"model.diffusion_model." + ldm: ldm for ldm in key_map.values()}  # values pass through unchanged
        assert convert_ldm_unet_checkpoint(sentinel, config) == key_map
    paper = dict(double_z=True, z_channels=3, resolution=512, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                 num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    for ddconfig, device in ((paper, "meta"), (TINY_DDCONFIG, "cpu")):
        config = released.vae_config_from_ldm(ddconfig, 3, 0.141)
        vae = released.build_vae(config, device)
        exported = released.export_vae_state(seeded_(vae, 0) if device == "cpu" else vae)
        assert len(exported) == len(released.vae_key_map(vae)) == len(vae.state_dict())
        assert any(v.ndim == 4 and v.shape[-1] == 1 for k, v in exported.items() if "mid.attn_1.q" in k)
        converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in exported.items()}, config)
        assert set(converted) == set(vae.state_dict())
        for key, value in vae.state_dict().items():
            assert converted[key].shape == value.shape, key
            assert device == "meta" or torch.equal(converted[key], value), key


@torch.no_grad()
@pytest.mark.parametrize("params", [TINY_UNET, TINY_DIFFUSER], ids=["member", "diffuser"])
def test_converted_unet_reproduces_the_ldm_forward(params):
    official = seeded_(LDMUNetModel(**params), 1).eval()
    converted = released.build_unet(released.unet_config_from_ldm(params)).eval()
    used = released.take_weights({"model.diffusion_model." + k: v for k, v in official.state_dict().items()},
                                 "model.diffusion_model.", released.unet_key_map(converted), converted, "UNet", "test")
    assert len(used) == len(official.state_dict())
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([3, 901]), torch.randn(2, 5, 32)
    want = official(x, t, ctx)
    got = converted(x, t, encoder_hidden_states=ctx).sample
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_converted_text_encoder_reproduces_the_bert_embedder():
    from codiff.text_encoder import LDMTextEncoder

    official = seeded_(BERTEmbedder(64, 2, vocab_size=50, max_seq_len=12), 2).eval()
    ours = LDMTextEncoder(vocab_size=50, max_length=12, dim=64, depth=2).eval()
    state = {"cond_stage_model." + k: v for k, v in official.state_dict().items()}
    released.take_weights(state, "cond_stage_model.", released.text_encoder_key_map(ours), ours, "text", "test")
    tokens = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(ours(tokens)[0], official.transformer(tokens), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- a tiny fake release


def tiny_member_yaml(kind: str, vae_ckpt: str = "pretrained/tiny_vae.ckpt") -> dict:
    cond = ({"target": released.TEXT_ENCODER_TARGET, "params": {"n_embed": 32, "n_layer": 2, "vocab_size": 64}}
            if kind == "text" else
            {"target": released.MASK_ENCODER_TARGET,
             "params": {"seg_mask_encoder_config": {"target": "ldm.modules.encoders.modules.PassSegMaskEncoder",
                                                    "params": {}}, "mask_embed_dim": 16, "context_dim": 32}})
    return {"model": {"base_learning_rate": 1e-6, "target": released.LDM_TARGET, "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "first_stage_key": "image",
        "cond_stage_key": "caption" if kind == "text" else "seg_mask", "image_size": 8, "channels": 3,
        "cond_stage_trainable": True, "conditioning_key": "crossattn", "scale_factor": 0.141, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(TINY_UNET)},
        "first_stage_config": {"target": released.VAE_TARGET, "params": {
            "embed_dim": 3, "ckpt_path": vae_ckpt, "ddconfig": TINY_DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": cond}}}


TINY_DDCONFIG = dict(double_z=True, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                     num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def tiny_collaboration_yaml() -> dict:
    return {"model": {"target": released.COLLABORATION_TARGET, "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
        "conditioning_key": "crossattn", "scale_factor": 0.141, "use_ema": False,
        "seg_mask_ldm_config_path": "configs/tiny_mask.yaml", "seg_mask_ldm_ckpt_path": "pretrained/tiny_mask.ckpt",
        "text_ldm_config_path": "configs/tiny_text.yaml", "text_ldm_ckpt_path": "pretrained/tiny_text.ckpt",
        "compose_unet_config": {"target": "ldm.models.diffusion.compose_modules.ComposeUNet", "params": {
            "confidence_conditioning_key": "crossattn", "confidence_input": "x_t",
            "confidence_map_predictor_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                "params": dict(TINY_DIFFUSER)}}},
        "compose_cond_stage_config": {"target": "ldm.models.diffusion.compose_modules.ComposeCondStageModel",
                                      "params": {}}}}}


def write_bert_tokenizer(folder: Path) -> Path:
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "this", "woman", "man", "is", "in", "her", "his",
             "twenties", "thirties", "has", "beard", "a", "no", "."]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Random tiny models in the project's classes, exported to the released layout, written as fake Lightning
    ``.ckpt`` files with the official configs."""
    import yaml

    root = tmp_path_factory.mktemp("release")
    (root / "configs").mkdir()
    (root / "pretrained").mkdir()
    member_cfgs = {}
    for kind in ("mask", "text"):
        cfg = tiny_member_yaml(kind)
        (root / "configs" / f"tiny_{kind}.yaml").write_text(yaml.safe_dump(cfg))
        member_cfgs[kind] = released.parse_member_config(cfg["model"], kind)
    (root / "configs" / "tiny_codiff_mask_text.yaml").write_text(yaml.safe_dump(tiny_collaboration_yaml()))
    vae = seeded_(released.build_vae(member_cfgs["text"].vae_config), 10).eval()
    members = {}
    for i, (kind, cfg) in enumerate(member_cfgs.items()):
        members[kind] = (seeded_(released.build_unet(cfg.unet_config), 20 + i).eval(),
                         seeded_(released.build_member_encoder(cfg), 30 + i).eval())
    diffuser_config = released.unet_config_from_ldm(TINY_DIFFUSER)
    diffusers = {kind: seeded_(released.build_unet(diffuser_config), 40 + i).eval()
                 for i, kind in enumerate(("mask", "text"))}
    schedule = member_cfgs["text"].scheduler_config
    state = released.export_collaboration_state(members, diffusers, vae, schedule)
    extras = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2",
              "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5),
                                                                 "best_model_path": "x.ckpt"}},
              "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-6, "betas": (0.9, 0.999)}]}],
              "lr_schedulers": [], "hparams": argparse.Namespace(base="configs/x.yaml")}
    torch.save({"state_dict": state, **extras}, root / "pretrained" / "tiny_codiff_mask_text.ckpt")
    torch.save({"state_dict": released.export_member_state(*members["text"], vae, schedule), **extras},
               root / "pretrained" / "tiny_text.ckpt")
    vae_state = released.export_vae_state(vae)
    vae_state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": vae_state, **extras}, root / "pretrained" / "tiny_vae.ckpt")
    (root / "configs" / "tiny_vae.yaml").write_text(yaml.safe_dump({"model": {
        "target": released.VAE_TARGET, "params": {"embed_dim": 3, "ddconfig": TINY_DDCONFIG,
                                                   "lossconfig": {"target": "torch.nn.Identity"}}}}))
    return {"root": root, "vae": vae, "members": members, "diffusers": diffusers, "state": state,
            "schedule": schedule, "tokenizer": write_bert_tokenizer(root / "bert")}


def test_round_trip_collaboration_is_bit_exact(release, tmp_path):
    root = release["root"]
    converted = released.convert_release(root / "pretrained" / "tiny_codiff_mask_text.ckpt",
                                         root / "configs" / "tiny_codiff_mask_text.yaml")
    assert converted.kind == "collaboration" and converted.confidence_input == "x_t"
    back = released.export_collaboration_state({k: (m.unet, m.encoder) for k, m in converted.members.items()},
                                               converted.diffusers, converted.vae, converted.scheduler_config)
    assert set(back) == set(release["state"])
    for key, value in release["state"].items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    for kind, (unet, _) in release["members"].items():
        for a, b in zip(unet.state_dict().values(), converted.members[kind].unet.state_dict().values()):
            assert torch.equal(a, b)


def test_member_and_vae_files_round_trip(release):
    root = release["root"]
    member = released.convert_release(root / "pretrained" / "tiny_text.ckpt", root / "configs" / "tiny_text.yaml")
    (only,) = member.members.values()
    again = released.export_member_state(only.unet, only.encoder, member.vae, member.scheduler_config)
    original = released.export_member_state(*release["members"]["text"], release["vae"], release["schedule"])
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)
    vae = released.convert_release(root / "pretrained" / "tiny_vae.ckpt", root / "configs" / "tiny_vae.yaml",
                                   scale_factor=0.2)
    assert vae.kind == "vae" and vae.vae.config.scaling_factor == 0.2
    assert all(torch.equal(a, b) for a, b in zip(vae.vae.state_dict().values(), release["vae"].state_dict().values()))


@pytest.mark.parametrize("name, edit, words", [
    ("codiff_mask_text", lambda s: s.pop("model.text_confidence_predictor.diffusion_model.out.2.weight"),
     "no model.text_confidence_predictor.diffusion_model.out.2.weight"),
    ("text", lambda s: s.__setitem__("model.extra_head.weight", torch.zeros(2)),
     "unexpected entry model.extra_head.weight"),
    ("codiff_mask_text", lambda s: s.__setitem__("seg_mask_ldm.cond_stage_model.linear.weight", torch.zeros(32, 17)),
     "seg_mask_ldm.cond_stage_model.linear.weight has shape (32, 17)"),
    ("codiff_mask_text", lambda s: s.__setitem__("model.seg_mask_unet.diffusion_model.out.2.bias", torch.ones(3)),
     "differs from"),
    ("text", lambda s: s.__setitem__("betas", torch.linspace(1e-4, 0.02, 1000)), "noise schedule"),
], ids=["missing", "unexpected", "shape", "copies", "schedule"])
def test_bad_files_are_one_line_errors(release, tmp_path, name, edit, words):
    root = release["root"]
    state = released.read_lightning_state_dict(root / "pretrained" / f"tiny_{name}.ckpt")
    edit(state)
    torch.save({"state_dict": state}, tmp_path / "variant.ckpt")
    with pytest.raises(UserError) as err:
        released.convert_release(tmp_path / "variant.ckpt", root / "configs" / f"tiny_{name}.yaml")
    assert words in str(err.value) and "\n" not in str(err.value)


class NotPlainData:
    """A pickled object of a class no allow-list names (as an arbitrary ``hparams`` object would be)."""


def test_pickled_code_is_refused(release, tmp_path):
    path = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"betas": torch.zeros(3)}, "hparams": NotPlainData()}, path)
    with pytest.raises(UserError, match="refusing to load it"):
        released.read_lightning_state_dict(path)


def test_convert_script_writes_folders_that_generate(release, tmp_path, capsys):
    from codiff.checkpoint import load_collaboration, load_member

    root = release["root"]
    convert = load_script("scripts/codiff/convert.py").main
    out = tmp_path / "codiff-tiny"
    args = ["--checkpoint", str(root / "pretrained" / "tiny_codiff_mask_text.ckpt"),
            "--config", str(root / "configs" / "tiny_codiff_mask_text.yaml"), "--output", str(out)]
    with pytest.raises(SystemExit):  # text needs the BERT tokenizer
        convert(args)
    assert "--tokenizer" in capsys.readouterr().err and not out.exists()
    assert convert(args + ["--tokenizer", str(release["tokenizer"])]) == 0
    assert {p.name for p in out.iterdir()} >= {"codiff.json", "dynamic_diffusers", "mask", "text", "vae"}
    collab = load_collaboration(out)
    assert collab.modalities == ("mask", "text") and collab.model.confidence_input == "x_t"
    for kind, (unet, encoder) in release["members"].items():
        member = collab.members[kind]
        for a, b in zip(unet.state_dict().values(), member.unet.state_dict().values()):
            assert torch.equal(a, b)
        module = member.encoder if kind == "mask" else member.encoder.text_encoder
        assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), module.state_dict().values()))
    for kind, net in release["diffusers"].items():
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                     collab.model.diffusers[kind].state_dict().values()))
    assert collab.vae.config.scaling_factor == pytest.approx(0.141) and collab.image_size == 16
    tokens = collab.members["text"].encode("this woman is in her twenties.")
    assert tokens.shape == (1, 77, 32)

    mask = tmp_path / "mask.png"
    from PIL import Image

    ids = torch.zeros(16, 16, dtype=torch.uint8)
    ids[4:12, 4:12] = 1
    ids[2:4] = 13
    Image.fromarray(ids.numpy(), mode="L").save(mask)
    generate = load_script("scripts/codiff/generate.py").main
    save = tmp_path / "samples"
    assert generate(["--checkpoint", str(out), "--mask_path", str(mask), "--input_text", "this man has a beard.",
                     "--batch_size", "1", "--num_inference_steps", "2", "--seed", "0", "--save_folder", str(save)]) in (0, None)
    images = list(save.rglob("*_x_0.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (16, 16)
    sample = load_script("scripts/sample.py").main
    assert sample(["--method", "codiff", "--checkpoint", str(out), "--prompt", "a woman",
                   "--mask_path", str(mask), "--num_inference_steps", "2", "--eta", "1", "--guidance_scale", "1", "--no_progress",
                   "--output_dir", str(tmp_path / "sampled")]) == 0
    assert len(list((tmp_path / "sampled" / "images").glob("*.png"))) == 1

    member_out = tmp_path / "text-member"
    assert convert(["--checkpoint", str(root / "pretrained" / "tiny_text.ckpt"), "--config",
                    str(root / "configs" / "tiny_text.yaml"), "--tokenizer", str(release["tokenizer"]),
                    "--output", str(member_out)]) == 0
    text = load_member(member_out)
    assert text.kind == "text" and text.vae_path == member_out / "vae"
    torch.testing.assert_close(text.encode("a man"), collab.members["text"].encode("a man"), atol=0, rtol=0)
    vae_out = tmp_path / "vae"
    assert convert(["--checkpoint", str(root / "pretrained" / "tiny_vae.ckpt"), "--config",
                    str(root / "configs" / "tiny_vae.yaml"), "--output", str(vae_out), "--scale_factor", "0.141"]) == 0
    assert (vae_out / "config.json").is_file()
    with pytest.raises(SystemExit):  # never written into an existing folder
        convert(["--checkpoint", str(root / "pretrained" / "tiny_vae.ckpt"), "--config",
                 str(root / "configs" / "tiny_vae.yaml"), "--output", str(vae_out)])
    assert "already exists" in capsys.readouterr().err


def test_a_released_ckpt_file_where_a_folder_is_expected_names_the_converter(release):
    from codiff.checkpoint import load_collaboration, load_member

    ckpt = release["root"] / "pretrained" / "tiny_codiff_mask_text.ckpt"
    for loader in (load_member, load_collaboration):
        with pytest.raises(UserError) as err:
            loader(ckpt)
        message = str(err.value)
        assert "released LDM checkpoint file" in message and "scripts/codiff/convert.py" in message
        assert "does not exist" not in message


# ---------------------------------------------------------------------------------------- zero initialisation


def test_ldm_zero_init_zeroes_exactly_the_ldm_zero_modules():
    from codiff.config import build_unet
    from codiff.dynamic import build_dynamic_diffuser

    diffuser_config, unet_config = (released.unet_config_from_ldm(p) for p in (TINY_DIFFUSER, TINY_UNET))
    pairs = ((build_dynamic_diffuser(diffuser_config, seed=0), build_dynamic_diffuser(diffuser_config, False, seed=0)),
             (build_unet(unet_config, seed=0), build_unet(unet_config, seed=0, zero_init="none")))
    for net, fresh in pairs:
        key_map = released.unet_key_map(net)
        before = fresh.state_dict()
        zero = {key_map[k] for k, v in net.state_dict().items() if not v.any() and before[k].any()}
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items() if key_map[k] not in zero)
        # openaimodel/attention.py wrap these in zero_module: out[2], every ResBlock's out_layers[3], every proj_out
        expected = {k for k in key_map.values()
                    if k.startswith("out.2.") or ".out_layers.3." in k or ".proj_out." in k}
        assert zero == expected and expected
    plain = build_dynamic_diffuser(diffuser_config, zero_init="conv_out", seed=0).state_dict()
    before = pairs[0][1].state_dict()
    assert {k for k, v in plain.items() if not v.any() and before[k].any()} == {"conv_out.weight", "conv_out.bias"}
    with pytest.raises(UserError, match="zero_init"):
        build_dynamic_diffuser(released.unet_config_from_ldm(TINY_DIFFUSER), zero_init="xavier")


def test_shipped_checkpoint_weights_are_loaded_not_reinitialised():
    from codiff.checkpoint import load_collaboration
    from common.io import load_safetensors

    shipped = Path(__file__).resolve().parent.parent / "ckpt" / "tiny" / "codiff"
    collab = load_collaboration(shipped)
    for name in collab.modalities:
        stored = load_safetensors(next((shipped / "dynamic_diffusers" / name).glob("*.safetensors")))
        loaded = collab.model.diffusers[name].state_dict()
        assert set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k].to(stored[k].dtype)) for k in stored)
        assert loaded["conv_out.weight"].any() and loaded["up_blocks.0.resnets.0.conv2.weight"].any()


def test_paper_config_describes_the_released_networks():
    from codiff.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "codiff" / "paper.yaml")
    for section, params in ((config["dynamic_diffuser"]["unet"], PAPER_DIFFUSER),
                            (config["modalities"]["mask"]["unet"], PAPER_UNET),
                            (config["modalities"]["text"]["unet"], PAPER_UNET)):
        converted = released.unet_config_from_ldm(params)
        assert {k: converted[k] for k in section} == {k: v for k, v in section.items()}
    ddconfig = dict(double_z=True, z_channels=3, resolution=512, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    assert released.vae_config_from_ldm(ddconfig, 3, 0.141) == config["vae"]["config"]
    official_text = tiny_member_yaml("text")
    official_text["model"]["params"]["cond_stage_config"]["params"] = {"n_embed": 640, "n_layer": 32}  # 512_text.yaml
    member = released.parse_member_config(official_text["model"], "512_text.yaml")
    assert member.text_encoder_args == config["modalities"]["text"]["text_encoder"]["args"]
