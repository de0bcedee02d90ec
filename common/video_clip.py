"""The embedded example clip of the digits world: one real handwritten digit gliding across the frame.

Built from ``sklearn.datasets.load_digits`` (ships with scikit-learn), rendered exactly like the digits dataset
(``common.digits``: bicubic upsampling, one named colour on black), so the tiny checkpoints and the independent
judge (``common.judge``) apply frame by frame. The digit is drawn at ``digit_size`` pixels inside the 32x32 frame
and moves along a horizontal path (left to right, then back), sub-pixel accurate (bicubic resampling of the 8x8
source at a shifted offset), so consecutive frames differ only by the motion.

    clip = digit_clip(digit=7, color="red")      # DigitClip(frames [8, 32, 32, 3] uint8, caption, ...)
    clip.caption                                 # "a red handwritten seven"
    edit_caption(clip, color="blue")             # "a blue handwritten seven"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.digits import COLORS, RESOLUTION, caption, real_digit_split, render
from common.errors import UserError


@dataclass(frozen=True)
class DigitClip:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    intensity: np.ndarray  # float [F, H, W] in [0, 1] (the stroke layout, before colouring)
    digit: int
    color: str
    caption: str


def _draw(digit8: np.ndarray, size: int, dx: float, dy: float, canvas: int) -> np.ndarray:
    """The 8x8 digit scaled to ``size`` px with its top-left corner at ``(dx, dy)`` of a ``canvas``-px frame."""
    scale = size / 8.0
    # Affine map from output pixel (x, y) to source pixel: x_src = (x - dx) / scale (PIL's inverse-map convention).
    src = Image.fromarray(digit8.astype(np.float32) / 16.0, mode="F")
    image = src.transform((canvas, canvas), Image.AFFINE, (1 / scale, 0, -dx / scale, 0, 1 / scale, -dy / scale),
                          resample=Image.BICUBIC, fillcolor=0.0)
    return np.clip(np.asarray(image), 0.0, 1.0)


def digit_clip(
    digit: int = 7,
    color: str = "red",
    n_frames: int = 8,
    *,
    index: int = 0,
    digit_size: int = 28,
    travel: float = 4.0,
    template: int = 0,
    size: int = RESOLUTION,
) -> DigitClip:
    """A clip of the ``index``-th real test-split ``digit`` in ``color``, moving ``travel`` px left to right.

    The path is a smooth back-and-forth (a half cosine period over the clip) centred in the frame, so the digit
    never leaves it. Deterministic for its arguments.
    """
    if digit not in range(10):
        raise UserError(f"digit must be 0..9, got {digit}")
    if color not in COLORS:
        raise UserError(f"unknown colour {color!r}: choose one of {', '.join(COLORS)}")
    if n_frames < 1:
        raise UserError(f"a clip needs at least one frame, got n_frames={n_frames}")
    if not 8 <= digit_size <= size or travel < 0 or digit_size + travel > size:
        raise UserError(f"digit_size {digit_size} + travel {travel} must fit the {size}px frame")
    _, _, x_test, y_test = real_digit_split()
    candidates = x_test[y_test == digit]
    digit8 = candidates[index % len(candidates)]
    margin = (size - digit_size - travel) / 2
    top = (size - digit_size) / 2
    phases = np.linspace(0.0, 1.0, n_frames) if n_frames > 1 else np.zeros(1)
    xs = margin + travel * (1 - np.cos(np.pi * phases)) / 2
    intensity = np.stack([_draw(digit8, digit_size, float(x), top, size) for x in xs])
    frames = np.stack([render(i, color) for i in intensity])
    return DigitClip(frames, intensity, digit, color, caption(digit, color, template))


def edit_caption(clip: DigitClip, color: str | None = None, digit: int | None = None, template: int = 0) -> str:
    """The caption of the edit target: the clip's caption with the colour and/or the digit replaced."""
    return caption(clip.digit if digit is None else digit, clip.color if color is None else color, template)
