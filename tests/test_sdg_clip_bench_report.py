"""bench/bench_sdg_clip.py's report: paired differences between CLIPs, image by image, and the rows of another UNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from script_loading import load_script


bench = load_script("bench/bench_sdg_clip.py")


def language_row(clip, correct, weight=1000.0, unet=None):
    row = {"clip": clip, "kind": "language", "weight": weight, "digit_correct": int(sum(correct)), "n": len(correct),
           "digit_per_image": list(correct)}
    return {**row, "unet": unet} if unet else row


def test_paired_rows_are_the_mean_difference_on_the_same_images_and_only_like_for_like():
    rng = np.random.default_rng(0)
    shipped = rng.integers(0, 2, size=60)
    better = shipped.copy()
    flips = np.flatnonzero(shipped == 0)[:9]  # nine images the new CLIP gets right where the shipped one did not
    better[flips] = 1
    rows_in = [language_row("shipped", shipped), language_row("new", better),
               language_row("new", better, weight=300.0),  # no shipped row at 300: nothing to pair with
               language_row("new", better, unet="unet_3000"),  # another UNet: paired only with its own shipped row
               {"clip": "new", "kind": "probe", "t": 400, "accuracy": 0.5, "n": 297}]
    rows = bench.paired_rows(rows_in, "shipped", steps=100)
    assert len(rows) == 1
    assert rows[0]["value"] == pytest.approx(9 / 60, abs=1e-3)
    assert "new minus shipped" in rows[0]["name"] and "weight 1000" in rows[0]["name"]
    lo, hi = (float(x) for x in rows[0]["name"].split("CI ")[1].rstrip(")").split(" to "))
    assert 0 < lo <= 9 / 60 <= hi  # all nine discordant pairs favour the new CLIP: the interval excludes 0
    assert bench.paired_rows(rows_in, None, steps=100) == []


def test_report_names_rows_of_another_unet_and_leaves_out_its_repeated_probe(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    rows = [language_row("shipped", [1, 0, 1, 1]), language_row("shipped", [1, 1, 1, 1], unet="unet_3000"),
            {"clip": "shipped", "kind": "probe", "t": 0, "accuracy": 0.75, "n": 4},
            {"clip": "shipped", "kind": "probe", "t": 0, "accuracy": 0.75, "n": 4, "unet": "unet_3000"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert bench.main(["--report", str(path), "--no_write"]) == 0
    out = capsys.readouterr().out
    assert "sdg CLIP shipped guiding the UNet unet_3000: 'a handwritten <digit>'" in out
    assert out.count("probe") == 1  # the probe does not depend on the UNet: reported once
