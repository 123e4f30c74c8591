"""Pick an index kind and its parameters from the catalog size and a memory/latency budget
(autofaiss spirit).

Candidates, most accurate first: ``flat`` (exact), ``hnsw`` (float vectors + graph),
``hnsw_sq`` (8-bit codes + graph, re-ranked exactly) and ``ivfpq`` with ever fewer PQ bytes
per vector (re-ranked exactly from the memory-mapped float vectors). The first one whose
predicted resident memory fits ``max_memory_bytes`` and whose predicted single-query latency
fits ``max_query_ms`` wins; when none meets the latency the smallest that fits the memory is
taken (with a warning); when nothing fits the memory the choice fails with the reason. The
predictions are rough models; the catalog then *measures* recall@10 and latency on its own
vectors and writes them into the index card (``index.measure``).

Exact search reads every vector per query, so its latency grows as ``N * d``. The scan
throughput is a measured constant (``benchmarks/index_latency.py``, docs/benchmarks.md), kept
conservative because the machines are shared.

A catalog card with ``index_kind: "auto"`` is resolved here on every open: when the catalog
grows past a threshold its indexes are rebuilt from the store (once).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from snapshop.errors import VectorIndexError

log = logging.getLogger(__name__)

AUTO = "auto"
# Single-query exact scan throughput (bytes of float32 vectors read per ms), measured with
# benchmarks/index_latency.py on the shared 2-core machines under load (2.0-2.8 GB/s at
# 100k-1M x 256 and 100k x 1280; docs/benchmarks.md). A quiet machine scans ~10x faster:
# pass IndexBudget(exact_bytes_per_ms=...) to move the switch-over up.
EXACT_BYTES_PER_MS = 2.5e6
HNSW_M = 32
# A new catalog's indexes together stay under this much resident memory unless told otherwise.
DEFAULT_MEMORY_BYTES = 2 * 1024**3
# HNSW, ef 128, 256-d: p50 0.45 ms at 200k on the shared machine (shared/NOTES.md); scaled by
# d, ef and log N below, doubled for safety.
HNSW_MS_256D = 0.9
SQ_SLOWDOWN = 1.5  # 8-bit codes are decoded on the fly
# Re-ranking reads `rerank` float rows (page cache, random access): ~2 us a 1 KB row.
RERANK_MS_PER_KB = 0.002
# 4-bit fast-scan PQ reads codes at ~1 GB/s on one busy core.
PQ_SCAN_BYTES_PER_MS = 1e6
# Per-vector bookkeeping: label, alive flag and id lookup. The compressed kinds look ids up in
# their label array while ids arrive in increasing order, as catalog ids do (reranked.IdNodeMap:
# entries re-added since the last compaction cost 16 B more each); hnsw keeps a Python dict
# (~100 bytes an entry).
ID_BYTES = 9
HNSW_COARSE_MIN = 4096  # IVF lists from which the coarse quantiser is an HNSW graph
FAST_SCAN_BLOCK = 32  # 4-bit fast-scan lists store codes in blocks of 32 vectors
HNSW_ID_BYTES = 109
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}  # fmt: skip


def parse_bytes(text: str | int | float) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1.5e9"`` -> bytes; raises VectorIndexError on anything else."""
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        s = text.strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num) :]
        try:
            value = float(num)
        except ValueError:
            raise VectorIndexError(
                f"cannot read a memory size from {text!r} (e.g. 2GB, 512MiB)"
            ) from None
    if unit not in UNITS or not math.isfinite(value) or value <= 0:
        raise VectorIndexError(f"cannot read a memory size from {text!r} (e.g. 2GB, 512MiB)")
    return int(value * UNITS[unit])


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def _real(value: object) -> bool:
    """A real number (a numpy one too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class IndexBudget:
    """What the catalog's indexes may cost: ``max_memory_bytes`` resident (None: unbounded)
    for all its indexes together, ``max_query_ms`` per single query."""

    max_memory_bytes: int | None = DEFAULT_MEMORY_BYTES
    max_query_ms: float = 20.0
    target_recall: float = 0.95
    exact_bytes_per_ms: float = EXACT_BYTES_PER_MS

    def __post_init__(self) -> None:
        # Checked for type and finiteness too: NaN compares false with everything, so a NaN
        # memory budget let every index fit, and text or None were raw TypeErrors.
        memory = self.max_memory_bytes
        if memory is not None:
            if not _real(memory) or not math.isfinite(memory) or memory < 1:
                raise VectorIndexError(
                    f"max_memory_bytes must be a number of bytes >= 1 or None, not {memory!r}"
                )
            object.__setattr__(self, "max_memory_bytes", int(memory))
        if not _real(self.max_query_ms) or not 0 < self.max_query_ms < math.inf:
            raise VectorIndexError(f"max_query_ms must be positive, not {self.max_query_ms!r}")
        if not _real(self.target_recall) or not 0 < self.target_recall <= 1:
            raise VectorIndexError(f"target_recall must be in (0, 1], not {self.target_recall!r}")
        if not _real(self.exact_bytes_per_ms) or not 0 < self.exact_bytes_per_ms < math.inf:
            raise VectorIndexError(
                f"exact_bytes_per_ms must be positive, not {self.exact_bytes_per_ms!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "exact_bytes_per_ms"}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IndexBudget:
        if data is not None and not isinstance(data, dict):
            raise VectorIndexError(f"an index budget is a mapping, not {data!r}")
        data = dict(data or {})
        allowed = {"max_memory_bytes", "max_query_ms", "target_recall"}
        if set(data) - allowed:
            raise VectorIndexError(f"unknown index budget keys {sorted(set(data) - allowed)}")
        return cls(**data)


@dataclass(frozen=True)
class IndexChoice:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    memory_bytes: int = 0
    predicted_ms: float = 0.0


def exact_latency_ms(n: int, dim: int, budget: IndexBudget = IndexBudget()) -> float:
    """Predicted single-query exact-search latency for ``n`` vectors of ``dim``."""
    return 4.0 * n * dim / budget.exact_bytes_per_ms


def max_exact_vectors(dim: int, budget: IndexBudget = IndexBudget()) -> int:
    """The largest catalog exact search answers within ``budget.max_query_ms``."""
    return int(budget.max_query_ms * budget.exact_bytes_per_ms / (4.0 * dim))


def ivf_params(n: int, dim: int, pq_m: int) -> dict[str, Any]:
    """nlist ~ 4 sqrt(N) (a power of two), nprobe ~ nlist / 32, 4-bit fast-scan codes."""
    nlist = 2 ** max(4, min(16, round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))))
    return {
        "nlist": nlist,
        "pq_m": pq_m,
        "nbits": 4,
        "nprobe": max(8, min(256, nlist // 32)),
        "rerank": 100,
    }


def index_memory_bytes(kind: str, n: int, dim: int, params: dict[str, Any] | None = None) -> int:
    """Predicted resident bytes of ``n`` vectors (float vectors of re-ranked kinds live in a
    memory-mapped file and are not counted)."""
    p = params or {}
    m = int(p.get("m", HNSW_M))
    if kind == "flat":
        return n * (4 * dim + 8)
    if kind == "hnsw":
        return n * (4 * dim + 8 * m + HNSW_ID_BYTES)
    if kind == "hnsw_sq":
        return n * (dim + 8 * m + ID_BYTES)
    if kind == "ivfpq":
        per = int(p["pq_m"]) * int(p.get("nbits", 4)) / 8 + 8 + ID_BYTES
        fixed = ivf_fixed_bytes(
            dim, int(p["nlist"]), int(p["pq_m"]), int(p.get("nbits", 4)), int(p.get("pca", 0)),
            bool(p.get("opq", False)),
        )  # fmt: skip
        return int(n * per + fixed)
    raise VectorIndexError(f"no memory model for index kind {kind!r}")


def ivf_fixed_bytes(
    dim: int, nlist: int, pq_m: int, nbits: int = 4, pca: int = 0, opq: bool = False
) -> int:
    """IVF-PQ bytes that do not grow with N: centroids (and their HNSW links from
    HNSW_COARSE_MIN lists), the half-empty last code block of each fast-scan list, the PCA
    or OPQ matrices (measured against faiss' own sizes by benchmarks/index_budget.py)."""
    reduced = pca or dim
    centroids = 4 * reduced * nlist
    links = 4 * 2 * 32 * nlist * 1.1 if nlist >= HNSW_COARSE_MIN else 0  # HNSW32, level 0 + up
    padding = nlist * FAST_SCAN_BLOCK / 2 * pq_m / 2 if nbits == 4 else 0
    matrices = 4 * (dim * reduced if pca else 0) + 4 * (reduced * reduced if opq else 0)
    return int(centroids + links + padding + matrices)


def catalog_memory_bytes(
    kind: str, n_total: int, dim: int, params: dict[str, Any], indexes: int = 1
) -> int:
    """Predicted resident bytes of a catalog's ``indexes`` indexes of ``kind`` holding
    ``n_total`` vectors together: the per-vector bytes once, the bytes that do not grow with N
    (IVF centroids, fast-scan padding, PCA/OPQ matrices) once per index. Counted once, a
    catalog with three crop positions overshot a tight budget by ~70 % (4 x 70 kB of
    centroids at 3,000 x 64)."""
    if isinstance(indexes, bool) or not isinstance(indexes, int) or indexes < 1:
        raise VectorIndexError(f"indexes must be a whole number >= 1, not {indexes!r}")
    fixed = index_memory_bytes(kind, 0, dim, params)
    return index_memory_bytes(kind, n_total, dim, params) + (indexes - 1) * fixed


def predicted_ms(
    kind: str, n: int, dim: int, params: dict[str, Any], budget: IndexBudget = IndexBudget()
) -> float:
    """A rough single-query latency model on the shared 2-core machines."""
    if kind == "flat":
        return exact_latency_ms(n, dim, budget)
    rerank_ms = int(params.get("rerank", 0)) * RERANK_MS_PER_KB * 4 * dim / 1000
    if kind in ("hnsw", "hnsw_sq"):
        scale = (dim / 256) * (int(params.get("ef_search", 128)) / 128)
        scale *= max(1.0, math.log2(max(n, 2)) / math.log2(200_000))
        return HNSW_MS_256D * scale * (SQ_SLOWDOWN if kind == "hnsw_sq" else 1.0) + rerank_ms
    if kind == "ivfpq":
        nlist, nprobe = int(params["nlist"]), int(params["nprobe"])
        coarse = (
            4.0 * nlist * dim / budget.exact_bytes_per_ms
            if nlist < 4096  # scanned
            else HNSW_MS_256D * dim / 256
        )  # an HNSW graph over the centroids
        codes = n * nprobe / nlist * int(params["pq_m"]) * int(params.get("nbits", 4)) / 8
        return coarse + codes / PQ_SCAN_BYTES_PER_MS + rerank_ms
    raise VectorIndexError(f"no latency model for index kind {kind!r}")


def candidates(n: int, dim: int) -> list[tuple[str, dict[str, Any]]]:
    """Every (kind, params) the budget may choose, most accurate first."""
    out: list[tuple[str, dict[str, Any]]] = [
        ("flat", {}),
        ("hnsw", {"m": HNSW_M, "ef_search": 128}),
        ("hnsw_sq", {"m": HNSW_M, "ef_search": 128, "rerank": 100}),
    ]
    for divisor in (2, 4, 8, 16, 32):
        if dim % divisor == 0 and dim // divisor >= 1:
            out.append(("ivfpq", ivf_params(n, dim, dim // divisor)))
    return out


def choose_index(
    n: int,
    dim: int,
    budget: IndexBudget = IndexBudget(),
    n_total: int | None = None,
    indexes: int = 1,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> IndexChoice:
    """The most accurate kind that fits the budget: latency judged on the largest index
    (``n`` vectors), memory on every vector the catalog indexes (``n_total``, default ``n``)
    in its ``indexes`` indexes (images, and one per crop position: see
    :func:`catalog_memory_bytes`). ``overrides`` ({kind: params}) replace a candidate's
    parameters before it is judged: judged with the defaults, an ``auto`` card's
    ``{"hnsw": {"m": 256}}`` took 318 MB under a 150 MB budget."""
    total = max(n, n_total or n)
    limit_b = budget.max_memory_bytes
    fits_memory = []
    for kind, defaults in candidates(n, dim):
        params = {**defaults, **(overrides or {}).get(kind, {})}
        try:
            memory = catalog_memory_bytes(kind, total, dim, params, indexes)
            ms = predicted_ms(kind, n, dim, params, budget)
        except (TypeError, ValueError) as exc:
            raise VectorIndexError(f"{kind} parameters {params} cannot be sized ({exc})") from None
        if limit_b is not None and memory > limit_b:
            continue
        fits_memory.append((kind, params, memory, ms))
        if ms <= budget.max_query_ms:
            reason = (
                f"{kind}: ~{human_bytes(memory)} for {total:,} vectors"
                f"{'' if limit_b is None else f' (budget {human_bytes(limit_b)})'},"
                f" ~{ms:.2f} ms predicted (budget {budget.max_query_ms:g} ms)"
            )
            return IndexChoice(kind, dict(params), reason, memory, ms)
    if not fits_memory:
        smallest = min(
            catalog_memory_bytes(k, total, dim, p, indexes) for k, p in candidates(n, dim)
        )
        raise VectorIndexError(
            f"no index of {total:,} x {dim} vectors fits {human_bytes(limit_b or 0)} (the"
            f" smallest needs ~{human_bytes(smallest)}): raise the memory budget, reduce the"
            " dimension, or use a server backend (pgvector, milvus)"
        )
    kind, params, memory, ms = min(fits_memory, key=lambda c: c[3])
    log.warning(
        "no index of %d x %d meets %g ms within the memory budget; %s predicts %.1f ms",
        n,
        dim,
        budget.max_query_ms,
        kind,
        ms,
    )
    reason = (
        f"{kind}: fastest within the memory budget (~{human_bytes(memory)}),"
        f" ~{ms:.1f} ms predicted, over the {budget.max_query_ms:g} ms budget"
    )
    return IndexChoice(kind, dict(params), reason, memory, ms)


def smallest_choice(n: int, dim: int, indexes: int = 1) -> IndexChoice:
    """The candidate with the least memory (when no budget can be met)."""
    kind, params = min(
        candidates(n, dim), key=lambda c: catalog_memory_bytes(c[0], n, dim, c[1], indexes)
    )
    return IndexChoice(
        kind, dict(params), "smallest index", catalog_memory_bytes(kind, n, dim, params, indexes)
    )


def resolve_index_kind(
    kind: str,
    params: dict[str, Any],
    n: int,
    dim: int,
    budget: IndexBudget | None = None,
    n_total: int | None = None,
    indexes: int = 1,
) -> tuple[str, dict[str, Any]]:
    """The concrete (kind, params) for a catalog card entry; ``auto`` is chosen by size and
    the budget (``params["budget"]``, else ``budget``, else the default budget) for the
    catalog's ``indexes`` indexes."""
    if kind != AUTO:
        return kind, params
    if budget is None:
        budget = IndexBudget.from_dict(params.get("budget"))
    # auto cards key their params by kind: {"hnsw": {...}}
    overrides = {k: v for k, v in params.items() if k != "budget" and isinstance(v, dict)}
    choice = choose_index(n, dim, budget, n_total, indexes, overrides)
    return choice.kind, dict(choice.params)
