"""The statistics and the eps-MSE split of bench/bench_codiff_members.py: closed forms and properties."""

from __future__ import annotations

import numpy as np
import torch
from script_loading import load_script


bench = load_script("bench/bench_codiff_members.py")


def test_wilson_matches_the_closed_form_and_brackets_the_proportion():
    lo, hi = bench.wilson(45, 60)
    # Wilson (1927) by hand for k = 45, n = 60, z = 1.96
    p, n, z = 0.75, 60, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert abs(lo - (centre - half)) < 1e-12 and abs(hi - (centre + half)) < 1e-12
    assert lo < p < hi
    lo0, hi0 = bench.wilson(0, 120)
    assert abs(lo0) < 1e-12 and 0.02 < hi0 < 0.04  # z^2 / (n + z^2) = 0.031, near the rule of three


def test_paired_difference_is_the_mean_difference_and_its_interval_shrinks_with_agreement():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=120)
    same = bench.paired_difference(a, a)
    assert same == (0.0, 0.0, 0.0)
    b = a.copy()
    b[:12] = 1 - b[:12]  # 12 discordant pairs
    d, lo, hi = bench.paired_difference(a, b)
    assert abs(d - float(np.mean(a - b))) < 1e-12
    assert lo <= d <= hi and hi - lo < 0.2
    unpaired = bench.bootstrap_mean(a)
    assert unpaired[1] <= unpaired[0] <= unpaired[2]


def test_split_error_is_additive_and_separates_a_uniform_shift_from_shape():
    g = torch.Generator().manual_seed(0)
    digit = torch.zeros(3, 1, 8, 8)
    digit[:, :, 2:6, 3:5] = 1  # 8 of 64 latent pixels
    err = torch.randn(3, 4, 8, 8, generator=g)
    colour, layout, total = bench.split_error(err, digit)
    assert torch.allclose(colour + layout, total)
    assert torch.allclose(total, (err ** 2).mean(dim=(1, 2, 3)))
    assert (colour >= 0).all() and (layout >= -1e-7).all()
    # a uniform per-channel shift on the digit only: all colour
    shift = torch.tensor([0.5, -1.0, 0.2, 0.0])[None, :, None, None] * digit
    c, lay, t = bench.split_error(shift, digit)
    assert torch.allclose(c, t) and torch.allclose(lay, torch.zeros(3), atol=1e-7)
    # an error that averages to zero over the digit's pixels, or lies in the background: all layout
    zero_mean = err * digit - ((err * digit).sum(dim=(2, 3), keepdim=True) / digit.sum(dim=(2, 3), keepdim=True)) * digit
    background = err * (1 - digit)
    for e in (zero_mean, background):
        c, lay, t = bench.split_error(e, digit)
        assert torch.allclose(c, torch.zeros(3), atol=1e-6) and torch.allclose(lay, t)
