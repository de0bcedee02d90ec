"""The embedded digits world and its independent judge."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from script_loading import load_script  # noqa: E402

from common.digits import COLORS, DIGIT_WORDS, build_digits, evaluation_prompts, render, upsample
from common.errors import UserError
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
    assert "digit_accuracy" in proc.stdout and judge_folder(digits / "test")["count"] == 297


def _load_evaluate():
    return load_script("scripts/evaluate.py")


def test_digits_prompts_are_the_evaluation_prompts():
    from common.digits import digits_prompts

    assert digits_prompts(120) == evaluation_prompts(120)
    with pytest.raises(UserError, match="must be >= 0"):
        digits_prompts(-1)


def test_judge_folder_reads_prompts_jsonl_and_any_image_size(digits, tmp_path):
    rows = [json.loads(x) for x in (digits / "test" / "metadata.jsonl").read_text().splitlines()][:40]
    out = tmp_path / "gen"
    out.mkdir()
    lines = []
    for i, row in enumerate(rows):
        img = Image.open(digits / "test" / row["file_name"]).resize((64, 64), Image.BICUBIC)
        img.save(out / f"{i:03d}.png")
        # targets only as a prompt (as sampling scripts write them), digits as strings in half the lines
        line = {"file_name": f"{i:03d}.png", "prompt": row["text"]} if i % 2 else \
            {"file_name": f"{i:03d}.png", "digit": str(row["digit"]), "color": row["color"].upper()}
        lines.append(json.dumps(line))
    (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    scores = judge_folder(out)
    assert scores["count"] == 40 and scores["digit_accuracy"] > 0.9 and scores["color_accuracy"] == 1.0
    (out / "prompts.jsonl").write_text('{"text": "a red one"}\n')
    with pytest.raises(UserError, match="prompts.jsonl:1 has no file_name"):
        judge_folder(out)


def test_evaluate_judge_main_writes_output_and_fails_cleanly(digits, tmp_path, capsys):
    """In-process ``main(argv)``: the table, the ``--output`` report, and a one-line error with exit code 2."""
    evaluate = _load_evaluate()
    out = tmp_path / "report.json"
    assert evaluate.main(["judge", "--images", str(digits / "test"), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["count"] == 297 and report["color_accuracy"] == 1.0
    table = capsys.readouterr().out
    assert "digit_accuracy" in table and "both_accuracy" in table and str(out) in table
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["judge", "--images", str(tmp_path / "empty"), "--output", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "x.json").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metadata.jsonl or prompts.jsonl" in err and len(err.splitlines()) == 1


def test_colour_and_caption_assignment_is_seeded():
    from common.digits import make_samples, real_digit_split

    _, _, x, y = real_digit_split()
    first, again, other = (make_samples(x[:60], y[:60], seed) for seed in (3, 3, 4))
    assert [(s.color, s.caption) for s in first] == [(s.color, s.caption) for s in again]
    assert [s.color for s in first] != [s.color for s in other]
