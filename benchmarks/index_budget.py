"""Index kinds by memory: bytes per vector, build time, p50/p99, recall@10; and filtered search
inside the index vs today's over-fetch, at several selectivities (issue #15).

Spectral synthetic vectors (``index_latency.spectral``: shaped like real embeddings); queries
are fresh draws from the same clusters; recall@10 is against exact (filtered) search.

    python benchmarks/index_budget.py --n 200000 --dim 256
    python benchmarks/index_budget.py --n 200000 --dim 512 --kinds hnsw_sq ivfpq

Every index is saved to a temporary directory and reloaded before it is timed, so the
compressed kinds search with their float vectors memory-mapped (as a catalog does). "RAM B/v"
is the index's own estimate of resident bytes per vector (codes, graph, ids); "faiss B/v" is
measured for the compressed kinds: the serialised faiss index (codes, list ids and their
padding, quantisers) plus the label, alive and id-map arrays as loaded; "disk B/v" counts every
file it saved (for compressed kinds, mostly the float vectors they re-rank from).

Filtered rows: each entry is its own product and a random subset of the ids passes the
filter (uncorrelated with the vectors: the hard case for a graph). "inside" passes the
allowed ids into the search (``top_products(..., allowed=...)``); "over-fetch" is the old
path (fetch 4k, widen 4x until k accepted).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from index_latency import exact_topk, spectral
from numpy.typing import NDArray

from snapshop.index import IdFilter, create_index, load_index, save_index
from snapshop.index.choose import ivf_params
from snapshop.search import top_products

faiss.cvar.distance_compute_blas_threshold = 1


def params_for(
    kind: str,
    n: int,
    dim: int,
    pq_m: int | None = None,
    rerank: int | None = None,
    pca: int = 0,
) -> dict[str, Any]:
    if kind == "ivfpq":
        # 4-bit codes: pq_m / 2 bytes a vector
        params = ivf_params(n, dim, pq_m or (pca or dim) // 4) | {"pca": pca}
        return params | ({"rerank": rerank} if rerank else {})
    if kind == "hnsw_sq":
        return {"m": 32, "ef_search": 128, "rerank": 100}
    if kind == "hnsw":
        return {"m": 32, "ef_search": 128}
    return {}


def recall(found: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def timed(fn: Any, queries: NDArray[np.float32]) -> tuple[list[float], list[Any]]:
    for q in queries[:10]:
        fn(q)
    lat, out = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        lat.append((time.perf_counter() - t) * 1e3)
    return lat, out


def filtered_rows(
    kind: str,
    index: Any,
    base: NDArray[np.float32],
    queries: NDArray[np.float32],
    selectivities: list[float],
    n_over: int,
) -> list[str]:
    n = len(base)
    ids = np.arange(n, dtype=np.int64)
    rows = []
    rng = np.random.default_rng(42)

    def owner_of(entries: list[int]) -> dict[int, int]:
        return {e: e for e in entries}

    for sel in selectivities:
        allowed = np.sort(rng.choice(ids, size=max(10, int(sel * n)), replace=False))
        truth = exact_topk(base[allowed], queries, 10)
        truth = allowed[truth]
        flt = IdFilter.of(allowed, key=("bench", sel))
        allowed_set = set(allowed.tolist())
        t = time.perf_counter()  # the first query with a filter also builds its selection
        top_products(index, queries[0], 10, owner_of, allowed=flt)
        first = (time.perf_counter() - t) * 1e3
        lat_in, found_in = timed(
            lambda q, f=flt: [e for _, _, e in top_products(index, q, 10, owner_of, allowed=f)],
            queries,
        )
        over_q = queries[:n_over]
        lat_over, found_over = timed(
            lambda q, s=allowed_set: [
                e for _, _, e in top_products(index, q, 10, owner_of, accept=lambda p: p in s)
            ],
            over_q,
        )
        pad = [np.array((f + [-1] * 10)[:10]) for f in found_in]
        pad_over = [np.array((f + [-1] * 10)[:10]) for f in found_over]
        rows.append(
            f"| {kind} | {sel * 100:g} % | {len(allowed):,} | {first:.1f} |"
            f" {np.percentile(lat_in, 50):.2f} |"
            f" {np.percentile(lat_in, 99):.2f} | {recall(np.array(pad), truth):.3f} |"
            + (
                f" {np.percentile(lat_over, 50):.2f} |"
                f" {recall(np.array(pad_over), truth[:n_over]):.3f} |"
                if n_over
                else " – | – |"
            )
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, nargs="+", default=[256])
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "hnsw_sq", "ivfpq"])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--pq-m", type=int, default=None, help="ivfpq sub-quantisers (default d/4)")
    ap.add_argument("--rerank", type=int, default=None, help="ivfpq re-rank depth (default 100)")
    ap.add_argument("--pca", type=int, default=0, help="ivfpq: project to this many dimensions")
    ap.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="save each built index under this folder and reuse it next time (skips the build)",
    )
    ap.add_argument("--selectivity", type=float, nargs="*", default=[0.5, 0.1, 0.01, 0.001])
    ap.add_argument("--filter-kinds", nargs="*", default=["flat", "hnsw", "hnsw_sq", "ivfpq"])
    ap.add_argument(
        "--over-fetch-queries",
        type=int,
        default=30,
        help="queries for the (slow) over-fetch baseline",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}", flush=True)
    kind_rows, filter_rows = [], []
    for dim in args.dim:
        clusters = max(10, args.n // 100)
        base = spectral(args.n, dim, seed=1, n_clusters=clusters)
        queries = spectral(args.queries, dim, seed=2, n_clusters=clusters)
        truth = exact_topk(base, queries, 10)
        ids = np.arange(args.n, dtype=np.int64)
        for kind in args.kinds:
            params = params_for(kind, args.n, dim, args.pq_m, args.rerank, args.pca)
            name = f"{kind}-{args.n}x{dim}-" + "-".join(f"{k}{v}" for k, v in params.items())
            with tempfile.TemporaryDirectory(prefix="snapshop-bench-") as tmp:
                folder = args.keep / name if args.keep else Path(tmp)
                path = folder / "images.faiss"
                build = float("nan")  # "–": reused from --keep
                if not path.exists():
                    index = create_index(kind, dim, **params)
                    t0 = time.perf_counter()
                    for s in range(0, args.n, 100_000):
                        index.add(ids[s : s + 100_000], base[s : s + 100_000])
                    build = time.perf_counter() - t0
                    save_index(index, path)
                    del index
                    gc.collect()
                disk = sum(f.stat().st_size for f in folder.iterdir())
                index, card = load_index(path)
                ram = index.memory_bytes()
                measured = measured_bytes(index, path)
                lat, hits = timed(lambda q, ix=index: ix.search(q[None], 10).ids[0], queries)
                r = recall(np.array(hits), truth)
                p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
                row = (
                    f"| {kind} | {args.n:,} | {dim} | {ram / args.n:.0f} |"
                    f" {'–' if measured is None else f'{measured / args.n:.1f}'} |"
                    f" {disk / args.n:.0f} |"
                    f" {build:.1f} | {p50:.2f} | {p99:.2f} | {r:.3f} | {card_params(card)} |"
                )
                print(row, flush=True)
                kind_rows.append(row)
                if kind in args.filter_kinds and args.selectivity:
                    filter_rows += filtered_rows(
                        kind, index, base, queries[:100], args.selectivity, args.over_fetch_queries
                    )
                del index
                gc.collect()
    print(
        "\n| kind | N | d | RAM B/v | faiss B/v | disk B/v | build s | p50 ms | p99 ms"
        " | recall@10 | params |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(kind_rows))
    if filter_rows:
        print(
            "\n| kind | selectivity | allowed | 1st query ms | inside p50 ms | inside p99 ms"
            " | inside recall@10 | over-fetch p50 ms | over-fetch recall@10 |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(filter_rows))
    sys.stdout.flush()


def measured_bytes(index: Any, path: Path) -> int | None:
    """Resident bytes of a compressed index as saved: the serialised faiss index plus the
    label, alive-flag and id-map arrays (None for the other kinds)."""
    if not hasattr(index, "_where"):
        return None
    with np.load(path, allow_pickle=False) as saved:
        graph = int(saved["graph"].nbytes)
    n = max(len(index._labels), 1)
    parts = {"faiss index": graph / n, "labels": index._labels.nbytes / n}
    parts |= {"alive": index._alive.nbytes / n, "id map": index._where.memory_bytes() / n}
    if getattr(index, "kind", "") == "ivfpq" and index.trained:
        ivf = faiss.extract_index_ivf(index._index)
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)])
        if hasattr(lists, "n_per_block"):  # fast scan: codes in blocks of n_per_block
            codes = int((-(-sizes // lists.n_per_block)).sum()) * lists.block_size
        else:
            codes = int(sizes.sum()) * lists.code_size
        parts["  of which codes (padded)"] = codes / n
        parts["  of which list ids"] = 8 * ivf.ntotal / n
        parts["  of which quantiser"] = len(faiss.serialize_index(ivf.quantizer)) / n
    print("bytes/vector: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
    return graph + index._labels.nbytes + index._alive.nbytes + index._where.memory_bytes()


def card_params(card: dict[str, Any]) -> str:
    keys = ("m", "ef_search", "nlist", "pq_m", "nbits", "nprobe", "rerank", "pca")
    return " ".join(f"{k}={card[k]}" for k in keys if card.get(k))


if __name__ == "__main__":
    main()
