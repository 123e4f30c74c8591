"""Toy catalogs with synthetic vectors for the shop features (similar, product vectors,
recommend, duplicates), and brute-force references that read the SQLite file directly."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from catalog_helpers import db_rows
from PIL import Image

from snapshop.catalog.catalog import Catalog, create_catalog
from snapshop.catalog.store import NewCrop

DIM = 16
CATEGORIES = ("tops", "skirts", "shoes")


def unit(rng: np.random.Generator, n: int = 1, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(rng: np.random.Generator, centre: np.ndarray, spread: float) -> np.ndarray:
    v = centre + spread * rng.normal(size=centre.shape).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def new_catalog(directory: Path, dim: int = DIM, index_kind: str = "flat") -> Catalog:
    return create_catalog(
        directory, model_id="toy@000000000000", model_ref="toy", dim=dim, index_kind=index_kind
    )


def add_image(
    catalog: Catalog,
    sku: str,
    vector: np.ndarray,
    crops: dict[str, np.ndarray] | None = None,
    *,
    price: float | None = None,
    category: str | None = None,
    sha256: str | None = None,
    blob: str | None = None,
) -> tuple[int, list[int]]:
    """Insert one image (and crops {position: vector}) the way ingest does; indexes saved."""
    new = [
        NewCrop(pos, f"{pos}-label", 0.5 + 0.1 * n, (1.0, 2.0, 30.0, 40.0), vec)
        for n, (pos, vec) in enumerate(sorted((crops or {}).items()))
    ]
    store = catalog.store
    sha = sha256 or f"{abs(hash((sku, vector.tobytes()))):064x}"
    with catalog.write_lock(), store.transaction() as db:
        product_id = store.upsert_product(db, sku, price=price, category=category)
        image_id, crop_ids = store.insert_image(
            db,
            product_id,
            source=f"{sku}.jpg",
            blob=blob,
            sha256=sha,
            width=40,
            height=50,
            vector=vector,
            crops=new,
        )
    committed = store.last_commit()
    catalog.add_vectors(None, np.array([image_id]), vector[None, :])
    for cid, c in zip(crop_ids, new, strict=True):
        catalog.add_vectors(c.position, np.array([cid]), c.vector[None, :])
    catalog.applied(committed)
    with catalog.write_lock():
        catalog.save_indexes()
    return image_id, crop_ids


def fill_shop(catalog: Catalog, n_products: int = 30, seed: int = 0) -> None:
    """``n_products`` products ``p00``..: 1-4 images each around a per-product centre (so a
    product's images resemble each other), an upper crop on most images and a lower crop on
    some, a category and a price (every fifth product has none)."""
    rng = np.random.default_rng(seed)
    dim = catalog.dim
    for n in range(n_products):
        centre = unit(rng, dim=dim)[0]
        for _ in range(int(rng.integers(1, 5))):
            crops = {}
            if rng.random() < 0.8:
                crops["upper"] = near(rng, centre, 0.6)
            if rng.random() < 0.4:
                crops["lower"] = unit(rng, dim=dim)[0]
            add_image(
                catalog,
                f"p{n:02d}",
                near(rng, centre, 0.4),
                crops,
                price=None if n % 5 == 4 else float(10 + n),
                category=CATEGORIES[n % 3],
            )


def stored(catalog_dir: Path, table: str, position: str | None = None) -> dict[int, tuple]:
    """{entry id: (product id, vector)} for images or the crops of ``position``, read straight
    from SQLite (independent of snapshop's code)."""
    if table == "images":
        rows = db_rows(catalog_dir, "SELECT id, product_id, vector FROM images")
    else:
        rows = db_rows(
            catalog_dir,
            "SELECT c.id, i.product_id, c.vector FROM crops c JOIN images"
            f" i ON c.image_id = i.id WHERE c.position = '{position}'",
        )
    return {r[0]: (r[1], np.frombuffer(r[2], np.float32)) for r in rows}


def product_ids(catalog_dir: Path) -> dict[str, int]:
    return {sku: pid for pid, sku in db_rows(catalog_dir, "SELECT id, sku FROM products")}


def mean_vectors(entries: dict[int, tuple]) -> dict[int, np.ndarray]:
    """Reference product vectors: mean of the normalised entry vectors, renormalised."""
    grouped: dict[int, list[np.ndarray]] = {}
    for product, vec in entries.values():
        grouped.setdefault(product, []).append(vec / np.linalg.norm(vec))
    out = {}
    for product, vecs in grouped.items():
        m = np.mean(vecs, axis=0)
        out[product] = m / np.linalg.norm(m)
    return out


def stored_file(
    catalog_dir: Path, image: Image.Image, fmt: str = "JPEG", quality: int = 75
) -> tuple[str, str]:
    """``image`` written where ingest keeps a stored file (``blobs/<sha[:2]>/<sha>.<fmt>``,
    JPEG at ``quality``); returns (blob, sha256) for the image row."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    blob = f"blobs/{sha[:2]}/{sha}.{fmt.lower()}"
    (catalog_dir / blob).parent.mkdir(parents=True, exist_ok=True)
    (catalog_dir / blob).write_bytes(data)
    return blob, sha
