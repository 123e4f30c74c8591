"""Helpers shared by the service tests: a deterministic garment detector and a tiny catalog."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from snapshop.detect.base import Box, Detection

API_KEY = "test-key-123456"


class FixedGarmentDetector:
    """Deterministic stand-in for a garment detector: an upper box over the top half of the
    picture and a lower box over the bottom half, so item-based search always has boxes."""

    name = "fixed-test"

    def detect(self, image: Image.Image) -> list[Detection]:
        w, h = image.size
        return [
            Detection(Box(0.1 * w, 0.05 * h, 0.9 * w, 0.55 * h), "short_sleeve_top", "upper", 0.9),
            Detection(Box(0.15 * w, 0.45 * h, 0.85 * w, 0.95 * h), "trousers", "lower", 0.8),
            Detection(Box(0.4 * w, 0.4 * h, 0.6 * w, 0.6 * h), "bag", None, 0.5),
        ]


def build_catalog(root: Path, n_products: int = 10, images_per_product: int = 2):
    """A generated demo catalog indexed with Lite0 and the fixed detector.

    Returns (catalog dir, [(held-out query photo, expected sku)])."""
    from snapshop import api
    from snapshop.demo import generate_demo_catalog

    manifest, queries = generate_demo_catalog(
        root / "source", n_products=n_products, images_per_product=images_per_product
    )
    catalog = root / "catalog"
    api.index_source(manifest, catalog, model="efficientnet_lite0", detector=FixedGarmentDetector())
    return catalog, queries


def jpeg_bytes(
    size: tuple[int, int] = (96, 128), colour: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()
