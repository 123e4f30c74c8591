"""One write to a catalog in progress: the rows of one transaction, and the index changes they
imply, staged until the transaction commits (see ``Catalog.writing``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.sql import Database
from snapshop.catalog.store import CatalogStore, NewCrop
from snapshop.errors import CatalogError


class CatalogWrite:
    """Rows go into the open transaction at once; vectors reach the indexes only after it
    committed (:meth:`Catalog.writing` applies :attr:`added` and :attr:`removed_images` /
    :attr:`removed_crops` then). Reads through it see the transaction's own rows."""

    def __init__(self, store: CatalogStore, db: Database, dim: int | None = None) -> None:
        self._store = store
        self._db = db
        self._dim = dim
        self.added: dict[str | None, list[tuple[int, NDArray[np.float32]]]] = {}
        self.removed_images: list[int] = []
        self.removed_crops: list[int] = []
        self.created_products: set[int] = set()

    def upsert_product(self, sku: str, **fields: Any) -> int:
        """Insert or update the product ``sku``; returns its id. The ids this write inserted
        are in :attr:`created_products`: decided inside the transaction, so of concurrent
        writers of a new sku exactly one created it."""
        known = self._store.product_id_in(self._db, sku)
        product_id = self._store.upsert_product(self._db, sku, **fields)
        if known is None:
            self.created_products.add(product_id)
        return product_id

    def update_product(self, product_id: int, **fields: Any) -> int:
        """Change the metadata of the product with this id (NotFoundError if none)."""
        return self._store.upsert_product(
            self._db, self._store.get_product(product_id).sku, **fields
        )

    def find_image(self, product_id: int, sha256: str) -> int | None:
        """The id of ``product_id``'s image with these bytes, if it has one."""
        return self._store.find_image(self._db, product_id, sha256)

    def insert_image(
        self,
        product_id: int,
        *,
        source: str,
        blob: str | None,
        sha256: str,
        width: int,
        height: int,
        vector: NDArray[np.float32],
        crops: Sequence[NewCrop] = (),
    ) -> tuple[int, list[int]]:
        """Insert an image with its vector and crops; returns (image id, crop ids). The
        vectors are added to the indexes once the write commits. A vector of another length
        than the catalog's is refused before any row is written."""
        for v in [vector, *(crop.vector for crop in crops)]:
            self._check_vector(v, source)
        image_id, crop_ids = self._store.insert_image(
            self._db, product_id, source=source, blob=blob, sha256=sha256, width=width,
            height=height, vector=vector, crops=crops,
        )  # fmt: skip
        self.added.setdefault(None, []).append((image_id, vector))
        for crop_id, crop in zip(crop_ids, crops, strict=True):
            self.added.setdefault(crop.position, []).append((crop_id, crop.vector))
        return image_id, crop_ids

    def _check_vector(self, vector: NDArray[np.float32], source: str) -> None:
        shape = np.shape(vector)
        if self._dim is not None and shape != (self._dim,):
            raise CatalogError(
                f"{source}: a vector of shape {shape} for a catalog of dimension {self._dim}"
                " (is the model card's output_dim right?)"
            )
        if not np.isfinite(vector).all():
            raise CatalogError(f"{source}: the vector holds NaN or infinity")

    def put_thumbnail(self, sha256: str, data: bytes, width: int, height: int) -> None:
        """Store the JPEG thumbnail of the image with content ``sha256`` (a server catalog's
        stand-in for the image file: see ``catalog.server``); kept once per content."""
        self._store.put_blob(self._db, sha256, data, "image/jpeg", width, height)

    def delete_product(self, product_id: int) -> list[int]:
        """Delete a product with its images and crops (NotFoundError if there is none);
        returns the image ids removed."""
        image_ids, crop_ids = self._store.delete_product_rows(self._db, product_id)
        self.removed_images += image_ids
        self.removed_crops += crop_ids
        return image_ids

    def delete_images(self, image_ids: Sequence[int]) -> list[int]:
        """Delete images and their crops; returns the crop ids removed."""
        crop_ids = self._store.delete_image_rows(self._db, image_ids)
        self.removed_images += [int(i) for i in image_ids]
        self.removed_crops += crop_ids
        return crop_ids
