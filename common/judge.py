"""An independent judge of digits-world images: which digit, which colour.

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


def _as_rgb32(image) -> np.ndarray:
    """A PIL image or uint8 array (any mode, any size) -> uint8 RGB ``[32, 32, 3]``, the judge's input."""
    from common.io import pil_to_rgb

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype.kind == "f":  # float images are taken to be in [0, 1]
            array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
        image = Image.fromarray(array)
    image = pil_to_rgb(image, background=(0, 0, 0))
    if image.size != (32, 32):
        image = image.resize((32, 32), Image.BICUBIC if min(image.size) < 32 else Image.BOX)
    return np.asarray(image)


def judge_images(images: Sequence, targets: Sequence[tuple[Optional[int], Optional[str]]]) -> dict:
    """Score images against their (digit, colour) targets; a None target is not scored for that attribute.

    ``images``: PIL images or uint8 arrays ``[H, W, 3]`` of any size (resized to 32x32). Returns digit, colour
    and both-correct accuracies, the count, the judge's own held-out digit accuracy and the per-image predictions.
    """
    if len(images) != len(targets):
        raise UserError(f"{len(images)} images but {len(targets)} targets: give one target per image")
    if not images:
        raise UserError("no images to judge")
    arrays = np.stack([_as_rgb32(im) for im in images])
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


METADATA_NAMES = ("metadata.jsonl", "prompts.jsonl")


def read_metadata(folder: Path, metadata: Optional[Path] = None) -> list[dict]:
    """The JSON lines describing a folder's images: ``metadata`` if given, else its metadata/prompts.jsonl."""
    if metadata is not None:
        path = metadata
        if not path.is_file():
            raise UserError(f"{path} does not exist: pass --metadata naming a jsonl file with file_name and text")
    else:
        path = next((folder / n for n in METADATA_NAMES if (folder / n).is_file()), folder / METADATA_NAMES[0])
        if not path.is_file():
            raise UserError(f"{folder} has no {' or '.join(METADATA_NAMES)}: the judge needs one line per image "
                            "with file_name and text (or digit and color)")
    from common.data import read_jsonl_rows

    rows = read_jsonl_rows(path)
    if not rows:
        raise UserError(f"{path} lists no images")
    return rows


def row_target(row: dict) -> tuple[Optional[int], Optional[str]]:
    """A metadata line's (digit, colour) target: its ``digit``/``color`` columns, else parsed from its prompt."""
    parsed = parse_prompt(str(row.get("text", row.get("prompt", "")) or ""))
    digit, color = row.get("digit", parsed[0]), row.get("color", parsed[1])
    try:
        digit = None if digit is None else int(digit)
    except (TypeError, ValueError):
        raise UserError(f"target digit {digit!r} of {row.get('file_name')} is not an integer 0..9") from None
    return digit, (None if color is None else str(color).strip().lower())


def judge_folder(folder: str | Path, metadata: Optional[str | Path] = None) -> dict:
    """Judge every image listed in the folder's ``metadata.jsonl`` or ``prompts.jsonl`` (or ``metadata``).

    Each line: ``file_name`` (relative to the jsonl file) and the target, as ``digit`` and ``color`` columns or
    a ``text``/``prompt`` caption that names them. Returns :func:`judge_images`'s scores.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist: pass --images pointing at the generated images")
    rows = read_metadata(folder, Path(metadata) if metadata else None)
    base = (Path(metadata).parent if metadata else folder)
    from common.io import open_image
    from common.limits import inside

    images, targets = [], []
    for row in rows:
        path = inside(base, row["file_name"], "file_name")
        try:
            with open_image(path) as im:
                im.load()
                images.append(im.copy())
        except (OSError, ValueError, SyntaxError):
            raise UserError(f"cannot read image {path}: regenerate or remove it from the metadata") from None
        targets.append(row_target(row))
    return judge_images(images, targets)


PER_IMAGE_KEYS = ("predicted_digits", "predicted_colors")


def write_judged_folder(
    output_dir: str | Path, images, rows: Sequence[dict], extra: Optional[dict] = None, extra_files=None
) -> dict:
    """Write the results as an imagefolder (:func:`common.io.write_image_folder`), judge it, and save the summary
    (without the per-image predictions) plus ``extra`` as ``scores.json``. Returns the full scores, per-image
    predictions included, for paired comparisons."""
    from common.io import write_image_folder

    output_dir = write_image_folder(output_dir, images, rows, extra_files=extra_files)
    scores = judge_folder(output_dir)
    summary = {k: v for k, v in scores.items() if k not in PER_IMAGE_KEYS}
    (output_dir / "scores.json").write_text(json.dumps({**summary, **(extra or {})}, indent=2) + "\n")
    return scores


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



# ------------------------------------------------------------------------------------------ digits-pairs


def parse_pair_prompt(text: str) -> tuple[Optional[int], Optional[str], Optional[int], Optional[str]]:
    """``(left digit, left colour, right digit, right colour)`` of a digits-pairs prompt; None where absent.

    The first two (colour, digit) mentions are read in order; "to the right of" says the first one is on the right.
    """
    words = re.findall(r"[a-z]+|\d", text.lower())
    colors = [w for w in words if w in COLORS]
    digits = [_WORD_TO_DIGIT[w] if w in _WORD_TO_DIGIT else int(w) for w in words
              if w in _WORD_TO_DIGIT or w.isdigit()]
    colors += [None] * (2 - len(colors))
    digits += [None] * (2 - len(digits))
    first, second = (digits[0], colors[0]), (digits[1], colors[1])
    if re.search(r"\bright of\b", text.lower()):
        first, second = second, first
    return first[0], first[1], second[0], second[1]


def _halves(image) -> tuple[np.ndarray, np.ndarray]:
    """A pair image (PIL or uint8/float array, any size) -> its left and right halves as uint8 RGB arrays."""
    from common.io import pil_to_rgb

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype.kind == "f":
            array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
        image = Image.fromarray(array)
    image = pil_to_rgb(image, background=(0, 0, 0))
    w, h = image.size
    return np.asarray(image.crop((0, 0, w // 2, h))), np.asarray(image.crop((w - w // 2, 0, w, h)))


def judge_pair_images(images: Sequence, targets: Sequence[tuple]) -> dict:
    """Score digits-pairs images: each half by the single-digit judge (stretched back to a square).

    ``targets``: ``(left digit, left colour, right digit, right colour)`` per image (None = not scored). Returns
    per-position digit and colour accuracies, ``binding_accuracy`` (both colours on the right sides), and
    ``both_accuracy``: all four attributes right, i.e. the whole prompt.
    """
    if len(images) != len(targets):
        raise UserError(f"{len(images)} images but {len(targets)} targets: give one target per image")
    if not images:
        raise UserError("no images to judge")
    halves = [_halves(im) for im in images]
    left = judge_images([h[0] for h in halves], [(t[0], t[1]) for t in targets])
    right = judge_images([h[1] for h in halves], [(t[2], t[3]) for t in targets])

    def mean(v):
        return float(np.mean(v)) if v else None

    rows = list(zip(targets, left["predicted_digits"], left["predicted_colors"], right["predicted_digits"],
                    right["predicted_colors"]))
    full = [int(ld == t[0] and lc == t[1] and rd == t[2] and rc == t[3]) for t, ld, lc, rd, rc in rows
            if None not in t]
    binding = [int(lc == t[1] and rc == t[3]) for t, _, lc, _, rc in rows if t[1] is not None and t[3] is not None]
    return {"left_digit_accuracy": left["digit_accuracy"], "left_color_accuracy": left["color_accuracy"],
            "right_digit_accuracy": right["digit_accuracy"], "right_color_accuracy": right["color_accuracy"],
            "binding_accuracy": mean(binding), "both_accuracy": mean(full), "count": len(images),
            "judge_heldout_digit_accuracy": left["judge_heldout_digit_accuracy"],
            "predicted": [(int(ld), lc, int(rd), rc) for _, ld, lc, rd, rc in rows]}


def real_pair_test_scores(seed: int = 0, count: int = 600) -> dict:
    """The pair judge on real held-out digit pairs rendered like the digits-pairs test split: its ceiling."""
    from common.digits_pairs import make_pairs, render_pair

    _, _, x_te, y_te = real_digit_split(seed)
    samples = make_pairs(x_te, y_te, count, seed + 1)
    return judge_pair_images([render_pair(s) for s in samples], [s.target for s in samples])
