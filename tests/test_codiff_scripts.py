"""Smoke runs of every codiff script on tiny random models through their real command lines, the files
generate.py documents, and bad input: one line on stderr, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_loading import load_script  # noqa: E402

from common.digits import build_digits
from common.io import OUTPUT_MANIFEST


REPO = Path(__file__).resolve().parent.parent


def _script(name: str):
    return load_script(f"scripts/codiff/{name}.py")


edit_script = _script("edit")
evaluate_script = _script("evaluate")
generate_script = _script("generate")
train_dynamic = _script("train_dynamic")
train_unimodal = _script("train_unimodal")


COMMON = ["--max_train_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--report_to", "none"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Digits (16 training rows), a tiny SD folder as the text member, a 2-step mask member and collaboration."""
    from common.tiny import make_tiny_sd_folder

    root = tmp_path_factory.mktemp("codiff")
    digits = build_digits(root / "digits")
    small = root / "train"
    shutil.copytree(digits / "train", small)
    rows = (small / "metadata.jsonl").read_text().splitlines()[:16]
    (small / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    sd = make_tiny_sd_folder(root / "sd", seed=3)
    assert train_unimodal.main(["--modality", "mask", "--train_data_dir", str(small), "--vae_model_path", str(sd),
                                "--noise_schedule_from", str(sd), "--unet_config",
                                str(REPO / "configs" / "baseline" / "unet.json"), "--cond_dropout", "0.2",
                                "--mask_conditioning", "concat", "--use_ema", "--output_dir", str(root / "mask_run"),
                                "--validation_masks", *(str(digits / "test" / "masks" / f"0000{i}.png") for i in (0, 1)),
                                *COMMON]) == 0
    assert train_dynamic.main(["--mask_model_dir", str(root / "mask_run"), "--text_model_dir", str(sd),
                               "--train_data_dir", str(small), "--output_dir", str(root / "dyn_run"),
                               "--default_steps", "3", "--validation_prompts", "a red handwritten seven",
                               "a blue handwritten two", *COMMON]) == 0
    return {"root": root, "digits": digits, "small": small, "sd": sd, "mask_member": root / "mask_run",
            "ckpt": root / "dyn_run", "mask": digits / "test" / "masks" / "00000.png",
            "image": digits / "test" / "images" / "00000.png"}


def _run_failing(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert message and message[-1].startswith("error: ")
    return message[-1]


def test_training_writes_a_member_and_a_loadable_checkpoint(world):
    from codiff.checkpoint import load_collaboration

    meta = json.loads((world["mask_member"] / "codiff_member.json").read_text())
    assert meta["kind"] == "mask" and meta["vae"] == "../sd/vae"  # frozen towers by path, relative to the member
    assert meta["mask_conditioning"] == "concat"
    unet_config = json.loads((world["mask_member"] / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == 4 + 2  # latent channels + one map per class
    assert (world["mask_member"] / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (world["mask_member"] / "mask_encoder" / "model.safetensors").is_file()
    # a lone member validates too: one image per --validation_masks file
    member_shots = sorted((world["mask_member"] / "validation").glob("step-*/*.png"))
    assert len([p for p in member_shots if "grid" not in p.name]) >= 2, member_shots
    # the final validation: the collaboration's samples, one PNG per prompt (and a grid), after the last step
    shots = sorted(p.name for p in (world["ckpt"] / "validation").glob("step-*/*.png"))
    assert len(shots) >= 2, shots
    index = json.loads((world["ckpt"] / "codiff.json").read_text())
    assert index["modalities"] == ["mask", "text"] and index["sampling"]["ddim_steps"] == 3
    collab = load_collaboration(world["ckpt"])
    assert collab.modalities == ("mask", "text") and collab.image_size == 32
    assert collab.scheduler_config["beta_end"] == 0.012  # the text member's (SD) schedule, not LDM's
    assert collab.members["mask"].token_dim == 256  # concat members take (and their diffuser reads) one-hot tokens
    assert collab.model.diffusers["mask"].config.cross_attention_dim == 256
    assert all(not p.requires_grad for p in collab.model.parameters())
    # the members are the trained ones, frozen; the diffusers are no longer zero after two steps
    assert any(v.abs().sum() > 0 for k, v in collab.model.diffusers["mask"].state_dict().items() if "conv_out" in k)


def test_text_member_trains_the_same_way(world):
    from codiff.checkpoint import load_member

    out = world["root"] / "text_run"
    assert train_unimodal.main(["--modality", "text", "--train_data_dir", str(world["small"]), "--vae_model_path",
                                str(world["sd"]), "--text_encoder_path", str(world["sd"]), "--unet_config",
                                str(REPO / "configs" / "baseline" / "unet.json"), "--cond_dropout", "0.1",
                                "--validation_prompts", "a red seven", "--output_dir", str(out), *COMMON]) == 0
    shots = [p for p in (out / "validation").glob("step-*/*.png") if "grid" not in p.name]
    assert len(shots) >= 1, shots
    member = load_member(out)  # the member folder is the output folder itself
    assert member.kind == "text" and member.encode(["a red seven"]).shape == (1, 77, 32)
    assert member.null_tokens(2).shape == (2, 77, 32)


def test_generate_writes_the_documented_files(world, capsys):
    out = world["root"] / "gen"
    assert generate_script.main(["--checkpoint", str(world["ckpt"]), "--mask_path", str(world["mask"]),
                                 "--input_text", "a green handwritten seven", "--batch_size", "2", "--seed", "0",
                                 "--save_z", "--return_influence_function", "--display_x_inter", "--save_mixed",
                                 "--save_folder", str(out)]) == 0
    folders = list(out.glob("00000/*"))
    assert len(folders) == 1
    folder = folders[0]
    steps = 3  # the checkpoint's default
    grid_w, grid_h = steps * (32 + 2) + 2, 32 + 4  # S tiles of 32 px (8x8 maps upscaled 4x), 10 per row, padding 2
    expected = {"00000.png": (32, 32), "settings.json": None}
    for idx in ("000000", "000001"):
        expected.update({f"{idx}_x_0.png": (32, 32), f"{idx}_mask_influence_function.png": (grid_w, grid_h),
                         f"{idx}_text_influence_function.png": (grid_w, grid_h), f"{idx}_x_inter.png": (grid_w, grid_h),
                         f"{idx}_pred_x0.png": (grid_w, grid_h), f"{idx}_z_0.png": (4 * 9 + 1, 10),
                         f"{idx}_mixed.png": (32, 32)})
    assert sorted(p.name for p in folder.iterdir()) == sorted([*expected, OUTPUT_MANIFEST])
    for name, size in expected.items():
        if size is not None:
            with Image.open(folder / name) as im:
                assert im.size == size and im.mode == "RGB", name
    # influence maps partition unity: the two grids' interiors add up to white
    mask_map = np.asarray(Image.open(folder / "000000_mask_influence_function.png"), dtype=np.int32)[2:34, 2:34, 0]
    text_map = np.asarray(Image.open(folder / "000000_text_influence_function.png"), dtype=np.int32)[2:34, 2:34, 0]
    assert np.abs(mask_map + text_map - 255).max() <= 1
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["ddim_steps"] == 3 and len(settings["timesteps"]) == 3 and settings["save_z"] is True
    # seeded: the same command gives the same image; other weightings run too
    first = np.asarray(Image.open(folder / "000000_x_0.png"))
    assert generate_script.main(["--checkpoint", str(world["ckpt"]), "--mask_path", str(world["mask"]),
                                 "--input_text", "a green handwritten seven", "--batch_size", "2", "--seed", "0",
                                 "--save_folder", str(out)]) == 0
    assert np.array_equal(first, np.asarray(Image.open(folder / "000000_x_0.png")))
    for weighting in ("average", "text_only"):
        argv = ["--checkpoint", str(world["ckpt"]), "--input_text", "a red two", "--batch_size", "1",
                "--weighting", weighting, "--save_folder", str(out / weighting), "--num_inference_steps", "2"]
        if weighting == "average":
            argv += ["--mask_path", str(world["mask"]), "--guidance_scale", "2"]
        assert generate_script.main(argv) == 0
    assert generate_script.main(["--checkpoint", str(world["ckpt"]), "--mask_path", str(world["mask"]),
                                 "--input_text", "a red two", "--batch_size", "1", "--released_reweighting",
                                 "--num_inference_steps", "2", "--save_folder", str(out / "released")]) == 0


def test_generate_rejects_bad_masks_and_missing_models(world, tmp_path, capsys):
    base = ["--checkpoint", str(world["ckpt"]), "--input_text", "a red seven", "--num_inference_steps", "2", "--save_folder",
            str(tmp_path / "out")]
    binary = np.asarray(Image.open(world["mask"])).astype(np.uint8) * 255  # a 0/255 mask: ids outside the palette
    Image.fromarray(binary, mode="L").save(tmp_path / "binary.png")
    message = _run_failing(generate_script.main, [*base, "--mask_path", str(tmp_path / "binary.png")], capsys)
    assert "outside the palette" in message and "255" in message
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(tmp_path / "small.png")
    message = _run_failing(generate_script.main, [*base, "--mask_path", str(tmp_path / "small.png")], capsys)
    assert "16x16" in message and "32x32" in message
    message = _run_failing(generate_script.main, base, capsys)  # the mask model without its condition
    assert "needs its condition" in message and "--mask_path" in message
    # a condition whose model the checkpoint lacks: a text-only collaboration given a mask
    text_only = tmp_path / "text_only"
    shutil.copytree(world["ckpt"], text_only)
    index = json.loads((text_only / "codiff.json").read_text())
    index["modalities"], index["members"] = ["text"], {"text": str(world["sd"])}
    index["vae"] = str(world["sd"] / "vae")
    (text_only / "codiff.json").write_text(json.dumps(index))
    message = _run_failing(generate_script.main, ["--checkpoint", str(text_only), "--input_text", "a red seven",
                                                  "--mask_path", str(world["mask"]), "--num_inference_steps", "2"], capsys)
    assert "no mask model" in message
    message = _run_failing(generate_script.main, [*base, "--mask_path", str(world["mask"]), "--checkpoint",
                                                  str(tmp_path / "nowhere")], capsys)
    assert "does not exist" in message
    message = _run_failing(generate_script.main, [*base, "--mask_path", str(world["mask"]), "--weighting", "average",
                                                  "--released_reweighting"], capsys)
    assert "--weighting collaborative" in message
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_generate_truncates_an_over_long_prompt_with_a_warning(world, tmp_path, capsys):
    long_text = "a red handwritten seven " + " ".join(["with a very long tail"] * 30)
    assert generate_script.main(["--checkpoint", str(world["ckpt"]), "--mask_path", str(world["mask"]),
                                 "--input_text", long_text, "--batch_size", "1", "--num_inference_steps", "2",
                                 "--save_folder", str(tmp_path / "long")]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "tokens are dropped" in warning[0] and "limit of 77" in warning[0]
    assert len(list((tmp_path / "long").rglob("*_x_0.png"))) == 1


def test_train_dynamic_rejects_missing_and_mismatched_members(world, tmp_path, capsys):
    from codiff.checkpoint import check_members_compatible, load_member

    argv = ["--train_data_dir", str(world["small"]), "--output_dir", str(tmp_path / "o"), *COMMON]
    message = _run_failing(train_dynamic.main, ["--mask_model_dir", str(tmp_path / "missing"), *argv], capsys)
    assert "does not exist" in message
    message = _run_failing(train_dynamic.main, ["--mask_model_dir", str(world["sd"]), *argv], capsys)
    assert "not a mask member" in message
    message = _run_failing(train_dynamic.main, argv, capsys)
    assert "--mask_model_dir" in message
    mask, text = load_member(world["mask_member"]), load_member(world["sd"])
    mask.scheduler_config = {**mask.scheduler_config, "beta_end": 0.0195, "beta_start": 0.0015}
    with pytest.raises(Exception, match="different noise schedules"):
        check_members_compatible({"mask": mask, "text": text})
    message = _run_failing(train_unimodal.main, ["--modality", "text", "--train_data_dir", str(world["small"]),
                                                 "--vae_model_path", str(world["sd"]), "--unet_config",
                                                 str(REPO / "configs" / "baseline" / "unet.json"), *COMMON], capsys)
    assert "--text_encoder_path" in message
    message = _run_failing(train_unimodal.main, ["--modality", "text", "--train_data_dir", str(world["small"]),
                                                 "--vae_model_path", str(world["sd"]), "--text_encoder_path",
                                                 str(world["sd"]), "--unet_config",
                                                 str(REPO / "configs" / "baseline" / "unet.json"), "--validation_masks",
                                                 str(world["mask"]), "--output_dir", str(world["root"] / "never"),
                                                 *COMMON], capsys)
    assert "--validation_masks is for --modality mask" in message


def test_edit_imagic_per_modality_then_collaborate(world, tmp_path, capsys):
    out = tmp_path / "edit"
    argv = ["--checkpoint", str(world["ckpt"]), "--input_image_path", str(world["image"]), "--mask_path",
            str(world["mask"]), "--text_prompt", "a blue handwritten seven", "--stage1_num_iter", "2",
            "--stage2_num_iter", "2", "--stage2_lr", "1e-4", "--alpha_list", "0,1.5", "--num_inference_steps", "2",
            "--save_unimodal", "--save_checkpoint", "--save_folder", str(out)]
    assert edit_script.main(argv) == 0
    folder = out / "00000"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for sub in ("", "mask_only/", "text_only/"):
        assert {f"{sub}000000_x_0_0_alpha=0.png", f"{sub}000000_x_0_1_alpha=1.5.png"} <= names
    assert {"input.png", "edit.json", "imagic/text_tokens.safetensors", "imagic/text_unet/config.json",
            "imagic/mask_unet/unet/config.json", "imagic/mask_unet/mask_encoder/model.safetensors"} <= names
    summary = json.loads((folder / "edit.json").read_text())
    assert summary["alphas"] == [0.0, 1.5] and set(summary["imagic"]) == {"mask", "text"}
    message = _run_failing(edit_script.main, [*argv[:-2], "--save_folder", str(tmp_path / "e2"), "--input_image_path",
                                              str(world["digits"] / "digits.json")], capsys)
    assert "not an image PIL can read" in message
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    message = _run_failing(edit_script.main, [*argv[:2], "--input_image_path", str(tmp_path / "small.png"),
                                              "--mask_path", str(world["mask"]), "--text_prompt", "a blue seven"], capsys)
    assert "20x20" in message
    message = _run_failing(edit_script.main, [*argv[:2], "--input_image_path", str(world["image"]), "--text_prompt",
                                              "a blue seven"], capsys)
    assert "--mask_path" in message


def test_sample_script_method_codiff(world, tmp_path, monkeypatch, capsys):
    import codiff.sample_cli as cli

    sample_script = load_script("scripts/sample.py")

    monkeypatch.setattr(cli, "DIGITS_ROOT", world["digits"])
    out = tmp_path / "s"
    assert sample_script.main(["--method", "codiff", "--checkpoint", str(world["ckpt"]),
                               "--prompt", "a red handwritten seven", "--prompt", "a blue digit three", "--num_inference_steps", "2",
                               "--guidance_scale", "1", "--no_progress", "--output_dir", str(out)]) == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    masks = cli.masks_for_prompts(["a red handwritten seven", "the digit 3 written in blue"],
                                  __import__("codiff.checkpoint", fromlist=["x"]).load_collaboration(world["ckpt"]))
    rows = [json.loads(line) for line in (world["digits"] / "test" / "metadata.jsonl").read_text().splitlines()]
    digits_of = {np.asarray(Image.open(world["digits"] / "test" / r["mask_file_name"])).tobytes(): r["digit"]
                 for r in rows}
    assert [digits_of[np.asarray(m, dtype=np.uint8).tobytes()] for m in masks] == [7, 3]  # same digit as the text
    assert sample_script.main(["--method", "codiff", "--checkpoint", str(world["ckpt"]),
                               "--prompt", "a red seven", "--mask_path", str(world["mask"]), "--num_inference_steps", "2",
                               "--guidance_scale", "3", "--negative_prompt", "blurry", "--weighting", "average",
                               "--no_progress", "--output_dir", str(tmp_path / "s2")]) == 0
    message = _run_failing(sample_script.main, ["--method", "codiff", "--checkpoint",
                                                str(world["ckpt"]), "--prompt", "a red seven", "--resolution", "64",
                                                "--output_dir", str(tmp_path / "s3")], capsys)
    assert "32x32" in message


def test_shipped_checkpoint_is_small_and_samples(world, tmp_path, monkeypatch):
    folder = REPO / "ckpt" / "tiny" / "codiff"
    assert (folder / "codiff.json").is_file(), "ckpt/tiny/codiff is missing: the shipped checkpoint must be committed"
    from codiff.checkpoint import load_collaboration

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 5e6 for p in files) and sum(p.stat().st_size for p in files) < 15e6
    assert all(p.suffix != ".bin" for p in files)
    collab = load_collaboration(folder)
    ids = torch.zeros(32, 32, dtype=torch.long)
    ids[8:24, 14:18] = 1
    gen = collab.pipeline()({"mask": ids, "text": "a red handwritten one"}, batch_size=1, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0), progress=False)
    assert gen.images.shape == (1, 3, 32, 32)
    import codiff.sample_cli as cli

    monkeypatch.setattr(cli, "DIGITS_ROOT", world["digits"])
    scores = cli.evaluate_digits(tmp_path / "eval", n=2)
    assert scores["count"] == 2 and 0 <= scores["stroke_iou"] <= 1 and scores["seconds"] > 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "metadata.jsonl").read_text().splitlines()]
    assert [r["digit"] for r in rows] == [0, 1] and all((tmp_path / "eval" / r["mask_file_name"]).is_file() for r in rows)


def test_evaluate_script_measures_every_variant(world, tmp_path):
    out = tmp_path / "eval"
    assert evaluate_script.main(["--checkpoint", str(world["ckpt"]), "--data_root", str(world["digits"]),
                                 "--num_prompts", "2", "--num_inference_steps", "2", "--guidance_scales", "1", "--mse_images", "4",
                                 "--edit_images", "1", "--edit_alphas", "0,1", "--stage1_num_iter", "1",
                                 "--stage2_num_iter", "1", "--edit_guidance_scales", "1,2", "--save_dir", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    labels = list(scores["generation"])
    assert [label.split(" ")[0] for label in labels] == ["mask_only", "text_only", "average", "collaborative",
                                                          "collaborative+released"]
    for s in scores["generation"].values():
        assert 0 <= s["stroke_iou"] <= 1 and s["count"] == 2
    assert set(scores["denoising_mse"]) == {"mask_only", "text_only", "average", "collaborative"}
    assert all(v["mean"] > 0 for v in scores["denoising_mse"].values())
    profile = scores["influence"]
    assert len(profile["text_influence_by_stretch"]) == 2  # 2 steps -> 2 non-empty stretches
    assert all(0 < v < 1 for v in profile["text_influence_by_stretch"])
    assert 0 < profile["text_influence_stroke"] < 1 and 0 < profile["text_influence_background"] < 1
    assert "collaborative, CFG 2, alpha=1" in scores["editing"] and "text_only, no CFG, alpha=0" in scores["editing"]
    assert scores["references"]["real test images (their own captions)"]["stroke_iou"] > 0.95
    assert (out / "cfg1" / "collaborative.png").exists() or (out / "cfg1" / "collaborative" / "collaborative.png").exists()


def test_shipped_cross_attention_member_collaboration_is_small_and_samples():
    """ckpt/tiny/codiff_crossattn: the paper's member reads the mask through cross-attention only (no class maps
    concatenated to its input), and the collaboration over it loads and samples like the shipped one."""
    folder = REPO / "ckpt" / "tiny" / "codiff_crossattn"
    assert (folder / "codiff.json").is_file(), "ckpt/tiny/codiff_crossattn is missing: it must be committed"
    from codiff.checkpoint import load_collaboration

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 5e6 for p in files) and sum(p.stat().st_size for p in files) < 10e6
    collab = load_collaboration(folder)
    concat = load_collaboration(REPO / "ckpt" / "tiny" / "codiff")
    assert collab.members["mask"].mask_conditioning == "crossattn"
    assert type(collab.members["mask"].unet).__name__ == "UNet2DConditionModel"  # no class-map input channels
    assert concat.members["mask"].mask_conditioning == "concat"
    assert type(concat.members["mask"].unet).__name__ == "SpatialMaskUNet"  # latent + pooled class maps as input
    ids = torch.zeros(32, 32, dtype=torch.long)
    ids[8:24, 14:18] = 1
    gen = collab.pipeline()({"mask": ids, "text": "a red handwritten one"}, batch_size=1, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0), progress=False)
    assert gen.images.shape == (1, 3, 32, 32) and torch.isfinite(gen.images).all()
