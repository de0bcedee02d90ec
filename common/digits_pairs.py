"""The compositional embedded world "digits-pairs": two real handwritten digits side by side, each in its own colour.

The single-digit world saturates: a plain tiny text-to-image model already draws the right digit in the right colour
for ~97 % of prompts, which leaves a text-alignment method no room to show a gain. Here a prompt names two digits,
two colours and their order ("a red three to the left of a blue seven"), so the model must bind each colour to the
right digit and each digit to the right side: attribute binding, the failure text-to-image models are known for.

Each image is ``RESOLUTION x RESOLUTION`` (32x32, so every square-image pipeline, the VAE and the baseline UNet's
latent size stay as they are): two real sklearn digits, each upsampled to a ``RESOLUTION/2``-wide half (narrower
than tall), drawn in one of the six named colours on black. The two colours always differ, so "which colour went
where" is always checkable. Digits come from the same fixed train/test split of the real digits as the single-digit
world, so no test digit is ever seen in training. Masks are palette PNGs (0 background, 1 left stroke, 2 right
stroke). The judge (``common.judge.judge_pair_images``) scores each half with the single-digit judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.digits import COLORS, DIGIT_WORDS, MASK_THRESHOLD, RESOLUTION, build_world, real_digit_split, render
from common.errors import UserError


VERSION = 1
HALF = RESOLUTION // 2
TRAIN_PAIRS = 6000
TEST_PAIRS = 600
# {c1} {w1} is the LEFT digit, {c2} {w2} the RIGHT one; templates that name the right digit first test that the
# model reads the relation, not the word order.
PAIR_TEMPLATES = (
    "a {c1} {w1} to the left of a {c2} {w2}",
    "a {c2} {w2} to the right of a {c1} {w1}",
    "a {c1} handwritten {w1} next to a {c2} handwritten {w2}",
    "{c1} {w1} and {c2} {w2}, left to right",
)


@dataclass(frozen=True)
class PairSample:
    left: np.ndarray  # [RESOLUTION, HALF] intensity in [0, 1]
    right: np.ndarray
    left_digit: int
    left_color: str
    right_digit: int
    right_color: str
    caption: str

    @property
    def target(self) -> tuple[int, str, int, str]:
        return self.left_digit, self.left_color, self.right_digit, self.right_color


def pair_caption(left_digit: int, left_color: str, right_digit: int, right_color: str, template: int = 0) -> str:
    return PAIR_TEMPLATES[template].format(c1=left_color, w1=DIGIT_WORDS[left_digit], c2=right_color,
                                          w2=DIGIT_WORDS[right_digit])


def upsample_half(digit8: np.ndarray) -> np.ndarray:
    """An 8x8 digit (0..16) -> ``[RESOLUTION, HALF]`` intensity in [0, 1], bicubic (a narrow, full-height digit)."""
    img = Image.fromarray(digit8.astype(np.float32) / 16.0, mode="F").resize((HALF, RESOLUTION), Image.BICUBIC)
    return np.clip(np.asarray(img), 0.0, 1.0)


def render_pair(sample: PairSample) -> np.ndarray:
    """uint8 RGB ``[RESOLUTION, RESOLUTION, 3]``: the left digit in its colour, then the right one."""
    return np.concatenate([render(sample.left, sample.left_color), render(sample.right, sample.right_color)], axis=1)


def pair_mask(sample: PairSample) -> np.ndarray:
    """``[RESOLUTION, RESOLUTION]`` uint8: 0 background, 1 left stroke, 2 right stroke."""
    left = (sample.left > MASK_THRESHOLD).astype(np.uint8)
    right = (sample.right > MASK_THRESHOLD).astype(np.uint8) * 2
    return np.concatenate([left, right], axis=1)


def make_pairs(images8: np.ndarray, labels: np.ndarray, count: int, seed: int) -> list[PairSample]:
    """``count`` pairs of distinct real digits images (any labels), two different colours, a random template."""
    if count < 1:
        raise UserError(f"the number of pairs must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    out = []
    for _ in range(count):
        i, j = rng.choice(len(images8), size=2, replace=False)
        ci, cj = rng.choice(len(names), size=2, replace=False)
        template = int(rng.integers(len(PAIR_TEMPLATES)))
        li, ri = int(labels[i]), int(labels[j])
        out.append(PairSample(upsample_half(images8[i]), upsample_half(images8[j]), li, names[ci], ri, names[cj],
                              pair_caption(li, names[ci], ri, names[cj], template)))
    return out


def _mask_png(mask: np.ndarray) -> Image.Image:
    image = Image.fromarray(mask, mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128] + [0, 0, 0] * 253)
    return image


def write_pair_split(samples: list[PairSample], folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    with open(folder / "metadata.jsonl", "w") as meta:
        for i, s in enumerate(samples):
            name, mask_name = f"images/{i:05d}.png", f"masks/{i:05d}.png"
            Image.fromarray(render_pair(s)).save(folder / name)
            _mask_png(pair_mask(s)).save(folder / mask_name)
            meta.write(json.dumps({"file_name": name, "text": s.caption, "mask_file_name": mask_name,
                                   "left_digit": s.left_digit, "left_color": s.left_color,
                                   "right_digit": s.right_digit, "right_color": s.right_color}) + "\n")


def build_digits_pairs(output_dir: str | Path, seed: int = 0, train_pairs: int = TRAIN_PAIRS,
                       test_pairs: int = TEST_PAIRS, force: bool = False) -> Path:
    """Write ``<output_dir>/{train,test}/`` (images, masks, metadata.jsonl); a no-op if already built alike.

    Like the single-digit build: the folder appears only when complete, and an existing folder that is not a
    digits-pairs build is refused.
    """
    stamp = {"world": "digits-pairs", "version": VERSION, "seed": seed, "resolution": RESOLUTION,
             "train_pairs": train_pairs, "test_pairs": test_pairs}

    def write(tmp: Path) -> None:
        x_tr, y_tr, x_te, y_te = real_digit_split(seed)
        write_pair_split(make_pairs(x_tr, y_tr, train_pairs, seed), tmp / "train")
        write_pair_split(make_pairs(x_te, y_te, test_pairs, seed + 1), tmp / "test")

    return build_world(output_dir, "digits_pairs.json", stamp, "digits-pairs", write, force=force)


def pair_prompts(n: int, template: int = 0, seed: int = 0) -> list[dict]:
    """``n`` evaluation prompts with their targets: every (left digit, right digit) pair once per 100 prompts,
    colour pairs cycling through all 30 ordered pairs of different colours. Keys: text, left_digit, left_color,
    right_digit, right_color."""
    if n < 0:
        raise UserError(f"the number of prompts must be >= 0, got {n}")
    names = list(COLORS)
    colour_pairs = [(a, b) for a in names for b in names if a != b]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(colour_pairs))
    out = []
    for i in range(n):
        ld, rd = (i % 100) // 10, i % 10
        lc, rc = colour_pairs[int(order[(i + i // 100) % len(colour_pairs)])]
        out.append({"text": pair_caption(ld, lc, rd, rc, template), "left_digit": ld, "left_color": lc,
                    "right_digit": rd, "right_color": rc})
    return out
