"""Smoke runs of every Shifted Diffusion script through its command line, and their refusals of bad input.

Tiny random towers built here (an open_clip CLIP of the shipped architecture, a tiny SD folder), 16 digits images;
2 training steps per run. Bad input: one line on stderr, exit 2, nothing written.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import sample as sample_script  # noqa: E402
from script_loading import load_script  # noqa: E402


def shifted_script(name: str):
    return load_script(f"scripts/shifted/{name}.py")


eval_prior, extract_embeddings, fit_bank, finetune, make_checkpoint, process_img, sft_test, train_prior, img2img = (
    shifted_script(n) for n in ("eval_prior", "extract_embeddings", "fit_bank", "finetune", "make_checkpoint",
                             "process_img", "sft_test", "train", "test"))


TRAIN = ["--max_train_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--report_to", "none",
         "--seed", "0"]
PRIOR = ["--model_width", "32", "--model_layers", "1", "--model_num_heads", "2", "--model_dim_head", "16"]


def write_clip(folder: Path, seed: int) -> Path:
    """A random open_clip CLIP of the shipped tiny architecture, saved as train_clip.py saves it."""
    from common.models import create_open_clip, save_open_clip_folder

    torch.manual_seed(seed)
    model, _, preprocess_cfg = create_open_clip(REPO / "configs" / "baseline" / "clip.json")
    model_cfg = json.loads((REPO / "configs" / "baseline" / "clip.json").read_text())
    save_open_clip_folder(model.eval(), model_cfg, preprocess_cfg, folder, torch.float16)
    return folder


def write_digits(folder: Path, n: int = 16) -> Path:
    from common.digits import make_samples, real_digit_split, write_split

    x, y, _, _ = real_digit_split(0)
    write_split(make_samples(x[:n], y[:n], 0), folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from common.tiny import make_tiny_sd_folder

    root = tmp_path_factory.mktemp("shifted")
    from common.io import load_safetensors, save_safetensors

    clip = write_clip(root / "clipA", 0)
    other = root / "clipB"  # the same architecture with other weights: another embedding space
    shutil.copytree(clip, other)
    weights = load_safetensors(other / "open_clip_model.safetensors")
    save_safetensors({k: v.flip(0) if v.ndim == 2 else v for k, v in weights.items()},
                     other / "open_clip_model.safetensors")
    return {"root": root, "clip": clip, "other_clip": other, "sd": make_tiny_sd_folder(root / "sd"),
            "data": write_digits(root / "digits")}


def run_ok(main, argv):
    assert main(argv) == 0


def run_bad(main, argv, capsys, *needles):
    with pytest.raises(SystemExit) as err:
        main(argv)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert err.value.code == 2, stderr
    assert len(errors) == 1, stderr  # one line naming the problem and the fix
    message = errors[0]
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def trained(assets):
    """cache -> bank -> shifted and baseline priors -> language-free decoder, all through the scripts."""
    root, clip = assets["root"], str(assets["clip"])
    cache = root / "emb.safetensors"
    run_ok(extract_embeddings.main, ["--train_data_dir", str(assets["data"]), "--clip", clip, "--t5_max_length", "8",
                                     "--out", str(cache)])
    bank = root / "bank.safetensors"
    run_ok(fit_bank.main, ["--cache", str(cache), "--size", "2", "--out", str(bank)])
    run_ok(train_prior.main, ["--cache", str(cache), "--bank", str(bank), *PRIOR, *TRAIN,
                              "--output_dir", str(root / "prior_run")])
    # the baseline prior embeds the image folder itself (the data flags every trainer takes) instead of the cache
    run_ok(train_prior.main, ["--train_data_dir", str(assets["data"]), "--clip", clip, "--t5_max_length", "8",
                              "--no_bank", *PRIOR, *TRAIN, "--output_dir", str(root / "base_run")])
    prior = root / "prior_run"  # the prior is the output folder itself
    run_ok(finetune.main, ["--pretrained_model_name_or_path", str(assets["sd"]), "--train_data_dir",
                           str(assets["data"]), "--clip", clip, "--prior", str(prior), "--cache_latents", *TRAIN,
                           "--output_dir", str(root / "ft")])
    # from parts (VAE + UNet config), black-image null, learned, without the unused text tower
    run_ok(finetune.main, ["--vae_model_path", str(assets["sd"] / "vae"), "--unet_config",
                           str(assets["sd"] / "unet" / "config.json"), "--train_data_dir", str(assets["data"]),
                           "--clip", clip, "--null_embedding", "black", "--learned_null", "--no_text_tower", *TRAIN,
                           "--output_dir", str(root / "ft_parts")])
    ckpt = root / "ckpt"
    run_ok(make_checkpoint.main, ["--prior", str(prior), "--prior_baseline", str(root / "base_run"),
                                  "--decoder", str(root / "ft"), "--clip", clip, "--out", str(ckpt)])
    return {"cache": cache, "bank": bank, "prior": prior, "base": root / "base_run",
            "decoder": root / "ft", "ckpt": ckpt, "parts_decoder": root / "ft_parts"}


def test_training_scripts_write_loadable_models(assets, trained):
    from diffusers import StableDiffusionPipeline

    from shifted.bank import GaussianBank
    from shifted.checkpoint import model_name
    from shifted.embeddings import load_embedding_cache
    from shifted.pipeline import ImageDecoder, load_prior

    tensors, meta = load_embedding_cache(trained["cache"])
    assert tensors["image_emb"].shape == (16, 64) and tensors["text_states"].shape == (16, 8, 32)
    assert meta["clip_models"] == [model_name(assets["clip"])]
    bank = GaussianBank.load(trained["bank"], clip_models=meta["clip_models"])
    assert bank.size == 2 and float(bank.std_scale) == 5.0
    prior, prior_bank = load_prior(trained["prior"], clip_models=meta["clip_models"])
    assert prior.config.use_bank_token and torch.equal(prior_bank.mean, bank.mean)
    assert prior.config.text_encoder == model_name(assets["clip"] / "text_encoder")
    base, no_bank = load_prior(trained["base"])
    assert no_bank is None and not base.config.use_bank_token
    # the decoder is the fine-tune's output folder itself (no pipeline/ subfolder): a plain diffusers pipeline; the
    # projection sits next to it with the prior("") null; the release copies the model and not the run's files
    assert not (trained["decoder"] / "pipeline").exists() and (trained["decoder"] / "train_summary.json").is_file()
    assert not (trained["ckpt"] / "decoder" / "train_summary.json").exists()
    assert not (trained["prior"] / "prior").exists() and (trained["prior"] / "train_summary.json").is_file()
    assert sorted(p.name for p in (trained["ckpt"] / "prior").iterdir()) == [
        "bank.safetensors", "config.json", "diffusion_pytorch_model.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(str(trained["decoder"]))
    decoder = ImageDecoder.from_pretrained(trained["decoder"])
    assert pipe.unet.config.cross_attention_dim == decoder.projection.config.cross_attention_dim
    assert decoder.projection.config.in_dim == 64 and decoder.projection.null_embedding.abs().sum() > 0
    assert decoder.clip_models == tuple(meta["clip_models"])
    slim = StableDiffusionPipeline.from_pretrained(str(trained["parts_decoder"]), text_encoder=None, tokenizer=None)
    assert slim.text_encoder is None and not (trained["parts_decoder"] / "text_encoder").exists()
    parts = ImageDecoder.from_pretrained(trained["parts_decoder"])
    assert isinstance(parts.projection.null_embedding, torch.nn.Parameter)
    assert torch.allclose(parts(torch.randn(1, 64), num_inference_steps=2).mean(), torch.tensor(0.5), atol=0.5)


def test_inference_scripts_and_sample_cli(assets, trained, tmp_path):
    from common.judge import read_metadata
    from shifted import sample_cli

    clip = str(assets["clip"])
    image = assets["data"] / "images" / "00000.png"
    run_ok(img2img.main, ["--decoder", str(trained["decoder"]), "--clip", clip, "--image", str(image),
                          "--image", str(image), "--num_inference_steps", "2", "--negative", "black", "--output_dir",
                          str(tmp_path / "i2i")])
    assert len(list((tmp_path / "i2i" / "images").iterdir())) == 2
    run_ok(sft_test.main, ["--prior", str(trained["prior"]), "--decoder", str(trained["decoder"]), "--clip", clip,
                           "--prompt", "a red handwritten seven", "--num_images", "3", "--num_inference_steps", "2",
                           "--output_dir", str(tmp_path / "t2i")])
    rows = read_metadata(tmp_path / "t2i")
    assert [r["text"] for r in rows] == ["a red handwritten seven"] * 3
    # the checkpoint layout through scripts/sample.py, both priors
    for variant in ("shifted", "baseline"):
        out = tmp_path / f"sample_{variant}"
        run_ok(sample_script.main, ["--method", "shifted", "--checkpoint", str(trained["ckpt"]),
                                    "--prompt", "a blue handwritten two", "--num_inference_steps", "2", "--prior_variant", variant,
                                    "--no_progress", "--output_dir", str(out)])
        assert (out / "grid.png").is_file()
    scores = sample_cli.evaluate_digits(tmp_path / "eval", n=3, checkpoint=trained["ckpt"],
                                        decoder_kwargs={"num_inference_steps": 2})
    assert scores["count"] == 3 and 0 <= scores["both_accuracy"] <= 1 and scores["seconds"] > 0
    assert len(read_metadata(tmp_path / "eval")) == 3
    # the prior comparison and the image squarer
    run_ok(eval_prior.main, ["--cache", str(trained["cache"]), "--prior", str(trained["prior"]), "--prior",
                             str(trained["base"]), "--seeds", "0", "--json", str(tmp_path / "cmp.json")])
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert len(result["priors"]) == 2 and all(r["frechet"] >= 0 for r in result["priors"].values())
    run_ok(process_img.main, ["--src", str(assets["data"]), "--dest", str(tmp_path / "sq"), "--size", "16"])
    from PIL import Image

    assert Image.open(tmp_path / "sq" / "images" / "00003.png").size == (16, 16)
    assert (tmp_path / "sq" / "metadata.jsonl").is_file()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(assets, trained, tmp_path, capsys):
    from shifted.bank import GaussianBank

    clip, other = str(assets["clip"]), str(assets["other_clip"])
    out = tmp_path / "out"
    # a bank of another dimension
    small = tmp_path / "bank32.safetensors"
    GaussianBank(torch.zeros(2, 32), torch.ones(2, 32)).save(small)
    run_bad(train_prior.main, ["--cache", str(trained["cache"]), "--bank", str(small), *PRIOR, *TRAIN,
                               "--output_dir", str(out)], capsys, "32-dimensional", "64-dimensional")
    # the reference's mean.pth / std.pth of another width
    torch.save(torch.zeros(3, 48), tmp_path / "mean.pth")
    torch.save(torch.ones(3, 48), tmp_path / "std.pth")
    run_bad(train_prior.main, ["--cache", str(trained["cache"]), "--mean_path", str(tmp_path / "mean.pth"),
                               "--std_path", str(tmp_path / "std.pth"), *PRIOR, *TRAIN, "--output_dir", str(out)],
            capsys, "K x 64")
    # a bank, a cache or a prior from other CLIP models
    other_cache = tmp_path / "other.safetensors"
    run_ok(extract_embeddings.main, ["--train_data_dir", str(assets["data"]), "--clip", other, "--t5_max_length",
                                     "8", "--out", str(other_cache)])
    capsys.readouterr()
    run_bad(train_prior.main, ["--cache", str(other_cache), "--bank", str(trained["bank"]), *PRIOR, *TRAIN,
                               "--output_dir", str(out)], capsys, "CLIP models")
    run_bad(sft_test.main, ["--prior", str(trained["prior"]), "--decoder", str(trained["decoder"]), "--clip", other,
                            "--prompt", "a red one", "--num_inference_steps", "2", "--output_dir", str(out)], capsys, "CLIP models")
    run_bad(img2img.main, ["--decoder", str(trained["decoder"]), "--clip", other, "--image",
                           str(assets["data"] / "images" / "00000.png"), "--output_dir", str(out)], capsys,
            "CLIP models")
    run_bad(fit_bank.main, ["--cache", str(other_cache), "--clip", clip, "--out", str(tmp_path / "b.safetensors")],
            capsys, "CLIP models")
    # empty text
    run_bad(sft_test.main, ["--prior", str(trained["prior"]), "--decoder", str(trained["decoder"]), "--clip", clip,
                            "--prompt", "  ", "--output_dir", str(out)], capsys, "empty")
    # an unreadable image
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    run_bad(img2img.main, ["--decoder", str(trained["decoder"]), "--clip", clip, "--image", str(broken),
                           "--output_dir", str(out)], capsys, "broken.png")
    src = tmp_path / "src"
    shutil.copytree(assets["data"] / "images", src)
    shutil.copy(broken, src / "zz.png")
    run_bad(process_img.main, ["--src", str(src), "--dest", str(out), "--size", "16"], capsys, "zz.png")
    # others: no bank for a shifted prior, a caption-free cache for the prior, a checkpoint that is not one
    run_bad(train_prior.main, ["--cache", str(trained["cache"]), *PRIOR, *TRAIN, "--output_dir", str(out)], capsys,
            "--bank")
    images_only = tmp_path / "img.safetensors"
    run_ok(extract_embeddings.main, ["--train_data_dir", str(assets["data"]), "--clip", clip, "--no_text",
                                     "--out", str(images_only)])
    capsys.readouterr()
    run_bad(train_prior.main, ["--cache", str(images_only), "--no_bank", *PRIOR, *TRAIN, "--output_dir", str(out)],
            capsys, "no captions")
    run_bad(sample_script.main, ["--method", "shifted", "--checkpoint", str(tmp_path),
                                 "--prompt", "a red one", "--output_dir", str(out)], capsys, "shifted.json")
    from common.io import save_safetensors

    null32 = save_safetensors({"embedding": torch.zeros(32)}, tmp_path / "null32.safetensors")
    run_bad(finetune.main, ["--pretrained_model_name_or_path", str(assets["sd"]), "--train_data_dir",
                            str(assets["data"]), "--clip", clip, "--null_embedding", str(null32), *TRAIN,
                            "--output_dir", str(out)], capsys, "32-d")
    assert not out.exists()


SHIPPED = REPO / "ckpt" / "tiny" / "shifted"


def test_shipped_checkpoint_fits_the_budget_and_matches_the_shipped_clip():
    """Every file < 5 MB, the folder < 15 MB, and its priors / decoder still name the shipped CLIP's weights."""
    assert (SHIPPED / "shifted.json").is_file(), "ckpt/tiny/shifted is missing (see its README to retrain)"
    from shifted.checkpoint import DECODER_FILE, ShiftedCheckpoint, model_name
    from shifted.pipeline import load_prior

    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert max(f.stat().st_size for f in files) < 5 * 2**20
    assert sum(f.stat().st_size for f in files) < 15 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    ckpt = ShiftedCheckpoint(SHIPPED)
    names = [model_name(p) for p in ckpt.clip_paths]
    states = model_name(ckpt.text_states_path)
    _, bank = load_prior(ckpt.prior_folder("shifted"), clip_models=names, text_encoder=states)
    _, no_bank = load_prior(ckpt.prior_folder("baseline"), clip_models=names, text_encoder=states)
    assert bank is not None and no_bank is None  # a retrained ckpt/tiny/clip would have raised above
    assert json.loads((ckpt.decoder_folder / DECODER_FILE).read_text())["clip_models"] == names
