"""Reading the authors' released Shifted Diffusion files: prior keys, bank, null embedding, SD folder, convert.py.

The reference network is the release's ``ClipPrior`` built here from the real x-transformers 0.28.4 ``Decoder``
(a test-only requirement) with the wrapper around it transcribed from the release's
``model_lib/decoder/clip_prior.py``: same sub-modules, same names, same token order.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.modules import timestep_embedding
from shifted import convert as release
from shifted.prior import ShiftedPrior, prior_parameter_count


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import sample as sample_script  # noqa: E402
from script_loading import load_script  # noqa: E402


# ------------------------------------------------------------------------------------- the release's ClipPrior


class ReleasedLayerNorm(nn.Module):
    """The release's LayerNorm: learnable ``gamma``, an all-zero ``beta`` buffer."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class ReleasedClipPrior(nn.Module):
    """``ClipPrior`` (x0-predicting, non-learnable bank: the bank holds no parameters, so only ``pos_embed``)."""

    def __init__(self, xf_width, xf_layers, xf_heads, clip_width, t5_dim, use_vocab):
        from x_transformers import Decoder

        super().__init__()
        self.xf_width = xf_width
        self.transformer = Decoder(dim=xf_width, depth=xf_layers, heads=xf_heads, use_scalenorm=True,
                                   use_rmsnorm=True, ff_glu=True)

        def mlp():
            return nn.Sequential(nn.Linear(xf_width, xf_width), nn.SiLU(), nn.Linear(xf_width, xf_width))

        def emb_proj(dim):
            return nn.Sequential(nn.Linear(dim, xf_width), nn.SiLU(), ReleasedLayerNorm(xf_width),
                                 nn.Linear(xf_width, xf_width))

        self.time_embed = mlp()
        self.t5_proj = nn.Sequential(ReleasedLayerNorm(t5_dim), nn.Linear(t5_dim, xf_width), nn.SiLU(),
                                     ReleasedLayerNorm(xf_width), nn.Linear(xf_width, xf_width))
        self.x_proj = emb_proj(clip_width)
        self.clip_sentence_proj = emb_proj(clip_width)
        self.final_emb = nn.Parameter(torch.randn(1, 1, xf_width))
        self.out_proj = nn.Sequential(nn.Linear(xf_width, clip_width), nn.SiLU(), nn.Linear(clip_width, clip_width))
        self.pos_embed = mlp() if use_vocab else None

    def forward(self, x, timesteps, t5_word_emb, clip_sentence_emb, indices=None):
        def sinusoid(t):  # float32 in the release, which runs in float32; cast so the float64 check runs too
            return timestep_embedding(t, self.xf_width).to(self.final_emb.dtype)

        x = self.x_proj(x)[:, None]
        temb = self.time_embed(sinusoid(timesteps))[:, None]
        clip_s_emb = self.clip_sentence_proj(clip_sentence_emb[:, None])
        parts = [self.t5_proj(t5_word_emb), clip_s_emb, temb]
        if self.pos_embed is not None:
            parts.append(self.pos_embed(sinusoid(indices.view(timesteps.shape)))[:, None])
        inp = torch.cat([*parts, x, self.final_emb.repeat(x.shape[0], 1, 1)], dim=1)
        return self.out_proj(self.transformer(inp)[:, -1])


NAMES = dict(clip_models=["a", "b", "c"], text_encoder="t5")


def released_state(seed=0, width=64, layers=2, heads=4, clip_width=24, t5_dim=32, use_vocab=True, device="cpu"):
    torch.manual_seed(seed)
    with torch.device(device):
        model = ReleasedClipPrior(width, layers, heads, clip_width, t5_dim, use_vocab)
    if device != "meta":  # random values everywhere, also where the release initialises ones
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith((".g", ".gamma")):
                    param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


# ------------------------------------------------------------------------------------------------- the prior


@pytest.mark.parametrize("layers", [16, 20])
def test_key_set_and_shapes_at_the_released_sizes_on_meta(layers):
    official = released_state(width=2048, layers=layers, heads=32, clip_width=1536, t5_dim=1024, device="meta")
    state = official.state_dict()
    config = release.released_prior_config(state, 32, clip_dims=[512] * 3, **NAMES)
    assert (config["layers"], config["dim_head"], config["ff_mult"], config["text_len"]) == (layers, 64, 4, 80)
    with torch.device("meta"):
        prior = ShiftedPrior(**config)
    ours = {k: tuple(v.shape) for k, v in prior.state_dict().items()}
    renamed = {k: tuple(v.shape) for k, v in release.released_to_project(state).items()}
    assert renamed == ours
    back = {k: tuple(v.shape) for k, v in release.project_to_released(prior.state_dict()).items()}
    assert back == {k: tuple(v.shape) for k, v in state.items()}  # the official key set, exactly
    assert len(state) == len(ours) + 4  # the four LayerNorm beta buffers
    count = sum(p.numel() for p in prior.parameters())
    assert count == sum(p.numel() for p in official.parameters()) == prior_parameter_count(1536, 1024, 2048, layers, 32)
    assert round(count / 1e9, 2) == {16: 1.12, 20: 1.39}[layers]


@pytest.mark.parametrize("use_vocab", [True, False])
def test_converted_prior_matches_the_released_network(use_vocab, tmp_path):
    torch.manual_seed(0)
    official = released_state(seed=1, use_vocab=use_vocab).double().eval()
    path = tmp_path / "model_state.th"
    torch.save(official.state_dict(), path)
    prior = release.load_released_prior(path, heads=4, text_len=7, clip_dims=[8, 8, 8], **NAMES).double()
    assert prior.config.use_bank_token == use_vocab and not prior.config.attn_out_bias
    g = torch.Generator().manual_seed(2)
    b = 3
    x, clip_text = torch.randn(b, 24, generator=g).double(), torch.randn(b, 24, generator=g).double()
    states, t = torch.randn(b, 7, 32, generator=g).double(), torch.tensor([0, 417, 999])
    index = torch.tensor([3, 0, 1023]) if use_vocab else None
    with torch.no_grad():
        want = official(x, t, states, clip_text, index)
        got = prior(x, t, clip_text, states, index)
    assert want.abs().mean() > 0.1
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    # float32 as the release runs it
    with torch.no_grad():
        got32 = prior.float()(x.float(), t, clip_text.float(), states.float(), index)
        want32 = official.float()(x.float(), t, states.float(), clip_text.float(), index)
    assert torch.allclose(got32, want32, atol=1e-5, rtol=0)


def test_round_trip_project_released_project_is_bit_for_bit(tmp_path):
    torch.manual_seed(3)
    prior = ShiftedPrior(emb_dim=24, text_dim=32, text_len=7, width=64, layers=2, heads=4, dim_head=64,
                         clip_dims=[8, 8, 8], **NAMES)
    state = prior.state_dict()
    released = release.project_to_released(state)
    official = released_state(use_vocab=True)
    assert set(released) == set(official.state_dict())
    official.load_state_dict(released, strict=True)  # the release's own module takes it
    back = release.released_to_project(released)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    torch.save(released, tmp_path / "model_state.th")
    loaded = release.load_released_prior(tmp_path / "model_state.th", heads=4, text_len=7, clip_dims=[8, 8, 8],
                                         **NAMES)
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(prior.config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(UserError, match="attn_out_bias"):
        release.project_to_released(ShiftedPrior(**{**prior.config, "attn_out_bias": True}).state_dict())


def _load_bad(tmp_path, state, **kwargs):
    path = tmp_path / "bad.th"
    torch.save(state, path)
    return release.load_released_prior(path, **{**NAMES, "heads": 4, "text_len": 7, "clip_dims": [8, 8, 8], **kwargs})


def test_bad_released_prior_files_are_one_line_errors_naming_the_key(tmp_path):
    good = released_state().state_dict()
    missing = {k: v for k, v in good.items() if k != "transformer.layers.2.1.to_k.weight"}
    with pytest.raises(UserError, match=r"lacks blocks\.1\.attn\.to_k\.weight"):
        _load_bad(tmp_path, missing)
    with pytest.raises(UserError, match=r"unexpected key transformer\.layers\.0\.1\.to_out\.bias"):
        _load_bad(tmp_path, {**good, "transformer.layers.0.1.to_out.bias": torch.zeros(64)})
    with pytest.raises(UserError, match=r"unexpected key vocab\.mean\.weight .*learnable bank"):
        _load_bad(tmp_path, {**good, "vocab.mean.weight": torch.zeros(4, 24)})
    with pytest.raises(UserError, match=r"time_embed\.2\.weight has shape \(64, 32\)"):
        _load_bad(tmp_path, {**good, "time_embed.2.weight": torch.zeros(64, 32)})
    with pytest.raises(UserError, match=r"unexpected key x_proj\.2\.weight: a second tensor for x_proj\.2\.weight"):
        _load_bad(tmp_path, {**good, "x_proj.2.weight": torch.ones(64)})
    with pytest.raises(UserError, match=r"x_proj\.2\.beta is not zero"):
        _load_bad(tmp_path, {**good, "x_proj.2.beta": torch.ones(64)})
    with pytest.raises(UserError, match="learn_sigma"):
        _load_bad(tmp_path, {**good, "out_proj.2.weight": torch.zeros(48, 24), "out_proj.2.bias": torch.zeros(48)})
    with pytest.raises(UserError, match="does not divide"):
        _load_bad(tmp_path, good, heads=5)
    with pytest.raises(UserError, match="does not split evenly over 5 CLIP models"):
        _load_bad(tmp_path, good, clip_dims=None, clip_models=list("abcde"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.th")  # a pickled module, not a state dict: never unpickled
    with pytest.raises(UserError, match="refusing to load"):
        release.load_released_prior(tmp_path / "module.th", **NAMES)


# ------------------------------------------------------------------------------------------- bank and null


def test_released_bank_and_empty_embedding_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(6, 1, 24, generator=g), torch.rand(6, 1, 24, generator=g) + 0.1  # stored [K, 1, D]
    torch.save(mean, tmp_path / "mean.pth")
    torch.save(std.half(), tmp_path / "std.pth")
    bank = release.load_released_bank(tmp_path / "mean.pth", tmp_path / "std.pth", dim=24, size=4,
                                      clip_models=NAMES["clip_models"], block_dims=[8, 8, 8])
    assert torch.equal(bank.mean, mean.view(-1, 24)[:4]) and torch.equal(bank.std, std.half().float().view(-1, 24)[:4])
    assert float(bank.std_scale) == 5.0 and bank.similarity == "concat" and bank.clip_models == ("a", "b", "c")
    with pytest.raises(UserError, match="fewer than the bank size 1024"):
        release.load_released_bank(tmp_path / "mean.pth", tmp_path / "std.pth", dim=24)
    with pytest.raises(UserError, match="whole number of 25-d rows"):
        release.load_released_bank(tmp_path / "mean.pth", tmp_path / "std.pth", dim=25, size=1)
    torch.save(torch.randn(1, 24, generator=g), tmp_path / "empty.th")
    null = release.load_released_empty_embedding(tmp_path / "empty.th", 24)
    assert null.shape == (24,) and torch.equal(null, torch.load(tmp_path / "empty.th", weights_only=True).view(24))
    with pytest.raises(UserError, match="not one 1536-d embedding"):
        release.load_released_empty_embedding(tmp_path / "empty.th", 1536)
    torch.save({"mean": mean}, tmp_path / "dict.pth")
    with pytest.raises(UserError, match="not one tensor"):
        release.load_released_bank(tmp_path / "dict.pth", tmp_path / "std.pth", dim=24, size=1)


# ------------------------------------------------------------------- the SD folder and the whole conversion

TINY = REPO / "ckpt" / "tiny"


def write_released_sd_folder(decoder: Path, out: Path) -> Path:
    """The shipped tiny decoder laid out as the release's forked-diffusers folder: the projection inside the
    UNet (``emb_proj_layers``, class ``UNet2DConditionModelEmb``), ``.bin`` weights, old VAE attention names."""
    from common.io import load_safetensors

    out.mkdir()
    shutil.copytree(decoder / "scheduler", out / "scheduler")
    index = json.loads((decoder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionPipelineWithCLIP", _diffusers_version="0.15.0.dev0",
                 unet=["diffusers", "UNet2DConditionModelEmb"])
    (out / "model_index.json").write_text(json.dumps(index))
    projection = json.loads((decoder / "image_projection" / "config.json").read_text())
    unet_config = json.loads((decoder / "unet" / "config.json").read_text())
    unet_config.update(_class_name="UNet2DConditionModelEmb", emb_dim=projection["cross_attention_dim"],
                       proj_n=projection["n_tokens"], input_dim=projection["in_dim"])
    (out / "unet").mkdir()
    (out / "unet" / "config.json").write_text(json.dumps(unet_config))
    unet = load_safetensors(decoder / "unet" / "diffusion_pytorch_model.safetensors")
    proj = load_safetensors(decoder / "image_projection" / "diffusion_pytorch_model.safetensors")
    unet.update({"emb_proj_layers.weight": proj["proj.weight"], "emb_proj_layers.bias": proj["proj.bias"]})
    torch.save(unet, out / "unet" / "diffusion_pytorch_model.bin")
    (out / "vae").mkdir()
    shutil.copy(decoder / "vae" / "config.json", out / "vae" / "config.json")
    vae = load_safetensors(decoder / "vae" / "diffusion_pytorch_model.safetensors")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in vae.items():
        for new, before in old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{before}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    torch.save(renamed, out / "vae" / "diffusion_pytorch_model.bin")
    return out


def test_convert_script_writes_a_checkpoint_sample_py_runs(tmp_path, capsys):
    from common.io import load_safetensors
    from shifted.checkpoint import model_name, text_encoder_name
    from shifted.pipeline import ImageDecoder, load_prior

    convert = load_script("scripts/shifted/convert.py")
    clip, states = TINY / "clip", TINY / "clip" / "text_encoder"
    torch.manual_seed(0)
    prior = ShiftedPrior(emb_dim=64, text_dim=32, text_len=12, width=32, layers=2, heads=2, dim_head=16,
                         clip_models=["x"], clip_dims=[64], text_encoder="y").eval()
    rel = tmp_path / "release"
    rel.mkdir()
    torch.save({k: v.half() for k, v in release.project_to_released(prior.state_dict()).items()},
               rel / "model_state.th")  # the release stores what its training saved; half precision here
    baseline = ShiftedPrior(**{**prior.config, "use_bank_token": False}).eval()
    torch.save(release.project_to_released(baseline.state_dict()), rel / "baseline_state.th")
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(5, 64, generator=g), torch.rand(5, 64, generator=g) + 0.05
    torch.save(mean, rel / "mean.pth")
    torch.save(std, rel / "std.pth")
    null = torch.randn(1, 64, generator=g)
    torch.save(null, rel / "small_sft_empty_embeds.th")
    sd = write_released_sd_folder(TINY / "shifted" / "decoder", rel / "finetuned")
    out = tmp_path / "converted"
    argv = ["--prior", str(rel / "model_state.th"), "--mean", str(rel / "mean.pth"), "--std", str(rel / "std.pth"),
            "--bank_size", "4", "--heads", "2", "--decoder", str(sd), "--null_embedding",
            str(rel / "small_sft_empty_embeds.th"), "--clip", str(clip), "--t5_model", str(states),
            "--t5_max_length", "12", "--out", str(out)]
    assert convert.main([*argv, "--prior_baseline", str(rel / "baseline_state.th")]) == 0
    base, no_bank = load_prior(out / "prior_baseline")
    assert no_bank is None and all(torch.equal(v, baseline.state_dict()[k]) for k, v in base.state_dict().items())
    assert convert.main(argv) == 0  # an existing checkpoint folder is replaced as a whole
    assert not (out / "prior_baseline").exists()
    loaded, bank = load_prior(out / "prior")
    assert loaded.config.clip_models == [model_name(clip)] and loaded.config.text_encoder == text_encoder_name(states)
    assert all(torch.equal(v, prior.state_dict()[k].half().float()) for k, v in loaded.state_dict().items())
    assert torch.equal(bank.mean, mean[:4]) and torch.equal(bank.std, std[:4]) and float(bank.std_scale) == 5.0
    decoder = ImageDecoder.from_pretrained(out / "decoder")
    assert torch.equal(decoder.projection.null_embedding, null[0])
    shipped = ImageDecoder.from_pretrained(TINY / "shifted" / "decoder")
    for ours, theirs in ((decoder.unet, shipped.unet), (decoder.vae, shipped.vae),
                         (decoder.projection.proj, shipped.projection.proj)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k].float()) for k in a)
    assert json.loads((out / "decoder" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert "emb_proj_layers.weight" not in load_safetensors(out / "decoder" / "unet" /
                                                            "diffusion_pytorch_model.safetensors")
    # what a researcher runs next
    assert sample_script.main(["--method", "shifted", "--checkpoint", str(out), "--prompt",
                               "a red handwritten seven", "--num_inference_steps", "2", "--no_progress", "--output_dir",
                               str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()
    # refusals: one line, nothing written
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        convert.main([*argv[:-1], str(tmp_path / "nothing"), "--heads", "3"])
    assert err.value.code == 2 and "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(SystemExit):
        convert.main([a for a in argv if a not in ("--mean", str(rel / "mean.pth"))])
    assert "pass --mean and --std" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a plain diffusers folder is not the release's
        convert.main([*argv[:argv.index("--decoder") + 1], str(TINY / "shifted" / "decoder"),
                      *argv[argv.index("--decoder") + 2:]])
    assert "UNet2DConditionModelEmb" in capsys.readouterr().err
    mine = tmp_path / "mine"  # a folder of the user's is never replaced
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        convert.main([*argv[:-1], str(mine)])
    assert "not a Shifted Diffusion checkpoint" in capsys.readouterr().err
    assert [f.name for f in mine.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------------- the shipped tiny priors


@pytest.mark.parametrize("variant", ["prior", "prior_baseline"])
def test_shipped_priors_keep_their_attention_biases_and_load_bit_for_bit(variant, tmp_path):
    from common.io import load_safetensors
    from shifted.pipeline import load_prior

    folder = TINY / "shifted" / variant
    weights = load_safetensors(folder / "diffusion_pytorch_model.safetensors")
    prior, _ = load_prior(folder)
    assert prior.config.attn_out_bias
    assert weights["blocks.0.attn.to_out.bias"].abs().max() > 0.01  # trained, so the flag is needed
    state = prior.state_dict()
    assert set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    # a folder saved before the flag existed (no key in config.json) loads the same way
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["attn_out_bias"]
    (legacy / "config.json").write_text(json.dumps(config))
    again, _ = load_prior(legacy)
    assert again.config.attn_out_bias and all(torch.equal(again.state_dict()[k], weights[k]) for k in weights)
    # a config that contradicts the weights is refused, not half-loaded
    config["attn_out_bias"] = False
    (legacy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"unexpected tensor blocks\.0\.attn\.to_out\.bias"):
        load_prior(legacy)
