"""Compressed ANN indexes that always re-rank their candidates exactly from float vectors.

Two kinds, both trained on the vectors they hold:

* ``hnsw_sq``: an HNSW graph over 8-bit scalar-quantised vectors (faiss ``IndexHNSWSQ``): a
  quarter of the memory of ``hnsw``, nearly its recall.
* ``ivfpq``: an inverted file over product-quantised codes (faiss ``IVF{nlist},PQ{m}x{nbits}``,
  4-bit codes use the fast-scan kernels; ``opq`` adds a learnt rotation; ``pca`` a projection
  to fewer dimensions, fitted on the vectors): a few bytes a vector.

PQ distances alone rank poorly (recall@10 ~.4 on product-like vectors), so every search fetches
``rerank`` candidates from the codes and orders them by their exact inner product with the
float vectors. Those live in a float32 ``.vectors.npy`` file beside the index, memory-mapped
on load: they cost disk and page cache, not resident memory; vectors added since the last save
are held in memory until the next save.

Removal marks nodes dead (skipped during the search by a bitmap selector) and the index is
rebuilt, and retrained, from the float vectors once dead nodes exceed ``compact_fraction``.
Until ``train_min`` vectors are present the index is untrained and searches exactly.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from snapshop.config import make_temp
from snapshop.index.base import SearchHits, check_ids, check_query, check_vectors, id_array
from snapshop.index.choose import HNSW_COARSE_MIN, ivf_fixed_bytes
from snapshop.index.filtering import (
    SINGLE_THREAD_MAX_QUERIES,
    IdFilter,
    NodeSelection,
    SelectionCache,
    exact_filter_max,
    inner_products_at,
    omp_threads,
    top_k_of_scores,
)
from snapshop.index.hnsw import check_graph_params

log = logging.getLogger(__name__)

LABEL_BYTES = 9  # a node's label (8) and alive flag (1); the id map adds 0 or 16 (IdNodeMap)

FORMAT = "snapshop-reranked/1"
TRAIN_SAMPLE = 100_000  # vectors used to train quantisers (faiss samples larger sets anyway)
# A catalog grows from empty: the quantisers are retrained (the index rebuilt from the float
# vectors) each time it has grown this many times over since the last training, so they
# fit at least 1/RETRAIN_GROWTH of the data (or TRAIN_SAMPLE vectors) at a total cost of
# ~1/(RETRAIN_GROWTH-1) of one build.
RETRAIN_GROWTH = 8


class FloatRows:
    """Float vectors by node: a (memory-mapped) base array plus rows appended since."""

    def __init__(self, dim: int, base: NDArray[np.float32] | None = None) -> None:
        self.dim = dim
        self.base = base if base is not None else np.zeros((0, dim), np.float32)
        self._tail: list[NDArray[np.float32]] = []
        self._tail_rows = 0
        self._tail_cat: NDArray[np.float32] | None = None

    def __len__(self) -> int:
        return len(self.base) + self._tail_rows

    def append(self, vectors: NDArray[np.float32]) -> None:
        self._tail.append(np.array(vectors, dtype=np.float32, copy=True))
        self._tail_rows += len(vectors)
        self._tail_cat = None

    def _tail_array(self) -> NDArray[np.float32]:
        if self._tail_cat is None:
            self._tail_cat = (
                np.concatenate(self._tail) if self._tail else np.zeros((0, self.dim), np.float32)
            )
            self._tail = [self._tail_cat] if self._tail_rows else []
        return self._tail_cat

    def take(self, nodes: NDArray[np.int64]) -> NDArray[np.float32]:
        """(len(nodes), dim) float32 rows, in the order given."""
        nb = len(self.base)
        if len(nodes) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._tail_rows == 0 or nodes.max() < nb:
            return np.asarray(self.base[nodes], dtype=np.float32)
        out = np.empty((len(nodes), self.dim), np.float32)
        low = nodes < nb
        out[low] = self.base[nodes[low]]
        out[~low] = self._tail_array()[nodes[~low] - nb]
        return out

    def inner_products(
        self, nodes: NDArray[np.int64], queries: NDArray[np.float32]
    ) -> NDArray[np.float32]:
        """(Q, len(nodes)) inner products with the rows of ``nodes``, read in place."""
        nb = len(self.base)
        if self._tail_rows == 0 or len(nodes) == 0 or nodes.max() < nb:
            return inner_products_at(self.base, nodes, queries)
        out = np.empty((len(queries), len(nodes)), np.float32)
        low = nodes < nb
        out[:, low] = inner_products_at(self.base, nodes[low], queries)
        out[:, ~low] = inner_products_at(self._tail_array(), nodes[~low] - nb, queries)
        return out

    def chunks(self, size: int = 65_536) -> Any:
        """(start node, rows) in node order, for saving and rebuilding."""
        for s in range(0, len(self.base), size):
            yield s, np.asarray(self.base[s : s + size], dtype=np.float32)
        if self._tail_rows:
            yield len(self.base), self._tail_array()

    @property
    def resident_bytes(self) -> int:
        """Bytes held in process memory (a memory-mapped base counts as none)."""
        base = 0 if isinstance(self.base, np.memmap) else self.base.nbytes
        return int(base + self._tail_rows * self.dim * 4)


class IdNodeMap:
    """Live catalog id -> node, in (almost) no memory of its own.

    Catalog ids arrive in increasing order, so the labels of the first ``ordered`` nodes
    increase strictly: there the labels array is itself the sorted index (a binary search,
    checked against the alive flags). Only nodes added out of order (an id re-added, older
    ids added late) are kept in sorted (id, node) arrays, 16 bytes each, plus a small dict of
    those added since the arrays were last rebuilt. Sorted arrays of every id cost 16 B a
    vector, which put 1M x 512 IVF-PQ (64 B codes) at 105 B/vector instead of 89."""

    def __init__(self) -> None:
        self.ordered = 0  # nodes [0, ordered) have strictly increasing labels
        self._ids = np.zeros(0, np.int64)  # out-of-order live nodes at the last rebuild
        self._nodes = np.zeros(0, np.int64)
        self._recent: dict[int, int] = {}  # id -> node added out of order since then
        self._recent_sorted: tuple[NDArray[np.int64], NDArray[np.int64]] | None = None

    def rebuild(self, labels: NDArray[np.int64], alive: NDArray[np.bool_]) -> None:
        falls = np.flatnonzero(np.diff(labels) <= 0)
        self.ordered = int(falls[0]) + 1 if len(falls) else len(labels)
        rest = self.ordered + np.flatnonzero(alive[self.ordered :]).astype(np.int64)
        order = np.argsort(labels[rest], kind="stable")
        self._ids, self._nodes = labels[rest][order], rest[order]
        self._recent, self._recent_sorted = {}, None

    def added(self, labels: NDArray[np.int64], start: int) -> None:
        """Nodes ``start`` onwards were just appended, labelled ``labels[start:]``."""
        new = labels[start:]
        extend = 0
        if self.ordered == start:  # every node so far is in order: try to stay so
            previous = labels[start - 1 : start] if start else np.array([-1], np.int64)
            falls = np.flatnonzero(np.diff(np.concatenate([previous, new])) <= 0)
            extend = int(falls[0]) if len(falls) else len(new)
            self.ordered += extend
        if extend < len(new):
            nodes = range(start + extend, len(labels))
            self._recent.update(zip(new[extend:].tolist(), nodes, strict=True))
            self._recent_sorted = None

    def lookup(
        self, ids: NDArray[np.int64], labels: NDArray[np.int64], alive: NDArray[np.bool_]
    ) -> NDArray[np.int64]:
        """Live node of each of ``ids``, -1 where the id is not live."""
        ids = np.asarray(ids, dtype=np.int64)
        nodes = np.full(len(ids), -1, np.int64)
        if len(ids) == 0:
            return nodes
        if self.ordered:
            pos = np.minimum(np.searchsorted(labels[: self.ordered], ids), self.ordered - 1)
            hit = (labels[pos] == ids) & alive[pos]
            nodes[hit] = pos[hit]
        if self._recent and self._recent_sorted is None:
            keys = np.fromiter(self._recent, np.int64, len(self._recent))
            vals = np.fromiter(self._recent.values(), np.int64, len(self._recent))
            order = np.argsort(keys)
            self._recent_sorted = keys[order], vals[order]
        sources = [(self._ids, self._nodes)]
        if self._recent_sorted is not None:
            sources.append(self._recent_sorted)
        for keys, vals in sources:
            if len(keys):
                pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
                found = vals[pos]
                # a stale entry's node is dead: at most one node of an id is alive
                hit = (keys[pos] == ids) & alive[found]
                nodes[hit] = found[hit]
        return nodes

    def needs_rebuild(self) -> bool:
        return len(self._recent) > max(4096, len(self._ids) // 16)

    def memory_bytes(self) -> int:
        return int(16 * len(self._ids) + 100 * len(self._recent))


class RerankedIndex:
    """Compressed codes for candidate generation, exact float re-ranking of ``rerank`` of them."""

    kind = "reranked"
    filters_inside = True  # overridden by the concrete kinds below

    def __init__(
        self,
        dim: int,
        rerank: int = 100,
        compact_fraction: float = 0.2,
        train_min: int = 1000,
        **params: Any,
    ) -> None:
        if rerank < 1:
            raise ValueError("rerank must be >= 1")
        if not 0.0 < compact_fraction <= 1.0:
            raise ValueError("compact_fraction must be in (0, 1]")
        if train_min < 1:
            raise ValueError("train_min must be >= 1")
        self.dim = dim
        self.rerank = int(rerank)
        self.compact_fraction = compact_fraction
        self.train_min = int(train_min)
        self.params = self._check_params(params)
        self._index: Any = None  # faiss index over nodes; None while untrained
        self._floats = FloatRows(dim)
        self._labels = np.zeros(0, np.int64)  # node -> catalog id
        self._alive = np.zeros(0, bool)
        self._where = IdNodeMap()  # live catalog id -> node
        self._live = 0
        self._dead_selection: NodeSelection | None = None
        self._selections = SelectionCache()
        self._token = uuid.uuid4().hex
        self._trained_on = 0  # live vectors when last trained

    # --- what differs between kinds -------------------------------------------------------
    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _new_index(self, train: NDArray[np.float32]) -> Any:
        """An untrained faiss index for these (N, dim) training vectors."""
        raise NotImplementedError

    def _search_params(
        self, fetch: int, fraction: float, sel: Any, exhaustive: bool = False
    ) -> Any:
        """faiss search parameters for ``fetch`` candidates under a filter keeping
        ``fraction`` of the vectors (1.0: none) checked by the selector ``sel``."""
        raise NotImplementedError

    def code_bytes_per_vector(self) -> float:
        raise NotImplementedError

    def _train_size(self) -> int:
        return TRAIN_SAMPLE

    # Under a filter keeping a fraction f of the vectors the search is widened by
    # min(widen_max, (1/f)**widen_power) and re-ranks min(deeper_max, (1/f)**deeper_power)
    # times more candidates (below exact_filter_max vectors the allowed set is scanned).
    widen_power, widen_max = 0.5, 16.0
    deeper_power, deeper_max = 0.5, 4.0

    def _widen(self, fraction: float) -> float:
        """How much wider to search when a filter keeps ``fraction`` of the vectors."""
        return float(min(self.widen_max, (1.0 / max(fraction, 1e-9)) ** self.widen_power))

    def _deeper(self, fraction: float) -> float:
        """How many times more candidates to re-rank under such a filter."""
        return float(min(self.deeper_max, (1.0 / max(fraction, 1e-9)) ** self.deeper_power))

    # --- size -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._live

    @property
    def tombstones(self) -> int:
        return len(self._labels) - self._live

    @property
    def trained(self) -> bool:
        return self._index is not None

    # --- writes -----------------------------------------------------------------------------
    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if len(ids) == 0:
            return
        self._kill(ids)
        start = len(self._labels)
        self._floats.append(vectors)
        self._labels = np.concatenate([self._labels, ids])
        self._alive = np.concatenate([self._alive, np.ones(len(ids), bool)])
        self._where.added(self._labels, start)
        self._live += len(ids)
        if self._where.needs_rebuild():
            self._where.rebuild(self._labels, self._alive)
        self._changed()
        if self._index is None and len(self) >= self.train_min:
            self._train_and_fill()
        elif (
            self._index is not None
            and self._trained_on < TRAIN_SAMPLE
            and len(self) >= RETRAIN_GROWTH * self._trained_on
        ):
            self.compact()  # retrains on the grown set
        elif self._index is not None:
            self._index.add(vectors)
        self._maybe_compact()

    def remove(self, ids: NDArray[np.int64]) -> int:
        removed = self._kill(id_array(ids))
        if removed:
            self._changed()
            self._maybe_compact()
        return removed

    def _kill(self, ids: NDArray[np.int64]) -> int:
        nodes = self._where.lookup(ids, self._labels, self._alive)
        found = nodes >= 0
        if not found.any():
            return 0
        dead = np.unique(nodes[found])
        self._alive[dead] = False
        self._live -= len(dead)
        return len(dead)

    def _changed(self) -> None:
        self._dead_selection = None
        self._selections.clear()

    def _maybe_compact(self) -> None:
        if self.tombstones and self.tombstones > self.compact_fraction * len(self._labels):
            self.compact()

    def _train_and_fill(self) -> None:
        started = time.perf_counter()
        live = np.flatnonzero(self._alive)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(live, size=min(len(live), self._train_size()), replace=False))
        train = self._floats.take(sample)
        index = self._new_index(train)
        index.train(train)
        for _, rows in self._floats.chunks():
            index.add(rows)
        self._index = index
        self._trained_on = len(live)
        log.info(
            "%s trained on %d and filled with %d vectors in %.1f s",
            self.kind,
            len(sample),
            len(self._labels),
            time.perf_counter() - started,
        )

    def compact(self) -> None:
        """Rebuild (and retrain) from the live float vectors, dropping every dead node; the
        nodes are put in id order (the id map then needs no memory, IdNodeMap)."""
        live = np.flatnonzero(self._alive)
        live = live[np.argsort(self._labels[live], kind="stable")]
        ids = self._labels[live]
        floats = FloatRows(self.dim)
        for s in range(0, len(live), 65_536):
            floats.append(self._floats.take(live[s : s + 65_536]))
        self._floats = floats
        self._labels = ids.copy()
        self._alive = np.ones(len(ids), bool)
        self._where.rebuild(self._labels, self._alive)
        self._live = len(ids)
        self._index = None
        self._changed()
        if len(ids) >= self.train_min:
            self._train_and_fill()

    # --- reads ------------------------------------------------------------------------------
    def _selection(self, allowed: IdFilter | None) -> NodeSelection | None:
        if allowed is not None:
            return self._selections.get(allowed, lambda: self._select(allowed))
        if self.tombstones == 0:
            return None
        if self._dead_selection is None:
            self._dead_selection = NodeSelection(
                np.flatnonzero(self._alive).astype(np.int64), len(self._alive)
            )
        return self._dead_selection

    def _select(self, allowed: IdFilter) -> NodeSelection:
        # a binary search of the allowed ids (IdNodeMap), not a pass over every label
        nodes = self._where.lookup(allowed.ids, self._labels, self._alive)
        return NodeSelection(np.sort(nodes[nodes >= 0]), len(self._labels))

    def search(
        self, queries: NDArray[np.float32], k: int, allowed: IdFilter | None = None
    ) -> SearchHits:
        queries = check_query(queries, k, self.dim)
        q = len(queries)
        if len(self) == 0 or q == 0:
            return SearchHits(np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64))
        selection = self._selection(allowed)
        if self._index is None or (
            selection is not None
            and allowed is not None
            and len(selection.nodes) <= exact_filter_max(self.dim)
        ):
            nodes = selection.nodes if selection is not None else np.flatnonzero(self._alive)
            scores, ids = top_k_of_scores(
                self._floats.inner_products(nodes, queries), self._labels[nodes], k
            )
            return SearchHits(scores, ids)
        # candidates to re-rank: ``rerank``, and at least twice k (a large k, as filtered
        # product searches ask for, must not be ordered by the codes alone)
        fetch = min(max(2 * k, self.rerank), len(self))
        fraction = 1.0
        if selection is not None:
            fraction = selection.fraction
            # the filtered top-k lie deeper in the unfiltered ranking, where the codes
            # mis-rank more: re-rank deeper (IVF-PQ 4-bit, 100k x 128, 10 % allowed: top-10
            # in 100 candidates .87, in 300 .94)
            fetch = min(int(fetch * self._deeper(fraction)), len(selection.nodes))
        sel = selection.selector if selection else None
        available = len(selection.nodes) if selection is not None else len(self)
        # few queries: one OpenMP thread (as flat.py): with a selector, IVF fast scan split one
        # query over 2 threads and took 22 ms instead of ~1 ms on the busy machine
        threads = 1 if q <= SINGLE_THREAD_MAX_QUERIES else faiss.omp_get_max_threads()
        with omp_threads(threads):
            params = self._search_params(fetch, fraction, sel)
            _, nodes = self._index.search(queries, fetch, params=params)
        short = (nodes >= 0).sum(axis=1) < min(fetch, available)
        scores_out = np.full((q, k), -np.inf, np.float32)
        ids_out = np.full((q, k), -1, np.int64)
        if short.any() and selection is not None and allowed is not None:
            # A selective filter stranded the beam / the probed lists: scan the allowed exactly.
            products = self._floats.inner_products(selection.nodes, queries[short])
            s, i = top_k_of_scores(products, self._labels[selection.nodes], k)
            scores_out[short], ids_out[short] = s, i
            nodes[short] = -1
        elif short.any():  # too few live candidates (tombstones): search those exhaustively
            exhaustive = self._search_params(fetch, fraction, sel, exhaustive=True)
            with omp_threads(threads):
                _, nodes[short] = self._index.search(queries[short], fetch, params=exhaustive)
            short &= (nodes >= 0).sum(axis=1) < min(fetch, available)
            if short.any():
                # The codes still rank too few: a zero query gave 4-bit fast scan nothing to
                # rank (every score ties), and no result at all came back. Scan exactly.
                live = selection.nodes if selection is not None else np.flatnonzero(self._alive)
                products = self._floats.inner_products(live, queries[short])
                s, i = top_k_of_scores(products, self._labels[live], k)
                scores_out[short], ids_out[short] = s, i
        for row, (query, found) in enumerate(zip(queries, nodes, strict=True)):
            if short[row]:
                continue
            found = found[found >= 0]
            products = self._floats.inner_products(found, query[None])
            s, i = top_k_of_scores(products, self._labels[found], k)
            scores_out[row], ids_out[row] = s[0], i[0]
        return SearchHits(scores_out, ids_out)

    def ids(self) -> NDArray[np.int64]:
        return self._labels[self._alive].copy()

    def vectors(self) -> NDArray[np.float32]:
        """(N, dim) live float vectors in the order of :meth:`ids`."""
        return self._floats.take(np.flatnonzero(self._alive))

    # --- memory -----------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Resident bytes (estimated): codes and structure, labels, id map, unsaved floats."""
        return int(
            len(self._labels) * (self.code_bytes_per_vector() + LABEL_BYTES)
            + self._where.memory_bytes()
            + self.fixed_bytes()
            + self._floats.resident_bytes
        )

    def fixed_bytes(self) -> int:
        """Bytes that do not grow with the number of vectors (centroids, rotations)."""
        return 0

    # --- persistence --------------------------------------------------------------------------
    @staticmethod
    def vectors_path(path: Path) -> Path:
        return Path(path).with_suffix(".vectors.npy")

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        vec_path = self.vectors_path(path)
        fd, tmp_vec = make_temp(path.parent, ".npy")
        os.close(fd)
        fd, tmp = make_temp(path.parent, ".reranked")
        try:
            out = np.lib.format.open_memmap(
                tmp_vec, mode="w+", dtype=np.float32, shape=(len(self._floats), self.dim)
            )
            for start, rows in self._floats.chunks():
                out[start : start + len(rows)] = rows
            out.flush()
            fingerprint = vectors_fingerprint(out)
            del out
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    graph=(
                        faiss.serialize_index(self._index)
                        if self._index is not None
                        else np.zeros(0, np.uint8)
                    ),
                    labels=self._labels,
                    alive=self._alive,
                    config=np.array(repr(self._config())),
                    token=np.array(token),
                    vectors=np.array(fingerprint),
                    trained_on=np.array(self._trained_on),
                    format=np.array(FORMAT),
                )
                fh.flush()
                os.fsync(fh.fileno())
            with open(tmp_vec, "rb") as vf:
                os.fsync(vf.fileno())
            # The vectors first: a crash in between leaves a main file whose fingerprint of
            # the vectors does not match, which load refuses (the catalog then rebuilds from
            # its store).
            tmp_vec.replace(vec_path)
            tmp.replace(path)
        finally:
            tmp_vec.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        self._floats = FloatRows(self.dim, np.load(vec_path, mmap_mode="r"))
        self._token = token

    def _config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "rerank": self.rerank,
            "compact_fraction": self.compact_fraction,
            "train_min": self.train_min,
            "params": self.params,
        }

    @classmethod
    def load(cls, path: Path) -> RerankedIndex:
        import ast

        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise RuntimeError(f"not a {FORMAT} file")
                config = ast.literal_eval(str(data["config"]))
                graph = data["graph"]
                labels = data["labels"].astype(np.int64)
                alive = data["alive"].astype(bool)
                token = str(data["token"])
                trained_on = int(data["trained_on"])
                fingerprint = str(data["vectors"]) if "vectors" in data else None
            floats = np.load(cls.vectors_path(path), mmap_mode="r")
        except (OSError, ValueError, KeyError, SyntaxError, EOFError, zipfile.BadZipFile) as exc:
            raise RuntimeError(f"cannot read {cls.kind} index ({exc})") from None  # torn too
        if not isinstance(config, dict) or not isinstance(config.get("params"), dict):
            raise RuntimeError(f"cannot read {cls.kind} index (its configuration is damaged)")
        kind_cls = RERANKED_KINDS.get(str(config.get("kind")))
        if kind_cls is None:
            raise RuntimeError(f"unknown reranked kind {config.get('kind')!r}")
        self = kind_cls(
            int(config["dim"]),
            rerank=int(config["rerank"]),
            compact_fraction=float(config["compact_fraction"]),
            train_min=int(config["train_min"]),
            **config["params"],
        )
        if (
            floats.shape != (len(labels), self.dim)
            or len(alive) != len(labels)
            or (fingerprint is not None and fingerprint != vectors_fingerprint(floats))
        ):
            raise RuntimeError("index and its vectors file do not match (interrupted save?)")
        if len(graph):
            self._index = faiss.deserialize_index(graph)
            if self._index.ntotal != len(labels) or self._index.d != self.dim:
                raise RuntimeError("index file is inconsistent")
        self._floats = FloatRows(self.dim, floats)
        self._labels, self._alive, self._token = labels, alive, token
        self._trained_on = trained_on
        self._where.rebuild(labels, alive)
        self._live = int(alive.sum())
        return self

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "metric": "inner_product",
            "rerank": self.rerank,
            "trained": self.trained,
            "tombstones": self.tombstones,
            "compact_fraction": self.compact_fraction,
            **self.params,
            "memory_bytes": self.memory_bytes(),
            "float_vectors": "memory-mapped .vectors.npy beside the index",
        }


def vectors_fingerprint(vectors: NDArray[np.float32], samples: int = 256) -> str:
    """A digest of a vectors file's shape and of rows spread over it: which save wrote the
    file, told apart cheaply (a whole-file hash would read gigabytes on every open)."""
    import hashlib

    n = len(vectors)
    rows = np.unique(np.linspace(0, max(n - 1, 0), min(n, samples)).astype(np.int64))
    digest = hashlib.sha256(repr(vectors.shape).encode())
    digest.update(np.ascontiguousarray(vectors[rows], dtype=np.float32).tobytes())
    return digest.hexdigest()


class HNSWSQIndex(RerankedIndex):
    """HNSW over 8-bit scalar-quantised vectors, re-ranked exactly."""

    kind = "hnsw_sq"

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        out = {"m": 32, "ef_construction": 40, "ef_search": 128}
        unknown = set(params) - set(out)
        if unknown:
            raise ValueError(f"unknown hnsw_sq parameters {sorted(unknown)}")
        out.update(params)
        check_graph_params(out["m"], out["ef_construction"], out["ef_search"])
        return {k: int(v) for k, v in out.items()}

    @property
    def ef_search(self) -> int:
        return int(self.params["ef_search"])

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.params["ef_search"] = int(value)

    def _new_index(self, train: NDArray[np.float32]) -> Any:
        index = faiss.IndexHNSWSQ(
            self.dim, faiss.ScalarQuantizer.QT_8bit, self.params["m"], faiss.METRIC_INNER_PRODUCT
        )
        index.hnsw.efConstruction = self.params["ef_construction"]
        return index

    def _search_params(
        self, fetch: int, fraction: float, sel: Any, exhaustive: bool = False
    ) -> Any:
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(max(self.params["ef_search"], fetch) * self._widen(fraction))
        if exhaustive:
            params.efSearch = max(params.efSearch * 4, int(self._index.ntotal))
        if sel is not None:
            params.sel = sel
        return params

    def code_bytes_per_vector(self) -> float:
        return float(self.dim + 8 * self.params["m"])

    # a graph walk passes non-matching nodes on its way; a beam 1/f wider was needlessly slow
    # (4 ms at 10 % over 200k) where sqrt(1/f) keeps recall (tests/test_index_budget.py)
    widen_power = 0.5


class IVFPQIndex(RerankedIndex):
    """Inverted file over PQ codes (4-bit fast scan by default, optional OPQ), re-ranked."""

    kind = "ivfpq"

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nlist": 1024,
            "pq_m": 32,
            "nbits": 4,
            "nprobe": 32,
            "opq": False,
            "pca": 0,
        }
        unknown = set(params) - set(out)
        if unknown:
            raise ValueError(f"unknown ivfpq parameters {sorted(unknown)}")
        for key, value in params.items():
            out[key] = bool(value) if key == "opq" else int(value)
        if out["nbits"] not in (4, 8):
            raise ValueError("nbits must be 4 (fast scan) or 8")
        if not 0 <= out["pca"] < self.dim:
            raise ValueError(f"pca must be 0 (none) or a dimension under {self.dim}")
        reduced = out["pca"] or self.dim
        if out["pq_m"] < 1 or reduced % out["pq_m"]:
            raise ValueError(f"pq_m must divide the dimension {reduced}")
        if out["nlist"] < 1 or out["nprobe"] < 1:
            raise ValueError("nlist and nprobe must be >= 1")
        return out

    @property
    def nprobe(self) -> int:
        return int(self.params["nprobe"])

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.params["nprobe"] = int(value)

    def _train_size(self) -> int:
        return max(TRAIN_SAMPLE, 40 * int(self.params["nlist"]))  # k-means wants ~39 a list

    # Probing 1/f times more lists (as many allowed candidates as unfiltered) put more
    # candidates before the same codes and lost recall; what the filtered top-10 need is a
    # deeper re-rank (they lie ~1/f deeper in the unfiltered ranking, among more candidates).
    # 200k x 512, 64 B codes, 10 % allowed: nprobe x 1/f, re-rank x sqrt(1/f): recall .927;
    # nprobe x sqrt(1/f), re-rank x 1/f: .995. At 1M x 512 the latter gave .918 (10 %) and
    # .889 (3 %); re-rank x min(40, 1/f^2), i.e. up to 4,000 candidates: .963 and .976.
    widen_power = 0.5
    deeper_power, deeper_max = 2.0, 40.0

    def _nlist_for(self, n_train: int) -> int:
        # k-means wants ~39 training points per list; a small catalog gets fewer lists.
        return max(1, min(self.params["nlist"], n_train // 39))

    def _new_index(self, train: NDArray[np.float32]) -> Any:
        p = self.params
        self._nlist = self._nlist_for(len(train))
        reduced = p["pca"] or self.dim
        codes = f"PQ{p['pq_m']}x4fs" if p["nbits"] == 4 else f"PQ{p['pq_m']}x8"
        # many lists: find the nearest ones through an HNSW graph rather than a scan of all
        coarse = (
            f"IVF{self._nlist}_HNSW32" if self._nlist >= HNSW_COARSE_MIN else f"IVF{self._nlist}"
        )
        key = (f"OPQ{p['pq_m']}," if p["opq"] else "") + f"{coarse},{codes}"
        index = faiss.index_factory(reduced, key, faiss.METRIC_INNER_PRODUCT)
        if p["pca"]:
            index = faiss.IndexPreTransform(pca_projection(train, p["pca"]), index)
        return index

    def _search_params(
        self, fetch: int, fraction: float, sel: Any, exhaustive: bool = False
    ) -> Any:
        ivf = faiss.extract_index_ivf(self._index)
        params = faiss.SearchParametersIVF()
        # enough lists to hold the allowed candidates twice over (a large fetch probes more)
        per_list = max(ivf.ntotal / ivf.nlist * fraction, 1.0)
        nprobe = max(self.params["nprobe"] * self._widen(fraction), 2 * fetch / per_list)
        params.nprobe = ivf.nlist if exhaustive else int(min(ivf.nlist, np.ceil(nprobe)))
        if sel is not None:
            params.sel = sel
        if self.params["opq"] or self.params["pca"]:
            outer = faiss.SearchParametersPreTransform()
            outer.index_params = params
            outer._inner = params  # keep the inner object alive as long as the outer one
            return outer
        return params

    def fixed_bytes(self) -> int:
        p = self.params
        return ivf_fixed_bytes(self.dim, p["nlist"], p["pq_m"], p["nbits"], p["pca"], p["opq"])

    def code_bytes_per_vector(self) -> float:
        # codes plus the 8-byte id each inverted list stores
        return self.params["pq_m"] * self.params["nbits"] / 8 + 8


def pca_projection(train: NDArray[np.float32], dims: int) -> Any:
    """A faiss transform onto the ``dims`` principal axes of ``train`` (N, d), not centred:
    inner products are what is searched, and a centred projection ranks the stored vectors x
    by <q - mu, x - mu>, i.e. by <q - mu, x>, not <q, x>. The axes are those of the second
    moment X^T X, which keep <q, x> best in ``dims`` dimensions."""
    x = np.asarray(train, dtype=np.float64)
    values, vectors = np.linalg.eigh(x.T @ x / max(len(x), 1))
    top = vectors[:, ::-1][:, :dims].T  # (dims, d), the largest eigenvalues first
    kept = float(values[::-1][:dims].sum() / max(values.sum(), 1e-30))
    log.info("pca %d -> %d keeps %.3f of the second moment", x.shape[1], dims, kept)
    transform = faiss.LinearTransform(x.shape[1], dims, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(top, dtype=np.float32).ravel(), transform.A)
    transform.is_trained = True
    return transform


RERANKED_KINDS: dict[str, type[RerankedIndex]] = {"hnsw_sq": HNSWSQIndex, "ivfpq": IVFPQIndex}
