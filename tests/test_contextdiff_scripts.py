"""ContextDiff's scripts end to end on tiny random models: stage 1, stage 2, sampling, checkpoints, bad input.

2-step smoke runs through the real command lines (in-process, so the ~1 s of imports is paid once), the checkpoint
save/load round trip reproducing samples bit for bit, and bad input (adapter that does not fit the latents / text
width, missing adapter in stage 2, unknown k_t): one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from script_loading import load_script  # noqa: E402
from tiny_data import write_captioned_images  # noqa: E402

from common.io import OUTPUT_MANIFEST
from common.tiny import tiny_unet2d_condition
from contextdiff.adapter import load_adapter, tiny_adapter
from contextdiff.checkpoint import load_contextdiff, save_contextdiff


REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "contextdiff"
SCRIPTS = REPO / "scripts" / "contextdiff"
FAST = ["--max_train_steps", "2", "--train_batch_size", "4", "--report_to", "none", "--cache_latents"]


def _script(name: str):
    return load_script(f"scripts/contextdiff/{name}.py")


@pytest.fixture(scope="module")
def sd_folder(tiny_sd_folder):
    return tiny_sd_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Eight 32x32 captioned images in the imagefolder layout (file_name, text)."""
    return write_captioned_images(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="module")
def stage1(sd_folder, data_dir, tmp_path_factory):
    """Stage 1, UNet frozen, 2 steps: the adapter folder."""
    out = tmp_path_factory.mktemp("stage1")
    argv = ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", str(data_dir), "--output_dir",
            str(out), "--adapter_config", str(CONFIGS / "tiny.yaml"), "--learning_rate", "1e-3", *FAST]
    assert _script("train_adapter").main(argv) == 0
    return out


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_stage1_trains_the_adapter_only_and_writes_its_folder(stage1, sd_folder):
    folder = stage1 / "adapter"
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors",
                                                  "process.json", OUTPUT_MANIFEST}
    assert not (stage1 / "pipeline").exists()  # frozen UNet: nothing new to export
    process = json.loads((folder / "process.json").read_text())
    assert process["k_schedule"] == "quadratic" and process["parameterization"] == "shifted_eps"
    assert process["provenance"]["steps"] == 2 and process["provenance"]["freeze_unet"] is True
    adapter = load_adapter(folder, latent_channels=4, text_dims=[32])
    assert adapter.proj_out.weight.abs().sum() > 0  # off its zero init: it received gradients through x_t


def test_stage2_uses_the_adapter_and_the_checkpoint_samples(stage1, sd_folder, data_dir, tmp_path):
    """Stage 2 (towers referenced, the shipped layout) fine-tunes the UNet, carries the stage-1 adapter unchanged,
    and ``scripts/sample.py --method contextdiff`` reproduces its images for a seed; ``--no_shift`` changes them."""
    out, ckpt = tmp_path / "stage2", tmp_path / "shipped" / "contextdiff"
    argv = ["--pretrained_model_name_or_path", str(sd_folder), "--adapter_path", str(stage1), "--train_data_dir",
            str(data_dir), "--output_dir", str(out), "--reference_towers", "--checkpoint_dir", str(ckpt), *FAST]
    assert _script("finetune_diffusion").main(argv) == 0
    assert not (out / "pipeline").exists()
    assert {p.name for p in ckpt.iterdir()} == {"unet", "scheduler", "adapter", "contextdiff.json", OUTPUT_MANIFEST}
    meta = json.loads((ckpt / "contextdiff.json").read_text())
    assert (ckpt / meta["towers"]["vae"]).resolve() == (sd_folder / "vae").resolve()
    trained, carried = (load_adapter(p) for p in (stage1 / "adapter", ckpt / "adapter"))
    for (name, a), (_, b) in zip(trained.state_dict().items(), carried.state_dict().items()):
        assert torch.equal(a, b), name
    base = load_contextdiff(sd_folder, require_adapter=False).unet
    tuned = load_contextdiff(ckpt).unet
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters()))

    sample = _script("sample")
    common = ["--checkpoint", str(ckpt), "--prompt", "a red handwritten seven", "--prompt",
              "a blue handwritten one", "--num_inference_steps", "3", "--guidance_scale", "3", "--seed", "5", "--no_progress"]
    images = {}
    for name, extra in (("a", []), ("b", []), ("plain", ["--no_shift"])):
        assert sample.main([*common, "--output_dir", str(tmp_path / name), *extra]) == 0
        images[name] = np.stack([np.asarray(Image.open(tmp_path / name / "images" / f"{i:04d}.png"))
                                 for i in range(2)])
    assert np.array_equal(images["a"], images["b"])
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["method"] == "contextdiff"


def test_stage2_full_checkpoint_is_the_output_dir_and_loads_as_is(stage1, sd_folder, data_dir, tmp_path):
    """Stage 2 without --checkpoint_dir: ``from_pretrained(output_dir)`` in plain diffusers and
    ``load_contextdiff(output_dir)`` both load what it wrote; a second run into the same folder replaces it."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "stage2"
    argv = ["--pretrained_model_name_or_path", str(sd_folder), "--adapter_path", str(stage1), "--train_data_dir",
            str(data_dir), "--output_dir", str(out), *FAST]
    assert _script("finetune_diffusion").main(argv) == 0
    assert not (out / "pipeline").exists() and (out / "contextdiff.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.text_encoder.dtype == torch.float32
    model = load_contextdiff(out)
    assert model.adapter is not None and model.parameterization == "shifted_eps"
    for (name, a), (_, b) in zip(load_adapter(stage1 / "adapter").state_dict().items(),
                                 model.adapter.state_dict().items()):
        assert torch.equal(a, b), name


def test_joint_stage1_from_scratch_and_full_checkpoint_loads_in_plain_diffusers(sd_folder, data_dir, tmp_path):
    """--no-freeze_unet --unet_config trains adapter and a fresh UNet jointly and exports a full checkpoint: plain
    diffusers loads it."""
    from diffusers import StableDiffusionPipeline

    argv = ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", str(data_dir), "--output_dir",
            str(tmp_path / "joint"), "--adapter_dim", "32", "--adapter_depth", "1", "--adapter_heads", "2",
            "--no-freeze_unet", "--adapter_learning_rate", "1e-3", "--unet_config",
            str(REPO / "configs" / "baseline" / "unet.json"), *FAST]
    assert _script("train_adapter").main(argv) == 0
    ckpt = tmp_path / "joint"  # the checkpoint is the output folder itself, beside the trainer's checkpoint-N/
    assert not (ckpt / "pipeline").exists() and (ckpt / "train_summary.json").is_file()
    assert (ckpt / "model_index.json").is_file() and (ckpt / "adapter" / "process.json").is_file()
    # The adapter inside the checkpoint is a complete stage-1 output: stage 2 can start from it.
    assert json.loads((ckpt / "adapter" / "process.json").read_text())["provenance"]["freeze_unet"] is False
    pipe = StableDiffusionPipeline.from_pretrained(str(ckpt))
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red handwritten seven", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    model = load_contextdiff(ckpt)
    assert model.adapter.config.dim == 32 and model.parameterization == "shifted_eps"


@pytest.mark.parametrize("reference", [False, True])
def test_save_load_round_trip_reproduces_samples(sd_folder, tmp_path, reference):
    """A trained-looking adapter (r != 0) and UNet saved as a checkpoint (full or towers referenced), loaded back:
    the same seed gives the same images bit for bit; the shift is really used (differs from --no_shift)."""
    from contextdiff.sample_cli import sample

    base = load_contextdiff(sd_folder, require_adapter=False)
    base.unet = tiny_unet2d_condition(seed=3)
    base.adapter = tiny_adapter(seed=4, head_std=0.2)
    process = {"parameterization": "shifted_eps", "k_schedule": "quadratic", "k_scale": 0.5}
    folder = tmp_path / "ckpt"
    save_contextdiff(folder, unet=base.unet, adapter=base.adapter, vae=base.vae, text_encoder=base.text_encoder,
                     tokenizer=base.tokenizer, scheduler_config=base.scheduler_config, process=process,
                     reference_towers=base.tower_paths if reference else None)
    loaded = load_contextdiff(folder)
    assert (loaded.k_schedule, loaded.k_scale) == ("quadratic", 0.5)
    base.k_scale = 0.5
    prompts = ["a red handwritten seven", "a green handwritten two", "a blue handwritten one"]
    kwargs = dict(steps=4, guidance_scale=3.0, seed=11)
    before, after = sample(base, prompts, **kwargs), sample(loaded, prompts, **kwargs)
    assert torch.equal(before, after)
    # chunks draw x_T for all images at once: DDIM eta 0 gives the same images up to batch-size rounding
    torch.testing.assert_close(sample(loaded, prompts, chunk=2, **kwargs), after, rtol=0, atol=1e-5)
    assert (sample(loaded, prompts, no_shift=True, **kwargs) - after).abs().max() > 1e-3


def _bad_adapter(tmp_path, name, **overrides):
    folder = tmp_path / name
    tiny_adapter(**overrides).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["no_adapter", "missing_folder", "channels", "text_width", "patch", "k_schedule",
                                  "frozen_x0", "scratch_frozen"])
def test_bad_input_one_line_exit_2_nothing_written(case, sd_folder, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", str(data_dir), "--output_dir",
              str(out), *FAST]
    stage, needle, extra = {
        "no_adapter": (2, "--adapter_path", []),
        "missing_folder": (2, "no ContextDiff adapter", ["--adapter_path", str(tmp_path / "nowhere")]),
        "channels": (2, "8-channel", ["--adapter_path", str(_bad_adapter(tmp_path, "ch8", latent_channels=8))]),
        "text_width": (2, "768", ["--adapter_path", str(_bad_adapter(tmp_path, "w768", text_dims=(768,)))]),
        "patch": (1, "patch size 3", ["--adapter_config", str(CONFIGS / "tiny.yaml"), "--adapter_patch_size", "3"]),
        "k_schedule": (1, "cubic", ["--k_schedule", "cubic"]),
        "frozen_x0": (1, "frozen UNet", ["--parameterization", "x0"]),
        "scratch_frozen": (1, "--no-freeze_unet", ["--unet_config", str(REPO / "configs" / "baseline" / "unet.json")]),
    }[case]
    script = _script("train_adapter" if stage == 1 else "finetune_diffusion")
    with pytest.raises(SystemExit) as err:
        script.main([*common, *extra])
    assert err.value.code == 2
    assert needle in _one_error_line(capsys)
    assert not out.exists()


def test_missing_adapter_command_line(sd_folder, data_dir, tmp_path):
    """The real command line of stage 2 without an adapter: exactly one stderr line, exit 2, no output folder."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "finetune_diffusion.py"), "--pretrained_model_name_or_path",
                           str(sd_folder), "--train_data_dir", str(data_dir), "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--adapter_path" in lines[0], proc.stderr
    assert not out.exists()


def test_sampling_a_plain_folder_needs_an_adapter_or_no_shift(sd_folder, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as err:
        _script("sample").main(["--checkpoint", str(sd_folder), "--prompt", "a red seven",
                                "--output_dir", str(out), "--no_progress"])
    assert err.value.code == 2 and "--adapter_path" in _one_error_line(capsys) and not out.exists()


@pytest.mark.parametrize("size", ["tiny", "paper"])
def test_flat_script_configs_are_the_nested_sections_and_only_hold_flags(size):
    """configs/contextdiff/<script>_<size>.yaml (what --config takes) equal the sections of <size>.yaml, and every
    key is a flag of that script (common.train.load_yaml_defaults rejects anything else)."""
    from common.train import load_yaml_defaults
    from contextdiff.config import load_config
    from contextdiff.sample_cli import add_arguments
    from contextdiff.training import build_parser

    nested = load_config(CONFIGS / f"{size}.yaml")
    from common.sample_command import build_parser as sample_build_parser

    sample_parser = sample_build_parser()
    add_arguments(sample_parser.add_argument_group("contextdiff"))
    for section, name, parser in (("stage1", "train_adapter", build_parser(1)),
                                  ("stage2", "finetune_diffusion", build_parser(2)),
                                  ("sample", "sample", sample_parser)):
        path = CONFIGS / f"{name}_{size}.yaml"
        assert yaml.safe_load(path.read_text()) == nested[section], path
        assert load_yaml_defaults(path, parser)


def test_shipped_tiny_checkpoint():
    """ckpt/tiny/contextdiff: small files, towers referenced, loads and samples."""
    folder = REPO / "ckpt" / "tiny" / "contextdiff"
    assert (folder / "contextdiff.json").is_file(), "ckpt/tiny/contextdiff is missing (see its README to retrain)"
    from contextdiff.sample_cli import sample

    sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file()]
    assert max(sizes) < 5 * 2**20 and sum(sizes) < 15 * 2**20
    model = load_contextdiff(folder)
    images = sample(model, ["a red handwritten seven"], steps=3, guidance_scale=3.0)
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
