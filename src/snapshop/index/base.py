"""The VectorIndex protocol every backend (exact, ANN, server) implements."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

# The card key of the CRC-32 of an index file whose format has no checksum of its own (faiss
# files: a flipped vector byte loads and is searched). The zip-based kinds' files carry CRCs.
FILE_CHECKSUM = "file_crc32"
CHECKSUM_CHUNK = 8 << 20


@dataclass(frozen=True)
class SearchHits:
    """Top-k per query: ``scores`` (Q, k) float32 inner products, ``ids`` (Q, k) int64.

    Missing results (fewer than k vectors) have id -1 and score -inf.
    """

    scores: NDArray[np.float32]
    ids: NDArray[np.int64]


@runtime_checkable
class VectorIndex(Protocol):
    """Inner-product search over L2-normalised vectors, keyed by int64 ids."""

    kind: str
    dim: int

    def __len__(self) -> int: ...

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        """Add or replace ``vectors`` (N, dim) under ``ids`` (N,)."""

    def remove(self, ids: NDArray[np.int64]) -> int:
        """Remove ``ids``; unknown ids are ignored. Returns how many were removed."""

    def search(self, queries: NDArray[np.float32], k: int) -> SearchHits:
        """Top-``k`` by inner product for each of the (Q, dim) queries.

        Backends with ``filters_inside = True`` also take ``allowed`` (an
        ``index.filtering.IdFilter``): only those ids are returned, applied during the search.
        """

    def ids(self) -> NDArray[np.int64]:
        """Every id in the index (any order)."""

    def save(self, path: Path) -> None:
        """Persist to ``path`` atomically."""

    def info(self) -> dict[str, Any]:
        """Parameters for the index card."""


def check_vectors(vectors: NDArray[Any], dim: int) -> NDArray[np.float32]:
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (N, {dim}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("vectors contain NaN or infinity")
    return arr


def check_query(queries: NDArray[Any], k: int, dim: int) -> NDArray[np.float32]:
    """The (Q, dim) ``queries`` of a top-``k`` search as float32 (ValueError unless ``k`` is
    a whole number >= 1)."""
    if isinstance(k, bool | np.bool_) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, not {k!r}")
    return check_vectors(queries, dim)


def id_array(ids: Any) -> NDArray[np.int64]:
    """``ids`` as a flat int64 array; ValueError for what no catalog id can be (a fraction,
    a bool, text, a number beyond int64), which a plain cast truncated (1.7 became id 1) or
    failed on with a raw OverflowError."""
    raw = np.asarray(ids)
    if raw.size == 0:
        return np.zeros(0, np.int64)
    if raw.dtype.kind == "u" and raw.max() > np.iinfo(np.int64).max:
        raise ValueError("ids must fit a signed 64-bit integer")
    if raw.dtype.kind == "f" and not np.all(
        np.isfinite(raw) & (raw == np.round(raw)) & (np.abs(raw) < 2.0**63)
    ):
        raise ValueError("ids must be whole numbers within a signed 64-bit integer")
    if raw.dtype.kind not in "iuf":  # bools, text, Python ints beyond 64 bits (object)
        raise ValueError(f"ids must be whole numbers within int64, not {raw.dtype} values")
    return np.ascontiguousarray(raw, dtype=np.int64).reshape(-1)


def check_ids(ids: NDArray[Any], n: int) -> NDArray[np.int64]:
    arr = id_array(ids)
    if len(arr) != n:
        raise ValueError(f"got {len(arr)} ids for {n} vectors")
    if len(np.unique(arr)) != len(arr):
        raise ValueError("duplicate ids in one add")
    if (arr < 0).any():
        raise ValueError("ids must be non-negative")
    return arr


def crc32_of_file(fh: Any, crc: int = 0) -> int:
    """The CRC-32 of what is left to read of the binary file ``fh``, continuing ``crc``."""
    buffer = bytearray(CHECKSUM_CHUNK)
    view = memoryview(buffer)
    while size := fh.readinto(buffer):
        crc = zlib.crc32(view[:size], crc)
    return crc
