"""Class-balanced P x K batch sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import NDArray

from snapshop.errors import ConfigError


class PKSampler:
    """Batches of ``p`` distinct classes x ``k`` samples each, drawn with replacement.

    Classes are drawn without replacement within a batch (with replacement only when there are
    fewer than ``p`` classes); a class's ``k`` samples are drawn with replacement, so classes
    with fewer than ``k`` samples still fill their slots. Deterministic for a given ``seed``.
    """

    def __init__(
        self,
        labels: Sequence[int] | NDArray[np.integer],
        p: int,
        k: int,
        batches: int,
        seed: int = 0,
    ) -> None:
        if p < 1 or k < 1 or batches < 1:
            raise ConfigError(f"P, K and batches must be >= 1, got {p}, {k}, {batches}")
        labels_arr = np.asarray(labels, dtype=np.int64)
        if labels_arr.ndim != 1 or len(labels_arr) == 0:
            raise ConfigError("the sampler needs a non-empty 1-d label list")
        self.classes = np.unique(labels_arr)
        self.members = {int(c): np.flatnonzero(labels_arr == c) for c in self.classes}
        self.p, self.k, self.batches, self.seed = p, k, batches, seed

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        replace = len(self.classes) < self.p
        for _ in range(self.batches):
            chosen = rng.choice(self.classes, size=self.p, replace=replace)
            yield np.concatenate(
                [rng.choice(self.members[int(c)], size=self.k, replace=True) for c in chosen]
            )
