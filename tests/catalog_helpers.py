"""Helpers for catalog, ingest, search and CLI tests: generated shops and consistency checks."""

from __future__ import annotations

import csv
import hashlib
import sqlite3
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.demo import DemoProduct, demo_products, render

CSV_HEADER = ["product_id", "image_path", "title", "url", "price", "category"]


def make_images(
    root: Path, n_products: int = 4, per_product: int = 3, size: int = 96, seed: int = 0
) -> dict[str, list[Path]]:
    """``root/<sku>/<j>.jpg`` rendered demo garments; returns {sku: [paths]}."""
    out: dict[str, list[Path]] = {}
    for n, product in enumerate(demo_products(n_products, seed=seed)):
        folder = root / product.sku
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for j in range(per_product):
            path = folder / f"{j}.jpg"
            render(product, seed * 10_000 + n * 100 + j, size=size).save(path, quality=90)
            paths.append(path)
        out[product.sku] = paths
    return out


def products_of(n_products: int, seed: int = 0) -> dict[str, DemoProduct]:
    return {p.sku: p for p in demo_products(n_products, seed=seed)}


def write_csv(path: Path, rows: list[list[object]], header: list[str] = CSV_HEADER) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def shop_csv(path: Path, images: dict[str, list[Path]], seed: int = 0) -> Path:
    """A CSV manifest listing every image in ``images`` with demo metadata."""
    meta = products_of(len(images), seed=seed)
    rows: list[list[object]] = []
    for sku, paths in images.items():
        p = meta.get(sku)
        for image in paths:
            rows.append(
                [
                    sku,
                    image,
                    p.title if p else sku,
                    f"https://shop.example/{sku}",
                    p.price if p else "",
                    p.shape if p else "",
                ]
            )
    return write_csv(path, rows)


def db_rows(catalog_dir: Path, sql: str) -> list[tuple]:
    """Read the catalog's SQLite directly (read-only), independent of snapshop's code."""
    db = sqlite3.connect(f"file:{catalog_dir / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def assert_consistent(catalog: Catalog) -> None:
    """Every index holds exactly the store's ids, with the store's vectors."""
    image_ids = np.sort(catalog.store.image_ids())
    index = catalog.index(None)
    assert index is not None
    assert np.array_equal(np.sort(index.ids()), image_ids)
    assert len(index) == len(image_ids)
    if hasattr(index, "vectors") and len(image_ids):
        ids, vecs = _all(catalog, "images")
        stored = dict(zip(ids, vecs, strict=True))
        for i, vec in zip(index.ids(), index.vectors(), strict=True):
            assert np.allclose(stored[int(i)], vec, atol=1e-6)
    for position in catalog.store.crop_positions():
        crop_index = catalog.index(position)
        assert crop_index is not None
        assert np.array_equal(np.sort(crop_index.ids()), np.sort(catalog.store.crop_ids(position)))


def _all(catalog: Catalog, table: str) -> tuple[list[int], list[np.ndarray]]:
    ids: list[int] = []
    vecs: list[np.ndarray] = []
    for batch_ids, batch_vecs in catalog.store.iter_vectors(table, catalog.dim):
        ids += batch_ids.tolist()
        vecs += list(batch_vecs)
    return ids, vecs


def check_catalog_dir(catalog_dir: Path) -> dict[str, int]:
    """Open, check consistency, close; returns the store counts."""
    catalog = open_catalog(catalog_dir)
    try:
        assert_consistent(catalog)
        return catalog.store.counts()
    finally:
        catalog.close()


def copy_catalog(source: Path, target: Path) -> Path:
    """A private copy of a catalog directory (SQLite WAL files included)."""
    import shutil

    shutil.copytree(source, target)
    return target


def add_vectors(
    catalog: Catalog, vectors: np.ndarray, sku: str = "sku-1", **meta: object
) -> list[int]:
    """Store ``vectors`` as images of one product (no files), straight into the store in one
    transaction; returns their image ids. Indexes catch up on the next ``refresh``."""
    with catalog.write_lock(), catalog.store.transaction() as db:
        product_id = catalog.store.upsert_product(db, sku, **meta)
        return [
            catalog.store.insert_image(
                db, product_id, source=f"{sku}-{i}.jpg", blob=None, width=4, height=4, vector=v,
                sha256=hashlib.sha256(f"{sku}/{i}".encode()).hexdigest(),
            )[0]
            for i, v in enumerate(vectors)
        ]  # fmt: skip


def race(threads: list[threading.Thread], stop: threading.Event, seconds: float) -> None:
    """Start ``threads`` and let them run for ``seconds``, the interpreter switching between
    them often (races show within seconds), then set ``stop`` and join them; fails when one
    is still running (a deadlock)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for t in threads:
            t.start()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: deadlock"


class MeanColourEmbedder:
    """A stand-in embedder: an image's L2-normalised mean colour (generated products differ
    by colour, so a product's images embed near each other), for evaluation tests."""

    dim = 3
    card = SimpleNamespace(name="mean-colour")

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        vecs = np.stack(
            [np.asarray(i.convert("RGB"), np.float32).mean(axis=(0, 1)) for i in images]
        )
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
