"""The compositional world digits-pairs: its build, its prompts and its judge (checked on real held-out pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.digits import COLORS
from common.digits_pairs import (
    PAIR_TEMPLATES,
    build_digits_pairs,
    make_pairs,
    pair_caption,
    pair_prompts,
    render_pair,
)
from common.errors import UserError
from common.judge import judge_pair_images, parse_pair_prompt, real_pair_test_scores


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_digits_pairs(tmp_path_factory.mktemp("pairs") / "digits_pairs", train_pairs=24, test_pairs=12)


def test_build_writes_images_masks_and_metadata(built):
    for split, count in (("train", 24), ("test", 12)):
        rows = [json.loads(line) for line in (built / split / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == count
        for row in rows:
            image = np.asarray(Image.open(built / split / row["file_name"]))
            mask = np.asarray(Image.open(built / split / row["mask_file_name"]))
            assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
            assert set(np.unique(mask)) <= {0, 1, 2}
            assert (mask[:, :16] != 2).all() and (mask[:, 16:] != 1).all()  # each stroke on its own side
            assert row["left_color"] != row["right_color"]
            assert parse_pair_prompt(row["text"]) == (row["left_digit"], row["left_color"], row["right_digit"],
                                                      row["right_color"])
    # Rebuilding alike is a no-op; a foreign non-empty folder is refused.
    stamp = (built / "digits_pairs.json").stat().st_mtime_ns
    build_digits_pairs(built, train_pairs=24, test_pairs=12)
    assert (built / "digits_pairs.json").stat().st_mtime_ns == stamp


def test_build_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a digits-pairs build"):
        build_digits_pairs(tmp_path, train_pairs=2, test_pairs=2)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("template", range(len(PAIR_TEMPLATES)))
def test_every_template_parses_back_to_its_target(template):
    for ld, lc, rd, rc in ((3, "red", 7, "blue"), (0, "cyan", 0, "yellow"), (9, "magenta", 1, "green")):
        text = pair_caption(ld, lc, rd, rc, template)
        assert parse_pair_prompt(text) == (ld, lc, rd, rc), text


def test_prompts_cover_every_digit_pair_and_only_different_colours():
    prompts = pair_prompts(200, template=1)
    assert {(p["left_digit"], p["right_digit"]) for p in prompts} == {(a, b) for a in range(10) for b in range(10)}
    assert all(p["left_color"] != p["right_color"] for p in prompts)
    assert len({(p["left_color"], p["right_color"]) for p in prompts}) == len(COLORS) * (len(COLORS) - 1)
    for p in prompts:
        assert parse_pair_prompt(p["text"]) == (p["left_digit"], p["left_color"], p["right_digit"], p["right_color"])


def test_judge_is_accurate_on_real_held_out_pairs_and_sees_swaps():
    scores = real_pair_test_scores(count=200)
    assert scores["both_accuracy"] > 0.95 and scores["binding_accuracy"] == 1.0
    from common.digits import real_digit_split

    _, _, x_te, y_te = real_digit_split(0)
    samples = make_pairs(x_te, y_te, 60, seed=7)
    swapped = [np.concatenate([render_pair(s)[:, 16:], render_pair(s)[:, :16]], axis=1) for s in samples]
    wrong = judge_pair_images(swapped, [s.target for s in samples])
    assert wrong["binding_accuracy"] == 0.0  # the two colours always differ, so a swap is always caught
    assert wrong["both_accuracy"] < 0.2
