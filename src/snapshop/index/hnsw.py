"""Approximate search: faiss ``IndexHNSWFlat`` (inner product) with an id map and tombstones.

HNSW graphs cannot delete nodes, so ``remove`` (and ``add`` over an existing id) marks the old
node dead; searches skip dead nodes through a faiss ``IDSelectorBitmap`` *during* graph
traversal (no post-filtering, so no result is silently dropped), and once dead nodes exceed
``compact_fraction`` of the graph it is rebuilt from the stored vectors.

``efSearch`` is raised to at least ``k`` (times ``ef_factor`` over-fetch when there are
tombstones), so large fetches made by filtered searches keep their recall.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from snapshop.config import make_temp
from snapshop.index.base import SearchHits, check_ids, check_query, check_vectors, id_array
from snapshop.index.filtering import (
    IdFilter,
    NodeSelection,
    SelectionCache,
    exact_filter_max,
    exact_top_k_at,
    select_nodes,
)

log = logging.getLogger(__name__)

FORMAT = "snapshop-hnsw/1"
# Bounds on the graph parameters, checked when an index is made: faiss takes any int, then
# allocates 2 m links per vector at level 0 and beams of ef entries (m or ef_search of 1e9:
# std::bad_alloc on the first add or search, or the OOM killer, long after the card was
# written). m 512 is 4 KB of links a vector; a beam of a million is ~8 MB a query.
MAX_M = 512
MAX_EF = 1_000_000


def check_graph_params(m: object, ef_construction: object, ef_search: object) -> None:
    """ValueError unless ``m`` (4..MAX_M), ``ef_construction`` and ``ef_search`` (1..MAX_EF)
    are whole numbers in range."""
    bounds = {"m": (m, 4, MAX_M), "ef_construction": (ef_construction, 1, MAX_EF),
              "ef_search": (ef_search, 1, MAX_EF)}  # fmt: skip
    for name, (value, low, high) in bounds.items():
        if (
            isinstance(value, bool | np.bool_)
            or not isinstance(value, int | np.integer)
            or not low <= int(value) <= high
        ):
            raise ValueError(f"{name} must be a whole number from {low} to {high}, not {value!r}")


class HNSWIndex:
    """HNSW over L2-normalised vectors; ``add`` with an existing id replaces its vector."""

    kind = "hnsw"
    filters_inside = True

    def __init__(
        self,
        dim: int,
        m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 128,
        compact_fraction: float = 0.2,
    ) -> None:
        check_graph_params(m, ef_construction, ef_search)
        if not 0.0 < compact_fraction <= 1.0:
            raise ValueError("compact_fraction must be in (0, 1]")
        self.dim = dim
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.compact_fraction = compact_fraction
        self._index = self._new_graph()
        self._labels = np.zeros(0, np.int64)  # graph node -> catalog id
        self._alive = np.zeros(0, bool)  # graph node -> still live
        self._where: dict[int, int] = {}  # live catalog id -> graph node
        # The live nodes while there are tombstones, built on the first search after a write;
        # one object holds the selector and the bitmap it points into (see ``_params``).
        self._live_selection: NodeSelection | None = None
        self._selections = SelectionCache()

    def _new_graph(self) -> faiss.IndexHNSWFlat:
        index = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    # --- size ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._where)

    @property
    def tombstones(self) -> int:
        return int(self._index.ntotal) - len(self._where)

    # --- writes -------------------------------------------------------------------------
    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if len(ids) == 0:
            return
        self._kill(ids)
        start = int(self._index.ntotal)
        self._index.add(vectors)
        self._labels = np.concatenate([self._labels, ids])
        self._alive = np.concatenate([self._alive, np.ones(len(ids), bool)])
        for node, i in enumerate(ids.tolist(), start):
            self._where[i] = node
        self._live_selection = None
        self._selections.clear()
        self._maybe_compact()

    def remove(self, ids: NDArray[np.int64]) -> int:
        ids = id_array(ids)
        removed = self._kill(ids)
        if removed:
            self._maybe_compact()
        return removed

    def _kill(self, ids: NDArray[np.int64]) -> int:
        removed = 0
        for i in ids.tolist():
            node = self._where.pop(i, None)
            if node is not None:
                self._alive[node] = False
                removed += 1
        if removed:
            self._live_selection = None
            self._selections.clear()
        return removed

    def _maybe_compact(self) -> None:
        total = int(self._index.ntotal)
        if total and self.tombstones > self.compact_fraction * total:
            self.compact()

    def compact(self) -> None:
        """Rebuild the graph from the live vectors (drops every tombstone)."""
        started = time.perf_counter()
        dead = self.tombstones
        ids, vectors = self.ids(), self.vectors()
        self._index = self._new_graph()
        self._labels = np.zeros(0, np.int64)
        self._alive = np.zeros(0, bool)
        self._where = {}
        self._live_selection = None
        self._selections.clear()
        if len(ids):
            self._index.add(vectors)
            self._labels = ids.copy()
            self._alive = np.ones(len(ids), bool)
            self._where = {i: n for n, i in enumerate(ids.tolist())}
        log.info(
            "hnsw compacted: %d live, %d tombstones dropped, %.1f s",
            len(ids),
            dead,
            time.perf_counter() - started,
        )

    # --- reads --------------------------------------------------------------------------
    def _params(self, k: int, selection: NodeSelection | None, filtered: bool) -> Any:
        """Search parameters for ``k`` results among the nodes of ``selection`` (None: every
        node). The faiss selector points into the selection's bitmap without owning it: the
        caller keeps ``selection`` referenced until the search has returned. (Made here from
        a filter without a cache key, or a bitmap replaced by another reader, the bitmap was
        freed before the search read it: freed memory decided which nodes passed.)"""
        params = faiss.SearchParametersHNSW()
        tomb = self.tombstones
        over = 1.0 if tomb == 0 else min(4.0, int(self._index.ntotal) / max(len(self), 1))
        params.efSearch = max(self.ef_search, int(np.ceil(k * over)))
        if selection is not None and filtered:
            # Under a filter keeping a fraction f, the beam is widened by sqrt(1/f) (at most
            # 16x): non-matching nodes are walked through but do not count towards the
            # results (1/f cost 4 ms at 10 % over 200k for no recall gain).
            widen = min(16.0, np.sqrt(1.0 / max(selection.fraction, 1e-9)))
            params.efSearch = int(max(self.ef_search, k) * widen)
        if selection is not None:
            params.sel = selection.selector
        return params

    def _selection(self, allowed: IdFilter) -> NodeSelection:
        return self._selections.get(
            allowed, lambda: select_nodes(self._labels, self._alive, allowed)
        )

    def _live_nodes(self) -> NodeSelection | None:
        """The live nodes (None when there are no tombstones)."""
        if self.tombstones == 0:
            return None
        selection = self._live_selection
        if selection is None:  # readers racing here each keep the one they made
            selection = NodeSelection(np.flatnonzero(self._alive).astype(np.int64),
                                      len(self._alive))  # fmt: skip
            self._live_selection = selection
        return selection

    def search(
        self, queries: NDArray[np.float32], k: int, allowed: IdFilter | None = None
    ) -> SearchHits:
        """Top-``k``; ``allowed`` limits the result to those ids, checked during the graph walk
        (a small allowed set is scanned exactly instead)."""
        queries = check_query(queries, k, self.dim)
        q = len(queries)
        scores_out = np.full((q, k), -np.inf, np.float32)
        ids_out = np.full((q, k), -1, np.int64)
        if len(self) == 0 or q == 0:
            return SearchHits(scores_out, ids_out)
        kk = min(k, len(self))
        # referenced until the search returns: the selector reads its bitmap (``_params``)
        selection = self._selection(allowed) if allowed is not None else self._live_nodes()
        if allowed is not None and selection is not None:
            if len(selection.nodes) <= exact_filter_max(self.dim):
                scores, ids = exact_top_k_at(
                    self._storage(), selection.nodes, self._labels[selection.nodes], queries, k
                )
                return SearchHits(scores, ids)
            kk = min(kk, len(selection.nodes))
        params = self._params(kk, selection, filtered=allowed is not None)
        scores, nodes = self._index.search(queries, kk, params=params)
        valid = nodes >= 0
        ids_out[:, :kk] = np.where(valid, self._labels[np.where(valid, nodes, 0)], -1)
        scores_out[:, :kk] = np.where(valid, scores, -np.inf)
        short = valid.sum(axis=1) < kk
        if allowed is not None and selection is not None and short.any():
            # A selective filter can strand the beam among non-matching nodes: scan exactly.
            s, i = exact_top_k_at(
                self._storage(), selection.nodes, self._labels[selection.nodes], queries[short], k
            )
            scores_out[short], ids_out[short] = s, i
        return SearchHits(scores_out, ids_out)

    def ids(self) -> NDArray[np.int64]:
        return self._labels[self._alive].copy()

    def _storage(self) -> NDArray[np.float32]:
        """A view of every node's vector (valid until the next write)."""
        total = int(self._index.ntotal)
        if total == 0:
            return np.zeros((0, self.dim), np.float32)
        storage = faiss.downcast_index(self._index.storage)
        return faiss.rev_swig_ptr(storage.get_xb(), total * self.dim).reshape(total, self.dim)

    def vectors(self) -> NDArray[np.float32]:
        """(N, dim) live vectors in the order of :meth:`ids`."""
        return np.array(self._storage()[self._alive], dtype=np.float32)

    # --- persistence --------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = make_temp(path.parent, ".hnsw")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    graph=faiss.serialize_index(self._index),
                    labels=self._labels,
                    alive=self._alive,
                    config=np.array([self.dim, self.m, self.ef_construction, self.ef_search]),
                    compact_fraction=np.array(self.compact_fraction),
                    format=np.array(FORMAT),
                )
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> HNSWIndex:
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise RuntimeError(f"not a {FORMAT} file")
                dim, m, efc, efs = (int(v) for v in data["config"])
                self = cls(dim, m, efc, efs, float(data["compact_fraction"]))
                self._index = faiss.deserialize_index(data["graph"])
                self._labels = data["labels"].astype(np.int64)
                self._alive = data["alive"].astype(bool)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise RuntimeError(f"cannot read HNSW index ({exc})") from None  # torn, not an npz
        if (
            len(self._labels) != self._index.ntotal
            or len(self._alive) != len(self._labels)
            or self._index.d != dim
        ):
            raise RuntimeError("HNSW index file is inconsistent")
        self._index.hnsw.efSearch = self.ef_search
        live = np.flatnonzero(self._alive)
        self._where = dict(zip(self._labels[live].tolist(), live.tolist(), strict=True))
        return self

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "metric": "inner_product",
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "tombstones": self.tombstones,
            "compact_fraction": self.compact_fraction,
            "memory_bytes": self.memory_bytes(),
        }

    def memory_bytes(self) -> int:
        """Resident bytes (estimated): float vectors, level-0 links, labels, alive flags and
        the id -> node dict (~100 bytes an entry)."""
        return int(self._index.ntotal * (4 * self.dim + 8 * self.m + 109))
