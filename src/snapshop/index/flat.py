"""Exact inner-product search: faiss IndexFlatIP behind an id map."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from snapshop.config import make_temp
from snapshop.index.base import (
    CHECKSUM_CHUNK,
    FILE_CHECKSUM,
    SearchHits,
    check_ids,
    check_query,
    check_vectors,
    crc32_of_file,
    id_array,
)
from snapshop.index.filtering import (
    SINGLE_THREAD_MAX_QUERIES,
    IdFilter,
    NodeSelection,
    SelectionCache,
    exact_filter_max,
    exact_top_k_at,
    omp_threads,
    select_nodes,
)

__all__ = ["SINGLE_THREAD_MAX_QUERIES", "FlatIndex", "omp_threads", "write_faiss_atomic"]

# faiss only uses BLAS for batches over this many queries; the default (20) routes small
# batches through a slow scalar path on these CPUs (see shared/NOTES.md).
faiss.cvar.distance_compute_blas_threshold = 1


def write_faiss_atomic(index: faiss.Index, path: Path) -> int:
    """Write ``index`` to ``path`` atomically; returns the file's CRC-32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path.parent, ".faiss")
    os.close(fd)
    try:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as exc:  # faiss reports a failed write (a full disk) this way
            raise OSError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from None
        with open(tmp, "rb") as fh:
            crc = crc32_of_file(fh)
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return crc


def read_faiss_checked(path: Path) -> tuple[faiss.Index, int]:
    """The index saved at ``path`` and the file's CRC-32, taken from the very bytes faiss
    reads (one pass; a file replaced meanwhile cannot pair one file's index with another's
    checksum)."""
    crc = 0
    with open(path, "rb") as fh:

        def read(size: int) -> bytes:
            nonlocal crc
            chunk = fh.read(size)
            crc = zlib.crc32(chunk, crc)
            return chunk

        index = faiss.read_index(faiss.PyCallbackIOReader(read, CHECKSUM_CHUNK))
        return index, crc32_of_file(fh, crc)  # and any bytes past the index


class FlatIndex:
    """Exact search; ``add`` with an existing id replaces its vector."""

    kind = "flat"
    filters_inside = True

    def __init__(self, dim: int, index: faiss.IndexIDMap2 | None = None) -> None:
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._selections = SelectionCache()
        # the CRC-32 of the file this index was last saved to or loaded from, while it still
        # holds what that file holds; it goes into the card, which load_index checks
        self.file_crc32: int | None = None

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if len(ids) == 0:
            return
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)
        self._selections.clear()
        self.file_crc32 = None

    def remove(self, ids: NDArray[np.int64]) -> int:
        ids = id_array(ids)
        if len(ids) == 0 or len(self) == 0:
            return 0
        self._selections.clear()
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        if removed:
            self.file_crc32 = None
        return removed

    def _select(self, allowed: IdFilter) -> NodeSelection:
        return self._selections.get(allowed, lambda: select_nodes(self.ids(), None, allowed))

    def search(
        self, queries: NDArray[np.float32], k: int, allowed: IdFilter | None = None
    ) -> SearchHits:
        """Exact top-``k``; ``allowed`` limits the result to those ids (scanned during the
        search: a small allowed set is gathered and scanned alone)."""
        queries = check_query(queries, k, self.dim)
        if len(self) == 0 or len(queries) == 0:
            q = len(queries)
            return SearchHits(np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64))
        selection = self._select(allowed) if allowed is not None else None
        if selection is not None and len(selection.nodes) <= exact_filter_max(self.dim):
            labels = faiss.rev_swig_ptr(self._index.id_map.data(), len(self))
            scores, ids = exact_top_k_at(
                self._stored(), selection.nodes, np.asarray(labels)[selection.nodes], queries, k
            )
            return SearchHits(scores, ids)
        params = None
        if selection is not None:
            params = faiss.SearchParameters()
            params.sel = selection.selector
        with omp_threads(
            1 if len(queries) <= SINGLE_THREAD_MAX_QUERIES else faiss.omp_get_max_threads()
        ):
            scores, nodes = self._index.index.search(queries, k, params=params)
        labels = faiss.rev_swig_ptr(self._index.id_map.data(), len(self))
        ids = np.where(nodes >= 0, np.asarray(labels)[np.maximum(nodes, 0)], -1)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return SearchHits(scores, ids.astype(np.int64))

    def ids(self) -> NDArray[np.int64]:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def _stored(self) -> NDArray[np.float32]:
        """A view of the stored (N, dim) vectors (valid until the next write)."""
        inner = faiss.downcast_index(self._index.index)
        return faiss.rev_swig_ptr(inner.get_xb(), len(self) * self.dim).reshape(-1, self.dim)

    def vectors(self) -> NDArray[np.float32]:
        """(N, dim) in the order of :meth:`ids`."""
        if len(self) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.index.reconstruct_n(0, len(self))

    def save(self, path: Path) -> None:
        self.file_crc32 = write_faiss_atomic(self._index, path)

    @classmethod
    def load(cls, path: Path) -> FlatIndex:
        """The index saved at ``path``; RuntimeError for any other faiss index (an L2 one
        ranked by distance, as if it were a score; a bare one failed on the first search).
        Its :attr:`file_crc32` is the file's, for the caller to compare with the card's."""
        index, crc = read_faiss_checked(Path(path))
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
        if not (
            isinstance(inner, faiss.IndexFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT
        ):
            raise RuntimeError(
                f"not an exact inner-product index with ids ({type(inner or index).__name__})"
            )
        self = cls(index.d, index)
        self.file_crc32 = crc
        return self

    def memory_bytes(self) -> int:
        return int(len(self) * (4 * self.dim + 8))

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "metric": "inner_product",
            "memory_bytes": self.memory_bytes(),
            **({FILE_CHECKSUM: self.file_crc32} if self.file_crc32 is not None else {}),
        }
