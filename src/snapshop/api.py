"""The Python API: typed functions the CLI and the service are thin shells over."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapshop.catalog.catalog import CARD_FILE, Catalog, create_catalog, open_catalog
from snapshop.data.sources import CatalogRecord, read_source
from snapshop.detect.base import Detector
from snapshop.detect.factory import create_detector
from snapshop.errors import CatalogError
from snapshop.images import ImageSource
from snapshop.ingest import Ingestor, IngestReport
from snapshop.models.embedder import Embedder, load_embedder
from snapshop.search import ProductFilter, Searcher, SearchResult

PathLike = str | os.PathLike[str]


def open_or_create_catalog(
    catalog_dir: PathLike, embedder: Embedder, model_ref: str, index_kind: str = "flat"
) -> Catalog:
    directory = Path(catalog_dir)
    if (directory / CARD_FILE).exists():
        return open_catalog(directory)
    return create_catalog(
        directory, model_id=embedder.model_id, model_ref=model_ref, dim=embedder.dim,
        index_kind=index_kind,
    )  # fmt: skip


def _model_ref(model: str | None) -> str:
    if model is None:
        return "efficientnet_lite2"
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def catalog_embedder(catalog: Catalog, model: str | None = None) -> Embedder:
    """The embedder a catalog was built with (or ``model``, which must match it)."""
    embedder = load_embedder(model or catalog.model_ref)
    catalog.check_model(embedder.model_id)
    return embedder


def index_source(
    source: PathLike | list[CatalogRecord],
    catalog_dir: PathLike,
    *,
    model: str | None = None,
    detector: str | Detector | None = None,
    batch_size: int = 32,
    sync: bool = False,
    index_kind: str = "flat",
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> IngestReport:
    """Ingest a folder or CSV manifest into ``catalog_dir`` (created on first use)."""
    records = source if isinstance(source, list) else read_source(Path(source))
    directory = Path(catalog_dir)
    existing = (directory / CARD_FILE).exists()
    if existing:
        catalog = open_catalog(directory)
        embedder = catalog_embedder(catalog, model)
    else:
        embedder = load_embedder(model)
        catalog = create_catalog(directory, model_id=embedder.model_id, model_ref=_model_ref(model),
                                 dim=embedder.dim, index_kind=index_kind)  # fmt: skip
    try:
        det = (
            create_detector(detector) if isinstance(detector, str) or detector is None else detector
        )
        if progress_total:
            progress_total(len(records))
        ingestor = Ingestor(catalog, embedder, det, batch_size=batch_size)
        return ingestor.ingest(records, progress=progress, sync=sync)
    finally:
        catalog.close()


def open_searcher(
    catalog_dir: PathLike, *, model: str | None = None, detector: str | Detector | None = None
) -> Searcher:
    catalog = open_catalog(catalog_dir)
    det = create_detector(detector) if isinstance(detector, str) or detector is None else detector
    return Searcher(catalog, catalog_embedder(catalog, model), det)


def search_image(
    image: ImageSource,
    catalog_dir: PathLike,
    *,
    k: int = 10,
    model: str | None = None,
    detector: str | None = None,
    filters: ProductFilter | None = None,
) -> SearchResult:
    searcher = open_searcher(catalog_dir, model=model, detector=detector)
    try:
        return searcher.search(image, k, filters=filters)
    finally:
        searcher.catalog.close()


def catalog_info(catalog_dir: PathLike) -> dict[str, Any]:
    catalog = open_catalog(catalog_dir)
    try:
        return catalog.info()
    finally:
        catalog.close()


def remove_products(catalog_dir: PathLike, products: list[str]) -> dict[str, int]:
    """Remove products given by integer id or sku; returns {product: images removed}."""
    catalog = open_catalog(catalog_dir)
    removed: dict[str, int] = {}
    try:
        for key in products:
            found = catalog.store.find_product(key)
            if found is None and key.isdigit():
                try:
                    found = catalog.store.get_product(int(key))
                except CatalogError:
                    found = None
            if found is None:
                raise CatalogError(f"no product with id or sku {key!r}")
            removed[key] = catalog.remove_product(found.id)
    finally:
        catalog.close()
    return removed
