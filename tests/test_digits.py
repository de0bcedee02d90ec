"""The embedded digits world and its independent judge."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.digits import COLORS, DIGIT_WORDS, build_digits, evaluation_prompts, render, upsample
from common.judge import judge_folder, judge_images, parse_prompt, real_test_scores, stroke_color


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("d") / "digits")


def test_build_layout_split_and_captions(digits):
    train = [json.loads(x) for x in (digits / "train" / "metadata.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (digits / "test" / "metadata.jsonl").read_text().splitlines()]
    assert len(train) == 1500 and len(test) == 297
    for row in train[:50]:
        assert DIGIT_WORDS[row["digit"]] in row["text"] or str(row["digit"]) in row["text"]
        assert row["color"] in row["text"]
        img = np.asarray(Image.open(digits / "train" / row["file_name"]))
        mask = np.asarray(Image.open(digits / "train" / row["mask_file_name"]))
        assert img.shape == (32, 32, 3) and mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1}
        bright = img.max(-1)
        assert bright[mask == 1].mean() > 3 * bright[mask == 0].mean()  # the mask is the stroke
    assert {r["color"] for r in train} == set(COLORS) and {r["digit"] for r in test} == set(range(10))


def test_build_is_idempotent(digits):
    stamp = (digits / "digits.json").stat().st_mtime_ns
    assert build_digits(digits) == digits and (digits / "digits.json").stat().st_mtime_ns == stamp


def test_judge_on_real_heldout_digits_is_near_perfect():
    scores = real_test_scores()
    assert scores["digit_accuracy"] > 0.95 and scores["color_accuracy"] == 1.0
    assert scores["judge_heldout_digit_accuracy"] == scores["digit_accuracy"]


def test_judge_scores_wrong_targets_low():
    from common.digits import make_samples, real_digit_split

    _, _, x, y = real_digit_split()
    samples = make_samples(x[:100], y[:100], 5)
    images = [render(s.intensity, s.color) for s in samples]
    names = list(COLORS)
    wrong = [((s.digit + 1) % 10, names[(names.index(s.color) + 1) % 6]) for s in samples]
    scores = judge_images(images, wrong)
    assert scores["digit_accuracy"] < 0.1 and scores["color_accuracy"] == 0.0


def test_colour_is_independent_of_brightness_and_grey_has_none():
    inten = upsample(np.eye(8) * 16)
    assert stroke_color(render(inten, "cyan") // 3) == "cyan"
    assert stroke_color(np.full((32, 32, 3), 128, dtype=np.uint8)) is None


def test_prompts_cover_every_pair_and_parse_back():
    prompts = evaluation_prompts(60)
    assert len({(p["digit"], p["color"]) for p in prompts}) == 60
    assert all(parse_prompt(p["text"]) == (p["digit"], p["color"]) for p in prompts)


def test_evaluate_judge_cli(digits, tmp_path):
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "judge", "--images",
                           str(digits / "test"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["digit_accuracy"] > 0.95
    assert judge_folder(digits / "test")["count"] == 297
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "judge", "--images",
                          str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and len(bad.stderr.splitlines()) == 1
