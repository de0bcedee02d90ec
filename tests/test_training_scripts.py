"""2-step smoke runs of every training script of the digits world, through their real command lines."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import train_clip  # noqa: E402
import train_text_to_image  # noqa: E402
import train_vae  # noqa: E402


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_root):
    full = digits_root
    small = tmp_path_factory.mktemp("small") / "train"
    shutil.copytree(full / "train", small)
    rows = (small / "metadata.jsonl").read_text().splitlines()[:24]
    (small / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return small


COMMON = ["--max_train_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--report_to", "none"]


def test_vae_clip_and_text_to_image_chain(small_digits, tmp_path, capsys):
    assert train_vae.main(["--train_data_dir", str(small_digits), "--output_dir", str(tmp_path / "vae_run"),
                           *COMMON]) == 0
    vae_dir = tmp_path / "vae_run"
    cfg = json.loads((vae_dir / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] > 0
    from diffusers import AutoencoderKL

    assert AutoencoderKL.from_pretrained(str(vae_dir)).config.scaling_factor == cfg["scaling_factor"]  # as it is
    assert train_clip.main(["--train_data_dir", str(small_digits), "--output_dir", str(tmp_path / "clip_run"),
                            "--model_config", str(REPO / "configs" / "baseline" / "clip.json"), "--save_dtype",
                            "float16", *COMMON]) == 0
    clip_dir = tmp_path / "clip_run"
    from common.models import load_open_clip

    model, _, tokenizer = load_open_clip(clip_dir)
    assert model.encode_text(tokenizer(["a red handwritten seven"])).shape == (1, 64)
    argv = ["--vae_model_path", str(vae_dir), "--clip_model_path", str(clip_dir), "--unet_config",
            str(REPO / "configs" / "baseline" / "unet.json"), "--train_data_dir", str(small_digits), "--output_dir",
            str(tmp_path / "t2i"), "--cache_latents", "--cache_dir", str(tmp_path / "cache"), "--use_ema", *COMMON]
    assert train_text_to_image.main(argv) == 0
    folder = tmp_path / "t2i"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red handwritten seven", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    # fine-tune the folder it wrote (the SD path of the script)
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1
    capsys.readouterr()
    # same VAE, text encoder and data: the fine-tune reuses the encodings instead of recomputing them
    assert train_text_to_image.main(["--pretrained_model_name_or_path", str(folder), "--train_data_dir",
                                     str(small_digits), "--output_dir", str(tmp_path / "ft"), "--cache_latents",
                                     "--cache_dir", str(tmp_path / "cache"), *COMMON]) == 0
    assert "reusing encodings cache" in capsys.readouterr().out
    assert (tmp_path / "ft" / "model_index.json").is_file()


def test_scripts_reject_bad_input(small_digits, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train_vae.main(["--train_data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"), *COMMON])
    assert err.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        train_text_to_image.main(["--train_data_dir", str(small_digits), "--output_dir", str(tmp_path / "o2"),
                                  *COMMON])
    assert err.value.code == 2 and "--pretrained_model_name_or_path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        train_vae.main(["--train_data_dir", str(small_digits), "--output_dir", str(tmp_path / "o3"),
                        "--resolution", "30", *COMMON])
    assert err.value.code == 2 and "not divisible" in capsys.readouterr().err
    assert not (tmp_path / "o3" / "config.json").exists()
