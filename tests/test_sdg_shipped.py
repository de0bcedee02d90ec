"""The shipped ckpt/tiny/sdg: loads (its base CLIP fingerprint still matches ckpt/tiny/clip), fits the size budget,
and samples with language guidance through the lab's entry point. Fast: 2 images, 2 steps."""

from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "ckpt" / "tiny" / "sdg"


def test_shipped_checkpoint_is_committed():
    assert (CKPT / "unet").is_dir() and (CKPT / "clip").is_dir(), "ckpt/tiny/sdg is missing (see its README to retrain)"


def test_shipped_checkpoint_budget_load_and_guided_sample():
    files = [p for p in CKPT.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 5 * 2**20 for p in files)
    assert sum(p.stat().st_size for p in files) < 15 * 2**20
    from sdg.sample_cli import run

    images = run(CKPT, ["a red handwritten seven", "a blue handwritten two"], clip_path=CKPT / "clip", respacing="2")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert 0 <= float(images.min()) and float(images.max()) <= 1
