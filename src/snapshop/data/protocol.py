"""The reference protocol: a seeded, product-disjoint train/test split of merged sources.

Products with ``min_images..max_images`` images are kept; a random ``test_fraction`` of the
*products* is held out (or, with ``folds = K``, the ``fold``-th of K equal parts of the same
seeded shuffle: the K manifests hold every product out exactly once, for cross-validation);
each test image becomes a query or a gallery image with probability 1/2 (each test product
gets at least one of each when it has two images or more), unless ``keep_roles`` keeps the
roles the sources gave. Every row gets a ``split`` column
(``train`` | ``test``); a source's own ``split`` column is kept as ``source_split``.
"""

from __future__ import annotations

import numbers
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from snapshop.data.manifest import ManifestRow, write_manifest
from snapshop.errors import ConfigError


@dataclass(frozen=True)
class ProtocolConfig:
    test_fraction: float = 0.2
    min_images: int = 2
    max_images: int = 30  # 0 = no upper limit
    seed: int = 0
    keep_roles: bool = False
    folds: int = 0  # >= 2: hold out part ``fold`` of ``folds`` instead of ``test_fraction``
    fold: int = 0

    def __post_init__(self) -> None:
        # checked here, not deep inside the split (slices and comparisons of the wrong type)
        for name in ("min_images", "max_images", "seed", "folds", "fold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            object.__setattr__(self, name, int(value))
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, numbers.Real):
            raise ConfigError(f"test_fraction must be a number, got {self.test_fraction!r}")
        if not isinstance(self.keep_roles, bool):
            raise ConfigError(f"keep_roles must be true or false, got {self.keep_roles!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"folds must be 0 (no cross-validation) or >= 2, got {self.folds}")
        if not 0 <= self.fold < max(self.folds, 1):
            raise ConfigError(f"fold must be in 0..{max(self.folds, 1) - 1}, got {self.fold}")
        if self.min_images < 1:
            raise ConfigError(f"min_images must be >= 1, got {self.min_images}")
        if self.max_images and self.max_images < self.min_images:
            raise ConfigError(f"max_images {self.max_images} < min_images {self.min_images}")


@dataclass
class SplitCounts:
    products: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    dropped_products: int = 0

    def table(self) -> list[tuple[str, int, int]]:
        """(split/role, products, images) rows."""
        return [(k, self.products[k], self.images[k]) for k in self.products]


def split_products(
    rows: list[ManifestRow], config: ProtocolConfig = ProtocolConfig()
) -> tuple[list[ManifestRow], SplitCounts]:
    """Apply the protocol to merged rows; returns the new rows (sorted by product) and counts."""
    by_product: dict[str, list[ManifestRow]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for r in rows:
        # the same image listed twice (merged sources, a relative and an absolute spelling,
        # a ".."): counted once, or it would pass min_images alone and be its own query
        image_key = (r.sku, os.path.abspath(r.path))
        if image_key not in seen:
            seen.add(image_key)
            by_product[r.sku].append(r)
    kept = sorted(
        p
        for p, images in by_product.items()
        if len(images) >= config.min_images
        and (not config.max_images or len(images) <= config.max_images)
    )
    if len(kept) < 2:
        raise ConfigError(
            f"{len(kept)} products have {config.min_images}..{config.max_images or 'any'} images;"
            " the protocol needs at least 2"
        )
    rng = random.Random(config.seed)
    shuffled = kept[:]
    rng.shuffle(shuffled)
    if config.folds:
        if config.folds > len(kept):
            raise ConfigError(f"{config.folds} folds need at least as many products ({len(kept)})")
        test = set(shuffled[config.fold :: config.folds])
    else:
        n_test = min(len(kept) - 1, max(1, round(len(kept) * config.test_fraction)))
        test = set(shuffled[:n_test])
    out: list[ManifestRow] = []
    counts = SplitCounts(dropped_products=len(by_product) - len(kept))
    for product in kept:
        images = sorted(by_product[product], key=lambda r: str(r.path))
        split = "test" if product in test else "train"
        if split == "train" or config.keep_roles:
            roles = [r.role for r in images]
        else:
            roles = [rng.choice(("query", "gallery")) for _ in images]
            if len(images) >= 2 and len(set(roles)) == 1:
                flip = rng.randrange(len(images))
                roles[flip] = "gallery" if roles[flip] == "query" else "query"
        for r, role in zip(images, roles, strict=True):
            extra = dict(r.extra)
            if "split" in extra:
                extra["source_split"] = extra.pop("split")
            extra["split"] = split
            out.append(replace(r, role=role, extra=extra))
    for r in out:
        for key in (r.extra["split"], f"{r.extra['split']}/{r.role}"):
            if r.extra["split"] == "train" and "/" in key:
                continue
            counts.images[key] = counts.images.get(key, 0) + 1
    for key in list(counts.images):
        keys_of = lambda r: (r.extra["split"], f"{r.extra['split']}/{r.role}")  # noqa: E731
        counts.products[key] = len({r.sku for r in out if key in keys_of(r)})
    return out, counts


def prepare(
    sources: Sequence[str | Path], output: Path, config: ProtocolConfig = ProtocolConfig()
) -> tuple[list[ManifestRow], SplitCounts]:
    """Read and merge ``sources`` (see :func:`snapshop.data.readers.read_dataset`), split them,
    and write one manifest with a ``split`` column to ``output`` (paths relative to it)."""
    from snapshop.data.readers import read_dataset

    if not sources:
        raise ConfigError("prepare needs at least one source")
    merged: list[ManifestRow] = []
    for source in sources:
        merged += read_dataset(source)
    rows, counts = split_products(merged, config)
    output = Path(output)
    write_manifest(output, rows, root=output.parent.resolve())
    return rows, counts
