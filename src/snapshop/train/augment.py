"""Train-time augmentation with PIL and numpy: random resized crop, flip, colour jitter.

With ``catalog_domain`` a packshot (:func:`snapshop.models.tta.is_packshot`: the product alone
on white) first becomes one of :func:`snapshop.models.tta.catalog_view`'s photo-like variants
(cut out onto clutter or grey, zoomed out, white balance, blur, rotation, crop), so that the
catalog image's training views look more like the shop photos it must match (issue #20). With
``catalog_piles`` that share of a packshot's views is a heap of the product instead
(:func:`snapshop.models.tta.pile_view`), as shops show fruit in a bin and cartons on a shelf.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageEnhance

from snapshop.errors import ConfigError
from snapshop.models.embedder import preprocess
from snapshop.models.tta import (
    VIEW_KINDS,
    CatalogAugmentConfig,
    catalog_view,
    is_packshot,
    pile_view,
)

# Settings added after frozen-feature caches were written, at the value that changes nothing:
# left out of the cache key (:meth:`AugmentConfig.key_settings`) so those caches keep their names.
_LATER_DEFAULTS = {"catalog_piles": 0.0}


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.35, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    catalog_domain: bool = False  # packshots: a random tta.catalog_view before the above
    catalog_piles: float = 0.0  # with catalog_domain: the share of packshot views that are piles

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(
                f"crop area scale must satisfy 0 < low <= high <= 1, got {self.scale}"
            )
        if not 0 <= self.catalog_piles <= 1:
            raise ConfigError(f"catalog_piles must be in 0..1, got {self.catalog_piles}")
        if self.catalog_piles and not self.catalog_domain:
            raise ConfigError("catalog_piles needs catalog_domain (piles are catalog views)")

    def key_settings(self) -> dict[str, object]:
        """The settings that name a frozen-feature cache."""
        settings = dataclasses.asdict(self)
        return {k: v for k, v in settings.items() if _LATER_DEFAULTS.get(k, object()) != v}


def random_resized_crop(
    image: Image.Image, size: int, rng: random.Random, config: AugmentConfig
) -> Image.Image:
    """A random crop of ``scale`` area and ``ratio`` aspect, resized to ``size`` x ``size``."""
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*config.scale)
        log_ratio = (math.log(config.ratio[0]), math.log(config.ratio[1]))
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:  # fall back to the central square
        cw = ch = min(w, h)
        x, y = (w - cw) // 2, (h - ch) // 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))


def colour_jitter(image: Image.Image, rng: random.Random, config: AugmentConfig) -> Image.Image:
    ops = [
        (ImageEnhance.Brightness, config.brightness),
        (ImageEnhance.Contrast, config.contrast),
        (ImageEnhance.Color, config.saturation),
    ]
    rng.shuffle(ops)
    for enhancer, amount in ops:
        if amount > 0:
            image = enhancer(image).enhance(rng.uniform(1 - amount, 1 + amount))
    return image


def augment(
    image: Image.Image, size: int, rng: random.Random, config: AugmentConfig = AugmentConfig()
) -> NDArray[np.float32]:
    """RGB image -> (3, size, size) float32 normalised like :func:`preprocess`, augmented."""
    if config.catalog_domain and is_packshot(image):
        if config.catalog_piles and rng.random() < config.catalog_piles:
            image = pile_view(image, rng)
        else:
            image = catalog_view(image, rng.choice(VIEW_KINDS), rng, CatalogAugmentConfig())
    out = random_resized_crop(image, size, rng, config)
    if rng.random() < config.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = colour_jitter(out, rng, config)
    return preprocess(out, size)


def views(
    image: Image.Image, size: int, n: int, rng: random.Random, config: AugmentConfig
) -> list[NDArray[np.float32]]:
    """``n`` views: the eval-time centre crop first, then ``n - 1`` augmented ones."""
    return [preprocess(image, size)] + [augment(image, size, rng, config) for _ in range(n - 1)]
