"""Measure an index on its own vectors: recall@10 against exact search, single-query latency.

The exact neighbours are computed by streaming the float vectors in chunks (the catalog's
store, or any iterator of ``(ids, vectors)``), so no second full copy is held in memory.
``tune`` then widens the search-time parameters (``ef_search``, ``nprobe``, ``rerank``) until
the target recall is met or the latency budget is spent, autofaiss-style.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.index.base import VectorIndex

log = logging.getLogger(__name__)

Chunks = Iterable[tuple[NDArray[np.int64], NDArray[np.float32]]]


def exact_neighbours(queries: NDArray[np.float32], chunks: Chunks, k: int) -> NDArray[np.int64]:
    """(Q, k) ids of the exact top-``k`` inner products over every chunk."""
    q = len(queries)
    best_s = np.full((q, k), -np.inf, np.float32)
    best_i = np.full((q, k), -1, np.int64)
    for ids, vecs in chunks:
        if len(ids) == 0:
            continue
        scores = queries @ np.asarray(vecs, dtype=np.float32).T
        all_s = np.concatenate([best_s, scores], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k] if all_s.shape[1] > k else None
        if top is not None:
            best_s = np.take_along_axis(all_s, top, axis=1)
            best_i = np.take_along_axis(all_i, top, axis=1)
        else:
            best_s, best_i = all_s, all_i
    return best_i


def recall_at(found: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    """Mean share of each query's exact neighbours that were found (padding -1 ignored)."""
    shares = []
    for f, t in zip(found, truth, strict=True):
        t = set(t[t >= 0].tolist())
        if t:
            shares.append(len(t & set(f.tolist())) / len(t))
    return float(np.mean(shares)) if shares else 1.0


def measure(
    index: VectorIndex, queries: NDArray[np.float32], truth: NDArray[np.int64], k: int = 10
) -> dict[str, Any]:
    """recall@k vs ``truth`` and p50/p99 of one query at a time (ms)."""
    for q in queries[: min(5, len(queries))]:  # warm-up
        index.search(q[None], k)
    found = np.empty((len(queries), k), np.int64)
    lat = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        found[i] = index.search(q[None], k).ids[0]
        lat.append((time.perf_counter() - t) * 1e3)
    return {
        f"recall_at_{k}": round(recall_at(found, truth[:, :k]), 4),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "queries": len(queries),
    }


def _knobs(index: Any) -> list[tuple[str, Callable[[], int], Callable[[int], None]]]:
    """Search-time parameters that trade latency for recall, in the order they are raised."""
    out = []
    for name in ("ef_search", "nprobe", "rerank"):
        if hasattr(index, name):
            out.append((name, lambda n=name: int(getattr(index, n)),
                        lambda v, n=name: setattr(index, n, v)))  # fmt: skip
    return out


def tune(
    index: VectorIndex,
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    target_recall: float,
    max_query_ms: float,
    rounds: int = 4,
) -> dict[str, Any]:
    """Measure; while recall is under target and p50 under budget, double the search-time
    parameters and measure again. Keeps the last setting that stayed within the latency
    budget. Returns the final measurement (with the parameters it settled on)."""
    result = measure(index, queries, truth)
    knobs = _knobs(index)
    for _ in range(rounds):
        if result["recall_at_10"] >= target_recall or not knobs:
            break
        previous = {name: get() for name, get, _ in knobs}
        for _name, get, put in knobs:
            put(get() * 2)
        widened = measure(index, queries, truth)
        if widened["p50_ms"] > max_query_ms:
            for name, _, put in knobs:
                put(previous[name])
            break
        result = widened
    result["search_params"] = {name: get() for name, get, _ in knobs}
    result["target_recall"] = target_recall
    return result
