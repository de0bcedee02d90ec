"""Intervals for the benchmarks' proportions and paired comparisons (95 %, two-sided).

- :func:`wilson`: the Wilson score interval of a proportion k / n (better than the normal one near 0 and 1 and for
  the 30-100 images a judged setting has);
- :func:`bootstrap_mean`: a mean with its percentile-bootstrap interval over entries;
- :func:`paired_difference`: the mean of ``a - b`` over paired entries (same prompt and starting noise), whose
  interval is much tighter than two unpaired ones when the two settings agree on most entries.
"""

from __future__ import annotations

import numpy as np


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``k / n`` (``(nan, nan)`` for ``n = 0``)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


def bootstrap_mean(values, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its 95 % percentile-bootstrap interval (resampling entries)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(reps, len(v)))
    means = v[idx].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(a, b, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired entries with its 95 % bootstrap interval; ``a`` and ``b`` must align."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    return bootstrap_mean(a - b, reps, seed)
