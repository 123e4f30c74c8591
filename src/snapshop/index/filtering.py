"""Filters applied inside the search: which catalog ids a query may return.

The search layer turns a product filter into the set of index entry ids it allows (an
:class:`IdFilter`); a backend turns that into a faiss selector over its own nodes (a bitmap,
checked during the scan or the graph walk, so nothing is fetched and thrown away). When the
allowed set is small, scanning exactly the allowed vectors is both faster and exact, so every
backend does that below ``exact_max`` vectors: correct at any selectivity.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

# Exact scan of the allowed vectors while it reads at most this many bytes: 31k vectors of
# 256-d, 15.6k of 512-d, 6k of 1280-d. Read in place (``inner_products_at``) the scan of 1 % of
# 1M x 512 (10k rows, 20 MB) took 1.3-1.7 ms with recall 1.000 on the busy machine; 3 % (30k
# scattered rows) took 11-12 ms, slower than IVF-PQ with a selector at 10 % (7.9 ms, recall
# .982), so larger allowed sets go through the index (docs/benchmarks/index.md).
EXACT_FILTER_BYTES = 32_000_000
EXACT_FILTER_MIN = 1024  # however wide the vectors, this many are always scanned exactly


@dataclass(frozen=True, eq=False)
class IdFilter:
    """Allowed ids (sorted, unique int64). ``key`` names the filter for caching: the same key
    must always mean the same ids (the catalog puts its generation into it); None: no cache."""

    ids: NDArray[np.int64]
    key: Hashable | None = None

    @classmethod
    def of(cls, ids: Any, key: Hashable | None = None) -> IdFilter:
        return cls(np.unique(np.asarray(ids, dtype=np.int64).reshape(-1)), key)

    def __len__(self) -> int:
        return len(self.ids)


# A query or a few run on one OpenMP thread. Requests already arrive on parallel threads, and a
# team of 2 per search makes OpenMP spin on a busy 2-core machine: at load average 3.6, one
# query over 641 x 512 took 24 ms with 2 threads and 0.3 ms with 1; over 100k x 256, 40 vs 18 ms.
SINGLE_THREAD_MAX_QUERIES = 16


@contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads on the calling thread (the setting is per thread)."""
    import faiss

    previous = faiss.omp_get_max_threads()
    if previous == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def exact_filter_max(dim: int) -> int:
    """Largest allowed set scanned exactly rather than through the ANN structure."""
    return max(EXACT_FILTER_MIN, EXACT_FILTER_BYTES // (4 * dim))


class NodeSelection:
    """The nodes of one index an :class:`IdFilter` allows, with a faiss bitmap selector."""

    def __init__(self, nodes: NDArray[np.int64], total: int) -> None:
        import faiss  # here, not at import: the package imports this module without faiss

        self.nodes = nodes  # sorted node numbers
        self.total = total
        mask = np.zeros(total, bool)
        mask[nodes] = True
        self._bitmap = np.packbits(mask, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(total, faiss.swig_ptr(self._bitmap))

    @property
    def fraction(self) -> float:
        return len(self.nodes) / max(self.total, 1)


def select_nodes(
    labels: NDArray[np.int64], alive: NDArray[np.bool_] | None, allowed: IdFilter
) -> NodeSelection:
    """Nodes whose label is allowed (and alive). ``labels`` maps node -> catalog id."""
    ok = np.isin(labels, allowed.ids, assume_unique=alive is None)
    if alive is not None:
        ok &= alive
    return NodeSelection(np.flatnonzero(ok).astype(np.int64), len(labels))


class SelectionCache:
    """Remembers the selection of the last few filters until the index changes."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: dict[Hashable, NodeSelection] = {}
        self._lock = threading.Lock()  # searches run on several threads

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, allowed: IdFilter, make: Any) -> NodeSelection:
        if allowed.key is None:
            return make()
        with self._lock:
            found = self._items.get(allowed.key)
            if found is None:
                found = make()
                if len(self._items) >= self.size:
                    self._items.pop(next(iter(self._items)))
                self._items[allowed.key] = found
            return found


def inner_products(vectors: NDArray[np.float32], queries: NDArray[np.float32]) -> NDArray[Any]:
    """(Q, M) inner products. A few queries go through faiss' single-threaded SIMD kernel:
    numpy's OpenBLAS threads a (1, d) x (d, M) product, which on the busy 2-core machine took
    2.5-16 ms instead of 0.05 ms for M = 2000, d = 256."""
    if len(queries) > SINGLE_THREAD_MAX_QUERIES:
        return queries @ vectors.T
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    out = np.empty((len(queries), len(vectors)), np.float32)
    n, dim = vectors.shape
    for row, query in enumerate(np.ascontiguousarray(queries, dtype=np.float32)):
        ptrs = faiss.swig_ptr(out[row]), faiss.swig_ptr(query), faiss.swig_ptr(vectors)
        faiss.fvec_inner_products_ny(*ptrs, dim, n)
    return out


def inner_products_at(
    store: NDArray[np.float32], rows: NDArray[np.int64], queries: NDArray[np.float32]
) -> NDArray[np.float32]:
    """(Q, len(rows)) inner products of ``queries`` with ``store[rows]``, reading the rows in
    place (``store``: a C-contiguous (N, d) float32 array, memory-mapped or not).

    Gathering the rows first copied them: at 1M x 512, 10,000 scattered rows out of the
    memory-mapped float file took 2-5 ms to gather, then 0.8 ms to score; scored in place
    (faiss ``fvec_inner_products_by_idx`` on one thread) they take ~1 ms in all. Many queries
    gather once and go through BLAS."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(store)):
        raise IndexError("row outside the store")  # the kernel does not check
    if len(queries) > SINGLE_THREAD_MAX_QUERIES or not (
        store.flags.c_contiguous and store.dtype == np.float32
    ):
        return inner_products(np.asarray(store[rows], dtype=np.float32), queries)
    import faiss

    out = np.empty((len(queries), len(rows)), np.float32)
    dim = store.shape[1]
    # one thread: the kernel parallelises over queries (one here) and a team of 2 spun on the
    # shared machine (p50 8.8 ms against 1.1 ms with one thread)
    with omp_threads(1):
        for row, query in enumerate(queries):
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(out[row]),
                faiss.swig_ptr(query),
                faiss.swig_ptr(store),
                faiss.swig_ptr(rows),
                dim,
                1,
                len(rows),
            )
    return out


def top_k_of_scores(
    scores: NDArray[np.float32], labels: NDArray[np.int64], k: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Top-``k`` of ``scores`` (Q, M) as (scores, labels), padded with (-inf, -1); ties keep
    the lower position (a stable order)."""
    q, m = scores.shape
    scores_out = np.full((q, k), -np.inf, np.float32)
    ids_out = np.full((q, k), -1, np.int64)
    if m == 0 or q == 0:
        return scores_out, ids_out
    kk = min(k, m)
    if kk < m:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(m), (q, m))
    top = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -top), axis=1)
    best = np.take_along_axis(part, order, axis=1)
    scores_out[:, :kk] = np.take_along_axis(scores, best, axis=1)
    ids_out[:, :kk] = labels[best]
    return scores_out, ids_out


def exact_top_k(
    vectors: NDArray[np.float32], labels: NDArray[np.int64], queries: NDArray[np.float32], k: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Top-``k`` of ``queries`` (Q, d) over ``vectors`` (M, d) labelled ``labels`` (M,), padded
    with (-inf, -1); ties keep the lower position (a stable order)."""
    if len(vectors) == 0 or len(queries) == 0:
        return top_k_of_scores(np.zeros((len(queries), 0), np.float32), labels, k)
    return top_k_of_scores(inner_products(vectors, queries), labels, k)


def exact_top_k_at(
    store: NDArray[np.float32],
    rows: NDArray[np.int64],
    labels: NDArray[np.int64],
    queries: NDArray[np.float32],
    k: int,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """:func:`exact_top_k` over ``store[rows]`` (labelled ``labels``), read in place."""
    return top_k_of_scores(inner_products_at(store, rows, queries), labels, k)
