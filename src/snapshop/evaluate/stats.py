"""Bootstrap intervals for the ratios the evaluations report (recall, precision)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from snapshop.config import check_int
from snapshop.errors import ConfigError

MAX_DRAWN = 4_000_000  # unit indices drawn at once (32 MB)


def _unit_columns(
    level: float, resamples: int, seed: int, *columns: ArrayLike
) -> list[NDArray[np.float64]]:
    """The columns as float arrays, one value per resampling unit; a ConfigError for a bad
    level, resample count, seed or shape."""
    if not 0 < level < 1 or resamples < 1:
        raise ConfigError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    check_int("the bootstrap seed", seed, 0)
    arrays = [np.asarray(c, np.float64) for c in columns]
    if arrays[0].ndim != 1 or any(a.shape != arrays[0].shape for a in arrays):
        raise ConfigError("numerators and denominators must be 1-d and of one length")
    return arrays


def _bootstrap_sums(
    columns: list[NDArray[np.float64]], resamples: int, seed: int
) -> list[NDArray[np.float64]]:
    """Per column, its sum over each of ``resamples`` draws of the units with replacement (the
    same draws for every column), drawn in chunks so that memory stays bounded."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_DRAWN // n)
    parts: list[list[NDArray[np.float64]]] = [[] for _ in columns]
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, n, (min(chunk, resamples - start), n))
        for part, column in zip(parts, columns, strict=True):
            part.append(column[draws].sum(axis=1))
    return [np.concatenate(part) for part in parts]


def _interval(values: NDArray[np.float64], level: float) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


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
    num, den = _unit_columns(level, resamples, seed, numerators, denominators)
    if len(num) == 0:
        return float("nan"), float("nan")
    num_sums, den_sums = _bootstrap_sums([num, den], resamples, seed)
    ok = den_sums > 0
    return _interval(num_sums[ok] / den_sums[ok], level)


def paired_ratio_difference(
    base: tuple[ArrayLike, ArrayLike],
    variant: tuple[ArrayLike, ArrayLike],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``variant``'s ratio minus ``base``'s (each a (numerators, denominators) pair over the same
    units, in the same order) and its percentile bootstrap interval: each draw resamples the
    units once for both, so what the two share (the hard photos) cancels out. Unlike the
    difference of per-unit hits, the two ratios may have different denominators (a
    detector's precision counts its own predictions)."""
    columns = _unit_columns(level, resamples, seed, *base, *variant)
    num_a, den_a, num_b, den_b = columns
    if len(num_a) == 0 or den_a.sum() == 0 or den_b.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    delta = float(num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum())
    sa, da, sb, db = _bootstrap_sums(columns, resamples, seed)
    ok = (da > 0) & (db > 0)
    return (delta, *_interval(sb[ok] / db[ok] - sa[ok] / da[ok], level))
