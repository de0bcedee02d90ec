"""scripts/sample.py end to end on a tiny Stable Diffusion folder: drop-in equal to diffusers, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import sample  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tiny_sd_folder):
    return tiny_sd_folder


def test_sample_script_matches_diffusers_pipeline(sd_folder, tmp_path):
    prompts = ["a red handwritten seven", "a green handwritten one"]
    out = tmp_path / "out"
    argv = ["--checkpoint", str(sd_folder), "--num_inference_steps", "3", "--guidance_scale", "5",
            "--seed", "7", "--output_dir", str(out), "--no_progress"]
    for p in prompts:
        argv += ["--prompt", p]
    assert sample.main(argv) == 0
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == prompts
    assert (out / "grid.png").is_file() and json.loads((out / "settings.json").read_text())["seed"] == 7
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
               output_type="np").images
    for m, expected in zip(meta, ref):
        ours = np.asarray(Image.open(out / m["file_name"])).astype(np.float64) / 255
        assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6  # same image up to 8-bit rounding


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "  "], "empty prompt"),
    ([], "no prompt given"),
    (["--prompt", "x", "--num_inference_steps", "0"], "--num_inference_steps must lie in [1, 1000], got 0"),
    (["--prompt", "x", "--checkpoint", "/nonexistent/model"], "does not exist"),
    (["--method", "sdg", "--prompt", "x", "--sampler", "euler"], "--sampler 'euler': choose one of ddim, ddpm"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, extra, message):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--output_dir", str(out), *extra],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("method, expected", [
    ("sdg", {"sampler": "ddpm", "guidance_scale": 1.0}),
    ("codiff", {"sampler": "ddim", "eta": 1.0, "guidance_scale": 3.0}),
    ("baseline", {"sampler": "ddim", "eta": 0.0, "guidance_scale": 7.5}),
])
def test_methods_set_their_own_sampling_defaults_and_flags_win(method, expected):
    args, _ = sample.parse_args(["--method", method, "--prompt", "a red handwritten seven"])
    assert {k: getattr(args, k) for k in expected} == expected
    args, _ = sample.parse_args(["--method", method, "--prompt", "x", "--sampler", "ddim", "--guidance_scale", "2"])
    assert args.sampler == "ddim" and args.guidance_scale == 2.0
