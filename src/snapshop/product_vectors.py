"""Product vectors: one vector per product fusing its images (and one per garment position).

A product's vector is the mean of its L2-normalised image vectors, renormalised; its vector
at a garment position is the same over its crops at that position. They are a cache derived
from the store, like the catalog's indexes: ``DIR/index/products.npz`` holds, per group
(``images`` and ``crops-<position>``), the entry ids (image or crop ids) the vectors were
computed from, each entry's product, and the product vectors, tagged with the store
generation they reflect. On open (and on ``refresh``) a stale cache is reconciled by the
store's change log since that generation, or by id difference where the log no longer reaches
back: only the products that gained or lost an entry are recomputed, from the vectors in the
store. The file is replaced atomically, so a crash costs recomputation, never data.

Photo search ranks image-based results by these vectors by default (``search.Searcher``,
``ranking="product"``); :meth:`ProductVectors.best_entries` finds the image each result shows.
"""

from __future__ import annotations

import logging
import os
import threading
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.catalog import IMAGES, Catalog, index_name
from snapshop.catalog.store import EntryChanges
from snapshop.config import make_temp
from snapshop.index.filtering import IdFilter
from snapshop.index.flat import FlatIndex
from snapshop.models.embedder import unit_rows

log = logging.getLogger(__name__)

CACHE_FILE = "products.npz"
FORMAT = "snapshop-product-vectors/1"


def mean_pool(
    owners: NDArray[np.int64], vectors: NDArray[np.float32]
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """(products (P,) sorted, (P, D) float32 L2-normalised): per owner, the mean of its rows
    of ``vectors`` (N, D) after normalising each row, renormalised."""
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    if len(owners) == 0:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    products, inverse = np.unique(owners, return_inverse=True)
    sums = np.zeros((len(products), dim), np.float64)
    np.add.at(sums, inverse, unit_rows(vectors))
    return products.astype(np.int64), unit_rows(sums).astype(np.float32)


def _found(haystack: NDArray[np.int64], needles: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Per needle, whether it is in ``haystack`` (sorted, unique): a binary search each, not
    a pass over the whole haystack as ``np.isin`` makes."""
    if len(haystack) == 0:
        return np.zeros(len(needles), bool)
    at = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return np.asarray(haystack[at] == needles)


class _Rows:
    """The first ``n`` rows of ``buffer``, grown in place: appending writes past row ``n`` and
    the buffer doubles when full, so appending k rows costs O(k) amortised where concatenating
    copied every row. A view of the first rows taken earlier never sees an append (it ends
    before the appended rows, or lies in the buffer an append outgrew)."""

    def __init__(self, rows: NDArray[Any]) -> None:
        self.buffer = rows
        self.n = len(rows)

    def view(self) -> NDArray[Any]:
        return self.buffer[: self.n]

    def copy(self) -> _Rows:
        """The same rows in a buffer of their own, as roomy as this one."""
        rows = _Rows(np.empty_like(self.buffer))
        rows.buffer[: self.n] = self.view()
        rows.n = self.n
        return rows

    def append(self, rows: NDArray[Any]) -> bool:
        """Append ``rows``; True when that moved them to a new buffer."""
        need = self.n + len(rows)
        grown = need > len(self.buffer)
        if grown:
            # pages past the rows written are not touched, so the spare half costs address
            # space, not memory, until appends reach it
            bigger = np.empty((max(need, 2 * len(self.buffer), 16), *self.buffer.shape[1:]),
                              self.buffer.dtype)  # fmt: skip
            bigger[: self.n] = self.view()
            self.buffer = bigger
        self.buffer[self.n : need] = rows
        self.n = need
        return grown


class _Group:
    """Entries (sorted ids and their products) and the product vectors computed from them.

    Rows below each array's length never change but for the vectors of products recomputed
    in place (:meth:`replace_vectors`), and those are copied first when the vectors may be
    read outside the lock (handed out by :meth:`ProductVectors.vectors`, or saved): an array
    read from this group stays as it was read.
    """

    def __init__(
        self,
        entry_ids: NDArray[np.int64],
        entry_owner: NDArray[np.int64],
        product_ids: NDArray[np.int64],  # sorted
        vectors: NDArray[np.float32],
    ) -> None:
        self._entry_ids, self._entry_owner = _Rows(entry_ids), _Rows(entry_owner)
        self._product_ids, self._vectors = _Rows(product_ids), _Rows(vectors)
        # a bound on the products that have entries: a higher product id has none
        self.max_owner = int(entry_owner.max()) if len(entry_owner) else -1
        # whether the vectors' buffer was handed out (or saved) since it last moved
        self.vectors_handed_out = False

    @classmethod
    def empty(cls, dim: int) -> _Group:
        none = np.zeros(0, np.int64)
        return cls(none, none.copy(), none.copy(), np.zeros((0, dim), np.float32))

    @property
    def entry_ids(self) -> NDArray[np.int64]:
        return self._entry_ids.view()

    @property
    def entry_owner(self) -> NDArray[np.int64]:
        return self._entry_owner.view()

    @property
    def product_ids(self) -> NDArray[np.int64]:
        return self._product_ids.view()

    @property
    def vectors(self) -> NDArray[np.float32]:
        return self._vectors.view()

    def append_entries(self, ids: NDArray[np.int64], owners: NDArray[np.int64]) -> None:
        """Append entries whose ids are above every entry's."""
        self._entry_ids.append(ids)
        self._entry_owner.append(owners)
        if len(owners):
            self.max_owner = max(self.max_owner, int(owners.max()))

    def set_entries(self, ids: NDArray[np.int64], owners: NDArray[np.int64]) -> None:
        self._entry_ids, self._entry_owner = _Rows(ids), _Rows(owners)
        self.max_owner = int(owners.max()) if len(owners) else -1

    def replace_vectors(self, rows: NDArray[np.intp], vectors: NDArray[np.float32]) -> None:
        """Overwrite the vectors at ``rows``: in place, unless they may be read outside the
        lock; then into a copy (once: the copy is nobody's until handed out again)."""
        if len(rows) == 0:
            return
        if self.vectors_handed_out:
            self._vectors = self._vectors.copy()
            self.vectors_handed_out = False
        self._vectors.buffer[rows] = vectors

    def append_products(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        """Append products whose ids are above every product's."""
        self._product_ids.append(ids)
        if self._vectors.append(vectors):
            self.vectors_handed_out = False

    def set_products(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        self._product_ids, self._vectors = _Rows(ids), _Rows(vectors)
        self.vectors_handed_out = False


class ProductVectors:
    """The product vectors of an open catalog, current as of the last :meth:`refresh`.

    Its methods are thread-safe; searches go through :meth:`index` (an exact index keyed by
    product id, updated in place by :meth:`refresh`), under the catalog's
    :meth:`~snapshop.catalog.catalog.Catalog.reading` like its own indexes.

    Locks: the catalog's index lock, then this object's (a search holds the read side while
    it asks for :meth:`vectors` or :meth:`entries`), so :meth:`refresh` takes the catalog's
    write side first and never the other way round.
    """

    def __init__(self, catalog: Catalog, *, save: bool = True) -> None:
        self.catalog = catalog
        self.dim = catalog.dim
        # a server catalog has no disk of its own here: its vectors are computed on open
        self.path = None if catalog.is_server else catalog.directory / "index" / CACHE_FILE
        self._save_enabled = save and self.path is not None
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()  # one save at a time: the newest is written last
        self._groups: dict[str, _Group] = {}
        self._indexes: dict[str, FlatIndex] = {}
        self._by_owner: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]] = {}
        self._generation = -1
        self._load()
        self.refresh()

    # --- reading ------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """The store generation the vectors reflect."""
        return self._generation

    def positions(self) -> list[str]:
        """Garment positions that have product vectors."""
        with self._lock:
            return sorted(n.removeprefix("crops-") for n, g in self._groups.items()
                          if n != IMAGES and len(g.product_ids))  # fmt: skip

    def vectors(self, position: str | None = None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """(product ids (P,) ascending, (P, D) L2-normalised vectors) of the images, or of the
        crops at ``position``: views, never changed by a later :meth:`refresh` (it appends
        past their end, or copies before recomputing a product in place)."""
        with self._lock:
            group = self._groups.get(index_name(position)) or _Group.empty(self.dim)
            group.vectors_handed_out = True
            return group.product_ids, group.vectors

    def product_ids(self, position: str | None = None) -> NDArray[np.int64]:
        """The product ids of :meth:`vectors` alone: a view a later :meth:`refresh` never
        changes, and, unlike :meth:`vectors`, no reason for it to copy the vectors before it
        recomputes a product in place."""
        with self._lock:
            group = self._groups.get(index_name(position)) or _Group.empty(self.dim)
            return group.product_ids

    def index(self, position: str | None = None) -> FlatIndex:
        """An exact index over :meth:`vectors` keyed by product id (built on first use, then
        updated in place by :meth:`refresh`): like the catalog's indexes, search it under
        the catalog's :meth:`~snapshop.catalog.catalog.Catalog.reading`. A product whose
        vector is zero (its image vectors cancel, v and -v) has no direction and is left
        out: it would score 0 against every query, above products of negative similarity."""
        with self._lock:
            name = index_name(position)
            if name not in self._indexes:
                group = self._groups.get(name) or _Group.empty(self.dim)
                index = FlatIndex(self.dim)
                nonzero = group.vectors.any(axis=1)
                index.add(group.product_ids[nonzero], group.vectors[nonzero])  # copied
                self._indexes[name] = index
            return self._indexes[name]

    def entries(
        self, products: list[int], position: str | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(entry ids, their products): the entries (image ids, or crop ids at ``position``)
        the vectors of ``products`` were computed from, grouped by product in their order."""
        with self._lock:
            name = index_name(position)
            if name not in self._by_owner:
                group = self._groups.get(name) or _Group.empty(self.dim)
                order = np.argsort(group.entry_owner, kind="stable")
                self._by_owner[name] = (group.entry_owner[order], group.entry_ids[order])
            owners, entries = self._by_owner[name]
        wanted = np.asarray(products, dtype=np.int64)
        starts = np.searchsorted(owners, wanted, side="left")
        ends = np.searchsorted(owners, wanted, side="right")
        ranges = [np.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
        rows = np.concatenate(ranges) if ranges else np.zeros(0, np.int64)
        return entries[rows], owners[rows]

    def best_entries(
        self, query: NDArray[np.float32], products: list[int], position: str | None = None
    ) -> dict[int, tuple[int, float]]:
        """{product: (entry id, score)}: for each of ``products``, its entry (image, or crop
        at ``position``) whose stored vector has the highest inner product with ``query``
        (D,); ties go to the lower entry id. Reads only those products' vectors from the
        store; a product with no entry left there is left out."""
        entries, owners = self.entries(products, position)
        best: dict[int, tuple[int, float]] = {}
        if len(entries) == 0:
            return best
        owner = dict(zip(entries.tolist(), owners.tolist(), strict=True))
        query = np.asarray(query, np.float32)
        for ids, scores in self._entry_scores(query, entries, position):
            for entry, score in zip(ids.tolist(), scores.tolist(), strict=True):
                product = owner.get(entry)
                if product is None:
                    continue
                found = best.get(product)
                if found is None or score > found[1] or (score == found[1] and entry < found[0]):
                    best[product] = (entry, float(score))
        return best

    def _entry_scores(
        self, query: NDArray[np.float32], entries: NDArray[np.int64], position: str | None
    ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
        """(entry ids, inner products with ``query``) in batches. An exact in-memory index
        holds the stored vectors: it scores them where they are (issue #16: reading them back
        from SQLite was most of a query's search time on grocery-dev, 71 images a product);
        any other index scores the store's vectors."""
        hits = None
        with self.catalog.reading():  # not held over the yield
            index = self.catalog.index(position)
            if isinstance(index, FlatIndex):
                allowed = IdFilter.of(entries)
                hits = index.search(query.reshape(1, -1), len(entries), allowed=allowed)
        if hits is not None:
            keep = hits.ids[0] >= 0
            yield hits.ids[0][keep], hits.scores[0][keep]
            return
        table = "images" if position is None else "crops"
        for ids, vecs in self.catalog.store.iter_vectors(table, self.dim, ids=entries.tolist()):
            yield ids, vecs @ query

    # --- reconciliation -----------------------------------------------------------------
    def refresh(self, force: bool = False, save: bool | None = None) -> bool:
        """Bring the vectors up to the store when its generation moved (or ``force``), and
        save the cache (``save`` None: as the constructor said; a searcher refreshing before
        each query passes False, since rewriting the whole file per write would cost more
        than the few products a later open recomputes). Returns True if it reconciled.

        Reconciles under the write side of the catalog's index lock (the product indexes
        change in place), taken only when the store moved, and saves once it is let go.
        Never call it holding this object's lock: a search holding the read side may be
        waiting for that lock.
        """
        store = self.catalog.store
        if not force and store.generation == self._generation:
            return False  # current: the searches in flight are not stopped for nothing
        # Read before the write side is taken, so searches go on meanwhile: the catalog's
        # changes, then the entries each group gained and lost since its generation.
        self.catalog.refresh()
        changes = None if force else store.entry_changes(self._generation, store.generation)
        with self.catalog.index_lock.write(), self._lock:
            generation = store.generation  # read first: a later write forces another pass
            if not force and generation == self._generation:
                return False
            self.catalog.refresh()  # a no-op unless a write came in between
            if changes is not None and (changes.since, changes.until) != (
                self._generation,
                generation,
            ):
                changes = store.entry_changes(self._generation, generation)
            # Without the log's changes, the entries are the catalog's indexes' (current once
            # refreshed): their ids are read from memory, where the store would scan its
            # tables (a server catalog's indexes are its tables: 0.55 s at 300k images).
            names = {IMAGES} | set(self.catalog.indexes) | set(self._groups)
            if changes is not None:
                names |= {index_name(p) for p in changes.positions()}
            changed = False
            for name in sorted(names):
                changed |= self._reconcile(name, changes)
            self._generation = generation
            if changed:
                self._by_owner.clear()
        save = self._save_enabled if save is None else save and self._save_enabled
        if save and self.path is not None and (changed or not self.path.exists()):
            self._save()
        return True

    def _current_entries(self, name: str) -> NDArray[np.int64]:
        index = self.catalog.indexes.get(name)
        return np.sort(index.ids()) if index is not None else np.zeros(0, np.int64)

    def _owners(self, name: str, ids: NDArray[np.int64]) -> NDArray[np.int64]:
        """Products of entries (an entry's product never changes); -1 for one deleted since."""
        store = self.catalog.store
        if name == IMAGES:
            found = store.image_product_map(ids.tolist())
        else:
            found = {cid: pid for cid, (_, pid) in store.crop_rows(ids.tolist()).items()}
        return np.array([found.get(int(i), -1) for i in ids], dtype=np.int64)

    def _reconcile(self, name: str, changes: EntryChanges | None = None) -> bool:
        """Bring group ``name`` to the catalog's entries: by ``changes`` (the store's change
        log since :attr:`generation`), else by id difference with the catalog's index.

        The usual write (entries with ids above the group's, of new products with ids above
        its products, or of a few products it has) costs what it changed: entries and new
        products are appended, changed products' vectors replaced in place. A removal or an
        id out of order rebuilds the arrays it touches."""
        group = self._groups.get(name) or _Group.empty(self.dim)
        self._groups[name] = group
        if changes is None:
            want = self._current_entries(name)
            added = np.setdiff1d(want, group.entry_ids, assume_unique=True)
            removed_at = np.flatnonzero(~np.isin(group.entry_ids, want, assume_unique=True))
        else:
            position = None if name == IMAGES else name.removeprefix("crops-")
            logged = changes.added_at(position)
            added = logged[~_found(group.entry_ids, logged)]  # a group may hold some already
            removed = changes.removed_at(position)
            removed_at = np.searchsorted(group.entry_ids, removed[_found(group.entry_ids, removed)])
        if len(added) == 0 and len(removed_at) == 0:
            return False
        added_owner = self._owners(name, added)
        alive = added_owner >= 0
        added, added_owner = added[alive], added_owner[alive]
        dirty = np.union1d(group.entry_owner[removed_at], added_owner)
        max_owner = group.max_owner
        had_entries = dirty[dirty <= max_owner]  # the others' entries are all in added

        self._update_entries(group, added, added_owner, removed_at)
        if len(had_entries) == 0:
            wanted = added
        else:
            mine = np.isin(group.entry_owner, had_entries)
            wanted = np.union1d(added[added_owner > max_owner], group.entry_ids[mine])
        fresh_ids, fresh_vecs = self._pool(name, group, dirty, wanted)

        gone = np.setdiff1d(dirty, fresh_ids, assume_unique=True)  # no entry left
        old = group.product_ids
        at = np.searchsorted(old, fresh_ids)
        known = at < len(old)
        known[known] = old[at[known]] == fresh_ids[known]
        new_ids = fresh_ids[~known]
        if len(gone) == 0 and (len(new_ids) == 0 or len(old) == 0 or new_ids[0] > old[-1]):
            group.replace_vectors(at[known], fresh_vecs[known])
            group.append_products(new_ids, fresh_vecs[~known])
        else:
            clean = ~np.isin(old, dirty)
            product_ids = np.concatenate([old[clean], fresh_ids])
            vectors = np.concatenate([group.vectors[clean], fresh_vecs])
            order = np.argsort(product_ids)
            group.set_products(product_ids[order], vectors[order])
        index = self._indexes.get(name)
        if index is not None:  # kept current in place: rebuilding it would copy every vector
            nonzero = fresh_vecs.any(axis=1)
            index.remove(np.union1d(gone, fresh_ids[~nonzero]))
            index.add(fresh_ids[nonzero], fresh_vecs[nonzero])
        log.info("product vectors %s reconciled: %d products recomputed", name, len(dirty))
        return True

    @staticmethod
    def _update_entries(
        group: _Group,
        added: NDArray[np.int64],
        added_owner: NDArray[np.int64],
        removed_at: NDArray[np.intp],
    ) -> None:
        """Remove the entries at rows ``removed_at`` and add ``added`` (sorted), keeping ids
        sorted: appended when they all come after the group's, else rebuilt."""
        last = group.entry_ids[-1] if len(group.entry_ids) else None
        if len(removed_at) == 0 and (last is None or len(added) == 0 or added[0] > last):
            group.append_entries(added, added_owner)  # the usual ingest
            return
        keep = np.ones(len(group.entry_ids), bool)
        keep[removed_at] = False
        entry_ids = np.concatenate([group.entry_ids[keep], added])
        entry_owner = np.concatenate([group.entry_owner[keep], added_owner])
        if len(entry_ids) > 1 and not (entry_ids[1:] > entry_ids[:-1]).all():
            order = np.argsort(entry_ids)
            entry_ids, entry_owner = entry_ids[order], entry_owner[order]
        group.set_entries(entry_ids, entry_owner)

    def _pool(
        self, name: str, group: _Group, dirty: NDArray[np.int64], wanted: NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """:func:`mean_pool` of the ``dirty`` products' entries (``wanted``, sorted, among the
        group's), summed batch by batch as the store streams them: memory stays at the sums,
        never every vector at once (a first open at 100k images peaked at 2.6x its steady
        size when they were all gathered first). When every entry is wanted, the table is
        read straight through instead of asked for by id."""
        table = "images" if name == IMAGES else "crops"
        position = None if name == IMAGES else name.removeprefix("crops-")
        entry_ids, entry_owner = group.entry_ids, group.entry_owner
        store = self.catalog.store
        if len(wanted) == len(entry_ids):
            batches = store.iter_vectors(table, self.dim, position=position, batch=8192)
        else:
            batches = store.iter_vectors(table, self.dim, ids=wanted.tolist())
        sums = np.zeros((len(dirty), self.dim), np.float64)
        seen = np.zeros(len(dirty), bool)
        for ids, vecs in batches:
            at = np.minimum(np.searchsorted(entry_ids, ids), max(len(entry_ids) - 1, 0))
            known = (entry_ids[at] == ids) if len(entry_ids) else np.zeros(len(ids), bool)
            owners = entry_owner[at[known]]
            rows = np.minimum(np.searchsorted(dirty, owners), max(len(dirty) - 1, 0))
            mine = dirty[rows] == owners if len(dirty) else np.zeros(len(owners), bool)
            np.add.at(sums, rows[mine], unit_rows(vecs[known][mine]))
            seen[rows[mine]] = True
        return dirty[seen].astype(np.int64), unit_rows(sums[seen]).astype(np.float32)

    # --- the cache file -----------------------------------------------------------------
    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT or int(data["dim"]) != self.dim:
                    raise ValueError("format or dimension changed")
                if str(data["model_id"]) != self.catalog.model_id:
                    raise ValueError("model changed")
                groups = {}
                for name in (str(n) for n in data["names"]):
                    groups[name] = _Group(*(data[f"{name}.{field}"] for field in
                                            ("entry_ids", "entry_owner", "product_ids",
                                             "vectors")))  # fmt: skip
                    self._check_group(name, groups[name])
                generation = int(data["generation"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            log.warning("%s: unusable product-vector cache (%s), recomputing", self.path, exc)
            return
        self._groups, self._generation = groups, generation

    def _check_group(self, name: str, group: _Group) -> None:
        """Raise ValueError unless ``group`` is what :meth:`_save` writes: reconciliation and
        search trust it (sorted unique ids, one finite vector per product)."""
        ids, owners, products, vectors = (group.entry_ids, group.entry_owner,
                                          group.product_ids, group.vectors)  # fmt: skip
        if not (ids.dtype == owners.dtype == products.dtype == np.int64) or (
            vectors.dtype != np.float32
        ):
            raise ValueError(f"{name}: unexpected array types")
        if ids.ndim != 1 or owners.shape != ids.shape or products.ndim != 1:
            raise ValueError(f"{name}: entries do not match their products")
        if vectors.shape != (len(products), self.dim):
            raise ValueError(f"{name}: vectors do not match their products")
        if (ids[1:] <= ids[:-1]).any() or (products[1:] <= products[:-1]).any():
            raise ValueError(f"{name}: ids not sorted and unique")
        if not np.isfinite(vectors).all():
            raise ValueError(f"{name}: vectors contain NaN or infinity")

    def _save(self) -> None:
        if self.path is None:
            return
        with self._save_lock:
            # written without the lock: a reconcile appends past the arrays read here, and
            # copies the vectors before changing rows of them
            with self._lock:
                arrays: dict[str, NDArray] = {
                    "format": np.array(FORMAT), "dim": np.array(self.dim),
                    "model_id": np.array(self.catalog.model_id),
                    "generation": np.array(self._generation),
                    "names": np.array(sorted(self._groups), dtype=str),
                }  # fmt: skip
                for name, group in self._groups.items():
                    group.vectors_handed_out = True
                    arrays[f"{name}.entry_ids"] = group.entry_ids
                    arrays[f"{name}.entry_owner"] = group.entry_owner
                    arrays[f"{name}.product_ids"] = group.product_ids
                    arrays[f"{name}.vectors"] = group.vectors
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = make_temp(self.path.parent, ".npz")
            try:
                with os.fdopen(fd, "wb") as fh:
                    # numpy's stub reads **arrays as possibly holding allow_pickle: bool
                    np.savez(fh, **arrays)  # type: ignore[arg-type]
                    fh.flush()
                    os.fsync(fh.fileno())
                tmp.replace(self.path)
            except OSError as exc:  # a read-only catalog still gets its vectors, only not cached
                log.warning("%s: cannot save the product-vector cache (%s)", self.path, exc)
            finally:
                tmp.unlink(missing_ok=True)
