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
