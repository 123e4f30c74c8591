"""A server catalog: every part of a catalog held by PostgreSQL, nothing on the host's disk.

``--catalog postgresql://…`` names one. The database holds what a catalog directory holds:

- the card (``meta`` key ``card``), checked on open like ``catalog.json``;
- products, images, crops and their vectors (``vector(dim)`` columns with HNSW indexes: the
  rows *are* the vector index, so a committed write is searchable by every replica at once);
- a JPEG thumbnail (longest side :data:`THUMBNAIL_SIDE`) of every image, in ``blobs``, since
  replicas share no disk; the source path or URL stays in ``images.source``.

Writers serialise on a PostgreSQL advisory lock taken inside each write transaction (see
``catalog.store``), so any number of processes on any hosts may write; the in-process thread
lock only keeps one process's own writers in order.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

from snapshop.catalog.blobs import DEFAULT_GRACE_SECONDS, GcReport
from snapshop.catalog.card import CatalogCard
from snapshop.catalog.catalog import IMAGES, Catalog
from snapshop.catalog.sql import is_server_target as is_server_target  # re-exported
from snapshop.catalog.sql import mask_dsn
from snapshop.catalog.store import CatalogStore, ImageRow, open_store
from snapshop.errors import CatalogError, CatalogUnavailableError, NotFoundError
from snapshop.index import VectorIndex
from snapshop.index.choose import IndexBudget

log = logging.getLogger(__name__)

CARD_KEY = "card"
SERVER_INDEX_KIND = "pgvector"  # the default: the catalog's own rows, searched in PostgreSQL
SERVER_INDEX_KINDS = (SERVER_INDEX_KIND, "milvus")
PGVECTOR_PARAMS = ("ef_search",)  # what CatalogTableIndex takes besides the store
THUMBNAIL_SIDE = 320
THUMBNAIL_MEDIA_TYPE = "image/jpeg"


def thumbnail_jpeg(image: Image.Image, side: int = THUMBNAIL_SIDE) -> tuple[bytes, int, int]:
    """``image`` as a JPEG of longest side at most ``side``: (bytes, width, height)."""
    small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue(), small.width, small.height


class ServerCatalog(Catalog):
    """A :class:`Catalog` whose card, rows, vectors and thumbnails live in PostgreSQL."""

    def __init__(self, card: CatalogCard, store: CatalogStore) -> None:
        super().__init__(None, card, store)

    def _resolve_index_kind(self) -> tuple[str, dict[str, Any]]:
        if self.card.index_kind not in SERVER_INDEX_KINDS:
            raise CatalogError(
                f"{self.location}: a server catalog searches its vectors in PostgreSQL"
                f" (pgvector) or Milvus, not {self.card.index_kind!r}"
            )
        params = dict(self.card.index_params)
        if self.card.index_kind == SERVER_INDEX_KIND:
            # A card written with an embedded index's parameters (a migrated catalog, before
            # migrate dropped them) opens: those parameters mean nothing to pgvector.
            foreign = sorted(set(params) - set(PGVECTOR_PARAMS))
            if foreign:
                log.warning("%s: ignoring index parameters %s of the catalog card (pgvector"
                            " takes %s)", self.location, foreign, PGVECTOR_PARAMS)  # fmt: skip
            params = {k: v for k, v in params.items() if k in PGVECTOR_PARAMS}
            _check_pgvector_params(params, self.location)
        return self.card.index_kind, params

    @property
    def _in_table(self) -> bool:
        """The vectors are searched in the catalog's own rows (pgvector), not copied out."""
        return self.index_kind == SERVER_INDEX_KIND

    # --- the card lives in the database -------------------------------------------------
    def rewrite_card(self, **changes: Any) -> None:
        with self.write_lock(), self.store.transaction(bump=False) as db:
            stored = _read_card(self.store, db)
            card = stored.replace(**changes)
            self.store.set_meta(db, CARD_KEY, card.to_json_text())
        self.card = self.card.replace(**changes)

    def claim_card_extra(self, key: str, value: Any) -> Any:
        with self.write_lock(), self.store.transaction(bump=False) as db:
            stored = _read_card(self.store, db)
            if key not in stored.extra:
                stored = stored.replace(extra={**stored.extra, key: value})
                self.store.set_meta(db, CARD_KEY, stored.to_json_text())
        self.card = self.card.replace(extra={**self.card.extra, key: stored.extra[key]})
        return stored.extra[key]

    # --- locking: the store's advisory lock serialises writers across hosts ---------------
    @contextmanager
    def write_lock(self) -> Iterator[None]:
        # other processes and hosts: the advisory lock each write transaction takes, waited
        # for until the same deadline (not write_wait_s again: twice it in all)
        deadline = self.write_deadline()
        with self.thread_write_lock(deadline), self.store.waiting_until(deadline):
            yield

    # --- indexes: the catalog's own tables, or Milvus collections ----------------------------
    def _load_or_create(self, name: str) -> VectorIndex:
        if not self._in_table:
            from snapshop.index.milvus import MilvusIndex

            # one collection per index, named from the card, so every replica finds it
            params = dict(self.index_params)
            collection = f"{params.pop('collection_prefix')}_{name.replace('-', '_')}"
            return MilvusIndex(self.dim, collection=collection, **params)
        from snapshop.index.pgtable import CatalogTableIndex

        if name == IMAGES:
            return CatalogTableIndex(self.store, **self.index_params)
        position = name.removeprefix("crops-")
        return CatalogTableIndex(self.store, "crops", position, **self.index_params)

    def _ensure_index(self, name: str) -> VectorIndex:
        if name not in self.indexes:
            self.indexes[name] = self._load_or_create(name)
        return self.indexes[name]

    def _reconcile(self, name: str) -> None:
        """In the table, nothing to reconcile: the rows committed are the index. Milvus holds
        copies, reconciled with the rows by id difference as a directory's indexes are."""
        if not self._in_table:
            super()._reconcile(name)

    def save_indexes(self, measure: bool = True) -> None:
        """Nothing to save: PostgreSQL keeps the HNSW indexes current in every transaction,
        and Milvus collections are named by the card."""
        with self._lock:
            self.refresh()

    def reindex(self, budget: IndexBudget) -> dict[str, Any]:
        raise CatalogError(
            f"{self.location}: a server catalog's vectors are indexed by PostgreSQL (pgvector"
            " HNSW, kept current on every write); there is nothing to rebuild"
        )

    # --- blobs: thumbnails in the database, deleted with their last image -------------------
    def _free_blobs(self, files: list[tuple[str, str | None]]) -> None:
        """The store deleted unreferenced thumbnails in the deleting transaction."""

    def collect_garbage(
        self, dry_run: bool = False, min_age_seconds: float = DEFAULT_GRACE_SECONDS
    ) -> GcReport:
        """Nothing to collect: thumbnails go in the transaction that deletes their last image,
        and a server catalog writes no files."""
        return GcReport(
            dry_run=dry_run, grace_seconds=min_age_seconds, files_scanned=0, orphans_found=0,
            orphans_removed=0, temp_files_found=0, temp_files_removed=0, young_files_kept=0,
            reclaimable_bytes=0, bytes_freed=0, missing_blobs=0,
        )  # fmt: skip

    def stored_thumbnail(self, image: ImageRow) -> tuple[bytes, str]:
        """The image's stored JPEG thumbnail and its media type (NotFoundError if none)."""
        found = self.store.get_blob(image.sha256)
        if found is None:
            raise NotFoundError(f"no stored thumbnail for image {image.id}")
        return found


def _check_pgvector_params(params: dict[str, Any], location: str) -> None:
    """CatalogError unless ``params`` are parameters a pgvector index takes."""
    unknown = sorted(set(params) - set(PGVECTOR_PARAMS))
    if unknown:
        raise CatalogError(
            f"{location}: a pgvector catalog takes the index parameters {PGVECTOR_PARAMS},"
            f" not {unknown}"
        )
    ef_search = params.get("ef_search", 100)
    if isinstance(ef_search, bool) or not isinstance(ef_search, int) or ef_search < 1:
        raise CatalogError(f"{location}: ef_search must be a positive integer, not {ef_search!r}")


def _no_catalog(location: str) -> CatalogError:
    return CatalogError(
        f"{location}: no catalog in this database (create one with"
        " `snapshop index SOURCE --catalog URI`)"
    )


def _read_card(store: CatalogStore, db: Any = None) -> CatalogCard:
    import json

    text = store.get_meta(CARD_KEY) if db is None else _meta_in(store, db, CARD_KEY)
    if text is None:
        raise _no_catalog(store.location)
    try:
        data = json.loads(text)
    except ValueError:
        raise CatalogError(f"{store.location}: the stored catalog card is not JSON") from None
    return CatalogCard.from_json(data, f"{store.location} (card)")


def _meta_in(store: CatalogStore, db: Any, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def server_catalog_exists(target: str) -> bool:
    """Whether the database holds a catalog card (CatalogUnavailableError if unreachable)."""
    store = open_store(target, readonly=True)  # an empty database is left as it is
    try:
        return store.get_meta(CARD_KEY) is not None
    except CatalogUnavailableError:
        raise
    except CatalogError:  # no catalog tables at all
        return False
    finally:
        store.close()


def open_server_catalog(target: str) -> ServerCatalog:
    """Open the catalog a PostgreSQL database holds (CatalogUnavailableError when the server
    cannot be reached, CatalogError when the database holds no catalog)."""
    # Read-only first: opened for writing, an empty database would get the schema, which
    # needs a dim only a new catalog's creator knows.
    if not server_catalog_exists(target):
        raise _no_catalog(mask_dsn(target))
    store = open_store(target)
    try:
        card = _read_card(store)
        if store.dim is not None and store.dim != card.dim:
            raise CatalogError(
                f"{store.location}: the card says dim {card.dim}, the vector columns {store.dim}"
            )
        return ServerCatalog(card, store)
    except BaseException:
        store.close()
        raise


def create_server_catalog(
    target: str,
    *,
    model_id: str,
    model_ref: str,
    dim: int,
    crop_mode: str,
    index_kind: str = SERVER_INDEX_KIND,
    index_params: dict[str, Any] | None = None,
) -> ServerCatalog:
    """Create the catalog in an empty database (CatalogError if it holds one already).

    ``index_kind``: ``pgvector`` (the default) searches the catalog's own rows; ``milvus``
    keeps copies in Milvus collections (``index_params["uri"]`` or ``$SNAPSHOP_MILVUS_URI``;
    the token only ever from ``$SNAPSHOP_MILVUS_TOKEN``)."""
    if index_kind not in SERVER_INDEX_KINDS:
        raise CatalogError(
            f"a server catalog searches its vectors in PostgreSQL (pgvector) or Milvus,"
            f" not {index_kind!r}"
        )
    params = dict(index_params or {})
    if index_kind == SERVER_INDEX_KIND:
        _check_pgvector_params(params, mask_dsn(target))
    if index_kind == "milvus":
        from snapshop.index.milvus import URI_ENV

        params.setdefault("uri", os.environ.get(URI_ENV, ""))
        if not params["uri"]:
            raise CatalogError(f"a Milvus-backed catalog needs a Milvus URI (${URI_ENV})")
        params["collection_prefix"] = f"snapshop_{uuid.uuid4().hex[:12]}"
    card = CatalogCard.new(
        model_id=model_id, model_ref=model_ref, dim=dim, index_kind=index_kind,
        index_params=params, crop_mode=crop_mode,
    )  # fmt: skip
    store = open_store(target, dim=dim)
    try:
        with store.transaction(bump=False) as db:
            if _meta_in(store, db, CARD_KEY) is not None:
                raise CatalogError(f"{store.location}: a catalog already exists here")
            store.set_meta(db, CARD_KEY, card.to_json_text())
        return ServerCatalog(card, store)
    except BaseException:
        store.close()
        raise
