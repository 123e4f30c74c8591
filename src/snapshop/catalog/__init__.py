"""The catalog: SQLite store (source of truth) plus the vector indexes derived from it."""

from snapshop.catalog.blobs import GcReport
from snapshop.catalog.card import CatalogCard
from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.catalog.store import CatalogStore, CropRow, ImageRow, NewCrop, Product

__all__ = [
    "Catalog",
    "CatalogCard",
    "CatalogStore",
    "CropRow",
    "GcReport",
    "ImageRow",
    "NewCrop",
    "Product",
    "open_catalog",
]
