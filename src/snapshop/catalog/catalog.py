"""A catalog directory: SQLite store + per-kind vector indexes + a JSON card.

Layout::

    DIR/catalog.json           card (``card.CatalogCard``): format, model id and dim, index kind...
    DIR/catalog.sqlite         products, images, crops and their vectors (source of truth)
    DIR/blobs/ab/<sha256>.jpg  content-addressed copies of the ingested image files; removed
                               with their last image, or by ``collect_garbage`` (see ``blobs``)
    DIR/index/images.faiss     whole-image index (ids = image ids) + images.json card
    DIR/index/crops-<pos>.faiss  one crop index per garment position (ids = crop ids)

Indexes are caches. Each card records the store generation it reflects; on open a stale index
is reconciled with the store by id difference, so a crash between a committed ingest and an
index save costs a little recomputation and loses nothing. ``refresh`` (another process wrote)
applies the store's change log since the generation the indexes are at, when the log still
holds it, and falls back to the id difference when not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.blobs import (
    BLOB_DIR,
    DEFAULT_GRACE_SECONDS,
    INDEX_DIR,
    GcReport,
    collect_garbage,
    free_unreferenced_blobs,
)
from snapshop.catalog.card import CatalogCard, read_card, write_card
from snapshop.catalog.fields import crop_position_problem, lookup_sku
from snapshop.catalog.sql import writers_busy
from snapshop.catalog.store import (
    MAX_ROW_ID,
    CatalogStore,
    CropRow,
    EntryChanges,
    ImageRow,
    Product,
)
from snapshop.catalog.write import CatalogWrite
from snapshop.config import check_number, is_temp_name, write_json
from snapshop.detect.base import CROP_MODES, DEFAULT_CROP_MODE
from snapshop.errors import CatalogBusyError, CatalogError, ConfigError, ModelError, NotFoundError
from snapshop.index import VectorIndex, create_index, load_index, save_index
from snapshop.index.choose import (
    AUTO,
    IndexBudget,
    IndexChoice,
    choose_index,
    resolve_index_kind,
    smallest_choice,
)
from snapshop.index.factory import card_path

log = logging.getLogger(__name__)

CARD_FILE = "catalog.json"
DB_FILE = "catalog.sqlite"
LOCK_FILE = "write.lock"
# What a process creating a catalog writes before it lets go of the lock (and the card's
# temp file, by ``is_temp_name``; earlier versions named it catalog.json.tmp).
_CREATING = frozenset({DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal",
                       CARD_FILE, f"{CARD_FILE}.tmp"})  # fmt: skip
IMAGES = "images"
# Kinds whose recall and latency the catalog measures on its own vectors (server backends are
# measured by benchmarks, not on every save).
NOTE_PREFIX = "note:"  # meta keys of Catalog.read_note / update_note
MEASURED_KINDS = frozenset({"flat", "hnsw", "hnsw_sq", "ivfpq"})
MEASURE_QUERIES = 100


def index_name(position: str | None) -> str:
    return IMAGES if position is None else f"crops-{position}"


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    The vector indexes are not safe to search while they are being modified, so searches
    hold the read side and anything that changes an index holds the write side.

    Re-entrant: the writer may take either side again, and a reader may read again even
    while a writer waits (it would wait on itself). A reader that asks for the write side
    gives its reads up while it waits and gets them back when it lets go, rather than
    deadlock with another reader doing the same: what it had read may have changed then.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread -> how many reads it holds
        self._writer: int | None = None
        self._write_depth = 0
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            reads = 0
            if self._writer == me:
                self._write_depth += 1
            else:
                reads = self._readers.pop(me, 0)
                if reads:
                    self._cond.notify_all()
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                except BaseException:
                    if reads:
                        self._readers[me] = reads
                    raise
                finally:
                    self._writers_waiting -= 1
                self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    if reads:  # no other writer can be in between: a downgrade
                        self._readers[me] = reads
                    self._cond.notify_all()


def check_index_kind(kind: str, params: dict[str, Any] | None, dim: int) -> None:
    """CatalogError unless ``kind`` with ``params`` makes an index of ``dim`` (for ``auto``:
    its budget, and the parameters it keys by kind), checked before a card names them: an
    index the catalog cannot make leaves it unopenable. A local kind is made and dropped; a
    server kind (pgvector, milvus) would make its table or collection, so only its name and
    address are checked here and the rest when the catalog first makes it."""
    params = dict(params or {})
    if kind == AUTO:
        try:
            IndexBudget.from_dict(params.get("budget"))
        except (TypeError, ValueError) as exc:
            raise CatalogError(
                f"index_kind auto: bad budget {params.get('budget')!r} ({exc})"
            ) from None
        for name, override in params.items():
            if name != "budget":
                check_index_kind(name, override if isinstance(override, dict) else {}, dim)
        return
    if kind in _SERVER_KINDS:
        from snapshop.index.milvus import URI_ENV

        if kind == "milvus" and not (params.get("uri") or os.environ.get(URI_ENV)):
            raise CatalogError(f"a milvus index needs a Milvus URI (uri, or ${URI_ENV})")
        return
    _make_local_index(kind, dim, params)


_SERVER_KINDS = frozenset({"pgvector", "milvus"})


def _make_local_index(kind: str, dim: int, params: dict[str, Any]) -> VectorIndex:
    """A new, empty index of a local ``kind``; CatalogError (VectorIndexError) if ``params``
    are refused, or if even empty it would take more memory than this host has (an ``nlist``
    of a billion is accepted by the backend, and would never be trained)."""
    index = create_index(kind, dim, **params)
    memory = getattr(index, "memory_bytes", None)
    host = _host_memory()
    if memory is not None and host and int(memory()) > host:
        raise CatalogError(
            f"a {kind} index with {params} needs {int(memory()):,} bytes before it holds a"
            f" vector, more than this host's {host:,}"
        )
    return index


def _host_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not every platform tells
        return 0


class Catalog:
    """Open catalog directory. Thread-safe; writers across processes serialise on a file lock.

    Locks, taken in this order and never the other way round: the write lock (``_lock``, a
    thread lock, then the ``flock``), then :attr:`index_lock`. Searches hold its read side
    (:meth:`reading`) while they use the indexes; a refresh and a write's index changes
    hold its write side, so they wait for the searches in flight and new searches wait for
    them. A search never needs the write lock, so a write in another process cannot stall
    it, and a writer waiting for the searches holds nothing they need.
    """

    def __init__(self, directory: Path | None, card: CatalogCard, store: CatalogStore) -> None:
        self._closed = False
        self._directory = None if directory is None else Path(directory)
        self.location = str(directory) if directory is not None else store.location
        self.card = card
        self._store = store
        self.dim: int = card.dim
        self.index_kind, self.index_params = self._resolve_index_kind()
        if self.index_kind in MEASURED_KINDS:  # a server kind is checked by making it, below
            _make_local_index(self.index_kind, self.dim, self.index_params)
        self.measured: dict[str, dict[str, Any]] = {}  # index name -> its measured card entry
        self._lock = threading.RLock()
        self._flock_depth = 0  # write_lock nesting in the thread that holds self._lock
        self.index_lock = ReadWriteLock()
        self.indexes: dict[str, VectorIndex] = {}
        self._owner_cache: dict[str, dict[int, int]] = {}
        self._owner_lock = threading.Lock()  # a leaf: searches take it under the read side
        self._generation = -1
        # Why the index files are behind the store: a save after a committed write failed
        # (see :meth:`save_after_commit`); None once a save succeeds.
        self.unsaved_indexes: str | None = None
        self.refresh(force=True)

    @property
    def store(self) -> CatalogStore:
        """The catalog's rows (CatalogError once the catalog is closed)."""
        self._check_open()
        return self._store

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise CatalogError(f"catalog {self.location} is closed")

    def _resolve_index_kind(self) -> tuple[str, dict[str, Any]]:
        """The card's index kind; for ``auto`` (issues #6, #15) the most accurate kind that
        fits the card's memory and latency budget (the default budget when it names none)."""
        counts = self.store.counts()
        kind, params = self.card.index_kind, dict(self.card.index_params)
        indexes = 1 + len(self.store.crop_positions())  # each pays its own fixed parts
        try:
            return resolve_index_kind(
                kind, params, counts["images"], self.dim,
                n_total=counts["images"] + counts["crops"], indexes=indexes,
            )  # fmt: skip
        except CatalogError as exc:  # nothing fits: open with the smallest rather than fail
            log.warning("catalog %s: %s; using the smallest index", self.location, exc)
            fallback = smallest_choice(counts["images"], self.dim, indexes)
            return fallback.kind, dict(fallback.params)

    # --- identity ---------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        """The catalog directory; a server catalog (:attr:`is_server`) has none."""
        if self._directory is None:
            raise CatalogError(f"{self.location}: a server catalog keeps no files on this host")
        return self._directory

    def stored_thumbnail(self, image: ImageRow) -> tuple[bytes, str]:
        """A server catalog's stored thumbnail of ``image`` (a directory keeps the image
        files themselves: see ``service.thumbs``)."""
        raise CatalogError(
            f"{self.location}: a catalog directory stores image files, not thumbnails"
        )

    @property
    def is_server(self) -> bool:
        """True for a catalog held by a database server (nothing of it on this host's disk)."""
        return self._directory is None

    @property
    def store_target(self) -> str:
        """What ``catalog.store.open_store`` opens to read this catalog's rows from another
        process (decode workers): the SQLite file, or the server's connection string."""
        return self.store.target

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
            raise CatalogError(f"{self.location}: unknown crop_mode {value!r} in the catalog card")
        return value

    def record_detector(self, spec: str) -> None:
        """Remember ``spec`` in the card: later ingests and searches default to it (issue #4)."""
        if self.card.detector == spec:
            return
        if self.detector is not None and spec.lower() != "none":
            log.warning("catalog %s: crops so far came from detector %r, new ones from %r",
                        self.location, self.detector, spec)  # fmt: skip
        self.rewrite_card(detector=spec)

    @property
    def catalog_views(self) -> int:
        """How many augmented views indexing averages into a packshot's vector (0: none; the
        card's ``catalog_views``, issue #20): every later ingest into this catalog does the
        same, so its packshots' vectors stay of one kind."""
        return self.card.catalog_views

    def record_catalog_views(self, views: int) -> None:
        """Set the card's ``catalog_views`` to ``views``: while the catalog holds no image it
        takes any setting; once it holds images, a different one raises ConfigError and
        nothing changes (vectors made both ways would be mixed; index into a new catalog, or
        leave the option out to keep the card's)."""
        from snapshop.models.tta import check_view_count

        views = check_view_count(views)
        with self.write_lock():
            if self.card.catalog_views == views:
                return
            images = self.store.counts()["images"]
            if images:
                raise ConfigError(
                    f"catalog {self.location} was indexed with {self.card.catalog_views}"
                    f" catalog views per packshot, not {views}; its {images} images keep their"
                    " vectors: leave the option out to index with the catalog's setting, or"
                    " index into a new catalog"
                )
            self.rewrite_card(catalog_views=views)

    def rewrite_card(self, **changes: Any) -> None:
        """Change keys of the stored card (re-read first: another process may have changed
        it since open, e.g. ``set_index_kind``), and of ``self.card``."""
        path = self.directory / CARD_FILE
        write_card(path, read_card(path).replace(**changes))
        self.card = self.card.replace(**changes)

    def claim_card_extra(self, key: str, value: Any) -> Any:
        """The stored card's extra ``key``, set to ``value`` first where the card has no such
        key: read and written under the write lock, so that processes claiming it at once
        all end up with the one stored first (an unlocked rewrite kept the last)."""
        with self.write_lock():
            path = self.directory / CARD_FILE
            stored = read_card(path)
            if key not in stored.extra:
                stored = stored.replace(extra={**stored.extra, key: value})
                write_card(path, stored)
            self.card = self.card.replace(extra={**self.card.extra, key: stored.extra[key]})
            return stored.extra[key]

    def read_note(self, key: str) -> str | None:
        """A small operational record kept in the store beside the content (every replica
        of a server catalog reads the same): e.g. the images that killed Ray workers."""
        return self.store.get_meta(f"{NOTE_PREFIX}{key}")

    def update_note(self, key: str, update: Callable[[str | None], str]) -> str:
        """Replace note ``key`` by ``update(its stored text)``, read and written in one write
        transaction under the write lock (writers at once each see the other's); not a
        content change: no generation, no refresh."""
        with self.write_lock(), self.store.transaction(bump=False) as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (NOTE_PREFIX + key,))
            found = row.fetchone()
            text = update(None if found is None else str(found[0]))
            self.store.set_meta(db, NOTE_PREFIX + key, text)
            return text

    def check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ModelError(
                f"catalog {self.location} was built with model {self.model_id}, not {model_id};"
                " search it with its own model, or index into a new catalog with that model"
            )

    @property
    def blob_dir(self) -> Path:
        return self.directory / BLOB_DIR

    def index_path(self, name: str) -> Path:
        """The file of index ``name``; CatalogError for a crop position that cannot name one
        (see :meth:`_index_file`)."""
        path = self._index_file(name)
        if path is None:
            raise CatalogError(f"{self.location}: index {name!r} cannot have a file")
        return path

    def _index_file(self, name: str) -> Path | None:
        """The file of index ``name``, or None (warned) for a crop position that cannot name
        one: a store written by other code may hold any text, and ``../../../catalog`` wrote
        an index, and its card, over the catalog's own card. Such an index stays in memory."""
        if name != IMAGES:
            position = name.removeprefix("crops-")
            problem = crop_position_problem(position)
            if problem is not None:
                log.warning(
                    "%s: the crops at position %r are indexed in memory only (never saved):"
                    " the position %s", self.location, position, problem,
                )  # fmt: skip
                return None
        return self.directory / INDEX_DIR / f"{name}.faiss"

    # --- locking ----------------------------------------------------------------------
    @property
    def write_wait_s(self) -> float | None:
        """How long a write waits for another writer (thread, process or host) before it
        fails with CatalogBusyError; None (the default): as long as the other one writes.
        The service sets it, so that an upload behind a long ingest gets a 503 to retry."""
        return self.store.write_wait_s

    @write_wait_s.setter
    def write_wait_s(self, seconds: float | None) -> None:
        if seconds is not None:
            seconds = check_number("write_wait_s", seconds, 0.0, 86_400.0)
        self.store.write_wait_s = seconds

    def write_deadline(self) -> float | None:
        """When a write starting now stops waiting for other writers (monotonic; None: it
        waits as long as they write)."""
        wait = self.write_wait_s
        return None if wait is None else time.monotonic() + wait

    @contextmanager
    def thread_write_lock(self, deadline: float | None = None) -> Iterator[None]:
        """This process's side of :meth:`write_lock`, waited for until ``deadline`` (None:
        :attr:`write_wait_s` from now)."""
        deadline = self.write_deadline() if deadline is None else deadline
        timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=timeout):
            raise writers_busy(self.location, self.write_wait_s or 0.0)
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive across threads and processes for the duration of one write operation,
        waited for at most :attr:`write_wait_s`.

        Re-entrant within a thread (a second ``flock`` on a new descriptor would deadlock)."""
        deadline = self.write_deadline()
        with self.thread_write_lock(deadline):
            if self._flock_depth:
                self._flock_depth += 1
                try:
                    yield
                finally:
                    self._flock_depth -= 1
                return
            fd = _flock_until(self.directory / LOCK_FILE, deadline)
            if fd is None:
                raise writers_busy(self.location, self.write_wait_s or 0.0)
            self._flock_depth = 1
            try:
                yield
            finally:
                self._flock_depth = 0
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)

    @contextmanager
    def writing(self) -> Iterator[CatalogWrite]:
        """One write: the write lock, one store transaction, and the index bookkeeping.

        Rows written through the yielded :class:`CatalogWrite` commit together, with the
        store's ``generation`` bumped, when the block ends; an exception inside the block
        rolls all of them back and changes no index. After the commit, the vectors the write
        added or removed are applied to the in-memory indexes and the catalog records that
        they are current (:meth:`applied`), so the next save need not rescan the store. The
        indexes are not saved here: call :meth:`save_indexes` when it is time."""
        with self.write_lock():
            with self.store.transaction() as db:
                write = CatalogWrite(self.store, db, dim=self.dim)
                yield write
            before = self.store.last_commit()
            with self.index_lock.write():  # waits for the searches in flight
                # additions first: an entry the write inserted and then deleted must end up
                # gone (ids are never reused, so no removal precedes an addition of its id)
                for position, pairs in write.added.items():
                    ids = np.array([entry for entry, _ in pairs], dtype=np.int64)
                    self.add_vectors(position, ids, np.stack([vector for _, vector in pairs]))
                self.remove_vectors(write.removed_images, write.removed_crops)
                self.applied(before)  # only once every change is in: else a refresh reconciles

    # --- index maintenance ------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while searching the indexes (:meth:`index`, :attr:`indexes`): no refresh or
        write changes them meanwhile. Re-entrant; a refresh inside waits for the others."""
        self._check_open()
        with self.index_lock.read():
            yield

    def index(self, position: str | None = None) -> VectorIndex | None:
        """The index of ``position`` (None: whole images), None if there is none; search it
        under :meth:`reading`."""
        self._check_open()
        return self.indexes.get(index_name(position))

    def _ensure_index(self, name: str) -> VectorIndex:
        if name not in self.indexes:
            self.indexes[name] = create_index(self.index_kind, self.dim, **self.index_params)
        return self.indexes[name]

    def refresh(self, force: bool = False) -> bool:
        """Bring in-memory indexes up to the store (when its generation moved, or ``force``).

        Every loaded index ends up holding exactly the store's entries; indexes of crop
        positions the store no longer holds end up empty. Returns True if it reconciled.
        Holds the write side of :attr:`index_lock`, only when there is something to do.

        The changes since the last refresh come from the store's change log, read before the
        write side is taken (searches go on meanwhile), and only the vectors added are
        fetched. Where the log does not hold them all (``force``, a catalog made before the
        log, a log pruned past this generation), every index is compared with the store's
        ids instead (a full id scan: 0.5 s per write at 300k images, 15 ms by the log).
        """
        generation = self.store.generation
        if not force and generation == self._generation:
            return False  # current: the searches in flight are not stopped for nothing
        changes = None if force else self.store.entry_changes(self._generation, generation)
        with self.index_lock.write():
            generation = self.store.generation  # read first: a later write forces another pass
            if not force and generation == self._generation:
                return False
            if changes is not None and (changes.since, changes.until) != (
                self._generation,
                generation,
            ):  # another write came in between (or this process's own was applied)
                changes = self.store.entry_changes(self._generation, generation)
            if changes is not None:
                self._apply_changes(changes)
            else:
                for name in [IMAGES] + [index_name(p) for p in self.store.crop_positions()]:
                    if name not in self.indexes:
                        self.indexes[name] = self._load_or_create(name)
                for name in self.indexes:
                    self._reconcile(name)
            self._generation = generation
            return True

    @property
    def _indexes_are_copies(self) -> bool:
        """The indexes are this process's own copies (faiss, in memory), to which a refresh
        applies the store's changes; a server's (pgvector rows, Milvus collections) are
        shared by every replica and are compared with the store's ids, as before the log."""
        return self.index_kind in MEASURED_KINDS

    def _apply_changes(self, changes: EntryChanges) -> None:
        """Bring the indexes from ``changes.since`` to ``changes.until`` (under the write side
        of :attr:`index_lock`). An index this refresh opens (a position new to this process;
        a file saved by another may hold anything) is reconciled with its position's rows."""
        opened = set()
        for name in sorted(index_name(p) for p in changes.added):
            if name not in self.indexes:
                self.indexes[name] = self._load_or_create(name)
                opened.add(name)
        for name in self.indexes:
            if name in opened or not self._indexes_are_copies:
                self._reconcile(name)
                continue
            at = None if name == IMAGES else name.removeprefix("crops-")
            self._apply(name, changes.added_at(at), changes.removed_at(at))

    def _load_or_create(self, name: str) -> VectorIndex:
        path = self._index_file(name)
        if path is not None:
            try:
                if not path.exists():  # inside: a folder it may not read raises
                    return create_index(self.index_kind, self.dim, **self.index_params)
                index, card = load_index(path)
                if self._fits(index, card):
                    if isinstance(card.get("measured"), dict):
                        self.measured[name] = card["measured"]
                    return index
                log.warning("%s: index kind, dim or parameters changed, rebuilding", path)
                _close_indexes(self.location, {name: index})
            except (CatalogError, Exception) as exc:  # a corrupt cache is rebuilt, never fatal
                log.warning("%s: unreadable index (%s), rebuilding from the store", path, exc)
        return create_index(self.index_kind, self.dim, **self.index_params)

    def _fits(self, index: VectorIndex, card: dict[str, Any]) -> bool:
        """Whether a saved index (and its card) is of this catalog's kind, dim and parameters.

        ``auto``'s parameters follow the catalog's size, and a saved index of the kind it
        resolves to is kept (see :meth:`_adopt_index_kind`); a card's own parameters must
        match those the index was saved with (a card saved before they were recorded: those
        of them its ``info`` shows)."""
        if index.dim != self.dim or card.get("kind") != self.index_kind:
            return False
        if self.card.index_kind == AUTO or self.index_kind not in MEASURED_KINDS:
            return True
        saved = card.get("params")
        if isinstance(saved, dict):
            return bool(saved == self.index_params)
        return all(card.get(key, value) == value for key, value in self.index_params.items())

    def _reconcile(self, name: str) -> None:
        """Make index ``name`` hold exactly the store's entries, by id difference."""
        index = self.indexes[name]
        if name == IMAGES:
            want = self.store.image_ids()
        else:
            want = self.store.crop_ids(name.removeprefix("crops-"))
        have = index.ids()
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        self._apply(name, missing, extra)

    def _apply(self, name: str, added: NDArray[np.int64], removed: NDArray[np.int64]) -> None:
        """Remove ``removed`` from index ``name`` and add ``added`` with the store's vectors
        (an entry already gone from the store is skipped)."""
        index = self.indexes[name]
        gone = 0
        if len(removed):
            gone = index.remove(removed)
            with self._owner_lock:
                cache = self._owner_cache.get(name, {})
                for entry in removed.tolist():
                    cache.pop(entry, None)
        table = "images" if name == IMAGES else "crops"
        for ids, vecs in self.store.iter_vectors(table, self.dim, ids=added.tolist()):
            index.add(ids, vecs)
        if len(added) or gone:
            log.info("index %s reconciled: +%d -%d", name, len(added), gone)

    def applied(self, before: int | None) -> None:
        """This thread committed ``before -> before + 1`` and has applied that change to the
        in-memory indexes: if they were current at ``before`` they are current now, and the
        next refresh need not rescan the store. Otherwise the next refresh reconciles."""
        with self.index_lock.write():
            if before is not None and self._generation == before:
                self._generation = before + 1

    def save_indexes(self, measure: bool = True) -> None:
        """Reconcile with the store (other writers may have committed), then persist every index.

        An index never measured, or measured at under half or over twice its size, is measured
        (recall@10, latency, memory) into its card (``measure``: False skips that).

        Takes the write lock (re-entrant), so no other writer commits between the two steps.
        The card is re-read under it first: indexes of a kind another process has replaced
        since (``catalog reindex``, ``index --index-kind``) are never written back, nor those
        of a kind ``auto`` no longer resolves to (see :meth:`_adopt_index_kind`).
        """
        with self.write_lock():
            with self.index_lock.write():
                self.refresh(force=self._adopt_index_kind())
            with self.reading():  # searches go on; a refresh waits until all is written
                generation = self._generation
                for name, index in self.indexes.items():
                    path = self._index_file(name)
                    if path is None:
                        continue
                    save_index(index, path, self._card_extra(name, generation))
                    if measure and self._measurement_stale(name):
                        # measured once saved: saved float vectors are memory-mapped
                        self.measured[name] = self.measure_index(name)
                        card = {**index.info(), **self._card_extra(name, generation)}
                        write_json(card_path(path), card)
            self.unsaved_indexes = None

    def save_after_commit(self) -> str | None:
        """:meth:`save_indexes` after a write committed: a save the system refuses (a full
        disk) is a warning, returned and logged, not the write's failure. The rows are
        stored and the in-memory indexes hold them; every save is atomic, so the files keep
        their last saved state, which the next save or open reconciles with the store."""
        try:
            self.save_indexes()
        except (OSError, CatalogBusyError) as exc:
            # busy: another writer took the catalog between the commit and this save
            self.unsaved_indexes = (
                f"the write is stored, but its index files were not saved ({exc}); the next"
                f" save or open brings them up to date"
            )
            log.warning("%s: %s", self.location, self.unsaved_indexes)
            return self.unsaved_indexes
        return None

    def _adopt_index_kind(self) -> bool:
        """Before a save, under the write lock: take the stored card's index kind and
        parameters if another process changed them since this one read the card (with the
        indexes that process saved), and for ``auto`` the kind the catalog's size now calls
        for, so that the files saved are the kind the next open resolves (a reader never
        saves: it would rebuild them in memory on every open). Returns True if the indexes
        were replaced (they then need a forced refresh)."""
        stored = read_card(self.directory / CARD_FILE)
        card_changed = (stored.index_kind, stored.index_params) != (
            self.card.index_kind,
            self.card.index_params,
        )
        if card_changed:
            self.card = self.card.replace(index_kind=stored.index_kind,
                                          index_params=stored.index_params)  # fmt: skip
        elif self.card.index_kind != AUTO:
            return False
        kind, params = self._resolve_index_kind()
        # Grown with the same kind, ``auto``'s parameters may differ; an open keeps the saved
        # index of that kind too, so only a new kind or changed card parameters rebuild.
        if kind == self.index_kind and (not card_changed or params == self.index_params):
            return False
        log.info("catalog %s: index kind %s -> %s (%s)", self.location, self.index_kind, kind,
                 "changed by another process" if card_changed else "the catalog grew")  # fmt: skip
        self.index_kind, self.index_params = kind, params
        self.measured = {}
        old, self.indexes = self.indexes, {}
        for name in old:
            self.indexes[name] = self._load_or_create(name)
        _close_indexes(self.location, old)
        return True

    def _card_extra(self, name: str, generation: int) -> dict[str, Any]:
        extra: dict[str, Any] = {"generation": generation, "name": name, "model_id": self.model_id}
        if self.index_kind in MEASURED_KINDS:  # a server kind's may name its address
            extra["params"] = dict(self.index_params)
        if name in self.measured:
            extra["measured"] = self.measured[name]
        return extra

    def _measurement_stale(self, name: str) -> bool:
        """Measured never, or at less than half or more than twice today's size."""
        index = self.indexes[name]
        if index.kind not in MEASURED_KINDS or len(index) == 0:
            return False
        found = self.measured.get(name)
        if not found or found.get("kind") != index.kind:
            return True
        count = int(found.get("count", 0))
        return not count / 2 <= len(index) <= 2 * count

    def _vectors_of(self, name: str, ids: list[int] | None = None) -> Any:
        if name == IMAGES:
            return self.store.iter_vectors("images", self.dim, ids=ids, batch=65_536)
        position = name.removeprefix("crops-")
        return self.store.iter_vectors("crops", self.dim, ids=ids, position=position, batch=65_536)

    def measure_index(self, name: str, budget: IndexBudget | None = None) -> dict[str, Any]:
        """recall@10 vs exact search and single-query latency of index ``name``, on a sample
        of the catalog's own vectors; with ``budget``, search-time parameters are widened
        until its target recall is met (or its latency spent). Returns the card entry."""
        from snapshop.index.measure import exact_neighbours, measure, tune

        index = self.indexes[name]
        ids = index.ids()
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(ids, size=min(MEASURE_QUERIES, len(ids)), replace=False))
        queries = np.concatenate([v for _, v in self._vectors_of(name, sample.tolist())])
        truth = exact_neighbours(queries, self._vectors_of(name), 10)
        if budget is not None:
            result = tune(index, queries, truth, budget.target_recall, budget.max_query_ms)
        else:
            result = measure(index, queries, truth)
        memory = getattr(index, "memory_bytes", None)
        result.update(
            kind=index.kind,
            count=len(index),
            memory_bytes=int(memory()) if memory is not None else None,
            measured_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        if result["memory_bytes"] is not None and len(index):
            result["bytes_per_vector"] = round(result["memory_bytes"] / len(index), 1)
        log.info("index %s measured: %s", name, result)
        return result

    def reindex(self, budget: IndexBudget) -> dict[str, Any]:
        """Choose the index kind and parameters for ``budget`` (recorded in the card as
        ``auto``), rebuild every index from the store, measure and tune each on the
        catalog's own vectors, and save. Raises CatalogError when nothing fits the budget
        (the catalog is left as it was). Returns what was chosen and measured."""
        with self.write_lock():
            self.refresh()
            counts = self.store.counts()
            choice: IndexChoice = choose_index(
                counts["images"], self.dim, budget, counts["images"] + counts["crops"],
                indexes=max(1, len(self.indexes)),
            )  # fmt: skip
            rebuilt: dict[str, VectorIndex] = {}
            for name in self.indexes:
                index = create_index(choice.kind, self.dim, **choice.params)
                for ids, vecs in self._vectors_of(name):
                    index.add(ids, vecs)
                rebuilt[name] = index
            self.rewrite_card(index_kind=AUTO, index_params={"budget": budget.to_dict()})
            with self.index_lock.write():
                self.indexes = rebuilt
                self.index_kind, self.index_params = choice.kind, dict(choice.params)
                self.measured = {}
            self.save_indexes(measure=False)  # first, so float vectors are memory-mapped
            with self.reading():  # tuning changes search parameters only
                for name in rebuilt:
                    if len(rebuilt[name]):
                        self.measured[name] = self.measure_index(name, budget)
            self.save_indexes(measure=False)  # the tuned search parameters and measurements
        return {
            "kind": choice.kind,
            "params": choice.params,
            "reason": choice.reason,
            "predicted_memory_bytes": choice.memory_bytes,
            "predicted_ms": round(choice.predicted_ms, 3),
            "budget": budget.to_dict(),
            "indexes": {name: self.measured.get(name, {"count": 0}) for name in self.indexes},
        }

    def owners(self, position: str | None, ids: list[int]) -> dict[int, int]:
        """Index entry ids (image ids, or crop ids of ``position``) -> product ids.

        Search ranks by product, so it asks this for every neighbour it fetches; an image's
        product never changes, so answers are cached in memory and only misses hit SQLite.
        """
        store = self.store
        with self._owner_lock:  # not held over the query: a writer holds the store meanwhile
            cache = self._owner_cache.setdefault(index_name(position), {})
            found = {i: cache[i] for i in ids if i in cache}
        missing = [i for i in ids if i not in found]
        if missing:
            if position is None:
                fetched = store.image_product_map(missing)
            else:
                fetched = {cid: pid for cid, (_, pid) in store.crop_rows(missing).items()}
            with self._owner_lock:  # ids are never reused: an answer cannot go stale
                cache.update(fetched)
            found.update(fetched)
        return {i: found[i] for i in ids if i in found}

    def add_vectors(
        self, position: str | None, ids: NDArray[np.int64], vectors: NDArray[np.float32]
    ) -> None:
        self._check_open()
        with self.index_lock.write():
            self._ensure_index(index_name(position)).add(ids, vectors)

    def remove_vectors(self, image_ids: list[int], crop_ids: list[int]) -> None:
        self._check_open()
        with self.index_lock.write():
            with self._owner_lock:
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

    # --- queries (the store's rows, typed) -----------------------------------------------
    @property
    def generation(self) -> int:
        """The store's write counter: every committed write moves it."""
        return self.store.generation

    @property
    def refreshed_generation(self) -> int:
        """The store generation the in-memory indexes are current at (-1: not yet)."""
        return self._generation

    @property
    def db_path(self) -> Path:
        """The SQLite file of a catalog directory."""
        if self.store.path is None:
            raise CatalogError(f"{self.location}: a server catalog has no database file here")
        return self.store.path

    def counts(self) -> dict[str, int]:
        """How many products, images and crops the catalog holds."""
        return self.store.counts()

    def get_product(self, product_id: int) -> Product:
        """The product with this catalog id (NotFoundError if there is none)."""
        return self.store.get_product(product_id)

    def find_product(self, sku: str) -> Product | None:
        return self.store.find_product(sku)

    def list_products(
        self, category: str | None = None, after_id: int = 0, limit: int = 50
    ) -> list[Product]:
        """Products in id order after ``after_id``, at most ``limit``, of ``category`` if given."""
        return self.store.list_products(category, after_id=after_id, limit=limit)

    def sku_twins(self) -> dict[str, list[int]]:
        """{sku: product ids} of the skus two or more products hold in other Unicode forms
        (composed and decomposed: a store written before skus were normalised may hold
        both); lookups find the composed one only. One pass over the products."""
        by_key: dict[str, list[int]] = {}
        after = 0
        while products := self.list_products(after_id=after, limit=1000):
            after = products[-1].id
            for product in products:
                by_key.setdefault(lookup_sku(product.sku), []).append(product.id)
        return {key: ids for key, ids in by_key.items() if len(ids) > 1}

    def get_image(self, image_id: int) -> ImageRow:
        """The image with this catalog id (NotFoundError if there is none)."""
        return self.store.get_image(image_id)

    def get_crop(self, crop_id: int) -> CropRow:
        """The crop with this catalog id (NotFoundError if there is none)."""
        found = self.store.crop_rows([crop_id]).get(crop_id) if abs(crop_id) <= MAX_ROW_ID else None
        if found is None:
            raise NotFoundError(f"no crop with id {crop_id}")
        return found[0]

    def images_of(self, product_id: int) -> list[ImageRow]:
        return self.store.images_of(product_id)

    def has_image(self, product_id: int, sha256: str) -> bool:
        """Whether ``product_id`` already holds an image with these bytes."""
        return self.store.has_image(product_id, sha256)

    # --- write operations -------------------------------------------------------------
    def update_product(self, product_id: int, **fields: Any) -> Product:
        """Change a product's metadata (one write; no vector changes). NotFoundError if the
        product does not exist."""
        with self.writing() as write:
            write.update_product(product_id, **fields)
        return self.store.get_product(product_id)

    def remove_product(self, product_id: int) -> int:
        """Delete a product with its images and crops; returns how many images went.

        Blob files no other image shares are removed after the commit."""
        with self.write_lock():
            with self.writing() as write:
                files = self.store.blob_refs_of_product(product_id)  # the lock keeps them current
                image_ids = write.delete_product(product_id)
            self.save_after_commit()
            self._free_blobs(files)
        return len(image_ids)

    def remove_images(self, image_ids: list[int]) -> None:
        """Delete images and their crops; blob files no other image shares go too."""
        if not image_ids:
            return
        with self.write_lock():
            with self.writing() as write:
                files = self.store.blob_refs_of_images(image_ids)
                write.delete_images(image_ids)
            self.save_after_commit()
            self._free_blobs(files)

    def _free_blobs(self, files: list[tuple[str, str | None]]) -> None:
        """After a delete committed: blob files no remaining image references."""
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
            "directory": str(self._directory) if self._directory is not None else None,
            "location": self.location,
            **self.store.counts(),
            "model_id": self.model_id,
            "model_ref": self.model_ref,
            "detector": self.detector,
            "crop_mode": self.crop_mode,
            "catalog_views": self.catalog_views,
            "dim": self.dim,
            "index_kind": self.index_kind,
            # server kinds' parameters may hold a connection string: only local ones are shown
            "index_params": dict(self.index_params) if self.index_kind in MEASURED_KINDS else {},
            "index_budget": IndexBudget.from_dict(self.card.index_params.get("budget")).to_dict()
            if self.card.index_kind == AUTO
            else None,
            "indexes": self._index_sizes(),
            "measured": {name: self.measured[name] for name in sorted(self.measured)},
            "generation": self.store.generation,
        }

    def _index_sizes(self) -> dict[str, int]:
        with self.reading():
            return {name: len(idx) for name, idx in sorted(self.indexes.items())}

    def close(self) -> None:
        """Close the index clients (a pgvector connection, a Milvus client) and the store,
        once the searches in flight are done; any later use raises CatalogError. Idempotent;
        one client failing to close does not keep the others open."""
        self._closed = True
        with self._lock, self.index_lock.write():
            indexes, self.indexes = self.indexes, {}
            _close_indexes(self.location, indexes)
            with self._owner_lock:
                self._owner_cache.clear()
            self._store.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _close_indexes(location: str, indexes: dict[str, VectorIndex]) -> None:
    """Close the index clients among ``indexes`` (a pgvector connection, a Milvus client);
    one failing to close does not keep the others open."""
    for name, index in indexes.items():
        close = getattr(index, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception as exc:  # closing must not hide the caller's own error
            log.warning("index %s of %s did not close cleanly (%s)", name, location, exc)


def create_catalog(
    target: str | os.PathLike[str],
    *,
    model_id: str,
    model_ref: str,
    dim: int,
    index_kind: str = "flat",
    index_params: dict[str, Any] | None = None,
) -> Catalog:
    """Create a catalog: a directory, or in a PostgreSQL database (``postgresql://…``; its
    vectors are searched there, or in Milvus with ``index_kind="milvus"``: any other kind
    only applies to directories)."""
    from snapshop.catalog.server import (
        SERVER_INDEX_KIND,
        SERVER_INDEX_KINDS,
        create_server_catalog,
        is_server_target,
    )

    if is_server_target(target):
        kind = index_kind if index_kind in SERVER_INDEX_KINDS else SERVER_INDEX_KIND
        return create_server_catalog(
            str(target), model_id=model_id, model_ref=model_ref, dim=dim,
            crop_mode=DEFAULT_CROP_MODE, index_kind=kind, index_params=index_params,
        )  # fmt: skip
    directory = Path(target)
    if (directory / CARD_FILE).exists():
        raise CatalogError(f"{directory}: a catalog already exists here")
    check_index_kind(index_kind, index_params, dim)  # before anything is written
    if directory.exists() and not directory.is_dir():
        raise CatalogError(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    # Checked before the lock file is made too, so a folder of other files is left as it was
    # (a catalog another process is creating here now passes, and is waited for below).
    _check_empty(directory, creating=True)
    # Creation holds the write lock, so of two processes creating one catalog at once the
    # second sees the first one's card ("already exists") rather than a half-made directory.
    with open(directory / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        if (directory / CARD_FILE).exists():
            raise CatalogError(f"{directory}: a catalog already exists here")
        _clear_interrupted_creation(directory)
        _check_empty(directory)
        return _create(directory, model_id, model_ref, dim, index_kind, index_params)


def _clear_interrupted_creation(directory: Path) -> None:
    """Under the creation lock, with no card: remove what a creation killed before it wrote
    the card left (its store, between the two steps), so the folder can be used again. Only a
    store without a product or an image goes; one holding any is refused, never removed."""
    left = [p.name for p in directory.iterdir() if p.name in _CREATING or is_temp_name(p.name)]
    if not left:
        return
    db_path = directory / DB_FILE
    if db_path.exists() and _stored_rows(db_path):
        raise CatalogError(
            f"{db_path}: a catalog database holding products, but no {CARD_FILE} beside it:"
            f" restore the card, or move the database away to create a new catalog here"
        )
    log.warning("%s: removing what an interrupted creation left (%s)", directory,
                ", ".join(sorted(left)))  # fmt: skip
    _remove_created(directory)


def _stored_rows(db_path: Path) -> int:
    """Products and images in a catalog database (0 for one whose schema was never
    written); a file SQLite cannot read counts as holding rows, so it is kept."""
    try:
        db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return 1
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        return sum(
            int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("products", "images")
            if table in tables
        )
    except sqlite3.Error:
        return 1
    finally:
        db.close()


def _check_empty(directory: Path, creating: bool = False) -> None:
    """CatalogError unless ``directory`` is empty (``creating``: but for what a process
    creating a catalog there writes)."""
    allowed = {".DS_Store", LOCK_FILE, *(_CREATING if creating else ())}
    if any(
        p.name not in allowed and not (creating and is_temp_name(p.name))
        for p in directory.iterdir()
    ):
        raise CatalogError(f"{directory}: directory is not empty and holds no catalog")


def _create(
    directory: Path,
    model_id: str,
    model_ref: str,
    dim: int,
    index_kind: str,
    index_params: dict[str, Any] | None,
) -> Catalog:
    """The catalog's store, card and indexes; what it wrote is removed if any step fails, so
    a failed creation never leaves a catalog every later command fails to open."""
    check_index_kind(index_kind, index_params, dim)
    card = CatalogCard.new(
        model_id=model_id, model_ref=model_ref, dim=dim, index_kind=index_kind,
        index_params=index_params, crop_mode=DEFAULT_CROP_MODE,
    )  # fmt: skip
    store: CatalogStore | None = None
    try:
        store = CatalogStore(directory / DB_FILE)
        write_card(directory / CARD_FILE, card)
        return Catalog(directory, card, store)
    except BaseException:
        if store is not None:
            store.close()
        _remove_created(directory)
        raise


def _remove_created(directory: Path) -> None:
    """Remove what creating a catalog in ``directory`` wrote (the lock file stays: it is held)."""
    for path in directory.iterdir():
        try:
            if path.name in _CREATING or is_temp_name(path.name):
                path.unlink(missing_ok=True)
            elif path.name in (INDEX_DIR, BLOB_DIR) and path.is_dir():
                shutil.rmtree(path)
        except OSError as exc:  # the caller's error matters more than this one
            log.warning("%s: could not remove %s (%s)", directory, path, exc)


def reindex_catalog(directory: str | os.PathLike[str], budget: IndexBudget) -> dict[str, Any]:
    """Rebuild a catalog's indexes by ``budget`` (see :meth:`Catalog.reindex`)."""
    with open_catalog(directory) as catalog:
        return catalog.reindex(budget)


def catalog_exists(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` (a directory, or a PostgreSQL URI) holds a catalog."""
    from snapshop.catalog.server import is_server_target, server_catalog_exists

    if is_server_target(target):
        return server_catalog_exists(str(target))
    return (Path(target) / CARD_FILE).exists()


def open_catalog(target: str | os.PathLike[str], *, alone: bool = False) -> Catalog:
    """Open an existing catalog: a directory (reconciling its indexes with the store), or a
    PostgreSQL database by connection string (``postgresql://…``, see ``catalog.server``).

    ``alone`` (directories): its database opened so that other processes wait until this
    one closes it; it opens on a full disk, where the shared way cannot (``catalog gc``)."""
    from snapshop.catalog.server import is_server_target, open_server_catalog

    if is_server_target(target):
        return open_server_catalog(str(target))
    directory = Path(target)
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
    store = CatalogStore(db_path, alone=alone)
    try:
        return Catalog(directory, card, store)
    except BaseException:
        store.close()
        raise


def _open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _flock_until(path: Path, deadline: float | None) -> int | None:
    """A descriptor of lock file ``path`` holding its exclusive ``flock`` (the caller
    unlocks and closes it), waited for until ``deadline`` (monotonic; None: without a
    limit); None when the deadline passed first.

    A bounded wait is a blocking ``flock`` in this process's one :class:`_FlockWaiter` for
    the file: the kernel hands the lock over when its holder lets go. Polling with
    ``LOCK_NB`` almost never found the gap while another process took the lock again at
    once (1 of 20 writes got it behind holds of 0.1 s); a thread per wait outlived the
    waits that gave up (300 busy writes: 300 threads and descriptors; measured by
    ``benchmarks/write_waits.py``)."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
    except BaseException:
        os.close(fd)
        raise
    assert deadline is not None
    return _FlockWaiter.wait(path, deadline)


class _FlockWaiter:
    """One thread per lock file and process, for the writers that wait with a deadline: it
    blocks in ``flock`` on a descriptor of its own and hands each lock it gets to a writer
    still waiting, or lets it go and ends when none is."""

    _lock = threading.Lock()
    _handed = threading.Condition(_lock)
    _waiters: dict[str, _FlockWaiter] = {}

    def __init__(self, path: Path) -> None:
        self.path, self.pid = path, os.getpid()
        self.wanted = 0  # writers waiting for a lock from this thread
        self.ready: list[int] = []  # locked descriptors not yet taken

    @classmethod
    def wait(cls, path: Path, deadline: float) -> int | None:
        with cls._lock:
            waiter = cls._waiters.get(str(path))
            if waiter is None or waiter.pid != os.getpid():  # none, or a forked parent's
                waiter = cls._waiters[str(path)] = _FlockWaiter(path)
                threading.Thread(target=waiter._run, name="snapshop-flock", daemon=True).start()
            waiter.wanted += 1
            while not waiter.ready:
                left = deadline - time.monotonic()
                if (left <= 0 or not cls._handed.wait(left)) and not waiter.ready:
                    waiter.wanted -= 1
                    return None
            return waiter.ready.pop()

    def _run(self) -> None:
        while True:
            try:  # failing (no descriptor left, the folder gone), the thread ends: the
                fd = _open_lock_file(self.path)  # writers waiting give up at their deadline,
            except OSError:  # and the next one starts another
                fd = -1
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:
                    os.close(fd)
                    fd = -1
            with self._lock:
                if fd >= 0 and self.wanted > 0:
                    self.wanted -= 1
                    self.ready.append(fd)
                    self._handed.notify_all()
                    if self.wanted > 0:
                        continue  # another writer waits: block again, behind the one served
                elif fd >= 0:  # nobody waits any more: let the lock go
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                if self._waiters.get(str(self.path)) is self:
                    del self._waiters[str(self.path)]
                return
