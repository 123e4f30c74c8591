"""A small generated demo catalog, so snapshop runs end to end on a machine with no data.

Products are drawn garments (shirt, trousers, dress, skirt) in distinct colours and patterns;
each product gets several photos with different backgrounds, scales, offsets and rotations,
and the query is a photo of one product that the catalog never saw.
"""

from __future__ import annotations

import csv
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from snapshop.search import SearchResult

SHAPES = ("shirt", "trousers", "dress", "skirt")
PATTERNS = ("solid", "stripes", "dots", "checks")
COLOURS = {
    "red": (200, 30, 40), "navy": (25, 40, 110), "green": (30, 140, 60),
    "yellow": (235, 200, 40), "black": (25, 25, 25), "pink": (240, 140, 180),
    "teal": (20, 150, 150), "orange": (240, 120, 20),
}  # fmt: skip
BACKGROUNDS = ((245, 245, 245), (225, 215, 200), (200, 220, 235), (210, 235, 210), (240, 240, 220))
POSITION = {"shirt": "upper", "dress": "upper", "trousers": "lower", "skirt": "lower"}


@dataclass(frozen=True)
class DemoProduct:
    sku: str
    shape: str
    colour: str
    pattern: str
    price: float

    @property
    def title(self) -> str:
        return f"{self.colour.title()} {self.pattern} {self.shape}"


def _outline(shape: str, s: float) -> list[tuple[float, float]]:
    """Polygon of a garment in a unit box scaled by ``s`` (origin top-left)."""
    unit = {
        "shirt": [(0.30, 0.05), (0.70, 0.05), (0.95, 0.25), (0.85, 0.38), (0.75, 0.30),
                  (0.75, 0.95), (0.25, 0.95), (0.25, 0.30), (0.15, 0.38), (0.05, 0.25)],
        "trousers": [(0.25, 0.05), (0.75, 0.05), (0.82, 0.95), (0.57, 0.95), (0.50, 0.35),
                     (0.43, 0.95), (0.18, 0.95)],
        "dress": [(0.38, 0.05), (0.62, 0.05), (0.68, 0.35), (0.88, 0.95), (0.12, 0.95),
                  (0.32, 0.35)],
        "skirt": [(0.30, 0.15), (0.70, 0.15), (0.90, 0.85), (0.10, 0.85)],
    }[shape]  # fmt: skip
    return [(x * s, y * s) for x, y in unit]


def _pattern_layer(
    size: int, colour: tuple[int, int, int], pattern: str, rng: random.Random
) -> Image.Image:
    layer = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(layer)
    accent = tuple(255 - c for c in colour)
    step = max(6, size // 12)
    if pattern == "stripes":
        for y in range(0, size, step * 2):
            draw.rectangle((0, y, size, y + step - 1), fill=accent)
    elif pattern == "dots":
        for x, y in itertools.product(range(step // 2, size, step * 2), repeat=2):
            draw.ellipse((x, y, x + step, y + step), fill=accent)
    elif pattern == "checks":
        for i, j in itertools.product(range(0, size, step), repeat=2):
            if (i // step + j // step) % 2 == 0:
                draw.rectangle((i, j, i + step - 1, j + step - 1), fill=accent)
    return layer


def render(product: DemoProduct, seed: int, size: int = 320) -> Image.Image:
    """One photo of ``product``: random background, scale, offset and small rotation."""
    rng = random.Random(seed)
    background = rng.choice(BACKGROUNDS)
    canvas = Image.new("RGB", (size, size), background)
    garment_size = int(size * rng.uniform(0.6, 0.9))
    mask = Image.new("L", (garment_size, garment_size), 0)
    ImageDraw.Draw(mask).polygon(_outline(product.shape, garment_size), fill=255)
    layer = _pattern_layer(garment_size, COLOURS[product.colour], product.pattern, rng)
    angle = rng.uniform(-12, 12)
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR)
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR)
    x = rng.randint(0, size - garment_size)
    y = rng.randint(0, size - garment_size)
    canvas.paste(layer, (x, y), mask)
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return canvas


def demo_products(n_products: int = 24, seed: int = 0) -> list[DemoProduct]:
    rng = random.Random(seed)
    combos = list(itertools.product(SHAPES, COLOURS, PATTERNS))
    rng.shuffle(combos)
    return [
        DemoProduct(f"demo-{i:03d}", shape, colour, pattern, round(rng.uniform(9, 120), 2))
        for i, (shape, colour, pattern) in enumerate(combos[:n_products])
    ]


def generate_demo_catalog(
    root: Path, n_products: int = 24, images_per_product: int = 4, seed: int = 0
) -> tuple[Path, list[tuple[Path, str]]]:
    """Write a catalog CSV (+ images) under ``root`` and held-out query photos.

    Returns (manifest path, [(query image, expected sku)]).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "queries").mkdir(parents=True, exist_ok=True)
    products = demo_products(n_products, seed)
    manifest = root / "catalog.csv"
    queries: list[tuple[Path, str]] = []
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["product_id", "image_path", "title", "price", "currency", "category", "url"]
        )
        for n, product in enumerate(products):
            for j in range(images_per_product):
                rel = Path("images") / f"{product.sku}-{j}.jpg"
                render(product, seed * 100_003 + n * 101 + j).save(root / rel, quality=90)
                url = f"https://shop.example/{product.sku}"
                writer.writerow([product.sku, rel, product.title, product.price, "EUR",
                                 POSITION[product.shape], url])  # fmt: skip
            query = root / "queries" / f"{product.sku}.jpg"
            render(product, seed * 100_003 + n * 101 + 97).save(query, quality=85)
            queries.append((query, product.sku))
    return manifest, queries


def search_demo_queries(
    catalog_dir: Path, queries: list[tuple[Path, str]], k: int = 5
) -> tuple[list[SearchResult], float]:
    """Search every query with one opened searcher; returns (results, recall@1)."""
    from snapshop.api import open_searcher

    searcher = open_searcher(catalog_dir)
    try:
        results = [searcher.search(query, k) for query, _ in queries]
    finally:
        searcher.catalog.close()
    hits = sum(
        bool(r.image_results) and r.image_results[0].sku == sku
        for r, (_, sku) in zip(results, queries, strict=True)
    )
    return results, hits / max(len(queries), 1)
