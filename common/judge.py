"""An independent judge of digits-world images: which digit, which colour (design note §4).

Digit: an RBF support-vector classifier fitted on the REAL sklearn digits (train split), fed the image's
brightness (max over RGB, normalised to its peak) pooled back to 8x8 on the original 0..16 scale, so colour and
exposure do not matter. Its accuracy on the real held-out split, rendered exactly as the dataset renders it, is
reported with every score. Colour: the hue of the stroke pixels (the brightest ones), mapped to the nearest of the
six named hues; a grey or black image has no colour.
"""

from __future__ import annotations

import colorsys
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from common.digits import COLORS, DIGIT_WORDS, real_digit_split, render, upsample
from common.errors import UserError


def brightness_features(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` uint8/float RGB -> ``[N, 64]`` features: peak-normalised brightness pooled to 8x8 (0..16)."""
    x = np.asarray(images, dtype=np.float64)
    if x.max() > 1.0:
        x = x / 255.0
    bright = x.max(axis=-1)
    n, h, w = bright.shape
    if h % 8 or w % 8:
        bright = np.stack([np.asarray(Image.fromarray(b.astype(np.float32), mode="F").resize((32, 32),
                                                                                          Image.BILINEAR))
                           for b in bright])
        h = w = 32
    pooled = bright.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    peak = pooled.reshape(n, -1).max(axis=1).clip(min=1e-6)
    return (pooled.reshape(n, -1) / peak[:, None]) * 16.0


def _rendered(images8: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    return np.stack([render(upsample(img), names[int(rng.integers(len(names)))]) for img in images8])


@functools.lru_cache(maxsize=1)
def digit_classifier(seed: int = 0):
    """``(classifier, held-out accuracy)``: SVC fitted on rendered real train digits, scored on the test split."""
    from sklearn.svm import SVC

    x_tr, y_tr, x_te, y_te = real_digit_split(seed)
    clf = SVC(C=10.0, gamma="scale").fit(brightness_features(_rendered(x_tr, seed)), y_tr)
    accuracy = float((clf.predict(brightness_features(_rendered(x_te, seed + 1))) == y_te).mean())
    return clf, accuracy


_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in COLORS.items()}


def stroke_color(image: np.ndarray) -> Optional[str]:
    """The named colour of the stroke (pixels above half the peak brightness), or None for grey/black images."""
    x = np.asarray(image, dtype=np.float64)
    if x.max() > 1.0:
        x = x / 255.0
    bright = x.max(axis=-1)
    if bright.max() < 0.1:
        return None
    mean = x[bright >= 0.5 * bright.max()].mean(axis=0)
    h, s, _ = colorsys.rgb_to_hsv(*mean)
    if s < 0.25:
        return None
    return min(_HUES, key=lambda name: min(abs(h - _HUES[name]), 1 - abs(h - _HUES[name])))


_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}


def parse_prompt(text: str) -> tuple[Optional[int], Optional[str]]:
    """The (digit, colour) a digits prompt asks for: digit words or numerals, colour names; None if absent."""
    words = re.findall(r"[a-z]+|\d", text.lower())
    digit = next((_WORD_TO_DIGIT[w] if w in _WORD_TO_DIGIT else int(w) for w in words
                  if w in _WORD_TO_DIGIT or w.isdigit()), None)
    color = next((w for w in words if w in COLORS), None)
    return digit, color


def judge_images(images: Sequence, targets: Sequence[tuple[Optional[int], Optional[str]]]) -> dict:
    """Score images against their (digit, colour) targets; a None target is not scored for that attribute."""
    if len(images) != len(targets):
        raise UserError(f"{len(images)} images but {len(targets)} targets: give one target per image")
    if not images:
        raise UserError("no images to judge")
    arrays = np.stack([np.asarray(Image.fromarray(np.asarray(im)) if not isinstance(im, Image.Image) else im)
                       for im in images])
    clf, judge_accuracy = digit_classifier()
    digits = clf.predict(brightness_features(arrays))
    colors = [stroke_color(a) for a in arrays]
    d_ok = [int(p == t) for p, (t, _) in zip(digits, targets) if t is not None]
    c_ok = [int(p == t) for p, (_, t) in zip(colors, targets) if t is not None]
    both = [int(pd == td and pc == tc) for pd, pc, (td, tc) in zip(digits, colors, targets)
            if td is not None and tc is not None]

    def mean(v):
        return float(np.mean(v)) if v else None

    return {"digit_accuracy": mean(d_ok), "color_accuracy": mean(c_ok), "both_accuracy": mean(both),
            "count": len(images), "judge_heldout_digit_accuracy": judge_accuracy,
            "predicted_digits": [int(d) for d in digits], "predicted_colors": colors}


def read_metadata(folder: Path, metadata: Optional[Path] = None) -> list[dict]:
    path = metadata or folder / "metadata.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: the judge needs metadata.jsonl lines with file_name and text")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON") from None
    if not rows:
        raise UserError(f"{path} lists no images")
    return rows


def judge_folder(folder: str | Path, metadata: Optional[str | Path] = None) -> dict:
    """Judge every image listed in ``metadata.jsonl`` (file_name, text; optional digit, color targets)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    rows = read_metadata(folder, Path(metadata) if metadata else None)
    base = (Path(metadata).parent if metadata else folder)
    images, targets = [], []
    for row in rows:
        path = base / row["file_name"]
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError):
            raise UserError(f"cannot read image {path}: regenerate or remove it from the metadata") from None
        parsed = parse_prompt(row.get("text", ""))
        targets.append((row.get("digit", parsed[0]), row.get("color", parsed[1])))
    return judge_images(images, targets)


def summary_line(scores: dict, label: str = "") -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    return (f"{label}digit {pct(scores['digit_accuracy'])}  colour {pct(scores['color_accuracy'])}  "
            f"both {pct(scores['both_accuracy'])}  (n={scores['count']}; judge's own held-out digit accuracy "
            f"{pct(scores['judge_heldout_digit_accuracy'])})")


def real_test_scores(seed: int = 0) -> dict:
    """The judge on the real held-out digits, rendered like the dataset: its ceiling."""
    from common.digits import make_samples

    _, _, x_te, y_te = real_digit_split(seed)
    samples = make_samples(x_te, y_te, seed + 1)
    return judge_images([render(s.intensity, s.color) for s in samples], [(s.digit, s.color) for s in samples])

