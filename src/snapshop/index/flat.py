"""Exact inner-product search: faiss IndexFlatIP behind an id map."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from snapshop.index.base import SearchHits, check_ids, check_vectors

# faiss only uses BLAS for batches over this many queries; the default (20) routes small
# batches through a slow scalar path on these CPUs (see shared/NOTES.md).
faiss.cvar.distance_compute_blas_threshold = 1

# A query or a few run on one OpenMP thread. Requests already arrive on parallel threads, and a
# team of 2 per search makes OpenMP spin on a busy 2-core machine: at load average 3.6, one
# query over 641 x 512 took 24 ms with 2 threads and 0.3 ms with 1; over 100k x 256, 40 vs 18 ms.
SINGLE_THREAD_MAX_QUERIES = 16


@contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads on the calling thread (the setting is per thread)."""
    previous = faiss.omp_get_max_threads()
    if previous == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def write_faiss_atomic(index: faiss.Index, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".faiss.tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class FlatIndex:
    """Exact search; ``add`` with an existing id replaces its vector."""

    kind = "flat"

    def __init__(self, dim: int, index: faiss.IndexIDMap2 | None = None) -> None:
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if len(ids) == 0:
            return
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: NDArray[np.int64]) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0 or len(self) == 0:
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, queries: NDArray[np.float32], k: int) -> SearchHits:
        queries = check_vectors(queries, self.dim)
        if k < 1:
            raise ValueError("k must be >= 1")
        if len(self) == 0 or len(queries) == 0:
            q = len(queries)
            return SearchHits(np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64))
        if len(queries) <= SINGLE_THREAD_MAX_QUERIES:
            with omp_threads(1):
                scores, ids = self._index.search(queries, k)
        else:
            scores, ids = self._index.search(queries, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return SearchHits(scores, ids.astype(np.int64))

    def ids(self) -> NDArray[np.int64]:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def vectors(self) -> NDArray[np.float32]:
        """(N, dim) in the order of :meth:`ids`."""
        if len(self) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.index.reconstruct_n(0, len(self))

    def save(self, path: Path) -> None:
        write_faiss_atomic(self._index, path)

    @classmethod
    def load(cls, path: Path) -> FlatIndex:
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        return cls(index.d, index)

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "count": len(self), "metric": "inner_product"}
