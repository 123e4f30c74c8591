"""Pick an index kind from the catalog size and a latency/memory budget (autofaiss spirit).

Exact search reads every vector per query, so its latency grows as ``N * d``; it stays the
default while one query fits the latency budget, and HNSW takes over above. The scan
throughput is a measured constant (``benchmarks/index_latency.py``, docs/benchmarks.md), kept
conservative because the machines are shared.

A catalog card with ``index_kind: "auto"`` is resolved here on every open: when the catalog
grows past the threshold its indexes are rebuilt as HNSW from the store (once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
# Single-query exact scan throughput (bytes of float32 vectors read per ms), measured with
# benchmarks/index_latency.py on the shared 2-core machines under load (2.0-2.8 GB/s at
# 100k-1M x 256 and 100k x 1280; docs/benchmarks.md). A quiet machine scans ~10x faster:
# pass IndexBudget(exact_bytes_per_ms=...) to move the switch-over up.
EXACT_BYTES_PER_MS = 2.5e6
HNSW_M = 32


@dataclass(frozen=True)
class IndexBudget:
    """What one query may cost: ``latency_ms`` per query, ``memory_gb`` for the index (None:
    unbounded)."""

    latency_ms: float = 20.0
    memory_gb: float | None = None
    exact_bytes_per_ms: float = EXACT_BYTES_PER_MS


@dataclass(frozen=True)
class IndexChoice:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def exact_latency_ms(n: int, dim: int, budget: IndexBudget = IndexBudget()) -> float:
    """Predicted single-query exact-search latency for ``n`` vectors of ``dim``."""
    return 4.0 * n * dim / budget.exact_bytes_per_ms


def max_exact_vectors(dim: int, budget: IndexBudget = IndexBudget()) -> int:
    """The largest catalog exact search answers within ``budget.latency_ms``."""
    return int(budget.latency_ms * budget.exact_bytes_per_ms / (4.0 * dim))


def index_memory_gb(kind: str, n: int, dim: int, m: int = HNSW_M) -> float:
    """Approximate resident size: vectors plus (for HNSW) ~2·m int32 links per vector."""
    per_vector = 4 * dim + (8 * m + 16 if kind == "hnsw" else 8)
    return n * per_vector / 1e9


def choose_index(n: int, dim: int, budget: IndexBudget = IndexBudget()) -> IndexChoice:
    """Exact below the size where one query stops meeting the latency budget, HNSW above."""
    limit = max_exact_vectors(dim, budget)
    if n <= limit:
        return IndexChoice(
            "flat", {}, f"{n} <= {limit} vectors: exact search meets {budget.latency_ms:g} ms"
        )
    memory = index_memory_gb("hnsw", n, dim)
    if budget.memory_gb is not None and memory > budget.memory_gb:
        log.warning(
            "HNSW over %d x %d needs ~%.1f GB, over the %.1f GB budget; consider a "
            "server backend (pgvector, milvus)",
            n,
            dim,
            memory,
            budget.memory_gb,
        )
    return IndexChoice(
        "hnsw",
        {"m": HNSW_M, "ef_search": 128},
        f"{n} > {limit} vectors: exact search would take "
        f"~{exact_latency_ms(n, dim, budget):.0f} ms",
    )


def resolve_index_kind(
    kind: str, params: dict[str, Any], n: int, dim: int, budget: IndexBudget = IndexBudget()
) -> tuple[str, dict[str, Any]]:
    """The concrete (kind, params) for a catalog card entry; ``auto`` is chosen by size."""
    if kind != AUTO:
        return kind, params
    choice = choose_index(n, dim, budget)
    override = params.get(choice.kind)  # auto cards key their params by kind: {"hnsw": {...}}
    return choice.kind, {**choice.params, **(override if isinstance(override, dict) else {})}
