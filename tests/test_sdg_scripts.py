"""scripts/sdg/* and ``scripts/sample.py --method sdg`` on tiny random models: smoke runs and one-line refusals."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_loading import load_script  # noqa: E402

from sdg.checkpoint import load_diffusion_model, load_noise_aware_clip_folder
from sdg.tiny import make_tiny_sdg_folder


REPO = Path(__file__).resolve().parent.parent




train_unconditional = load_script("scripts/sdg/train_unconditional.py")
finetune_clip = load_script("scripts/sdg/finetune_clip.py")
sdg_sample = load_script("scripts/sdg/sample.py")
convert_checkpoint = load_script("scripts/sdg/convert_checkpoint.py")
lab_sample = load_script("scripts/sample.py")

TINY_FLAGS = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
              "--attention_resolutions", "", "--num_head_channels", "32", "--resblock_updown", "True",
              "--learn_sigma", "True"]
TRAIN = ["--max_train_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--report_to", "none"]


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` random 32 px digit-like PNGs (a coloured blob on black), no metadata: captions are not needed."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.zeros((32, 32, 3), np.uint8)
        y, x = rng.integers(6, 20, size=2)
        img[y:y + 10, x:x + 4] = rng.integers(80, 256, size=3)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdg")
    folder = make_tiny_sdg_folder(root / "model", attention_resolutions="")
    refs = write_images(root / "refs" / "nested", 2).parent
    (root / "instructions.txt").write_text("a handwritten seven\n\n  a red digit  \n")
    return {"model": folder, "clip": folder / "clip", "refs": refs, "instructions": root / "instructions.txt",
            "images": write_images(root / "train", 8, seed=1), "base_clip": folder / "base_clip"}


def test_train_unconditional_two_steps_writes_a_loadable_learn_sigma_model(tiny, tmp_path):
    out = tmp_path / "run"
    assert train_unconditional.main(["--train_data_dir", str(tiny["images"]), "--output_dir", str(out),
                                     "--num_validation_images", "0", *TINY_FLAGS, *TRAIN]) == 0
    # the model is the output folder itself: plain diffusers and the project's loader both load it as is
    from diffusers import UNet2DModel

    assert not (out / "unet").exists()
    unet, flags = load_diffusion_model(out)
    assert unet.config.out_channels == 6 and flags.learn_sigma and flags.channel_mult == "1,2"
    plain = UNet2DModel.from_pretrained(str(out))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), unet.state_dict().values()))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and np.isfinite(summary["final_loss"])


def test_finetune_clip_two_steps_writes_a_noise_aware_clip(tiny, tmp_path):
    out = tmp_path / "run"
    assert finetune_clip.main(["--data_dir", str(tiny["images"]), "--clip_model_path", str(tiny["base_clip"]),
                               "--output_dir", str(out), "--t_dim", "16", "--hidden", "16", *TRAIN]) == 0
    assert not (out / "clip").exists()  # the noise-aware CLIP is the output folder itself: --clip_path <out>
    bundle = load_noise_aware_clip_folder(out)
    config = json.loads((out / "noise_aware_clip.json").read_text())
    assert config["trained_with"]["max_train_steps"] == 2 and config["t_dim"] == 16
    x = torch.zeros(2, 3, 32, 32)
    assert bundle.clip(x, torch.tensor([0, 999])).embedding.shape == (2, 64)
    assert bundle.encode_text(["a handwritten seven"]).shape == (1, 64)


def test_finetune_clip_learns_the_temperature_or_warms_the_scale_up(tiny, tmp_path):
    common = ["--data_dir", str(tiny["images"]), "--clip_model_path", str(tiny["base_clip"]), "--t_dim", "16",
              "--hidden", "16", *TRAIN]
    learned = tmp_path / "learned"
    assert finetune_clip.main([*common, "--output_dir", str(learned), "--learn_logit_scale", "true",
                               "--logit_scale", "20", "--logit_scale_lr", "0.1"]) == 0
    trained = json.loads((learned / "noise_aware_clip.json").read_text())["trained_with"]
    # two Adam steps at lr 0.1 move log(scale) by about 0.1 each: the temperature was trained, not left at 20
    assert trained["logit_scale"] == 20 and abs(math.log(trained["learned_logit_scale"] / 20)) > 0.1
    assert load_noise_aware_clip_folder(learned).clip is not None  # the temperature is not part of the CLIP

    warmed = tmp_path / "warmed"
    assert finetune_clip.main([*common, "--output_dir", str(warmed), "--logit_scale", "100",
                               "--logit_scale_warmup_steps", "10"]) == 0
    trained = json.loads((warmed / "noise_aware_clip.json").read_text())["trained_with"]
    assert trained["logit_scale_warmup_steps"] == 10 and trained["learned_logit_scale"] is None
    with pytest.raises(SystemExit) as exit_info:
        finetune_clip.main([*common, "--output_dir", str(tmp_path / "both"), "--learn_logit_scale", "true",
                            "--logit_scale_warmup_steps", "10"])
    assert exit_info.value.code != 0 and not (tmp_path / "both" / "noise_aware_clip.json").exists()


def run_sample(tiny, out_root, *extra):
    argv = ["--checkpoint", str(tiny["model"]), "--timestep_respacing", "3", "--batch_size", "2",
            "--out_root", str(out_root), "--no_progress", *extra]
    return sdg_sample.main(argv)


@pytest.mark.parametrize("name,extra,folders", [
    ("none", [], ["00000_unguided"]),
    ("text", ["--text_weight", "5"], ["00000_a_handwritten_seven", "00001_a_red_digit"]),
    ("semantic", ["--image_weight", "5"], ["00000_000", "00001_001"]),
    ("style", ["--image_weight", "1", "--image_loss", "style", "--style_gram", "batch"], ["00000_000", "00001_001"]),
    ("both", ["--text_weight", "5", "--image_weight", "5"],
     ["00000_00000_000_a_handwritten_seven", "00000_00001_000_a_red_digit", "00001_00000_001_a_handwritten_seven",
      "00001_00001_001_a_red_digit"]),
])
def test_sample_script_writes_sdg_folders(tiny, tmp_path, name, extra, folders):
    guidance = ["--clip_path", str(tiny["clip"]), "--text_instruction_file", str(tiny["instructions"]),
                "--data_dir", str(tiny["refs"])] if extra else []
    assert run_sample(tiny, tmp_path, "--exp_name", name, *guidance, *extra) == 0
    run = tmp_path / name
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == folders
    pngs = sorted(p.name for p in run.rglob("*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(2 * len(folders))]  # one global counter
    meta = json.loads((run / "meta.json").read_text())
    assert set(meta["folders"]) == set(folders) and meta["timestep_respacing"] == "3"


def test_paired_noise_text_guidance_changes_the_images_zero_weight_does_not(tiny, tmp_path):
    clip = ["--clip_path", str(tiny["clip"]), "--text_instruction_file", str(tiny["instructions"])]
    run_sample(tiny, tmp_path, "--exp_name", "plain")
    run_sample(tiny, tmp_path, "--exp_name", "zero", *clip)  # file given, weight 0: ignored, unguided
    run_sample(tiny, tmp_path, "--exp_name", "guided", *clip, "--text_weight", "50")

    def load(run, folder):
        return np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / run / folder).glob("*.png"))])

    assert np.array_equal(load("plain", "00000_unguided"), load("zero", "00000_unguided"))
    assert not np.array_equal(load("plain", "00000_unguided"), load("guided", "00000_a_handwritten_seven"))


def test_convert_checkpoint_adm_and_clip_gd(tiny, tmp_path):
    from open_clip.model import CLIP
    from test_sdg_adm import synthetic_adm_state_dict

    from common.io import save_safetensors
    from sdg.convert import convert_adm_state_dict
    from sdg.tiny import tiny_adm_flags, tiny_resnet_clip_config

    flags = tiny_adm_flags(attention_resolutions="16", num_head_channels=16)
    adm = synthetic_adm_state_dict(flags)
    torch.save({k: v.float() for k, v in adm.items()}, tmp_path / "adm.pt")
    # a tiny ResNet CLIP as the "RN50x16" base (config .json + weights), and a CLIP_gd file made from it
    base = CLIP(**tiny_resnet_clip_config())
    (tmp_path / "tiny-rn.json").write_text(json.dumps(tiny_resnet_clip_config()))
    save_safetensors({k: v for k, v in base.state_dict().items() if v.is_floating_point()}, tmp_path / "rn.safetensors")
    from sdg.checkpoint import noise_aware_from_base

    torch.manual_seed(0)
    clip = noise_aware_from_base(base, {"image_size": 32, "t_dim": 24, "hidden": 24, "film_init": "default",
                                        "pos_init": "random"})
    stem = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7", "layer1": "10",
            "layer2": "11", "layer3": "12"}
    released = {}
    for key, value in clip.state_dict().items():
        if key.startswith("visual."):
            head, rest = key[len("visual."):].split(".", 1)
            key = f"visual_frozen.{stem[head]}.{rest}" if head in stem else (
                f"attn_pool.{rest}" if head == "attnpool" else f"{head}.{rest}")
        released[key] = value
    torch.save(released, tmp_path / "clip_gd.pt")
    out = tmp_path / "converted"
    argv = ["--model_path", str(tmp_path / "adm.pt"), "--clip_gd_path", str(tmp_path / "clip_gd.pt"),
            "--clip_model", str(tmp_path / "tiny-rn.json"), "--clip_weights", str(tmp_path / "rn.safetensors"),
            "--clip_t_dim", "24", "--clip_hidden", "24", "--output_dir", str(out), "--image_size", "32",
            "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "16",
            "--num_head_channels", "16", "--resblock_updown", "True", "--learn_sigma", "True"]
    assert convert_checkpoint.main(argv) == 0
    unet, got_flags = load_diffusion_model(out)
    expected = convert_adm_state_dict(adm, flags)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in expected.items())
    assert got_flags.attention_resolutions == "16"
    bundle = load_noise_aware_clip_folder(out / "clip")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 900])
    assert torch.equal(bundle.clip.eval().embed(x, t), clip.eval().embed(x, t))


def lab_sample_argv(tiny, out, *extra):
    return ["--method", "sdg", "--checkpoint", str(tiny["model"]), "--num_inference_steps", "3",
            "--sampler", "ddpm", "--output_dir", str(out), "--no_progress", *extra]


def test_lab_sample_entry_runs_language_and_image_guidance(tiny, tmp_path):
    out = tmp_path / "out"
    argv = lab_sample_argv(tiny, out, "--prompt", "a handwritten seven", "--prompt", "a blue two",
                           "--text_weight", "5", "--image_weight", "2", "--data_dir", str(tiny["refs"]))
    assert lab_sample.main(argv) == 0
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == ["a handwritten seven", "a blue two"]
    assert np.asarray(Image.open(out / meta[0]["file_name"])).shape == (32, 32, 3)


def one_error_line(capsys, message):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.parametrize("case,message", [
    ("empty_instructions", "holds no instruction"),
    ("no_reference_images", "holds no reference images"),
    ("weights_without_clip", "no --clip_path"),
    ("plain_clip", "plain (not noise-aware) CLIP"),
    ("bare_weights_file", "bare weights file"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, capsys, case, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("not an image")
    extra = {
        "empty_instructions": ["--clip_path", str(tiny["clip"]), "--text_weight", "1",
                               "--text_instruction_file", str(empty)],
        "no_reference_images": ["--clip_path", str(tiny["clip"]), "--image_weight", "1", "--data_dir", str(no_images)],
        "weights_without_clip": ["--text_weight", "1", "--text_instruction_file", str(tiny["instructions"])],
        "plain_clip": ["--clip_path", str(tiny["base_clip"]), "--text_weight", "1",
                       "--text_instruction_file", str(tiny["instructions"])],
        "bare_weights_file": ["--clip_path", str(tiny["base_clip"] / "open_clip_model.safetensors"),
                              "--text_weight", "1", "--text_instruction_file", str(tiny["instructions"])],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        run_sample(tiny, tmp_path / "results", "--exp_name", "bad", *extra)
    assert exit_info.value.code == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "results").exists()


def test_plain_clip_weights_are_refused_even_inside_a_noise_aware_folder(tiny, tmp_path, capsys):
    """A noise_aware_clip.safetensors that holds a plain CLIP tower (no time modulation) is refused by name."""
    import shutil

    from common.io import load_safetensors, save_safetensors

    folder = tmp_path / "fake_clip"
    shutil.copytree(tiny["clip"], folder)
    state = load_safetensors(folder / "noise_aware_clip.safetensors")
    save_safetensors({k: v for k, v in state.items() if k.startswith("visual.")}, folder / "noise_aware_clip.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        run_sample(tiny, tmp_path / "results", "--exp_name", "bad", "--clip_path", str(folder), "--text_weight", "1",
                   "--text_instruction_file", str(tiny["instructions"]))
    assert exit_info.value.code == 2
    one_error_line(capsys, "lacks the time-modulation weights")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("extra,message", [
    (["--text_weight", "1"], "has no clip/ folder"),
    (["--text_weight", "0", "--image_weight", "1", "--clip_path", "CLIP"], "no --data_dir reference"),
    (["--data_dir", "NOIMAGES", "--image_weight", "1", "--clip_path", "CLIP"], "holds no reference images"),
])
def test_lab_sample_entry_refuses_bad_input(tiny, tmp_path, capsys, extra, message):
    import shutil

    model = tmp_path / "model_without_clip"
    model.mkdir()
    shutil.copytree(tiny["model"] / "unet", model / "unet")
    (tmp_path / "noimages").mkdir()
    extra = [str(tiny["clip"]) if e == "CLIP" else str(tmp_path / "noimages") if e == "NOIMAGES" else e for e in extra]
    out = tmp_path / "out"
    argv = ["--method", "sdg", "--checkpoint", str(model), "--num_inference_steps", "2", "--output_dir",
            str(out), "--no_progress", "--prompt", "a seven", *extra]
    with pytest.raises(SystemExit) as exit_info:
        lab_sample.main(argv)
    assert exit_info.value.code == 2
    one_error_line(capsys, message)
    assert not out.exists()


def test_help_works_for_every_script(capsys):
    for module in (train_unconditional, finetune_clip, sdg_sample, convert_checkpoint):
        with pytest.raises(SystemExit) as exit_info:
            module.build_parser().parse_args(["--help"])
        assert exit_info.value.code == 0
    assert "--text_weight" in capsys.readouterr().out


def test_a_retrained_base_clip_is_refused(tiny, tmp_path, capsys):
    """The folder references its base CLIP by path + weights fingerprint: a swapped base text tower is an error."""
    import shutil

    from common.io import load_safetensors, save_safetensors

    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    weights = model / "base_clip" / "open_clip_model.safetensors"
    state = load_safetensors(weights)
    state["text_projection"] = state["text_projection"] + 0.01
    save_safetensors(state, weights)
    config = json.loads((model / "clip" / "noise_aware_clip.json").read_text())
    config["base_clip"] = str(model / "base_clip")
    (model / "clip" / "noise_aware_clip.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        run_sample(tiny, tmp_path / "results", "--exp_name", "bad", "--clip_path", str(model / "clip"),
                   "--text_weight", "1", "--text_instruction_file", str(tiny["instructions"]))
    assert exit_info.value.code == 2
    one_error_line(capsys, "has changed since the noise-aware CLIP was trained")
    assert not (tmp_path / "results").exists()
