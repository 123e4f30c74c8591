"""Test-time views of an image (issue #20): mirror, catalog-image augmentations, a main-object crop.

A catalog ("iconic") image is a product alone on white; a shopper's photo is the product in a
shop. :func:`catalog_views` makes photo-like variants of a catalog image (crops, zoom-out,
white-balance and light shifts, blur, small rotations, and the product cut out by a near-white
threshold and composited on grey or on synthetic clutter) whose embeddings can be averaged into
one product vector. :func:`main_object_crop` frames a query photo on its most distinctive
region. :func:`is_packshot` tells a packshot from a photo (indexing averages
:func:`packshot_views` into a packshot's vector when the catalog asks for it). Pure PIL +
numpy, apart from :func:`embed_averaged`, which embeds through the embedder it is given.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter

from snapshop.errors import ConfigError
from snapshop.models.embedder import unit_rows

VIEW_KINDS = ("crop", "zoom_out", "white_balance", "blur", "rotate", "on_grey", "on_clutter")
VIEW_SEED = 0  # catalog_levers.py drew every image's views from random.Random(0) too
# is_packshot: share of the border ring that must be near-white (grocery-dev: catalog images
# 0.85-1.0, shop photos <= 0.18)
PACKSHOT_WHITE_BORDER = 0.6
MAX_CATALOG_VIEWS = 64  # each costs one embedding per packshot at indexing time


@dataclass(frozen=True)
class CatalogAugmentConfig:
    """How :func:`catalog_views` varies a catalog image."""

    white_threshold: int = 235  # a pixel with every channel >= this is background
    crop_scale: tuple[float, float] = (0.55, 0.9)  # crop side as a fraction of the image's
    zoom_out: tuple[float, float] = (0.5, 0.85)  # product size on the enlarged canvas
    gain: float = 0.15  # per-channel white-balance gain in 1 +- gain
    brightness: float = 0.25
    blur: tuple[float, float] = (1.0, 2.5)  # Gaussian radius, px at 260 px
    rotate: float = 12.0  # degrees, +-
    flip: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.white_threshold <= 255:
            raise ConfigError(f"white_threshold must be in 1..255, got {self.white_threshold}")
        for name in ("crop_scale", "zoom_out"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")


def mirror(image: Image.Image) -> Image.Image:
    """The image flipped left to right."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def foreground_mask(image: Image.Image, white_threshold: int = 235) -> NDArray[np.bool_]:
    """(H, W) True where the product is: not near-white, after a 5-px opening and closing that
    removes speckle and fills pin-holes. All False on a blank image."""
    rgb = np.asarray(image.convert("RGB"))
    product = Image.fromarray(((rgb < white_threshold).any(axis=2) * 255).astype(np.uint8))
    product = product.filter(ImageFilter.MinFilter(5)).filter(ImageFilter.MaxFilter(5))
    product = product.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.MinFilter(5))
    return np.asarray(product) > 127


def clutter(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A synthetic cluttered background: random coloured shapes, softly blurred."""
    w, h = size
    base = tuple(rng.randint(60, 200) for _ in range(3))
    canvas = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(canvas)
    for _ in range(24):
        x0, y0 = rng.randint(-w // 4, w), rng.randint(-h // 4, h)
        x1, y1 = x0 + rng.randint(w // 8, w // 2), y0 + rng.randint(h // 8, h // 2)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x1, y1), fill=colour)
    return canvas.filter(ImageFilter.GaussianBlur(max(1.0, min(w, h) / 100)))


def _composite(image: Image.Image, background: Image.Image, threshold: int) -> Image.Image:
    mask = foreground_mask(image, threshold)
    if not mask.any():
        return image
    alpha = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    return Image.composite(image, background, alpha)


def catalog_view(
    image: Image.Image, kind: str, rng: random.Random, config: CatalogAugmentConfig
) -> Image.Image:
    """One augmented variant of a catalog image (``kind`` from :data:`VIEW_KINDS`), mirrored
    with probability ``config.flip``."""
    image = image.convert("RGB")
    w, h = image.size
    if kind == "crop":
        side = rng.uniform(*config.crop_scale)
        cw, ch = max(1, round(w * side)), max(1, round(h * side))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = image.crop((x, y, x + cw, y + ch))
    elif kind == "zoom_out":
        scale = rng.uniform(*config.zoom_out)
        canvas = Image.new("RGB", (round(w / scale), round(h / scale)), (255, 255, 255))
        canvas.paste(image, (rng.randint(0, canvas.width - w), rng.randint(0, canvas.height - h)))
        out = canvas
    elif kind == "white_balance":
        gains = np.array([rng.uniform(1 - config.gain, 1 + config.gain) for _ in range(3)])
        gains *= rng.uniform(1 - config.brightness, 1 + config.brightness)
        pixels = np.asarray(image, np.float32) * gains
        out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    elif kind == "blur":
        radius = rng.uniform(*config.blur) * min(w, h) / 260
        out = image.filter(ImageFilter.GaussianBlur(radius))
    elif kind == "rotate":
        angle = rng.uniform(-config.rotate, config.rotate)
        out = image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))
    elif kind == "on_grey":
        grey = rng.randint(90, 170)
        out = _composite(image, Image.new("RGB", (w, h), (grey,) * 3), config.white_threshold)
    elif kind == "on_clutter":
        out = _composite(image, clutter((w, h), rng), config.white_threshold)
    else:
        raise ConfigError(f"unknown catalog view {kind!r}; choose from {', '.join(VIEW_KINDS)}")
    return mirror(out) if rng.random() < config.flip else out


@dataclass(frozen=True)
class PileConfig:
    """How :func:`pile_view` heaps copies of a product: ``grid`` x ``grid`` cells (one copy
    each, drawn from the range), a copy's long side ``overlap`` times its cell, rotated within
    +-``rotate`` degrees, its centre jittered by up to ``jitter`` of a cell."""

    grid: tuple[int, int] = (3, 5)
    overlap: tuple[float, float] = (1.1, 1.5)
    rotate: float = 30.0
    jitter: float = 0.3
    white_threshold: int = 235

    def __post_init__(self) -> None:
        if not 1 <= self.grid[0] <= self.grid[1] <= 16:
            raise ConfigError(f"grid must satisfy 1 <= low <= high <= 16, got {self.grid}")
        if not 0 < self.overlap[0] <= self.overlap[1] <= 4:
            raise ConfigError(f"overlap must satisfy 0 < low <= high <= 4, got {self.overlap}")


def pile_view(
    image: Image.Image, rng: random.Random, config: PileConfig = PileConfig()
) -> Image.Image:
    """A catalog image of one item (an apple alone on white) turned into a heap of it, as
    shops show fruit, vegetables and packages: copies of the cut-out product on a jittered
    grid over grey or clutter, each rotated, mirrored at random and lit a little differently.
    The image itself when no product stands out from a white background."""
    rgb = image.convert("RGB")
    mask = foreground_mask(rgb, config.white_threshold)
    if not mask.any():
        return rgb
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    item = rgb.crop(box)
    alpha = Image.fromarray((mask * 255).astype(np.uint8)).crop(box)
    alpha = alpha.filter(ImageFilter.GaussianBlur(1))
    w, h = rgb.size
    if rng.random() < 0.5:
        grey = rng.randint(40, 140)
        canvas = Image.new("RGB", (w, h), (grey,) * 3)
    else:
        canvas = clutter((w, h), rng)
    cells = rng.randint(*config.grid)
    cell_w, cell_h = w / cells, h / cells
    spots = [(i, j) for i in range(cells) for j in range(cells)]
    rng.shuffle(spots)
    for i, j in spots:
        side = max(cell_w, cell_h) * rng.uniform(*config.overlap)
        scale = side / max(item.size)
        size = (max(1, round(item.width * scale)), max(1, round(item.height * scale)))
        copy = item.resize(size, Image.Resampling.BILINEAR)
        copy_alpha = alpha.resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            copy, copy_alpha = mirror(copy), mirror(copy_alpha)
        angle = rng.uniform(-config.rotate, config.rotate)
        copy = copy.rotate(angle, Image.Resampling.BILINEAR, expand=True)
        copy_alpha = copy_alpha.rotate(angle, Image.Resampling.BILINEAR, expand=True)
        light = rng.uniform(0.8, 1.1)
        copy = Image.fromarray(
            np.clip(np.asarray(copy, np.float32) * light, 0, 255).astype(np.uint8)
        )
        cx = (i + 0.5 + rng.uniform(-config.jitter, config.jitter)) * cell_w
        cy = (j + 0.5 + rng.uniform(-config.jitter, config.jitter)) * cell_h
        canvas.paste(copy, (round(cx - copy.width / 2), round(cy - copy.height / 2)), copy_alpha)
    return canvas


def catalog_views(
    image: Image.Image,
    n: int,
    rng: random.Random,
    config: CatalogAugmentConfig = CatalogAugmentConfig(),
) -> list[Image.Image]:
    """``n`` augmented variants, cycling through :data:`VIEW_KINDS` (the original not
    included). Deterministic for a given ``rng`` state."""
    if n < 0:
        raise ConfigError(f"the number of catalog views must be >= 0, got {n}")
    return [catalog_view(image, VIEW_KINDS[i % len(VIEW_KINDS)], rng, config) for i in range(n)]


def main_object_crop(
    image: Image.Image, min_side: float = 0.5, margin: float = 0.1, thumb: int = 64
) -> Image.Image:
    """The image cropped to its most distinctive region: on a ``thumb``-px copy, each pixel's
    colour distance from the median border colour; the box spans the 5th-95th percentiles of
    that distance's mass above its mean, grown by ``margin`` and to at least ``min_side`` of
    each side. The whole image when nothing stands out (a flat image)."""
    rgb = image.convert("RGB")
    small = rgb.copy()
    small.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
    px = np.asarray(small, np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    distance = np.linalg.norm(px - np.median(border, axis=0), axis=2)
    weight = np.clip(distance - distance.mean(), 0, None)
    if weight.sum() <= 0:
        return rgb
    sh, sw = weight.shape

    def span(mass: NDArray[np.float64], n: int, keep: float) -> tuple[float, float]:
        cdf = np.cumsum(mass) / mass.sum()
        lo, hi = float(np.searchsorted(cdf, 0.05)), float(np.searchsorted(cdf, 0.95) + 1)
        grow = (hi - lo) * margin
        lo, hi = max(0.0, lo - grow), min(float(n), hi + grow)
        short = keep * n - (hi - lo)
        if short > 0:
            lo, hi = max(0.0, lo - short / 2), min(float(n), hi + short / 2)
            lo, hi = (0.0, max(hi, keep * n)) if lo == 0 else (min(lo, n - keep * n), hi)
        return lo / n, hi / n

    x0, x1 = span(weight.sum(axis=0), sw, min_side)
    y0, y1 = span(weight.sum(axis=1), sh, min_side)
    w, h = rgb.size
    return rgb.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))


def flip_views(image: Image.Image) -> list[Image.Image]:
    """The extra view of flip averaging: the mirrored image."""
    return [mirror(image)]


def is_packshot(
    image: Image.Image,
    white_threshold: int = 235,
    min_white_border: float = PACKSHOT_WHITE_BORDER,
    thumb: int = 64,
) -> bool:
    """Whether ``image`` looks like a catalog packshot, the product alone on white: on a
    ``thumb``-px copy, at least ``min_white_border`` of the 2-px border ring is near-white
    (every channel >= ``white_threshold``) and something inside is not (a blank white image
    is no product). About 0.3 ms at 350 px. On grocery-dev the 41 catalog images' border
    shares are 0.85-1.0 and 600 shop photos' at most 0.18 (docs/benchmarks/retrieval.md)."""
    small = image.convert("RGB")
    small.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
    white = np.all(np.asarray(small) >= white_threshold, axis=2)
    if white.shape[0] <= 4 or white.shape[1] <= 4:
        return False
    ring = np.ones_like(white)
    ring[2:-2, 2:-2] = False
    return bool(white[ring].mean() >= min_white_border and not white.all())


def check_view_count(n: object) -> int:
    """``n`` if it is a number of catalog views an index may average (0 to
    :data:`MAX_CATALOG_VIEWS`), else a ConfigError."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_CATALOG_VIEWS:
        raise ConfigError(
            f"catalog views must be an integer from 0 (off) to {MAX_CATALOG_VIEWS}, got {n!r}"
        )
    return n


def packshot_views(
    image: Image.Image, n: int, config: CatalogAugmentConfig = CatalogAugmentConfig()
) -> list[Image.Image]:
    """The extra views a packshot's vector averages at indexing time: its mirror and ``n``
    :func:`catalog_views`, drawn from a generator seeded with :data:`VIEW_SEED` for every
    image (the same views whatever the order or thread an image is indexed in)."""
    return [mirror(image), *catalog_views(image, n, random.Random(VIEW_SEED), config)]


def mean_view(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    """(V, D) L2-normalised embeddings of one image's views -> (D,) float32: their mean,
    L2-normalised (the vector every averaging lever stores or searches with)."""
    return unit_rows(vectors.mean(axis=0, keepdims=True, dtype=np.float64))[0].astype(np.float32)


def embed_averaged(
    embedder: Any,
    images: Sequence[Image.Image],
    extra_views: Callable[[Image.Image], list[Image.Image]],
) -> NDArray[np.float32]:
    """(N, D) float32, L2-normalised: each image's embedding averaged with its
    ``extra_views``' (e.g. :func:`flip_views`, or ``lambda im: catalog_views(im, 24, rng)``).
    ``embedder`` is an :class:`~snapshop.models.embedder.Embedder` (anything with
    ``embed_images`` and ``dim``). Costs 1 + len(views) embeddings per image, each image's
    views embedded as one batch."""
    out = np.zeros((len(images), embedder.dim), np.float32)
    for i, image in enumerate(images):
        out[i] = mean_view(embedder.embed_images([image, *extra_views(image)]))
    return out
