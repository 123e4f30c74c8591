"""Issue #16: a query embeds its photo beside detection (only the crops need the boxes)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import write_csv
from PIL import Image

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.demo import demo_products, render
from snapshop.detect.base import UPPER, Box, Detection
from snapshop.models.embedder import Embedder
from snapshop.search import Searcher


class WaitingDetector:
    """Detects one upper garment, but first waits (up to 10 s) for the photo's embedding to
    start, and records whether it did: it can only start during detection if the searcher
    began it before detecting."""

    name = "waiting"

    def __init__(self, started: threading.Event) -> None:
        self.started = started
        self.saw_embedding = False

    def detect(self, image: Image.Image) -> list[Detection]:
        self.saw_embedding = self.started.wait(timeout=10)
        w, h = image.size
        return [Detection(Box(0.1 * w, 0.1 * h, 0.9 * w, 0.6 * h), "top", UPPER, 0.9)]


def test_photo_embedding_runs_beside_detection(tmp_path: Path, lite0_model_dir: Path) -> None:
    products = demo_products(4, seed=3)
    rows: list[list[object]] = []
    for n, product in enumerate(products):
        path = tmp_path / f"{n}.jpg"
        render(product, seed=n, size=64).save(path, quality=90)
        rows.append([product.sku, path, product.title, "", 10.0, "upper"])
    api.index_source(write_csv(tmp_path / "shop.csv", rows), tmp_path / "cat",
                     model=str(lite0_model_dir))  # fmt: skip
    query = render(products[1], seed=77, size=64)

    embedder = Embedder(lite0_model_dir, parallel=2)
    started = threading.Event()
    embed_one = embedder._embed_one

    def flagging(image: Image.Image) -> np.ndarray:
        started.set()
        return embed_one(image)

    embedder._embed_one = flagging  # type: ignore[method-assign]
    detector = WaitingDetector(started)
    catalog = open_catalog(tmp_path / "cat")
    try:
        result = Searcher(catalog, embedder, detector).search(query, k=3)
        assert detector.saw_embedding  # the photo's embedding started while detecting
        # the same answer as embedding the photo and its crop in one call, one after the other
        serial = Searcher(catalog, Embedder(lite0_model_dir, parallel=0), detector)
        started.set()
        reference = serial.search(query, k=3)
    finally:
        catalog.close()
    assert [h.product_id for h in result.image_results] == [
        h.product_id for h in reference.image_results
    ]
    assert [h.score for h in result.image_results] == pytest.approx(
        [h.score for h in reference.image_results], abs=1e-5
    )
    assert [r.position for r in result.item_results] == [UPPER]
    assert result.image_results[0].sku == products[1].sku


def test_submit_without_a_pool_runs_at_once(lite0_model_dir: Path) -> None:
    image = render(demo_products(1)[0], seed=5, size=64)
    inline = Embedder(lite0_model_dir, parallel=0).submit(image)
    assert inline.done()
    pooled = Embedder(lite0_model_dir, parallel=2).submit(image).result()
    assert pooled.shape == (1, 1280)
    assert np.abs(inline.result() - pooled).max() < 1e-5
