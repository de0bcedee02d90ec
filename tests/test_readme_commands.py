"""Every runnable command of README.md's Generating / Training / Evaluating blocks, run as written on the tiny
checkpoints (training with 2 steps appended), in a scratch folder where ``ckpt/`` and ``configs/`` are the
repository's and ``data/digits`` is a small folder of the same layout.

Commands with placeholders (``GEN``, ``/models/...``, ``my_images``) need the user's files; ``torchrun`` /
``accelerate launch`` multi-process runs are tests/test_train.py's; video editing and the web app have their own tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from tiny_data import write_captioned_images


REPO = Path(__file__).resolve().parent.parent
PLACEHOLDERS = re.compile(r"\b(GEN|REF|CLIP_DIR|my_images)\b|/models/")
NOT_HERE = ("scripts/app.py", "scripts/contextdiff/edit_video.py")  # a server; minutes of CPU (own tests)
FAST_TRAINING = ["--max_train_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "0",
                 "--checkpointing_steps", "1000", "--validation_steps", "1000"]


def readme_commands() -> list[list[str]]:
    """The ``python scripts/...`` commands of README.md's bash blocks (continuations joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["python"] and argv[1].startswith("scripts/"):
                commands.append(argv)
    return commands


def runnable(argv: list[str]) -> bool:
    return argv[1] not in NOT_HERE and not PLACEHOLDERS.search(" ".join(argv))


def small_digits(root: Path) -> None:
    """``data/digits/{train,test}``: captioned 32 px images and binary masks with the same file names."""
    for split in ("train", "test"):
        folder = write_captioned_images(root / split, count=12)
        (folder / "masks").mkdir()
        rng = np.random.default_rng(1)
        for image in sorted((folder / "images").iterdir()):
            mask = (rng.random((32, 32)) > 0.7).astype(np.uint8)
            Image.fromarray(mask, mode="L").save(folder / "masks" / image.name)


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location("readme_" + relative.replace("/", "_")[:-3], REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name in ("ckpt", "configs", "scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    small_digits(tmp_path / "data" / "digits")
    monkeypatch.chdir(tmp_path)
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_readme_commands_run_as_written(workdir, caplog):
    commands = readme_commands()
    scripts = {argv[1] for argv in commands}
    assert {"scripts/sample.py", "scripts/evaluate.py", "scripts/train_vae.py", "scripts/train_text_to_image.py"} \
        <= scripts
    run = [argv for argv in commands if runnable(argv)]
    skipped = [" ".join(argv[1:3]) for argv in commands if not runnable(argv)]
    assert len(run) >= 9, (run, skipped)
    caplog.set_level("INFO", logger="common")
    for argv in run:
        extra = FAST_TRAINING if "/train_" in argv[1] else []
        if argv[1] == "scripts/train_vae.py":  # once as a real process: INFO logging is on by default
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, *argv[1:], *extra], env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert "***** training 2 steps" in proc.stderr and "INFO" in proc.stderr
            continue
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        started = time.perf_counter()
        code = load_script(argv[1]).main([*argv[2:], *extra])
        print(f"{time.perf_counter() - started:6.1f} s  {' '.join(argv[1:3])}")
        assert code in (0, None), argv

    # the models are output_dir itself and load in plain diffusers / transformers, as the README says
    from diffusers import AutoencoderKL, DiffusionPipeline

    assert AutoencoderKL.from_pretrained("out/vae").config.scaling_factor > 0
    assert (workdir / "out" / "clip" / "text_encoder" / "config.json").is_file()
    pipe = DiffusionPipeline.from_pretrained("out/t2i")
    assert pipe.text_encoder.dtype == torch.float32
    assert sorted(p.name for p in (workdir / "out" / "t2i" / "validation").iterdir()) == ["step-2"]
    assert any(r.getMessage().startswith("***** training") for r in caplog.records)
    # the evaluations read the sample folder recursively (images/), without the grid
    scores = json.loads((workdir / "outputs" / "samples" / "scores.json").read_text())
    assert scores["count"] == 8
    reports = {p.stem: json.loads(p.read_text()) for p in (workdir / "outputs" / "eval").glob("*.json")}
    assert reports["clip-score"]["count"] == 8
    assert reports["mask"]["count"] == 12


def test_the_shipped_baseline_generates_in_plain_diffusers():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(REPO / "ckpt" / "tiny" / "baseline")  # no torch_dtype
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red handwritten seven", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
