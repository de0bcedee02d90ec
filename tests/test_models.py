"""common.models loaders and common.tiny builders: every loader round-trips a tiny model saved to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from common.models import (
    load_clip_text,
    load_open_clip,
    load_open_clip_state_dict,
    load_t5_encoder,
    load_unet,
    load_vae,
    read_open_clip_weights,
)
from common.tiny import (
    CLIP_EOS_ID,
    TINY_OPEN_CLIP_CONFIG_PATH,
    clip_bpe_vocab,
    clip_tokenizer,
    make_tiny_sd_folder,
    t5_tokenizer,
    tiny_clip_text,
    tiny_open_clip,
    tiny_open_clip_config,
    tiny_t5_encoder,
    tiny_unet2d,
    tiny_unet2d_condition,
    tiny_vae,
)


pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

PROMPTS = [
    "a red handwritten seven",
    "A photo of a cat, sitting on the mat!",
    "It's 3.14 o'clock,   isn't it? café naïve",
    "digits: 0 1 2 3 4 5 6 7 8 9 -- (blue) [green] {yellow}",
]


class RunsCode:
    """Unpickling this runs ``touch <marker>``: the canonical malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return make_tiny_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0)


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------------------------


def test_builders_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert params_equal(tiny_unet2d_condition(seed=0), tiny_unet2d_condition(seed=0))
    assert not params_equal(tiny_vae(seed=0), tiny_vae(seed=1))
    assert torch.equal(torch.get_rng_state(), before)


def test_tiny_shapes():
    with torch.no_grad():
        latents = tiny_vae().encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
        assert latents.shape == (2, 4, 8, 8)
        out = tiny_unet2d_condition()(latents, torch.tensor([10, 500]), torch.zeros(2, 77, 32)).sample
        assert out.shape == (2, 4, 8, 8)
        assert tiny_unet2d(out_channels=6)(torch.zeros(1, 3, 32, 32), 3).sample.shape == (1, 6, 32, 32)
    assert 0.5e6 < sum(p.numel() for p in tiny_unet2d_condition().parameters()) < 1.2e6


def test_open_clip_config_file_matches_builder():
    assert json.loads(TINY_OPEN_CLIP_CONFIG_PATH.read_text()) == tiny_open_clip_config()


# ---------------------------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_clip_tokenizer_ids_equal_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    ours = clip_tokenizer()
    long_prompt = " ".join(["a red seven next to a blue four"] * 20)
    for prompt in [*PROMPTS, long_prompt]:
        ref = reference([prompt])[0].tolist()
        ref = ref[: ref.index(reference.eot_token_id) + 1]  # open_clip pads with 0 after EOT
        got = ours(prompt, truncation=True, max_length=77).input_ids
        assert got == ref, prompt
    assert len(ours) == 49408 and ours.bos_token_id == 49406 and ours.eos_token_id == ours.pad_token_id == CLIP_EOS_ID
    padded = ours(PROMPTS[0], padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == CLIP_EOS_ID


def test_clip_vocab_files_load_in_transformers(sd_folder):
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    assert vocab[256] == "!</w>" and vocab[-2:] == ("<|startoftext|>", "<|endoftext|>") and len(merges) == 48894
    only_files = sd_folder.parent / "vocab-only"
    only_files.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (only_files / name).write_bytes((sd_folder / "tokenizer" / name).read_bytes())
    from_files = CLIPTokenizer.from_pretrained(only_files, local_files_only=True)
    for prompt in PROMPTS:
        assert from_files(prompt).input_ids == clip_tokenizer()(prompt).input_ids


def test_t5_tokenizer_is_real_t5_and_round_trips(tmp_path):
    from transformers import AutoTokenizer, T5Tokenizer

    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(reloaded, T5Tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert ids == reloaded(prompt).input_ids and ids[-1] == 1
    ids = tokenizer("a red handwritten seven").input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red handwritten seven"


# ---------------------------------------------------------------------------------------------------------------
# diffusers + transformers loaders: round trips
# ---------------------------------------------------------------------------------------------------------------


def test_load_vae_round_trip(tmp_path):
    vae = tiny_vae(seed=3)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)
        assert torch.equal(loaded.decode(torch.ones(1, 4, 8, 8)).sample, vae.decode(torch.ones(1, 4, 8, 8)).sample)


@pytest.mark.parametrize("conditional", [True, False])
def test_load_unet_picks_class_from_config(tmp_path, conditional):
    unet = tiny_unet2d_condition(seed=4) if conditional else tiny_unet2d(seed=4, out_channels=6)
    unet.save_pretrained(tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet")
    assert type(loaded) is type(unet)
    with torch.no_grad():
        if conditional:
            args = (torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.randn(2, 77, 32))
        else:
            args = (torch.randn(2, 3, 32, 32), torch.tensor([1, 999]))
        assert torch.equal(loaded(*args).sample, unet(*args).sample)


@pytest.mark.parametrize("with_projection", [False, True])
def test_load_clip_text_round_trip(tmp_path, with_projection):
    model = tiny_clip_text(seed=5, with_projection=with_projection)
    model.save_pretrained(tmp_path / "text_encoder")
    clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "model_index.json").write_text("{}")
    loaded, tokenizer = load_clip_text(tmp_path)  # pipeline root: text_encoder/ + sibling tokenizer/
    assert type(loaded) is type(model)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_load_clip_text_from_full_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text = tiny_clip_text().config
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)).eval()
    full.save_pretrained(tmp_path)
    clip_tokenizer().save_pretrained(tmp_path)  # Hub layout: tokenizer files next to the weights
    loaded, _ = load_clip_text(tmp_path, with_projection=True)
    ids = clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).text_embeds, full.get_text_features(ids).pooler_output, atol=1e-6)


def test_load_t5_encoder_round_trip(tmp_path):
    model = tiny_t5_encoder(seed=6)
    model.save_pretrained(tmp_path / "t5")
    t5_tokenizer().save_pretrained(tmp_path / "t5")
    loaded, tokenizer = load_t5_encoder(tmp_path / "t5")
    assert type(tokenizer).__name__ == "T5Tokenizer"
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)


# ---------------------------------------------------------------------------------------------------------------
# loader errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_vae, load_unet, load_clip_text, load_t5_encoder])
def test_missing_path_is_one_line_user_error(tmp_path, loader):
    with pytest.raises(UserError) as info:
        loader(tmp_path / "nope")
    assert str(info.value) == (
        f"model path {tmp_path / 'nope'} does not exist: pass the folder written by save_pretrained "
        "(a pipeline folder, or the component folder inside it)"
    )


def test_wrong_model_class_names_expected_and_found(sd_folder):
    with pytest.raises(UserError, match=r"vae holds AutoencoderKL, not a UNet \(expected _class_name "
                                        r"UNet2DConditionModel or UNet2DModel\)"):
        load_unet(sd_folder, subfolder="vae")
    with pytest.raises(UserError, match="unet holds UNet2DConditionModel, not a VAE"):
        load_vae(sd_folder / "unet")
    with pytest.raises(UserError, match="holds CLIPTextModel, not a T5 encoder"):
        load_t5_encoder(sd_folder)
    with pytest.raises(UserError, match="holds AutoencoderKL, not a CLIP text encoder"):
        load_clip_text(sd_folder, subfolder="vae")
    with pytest.raises(UserError, match="has no subfolder 'unet_ema'"):
        load_unet(sd_folder, subfolder="unet_ema")


def test_corrupt_or_missing_weights_are_user_errors(sd_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.safetensors is not a readable safetensors file"):
        load_unet(broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="has a config.json but no weights file"):
        load_vae(broken)
    (broken / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load_clip_text(broken)


def test_loaders_write_nothing(sd_folder):
    def snapshot():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sd_folder.parent.rglob("*")}

    before = snapshot()
    load_vae(sd_folder)
    load_unet(sd_folder / "unet")
    load_clip_text(sd_folder / "text_encoder")  # component folder: tokenizer found as the sibling
    assert snapshot() == before


def test_pickled_code_in_bin_weights_is_refused(sd_folder, tmp_path):
    import shutil

    broken = tmp_path / "evil"
    shutil.copytree(sd_folder / "vae", broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"payload": RunsCode(marker)}, broken / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="pickled Python objects"):
        load_vae(broken)
    assert not marker.exists()


def test_tokenizer_mismatches_are_user_errors(sd_folder, tmp_path):
    t5_tokenizer().save_pretrained(tmp_path / "t5tok")
    with pytest.raises(UserError, match="holds a T5Tokenizer, expected CLIPTokenizer"):
        load_clip_text(sd_folder, tokenizer_path=tmp_path / "t5tok")
    tiny_t5_encoder().save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match="has 49408 tokens but the encoder .* embeds only 8104"):
        load_t5_encoder(tmp_path / "t5", tokenizer_path=sd_folder / "tokenizer")
    with pytest.raises(UserError, match="found no tokenizer in or next to"):
        load_t5_encoder(tmp_path / "t5")


# ---------------------------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------------------------


def _open_clip_outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    from open_clip.tokenizer import SimpleTokenizer

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(SimpleTokenizer()(PROMPTS[:2]))


def _trace_openai_style(model, path: Path) -> Path:
    """A TorchScript archive laid out like OpenAI's CLIP release: a traced CLIP with forward/encode_* methods.

    open_clip's ``trace_model`` would do this but fails in open_clip 3.3 for ViTs (``visual.image_size`` is a
    tuple), so trace the three methods directly, as it intends.
    """
    images, text = torch.randn(2, 3, 32, 32), torch.zeros(2, 77, dtype=torch.int)
    traced = torch.jit.trace_module(
        model, {"forward": (images, text), "encode_text": (text,), "encode_image": (images,)}
    )
    torch.jit.save(traced, str(path))
    return path


@pytest.fixture(scope="module")
def open_clip_reference():
    model = tiny_open_clip(seed=7)
    return model, _open_clip_outputs(model)


@pytest.mark.parametrize("form", ["safetensors", "state_dict_pt", "wrapped_bin", "openai_jit"])
def test_load_open_clip_weight_formats(tmp_path, open_clip_reference, monkeypatch, form):
    from common.io import save_safetensors

    model, (image_ref, text_ref) = open_clip_reference
    state = model.state_dict()
    if form == "safetensors":
        weights = save_safetensors(state, tmp_path / "w.safetensors")
    elif form == "state_dict_pt":
        weights = tmp_path / "w.pt"
        torch.save(state, weights)
    elif form == "wrapped_bin":  # open_clip training checkpoints: {"state_dict": {"module.<key>": ...}, "epoch": ...}
        weights = tmp_path / "epoch_1.bin"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)
    else:
        weights = _trace_openai_style(model, tmp_path / "ViT-tiny.pt")

        def no_jit(*args, **kwargs):
            raise AssertionError("torch.jit.load must not be used: it runs the archive's code")

        monkeypatch.setattr(torch.jit, "load", no_jit)
    loaded, preprocess, tokenizer = load_open_clip(TINY_OPEN_CLIP_CONFIG_PATH, weights)
    image_out, text_out = _open_clip_outputs(loaded)
    assert torch.equal(image_out, image_ref) and torch.equal(text_out, text_ref)
    assert not loaded.training
    assert tokenizer(["a red seven"]).shape == (1, 77)
    from PIL import Image

    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_openai_jit_weights_fit_open_clips_openai_builder(tmp_path, open_clip_reference):
    """The archive really has OpenAI's layout: open_clip's own OpenAI builder infers the same architecture."""
    from open_clip.model import build_model_from_openai_state_dict

    model, (image_ref, text_ref) = open_clip_reference
    weights = read_open_clip_weights(_trace_openai_style(model, tmp_path / "a.pt"))
    weights.pop("attn_mask")  # open_clip keeps the causal mask as a buffer; OpenAI's trace folded it in
    rebuilt = build_model_from_openai_state_dict(weights, cast_dtype=None).float()
    image_out, text_out = _open_clip_outputs(rebuilt)  # the builder rounds weights through fp16, as OpenAI shipped
    assert torch.allclose(image_out, image_ref, atol=2e-2) and torch.allclose(text_out, text_ref, atol=2e-2)


def test_load_open_clip_from_local_dir_layout(tmp_path, open_clip_reference):
    from common.io import save_safetensors

    model, (image_ref, _) = open_clip_reference
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_config()}))
    save_safetensors(model.state_dict(), tmp_path / "open_clip_model.safetensors")
    loaded, _, _ = load_open_clip(tmp_path)
    assert torch.equal(_open_clip_outputs(loaded)[0], image_ref)


def test_load_open_clip_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"visual.proj": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="evil.pt holds pickled Python objects, not plain weights: refusing"):
        load_open_clip(TINY_OPEN_CLIP_CONFIG_PATH, tmp_path / "evil.pt")
    assert not marker.exists()


def test_load_open_clip_bad_inputs(tmp_path, open_clip_reference):
    from common.io import save_safetensors

    model, _ = open_clip_reference
    with pytest.raises(UserError, match="model path .*nope.pt does not exist"):
        load_open_clip(TINY_OPEN_CLIP_CONFIG_PATH, tmp_path / "nope.pt")
    with pytest.raises(UserError, match="unknown open_clip model 'ViT-Nope'"):
        load_open_clip("ViT-Nope", tmp_path / "nope.pt")
    clash = tmp_path / "ViT-B-32.json"
    clash.write_text(json.dumps(tiny_open_clip_config()))
    with pytest.raises(UserError, match="already has a different model config named 'ViT-B-32'"):
        load_open_clip(clash, tmp_path / "nope.pt")
    partial = save_safetensors({k: v for k, v in model.state_dict().items() if "visual" not in k}, tmp_path / "p.safetensors")
    with pytest.raises(UserError, match=r"does not fit this open_clip model \(missing \['visual"):
        load_open_clip(TINY_OPEN_CLIP_CONFIG_PATH, partial)
    wrong = {k: (v[:1] if k == "text_projection" else v) for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="does not fit this open_clip model: .*size mismatch"):
        load_open_clip_state_dict(model, wrong, "wrong.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# a whole tiny Stable Diffusion
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_sd_folder_loads_in_plain_diffusers_and_generates(sd_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(sd_folder)
    scheduler = pipeline.scheduler
    assert isinstance(scheduler, DDIMScheduler)
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end) == (
        "scaled_linear", 0.00085, 0.012)
    assert scheduler.config.steps_offset == 1 and not scheduler.config.set_alpha_to_one
    assert not scheduler.config.clip_sample and pipeline.safety_checker is None
    images = pipeline(
        "a red handwritten seven", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (1, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0
    assert sorted(p.name for p in sd_folder.rglob("*.safetensors")) == [
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors"]
    assert not list(sd_folder.rglob("*.bin"))


def test_tiny_sd_folder_is_deterministic_and_replaced_atomically(sd_folder, tmp_path):
    from common.io import load_safetensors

    other = make_tiny_sd_folder(tmp_path / "again", seed=0)
    make_tiny_sd_folder(other, seed=0)  # over an existing folder: replaced, no temp siblings left
    assert sorted(os.listdir(tmp_path)) == ["again"]
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        ours, theirs = (load_safetensors(root / f"{part}.safetensors") for root in (sd_folder, other))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
