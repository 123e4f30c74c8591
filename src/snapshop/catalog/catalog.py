"""A catalog directory: SQLite store + per-kind vector indexes + a JSON card.

Layout::

    DIR/catalog.json           card: model id and dim, index kind, created_at
    DIR/catalog.sqlite         products, images, crops and their vectors (source of truth)
    DIR/blobs/ab/<sha256>.jpg  content-addressed copies of the ingested image files; removed
                               with their last image, or by ``collect_garbage`` (see ``blobs``)
    DIR/index/images.faiss     whole-image index (ids = image ids) + images.json card
    DIR/index/crops-<pos>.faiss  one crop index per garment position (ids = crop ids)

Indexes are caches. Each card records the store generation it reflects; on open (and on
``refresh``) a stale index is reconciled with the store by id difference, so a crash between
a committed ingest and an index save costs a little recomputation and loses nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.blobs import (
    BLOB_DIR,
    DEFAULT_GRACE_SECONDS,
    GcReport,
    collect_garbage,
    free_unreferenced_blobs,
)
from snapshop.catalog.card import CatalogCard, read_card, write_card
from snapshop.catalog.store import CatalogStore
from snapshop.detect.base import CROP_MODES, DEFAULT_CROP_MODE
from snapshop.errors import CatalogError, ModelError
from snapshop.index import VectorIndex, create_index, load_index, save_index
from snapshop.index.choose import resolve_index_kind

log = logging.getLogger(__name__)

CARD_FILE = "catalog.json"
DB_FILE = "catalog.sqlite"
LOCK_FILE = "write.lock"
# What a process creating a catalog writes before it lets go of the lock.
_CREATING = frozenset({DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal",
                       CARD_FILE, f"{CARD_FILE}.tmp"})  # fmt: skip
IMAGES = "images"


def index_name(position: str | None) -> str:
    return IMAGES if position is None else f"crops-{position}"


class Catalog:
    """Open catalog directory. Thread-safe; writers across processes serialise on a file lock."""

    def __init__(self, directory: Path, card: CatalogCard, store: CatalogStore) -> None:
        self.directory = Path(directory)
        self.card = card
        self.store = store
        self.dim: int = card.dim
        # "auto" (issue #6): exact below the size exact search meets the latency budget, HNSW above.
        self.index_kind, self.index_params = resolve_index_kind(
            card.index_kind, dict(card.index_params), store.counts()["images"], self.dim,
        )  # fmt: skip
        self._lock = threading.RLock()
        self._flock_depth = 0  # write_lock nesting in the thread that holds self._lock
        self.indexes: dict[str, VectorIndex] = {}
        self._owner_cache: dict[str, dict[int, int]] = {}
        self._generation = -1
        self.refresh(force=True)

    # --- identity ---------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def model_ref(self) -> str:
        return self.card.model_ref

    @property
    def detector(self) -> str | None:
        """Spec of the garment detector the catalog's crops were made with (None: none)."""
        value = self.card.detector
        return value if value and value.lower() != "none" else None

    @property
    def crop_mode(self) -> str:
        """How garment crops are framed for the embedder (``detect.base.CROP_MODES``); a card
        without the key predates it, and its crops were embedded as they are ("center")."""
        value = self.card.crop_mode
        if value not in CROP_MODES:
            raise CatalogError(f"{self.directory / CARD_FILE}: unknown crop_mode {value!r}")
        return value

    def record_detector(self, spec: str) -> None:
        """Remember ``spec`` in the card: later ingests and searches default to it (issue #4)."""
        if self.card.detector == spec:
            return
        if self.detector is not None and spec.lower() != "none":
            log.warning("catalog %s: crops so far came from detector %r, new ones from %r",
                        self.directory, self.detector, spec)  # fmt: skip
        path = self.directory / CARD_FILE
        on_disk = read_card(path)  # the file may have changed since open (set_index_kind)
        write_card(path, on_disk.replace(detector=spec))
        self.card = self.card.replace(detector=spec)

    def check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ModelError(
                f"catalog {self.directory} was built with model {self.model_id}, not {model_id};"
                " search it with its own model, or index into a new catalog with that model"
            )

    @property
    def blob_dir(self) -> Path:
        return self.directory / BLOB_DIR

    def index_path(self, name: str) -> Path:
        return self.directory / "index" / f"{name}.faiss"

    # --- locking ----------------------------------------------------------------------
    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive across threads and processes for the duration of one write operation.

        Re-entrant within a thread (a second ``flock`` on a new descriptor would deadlock)."""
        with self._lock:
            if self._flock_depth:
                self._flock_depth += 1
                try:
                    yield
                finally:
                    self._flock_depth -= 1
                return
            lock_path = self.directory / LOCK_FILE
            with open(lock_path, "a+") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                self._flock_depth = 1
                try:
                    yield
                finally:
                    self._flock_depth = 0
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # --- index maintenance ------------------------------------------------------------
    def index(self, position: str | None = None) -> VectorIndex | None:
        return self.indexes.get(index_name(position))

    def _ensure_index(self, name: str) -> VectorIndex:
        if name not in self.indexes:
            self.indexes[name] = create_index(self.index_kind, self.dim, **self.index_params)
        return self.indexes[name]

    def refresh(self, force: bool = False) -> bool:
        """Bring in-memory indexes up to the store (when its generation moved, or ``force``).

        Every loaded index is reconciled with the store by id difference; indexes of crop
        positions the store no longer holds end up empty. Returns True if it reconciled.
        """
        with self._lock:
            generation = self.store.generation  # read first: a later write forces another pass
            if not force and generation == self._generation:
                return False
            for name in [IMAGES] + [index_name(p) for p in self.store.crop_positions()]:
                if name not in self.indexes:
                    self.indexes[name] = self._load_or_create(name)
            for name in self.indexes:
                self._reconcile(name)
            self._generation = generation
            return True

    def _load_or_create(self, name: str) -> VectorIndex:
        path = self.index_path(name)
        if path.exists():
            try:
                index, card = load_index(path)
                if index.dim == self.dim and card.get("kind") == self.index_kind:
                    return index
                log.warning("%s: index kind/dim changed, rebuilding", path)
            except (CatalogError, Exception) as exc:  # a corrupt cache is rebuilt, never fatal
                log.warning("%s: unreadable index (%s), rebuilding from the store", path, exc)
        return create_index(self.index_kind, self.dim, **self.index_params)

    def _reconcile(self, name: str) -> None:
        index = self.indexes[name]
        if name == IMAGES:
            table, position, want = "images", None, self.store.image_ids()
        else:
            position = name.removeprefix("crops-")
            table, want = "crops", self.store.crop_ids(position)
        have = index.ids()
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra):
            index.remove(extra)
            cache = self._owner_cache.get(name, {})
            for entry in extra.tolist():
                cache.pop(entry, None)
        for ids, vecs in self.store.iter_vectors(table, self.dim, ids=missing.tolist()):
            index.add(ids, vecs)
        if len(extra) or len(missing):
            log.info("index %s reconciled: +%d -%d", name, len(missing), len(extra))

    def applied(self, before: int | None) -> None:
        """This thread committed ``before -> before + 1`` and has applied that change to the
        in-memory indexes: if they were current at ``before`` they are current now, and the
        next refresh need not rescan the store. Otherwise the next refresh reconciles."""
        with self._lock:
            if before is not None and self._generation == before:
                self._generation = before + 1

    def save_indexes(self) -> None:
        """Reconcile with the store (other writers may have committed), then persist every index.

        Call under :meth:`write_lock` so no other writer commits between the two steps.
        """
        with self._lock:
            self.refresh()
            generation = self._generation
            for name, index in self.indexes.items():
                save_index(
                    index,
                    self.index_path(name),
                    {"generation": generation, "name": name, "model_id": self.model_id},
                )
            self._generation = generation

    def owners(self, position: str | None, ids: list[int]) -> dict[int, int]:
        """Index entry ids (image ids, or crop ids of ``position``) -> product ids.

        Search ranks by product, so it asks this for every neighbour it fetches; an image's
        product never changes, so answers are cached in memory and only misses hit SQLite.
        """
        with self._lock:
            cache = self._owner_cache.setdefault(index_name(position), {})
            missing = [i for i in ids if i not in cache]
            if missing:
                if position is None:
                    cache.update(self.store.image_product_map(missing))
                else:
                    cache.update(
                        {cid: pid for cid, (_, pid) in self.store.crop_rows(missing).items()}
                    )
            return {i: cache[i] for i in ids if i in cache}

    def add_vectors(
        self, position: str | None, ids: NDArray[np.int64], vectors: NDArray[np.float32]
    ) -> None:
        with self._lock:
            self._ensure_index(index_name(position)).add(ids, vectors)

    def remove_vectors(self, image_ids: list[int], crop_ids: list[int]) -> None:
        with self._lock:
            for name, cache in self._owner_cache.items():
                for entry in image_ids if name == IMAGES else crop_ids:
                    cache.pop(entry, None)
            if image_ids and IMAGES in self.indexes:
                self.indexes[IMAGES].remove(np.array(image_ids, dtype=np.int64))
            if crop_ids:
                arr = np.array(crop_ids, dtype=np.int64)
                for name, index in self.indexes.items():
                    if name != IMAGES:
                        index.remove(arr)

    # --- write operations -------------------------------------------------------------
    def remove_product(self, product_id: int) -> int:
        """Delete a product with its images and crops; returns how many images went.

        Blob files no other image shares are removed after the commit."""
        with self.write_lock():
            files = self.store.blob_refs_of_product(product_id)  # the lock keeps them current
            image_ids, crop_ids = self.store.delete_product(product_id)
            self.remove_vectors(image_ids, crop_ids)
            self.applied(self.store.last_commit())
            self.save_indexes()
            free_unreferenced_blobs(self.directory, self.store, files)
        return len(image_ids)

    def remove_images(self, image_ids: list[int]) -> None:
        """Delete images and their crops; blob files no other image shares go too."""
        if not image_ids:
            return
        with self.write_lock():
            files = self.store.blob_refs_of_images(image_ids)
            crop_ids = self.store.delete_images(image_ids)
            self.remove_vectors(image_ids, crop_ids)
            self.applied(self.store.last_commit())
            self.save_indexes()
            free_unreferenced_blobs(self.directory, self.store, files)

    def collect_garbage(
        self, dry_run: bool = False, min_age_seconds: float = DEFAULT_GRACE_SECONDS
    ) -> GcReport:
        """Remove blob files no image references and temp files of interrupted blob writes,
        when older than ``min_age_seconds`` (younger ones may belong to an ingest in flight in
        another process). ``dry_run``: only count what would go."""
        return collect_garbage(
            self.directory, self.store, self.write_lock,
            dry_run=dry_run, min_age_seconds=min_age_seconds,
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            **self.store.counts(),
            "model_id": self.model_id,
            "model_ref": self.model_ref,
            "detector": self.detector,
            "crop_mode": self.crop_mode,
            "dim": self.dim,
            "index_kind": self.index_kind,
            "indexes": {name: len(idx) for name, idx in sorted(self.indexes.items())},
            "generation": self.store.generation,
        }

    def close(self) -> None:
        """Close the index clients (a pgvector connection, a Milvus client) and the store.
        Idempotent; one client failing to close does not keep the others open."""
        with self._lock:
            indexes, self.indexes = self.indexes, {}
            for name, index in indexes.items():
                close = getattr(index, "close", None)
                if close is None:
                    continue
                try:
                    close()
                except Exception as exc:  # closing must not hide the caller's own error
                    log.warning(
                        "index %s of %s did not close cleanly (%s)", name, self.directory, exc
                    )
            self._owner_cache.clear()
            self.store.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_catalog(
    directory: Path,
    *,
    model_id: str,
    model_ref: str,
    dim: int,
    index_kind: str = "flat",
    index_params: dict[str, Any] | None = None,
) -> Catalog:
    directory = Path(directory)
    if (directory / CARD_FILE).exists():
        raise CatalogError(f"{directory}: a catalog already exists here")
    if directory.exists() and not directory.is_dir():
        raise CatalogError(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    # Checked before the lock file is made too, so a folder of other files is left as it was
    # (a catalog another process is creating here now passes, and is waited for below).
    _check_empty(directory, also_allowed=_CREATING)
    # Creation holds the write lock, so of two processes creating one catalog at once the
    # second sees the first one's card ("already exists") rather than a half-made directory.
    with open(directory / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        if (directory / CARD_FILE).exists():
            raise CatalogError(f"{directory}: a catalog already exists here")
        _check_empty(directory)
        return _create(directory, model_id, model_ref, dim, index_kind, index_params)


def _check_empty(directory: Path, also_allowed: frozenset[str] = frozenset()) -> None:
    allowed = {".DS_Store", LOCK_FILE, *also_allowed}
    if any(p.name not in allowed for p in directory.iterdir()):
        raise CatalogError(f"{directory}: directory is not empty and holds no catalog")


def _create(
    directory: Path,
    model_id: str,
    model_ref: str,
    dim: int,
    index_kind: str,
    index_params: dict[str, Any] | None,
) -> Catalog:
    card = CatalogCard.new(
        model_id=model_id, model_ref=model_ref, dim=dim, index_kind=index_kind,
        index_params=index_params, crop_mode=DEFAULT_CROP_MODE,
    )  # fmt: skip
    store = CatalogStore(directory / DB_FILE)
    write_card(directory / CARD_FILE, card)
    return Catalog(directory, card, store)


def open_catalog(directory: str | os.PathLike[str]) -> Catalog:
    """Open an existing catalog directory (reconciling its indexes with the store)."""
    directory = Path(directory)
    if not (directory / CARD_FILE).exists():
        raise CatalogError(
            f"{directory}: no catalog here (create one with `snapshop index SOURCE --catalog DIR`)"
        )
    card = read_card(directory / CARD_FILE)
    db_path = directory / DB_FILE
    # Never recreate an empty store under a card: that would silently empty the indexes. A
    # store SQLite has written is never 0 bytes (its header is written first), so such a file
    # is a broken copy, not a new database.
    if not db_path.exists():
        raise CatalogError(f"{db_path}: catalog database is missing")
    if db_path.stat().st_size == 0:
        raise CatalogError(f"{db_path}: catalog database is empty (0 bytes)")
    store = CatalogStore(db_path)
    try:
        return Catalog(directory, card, store)
    except BaseException:
        store.close()
        raise
