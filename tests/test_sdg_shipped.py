"""The shipped ckpt/tiny/sdg: loads (its base CLIP fingerprint still matches ckpt/tiny/sdg/base_clip), is the
paper's design (a convolutional tower with FiLM on its BatchNorms), fits the size budget, and samples with language
guidance through the lab's entry point. Fast: 2 images, 2 steps."""

from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "ckpt" / "tiny" / "sdg"


def test_shipped_checkpoint_is_committed():
    assert (CKPT / "unet").is_dir() and (CKPT / "clip").is_dir(), "ckpt/tiny/sdg is missing (see its README to retrain)"


def test_shipped_checkpoint_budget_load_and_guided_sample():
    files = [p for p in CKPT.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 6 * 2**20 for p in files)  # the base CLIP's 49,408-token embedding dominates
    assert sum(p.stat().st_size for p in files) < 15 * 2**20
    from sdg.sample_cli import run

    images = run(CKPT, ["a red handwritten seven", "a blue handwritten two"], clip_path=CKPT / "clip", respacing="2")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert 0 <= float(images.min()) and float(images.max()) <= 1


def test_shipped_noise_aware_clip_modulates_the_batchnorms_of_a_conv_tower():
    from torch import nn

    from sdg.checkpoint import load_noise_aware_clip_folder
    from sdg.noisy_clip import film_sites

    bundle = load_noise_aware_clip_folder(CKPT / "clip")
    assert bundle.clip.kind == "resnet"
    sites = [module for _, module in film_sites(bundle.clip.visual)]
    assert len(sites) == 15 and all(isinstance(m, nn.BatchNorm2d) for m in sites)
    # trained: the time modulation is no longer the zero start, so the embedding depends on t
    x = torch.zeros(2, 3, 32, 32)
    e = bundle.clip.eval().embed(x, torch.tensor([0, 800]))
    assert (e[0] - e[1]).abs().max() > 1e-3
