"""Bootstrap intervals for the ratios the evaluations report (recall, precision)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from snapshop.errors import ConfigError

MAX_DRAWN = 4_000_000  # unit indices drawn at once (32 MB)


def ratio_interval(
    numerators: ArrayLike,
    denominators: ArrayLike,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)``.

    Row ``i`` is one resampling unit (a product with all its queries, a photo with its boxes):
    units are drawn with replacement, so what succeeds or fails together stays together.
    Draws whose denominators sum to zero are left out; (nan, nan) when every draw is.
    """
    if not 0 < level < 1 or resamples < 1:
        raise ConfigError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    num = np.asarray(numerators, np.float64)
    den = np.asarray(denominators, np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ConfigError("numerators and denominators must be 1-d and of one length")
    if len(num) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_DRAWN // len(num))  # bounded memory for many units
    parts = []
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, len(num), (min(chunk, resamples - start), len(num)))
        totals = den[draws].sum(axis=1)
        parts.append(num[draws].sum(axis=1)[totals > 0] / totals[totals > 0])
    rates = np.concatenate(parts)
    if len(rates) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_ratio_difference(
    base: tuple[ArrayLike, ArrayLike],
    variant: tuple[ArrayLike, ArrayLike],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``variant``'s ratio minus ``base``'s (each a (numerators, denominators) pair over the same
    units, in the same order) and its percentile bootstrap interval: each draw resamples the
    units once for both, so what the two share (the hard photos) cancels out."""
    if not 0 < level < 1 or resamples < 1:
        raise ConfigError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    arrays = [np.asarray(a, np.float64) for a in (*base, *variant)]
    if arrays[0].ndim != 1 or any(a.shape != arrays[0].shape for a in arrays):
        raise ConfigError("numerators and denominators must be 1-d and of one length")
    num_a, den_a, num_b, den_b = arrays
    if len(num_a) == 0 or den_a.sum() == 0 or den_b.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    delta = num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum()
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_DRAWN // len(num_a))
    parts = []
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, len(num_a), (min(chunk, resamples - start), len(num_a)))
        da, db = den_a[draws].sum(axis=1), den_b[draws].sum(axis=1)
        ok = (da > 0) & (db > 0)
        parts.append(num_b[draws].sum(axis=1)[ok] / db[ok] - num_a[draws].sum(axis=1)[ok] / da[ok])
    deltas = np.concatenate(parts)
    if len(deltas) == 0:
        return float(delta), float("nan"), float("nan")
    lo, hi = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2])
    return float(delta), float(lo), float(hi)
