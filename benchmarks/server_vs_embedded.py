"""Server catalog vs embedded: pgvector HNSW vs faiss HNSW on the same vectors (issue #14).

The same spectral synthetic vectors (``index_latency.spectral``: shaped like real embeddings)
and the same queries go into faiss HNSW (snapshop's ``hnsw`` index, in-process) and into
PostgreSQL 18 + pgvector HNSW (a local server from ``snapshop.dbserver``, searched through
snapshop's ``pgvector`` index, i.e. the SQL a server catalog sends). Both graphs get the same
M and efConstruction; efSearch is swept on each side and, per side, the smallest efSearch that
reaches recall@10 ≥ each target (vs exact) is reported with its p50/p95 (one query at a time).

pgvector is loaded the way a bulk migration would do it: binary COPY into the table, then one
``CREATE INDEX ... USING hnsw`` with ``maintenance_work_mem`` large enough for an in-memory
build and ``max_parallel_maintenance_workers`` (default 1: the leader plus one worker).
Memory: faiss = bytes of the graph (vectors + links); PostgreSQL = ``pg_table_size`` (heap +
TOAST) and ``pg_relation_size`` of the HNSW index (their sum is ``pg_total_relation_size``
minus the primary key).

    python benchmarks/server_vs_embedded.py --n 100000 --dim 512 --queries 300

Prints markdown tables: the sweep, then one row per (side, target).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).parent))
from index_latency import exact_topk, spectral  # noqa: E402

from snapshop.dbserver import start_database, stop_database  # noqa: E402
from snapshop.index import create_index  # noqa: E402

faiss.cvar.distance_compute_blas_threshold = 1
TABLE = "bench_vectors"


def timed_search(
    search_one: Callable[[int], NDArray[np.int64]], n_queries: int, truth: NDArray[np.int64]
) -> dict[str, float]:
    """``search_one(i)``: the top-10 ids of query ``i``, timed one query at a time."""
    for i in range(min(30, n_queries)):  # warm-up (caches, pages)
        search_one(i)
    lat = np.empty(n_queries)
    found = np.empty((n_queries, 10), np.int64)
    for i in range(n_queries):
        t = time.perf_counter()
        found[i] = search_one(i)
        lat[i] = (time.perf_counter() - t) * 1e3
    recall = np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(n_queries)])
    return {
        "recall": float(recall),
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
    }


def sweep(
    set_ef: Callable[[int], None],
    search_one: Callable[[int], NDArray[np.int64]],
    n_queries: int,
    truth: NDArray[np.int64],
    efs: list[int],
    top_target: float,
) -> list[dict[str, float]]:
    """Increasing efSearch until one step past the first that reaches ``top_target`` (a
    plateau shows), or the list ends."""
    rows: list[dict[str, float]] = []
    reached = False
    for ef in sorted(efs):
        set_ef(ef)
        rows.append({"ef": ef, **timed_search(search_one, n_queries, truth)})
        if reached:
            break
        reached = rows[-1]["recall"] >= top_target
    return rows


def index_sweep(
    index: Any,
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    efs: list[int],
    top_target: float,
) -> list[dict[str, float]]:
    """Through a snapshop vector index: what a catalog calls."""

    def set_ef(ef: int) -> None:
        index.ef_search = ef

    def search_one(i: int) -> NDArray[np.int64]:
        return np.asarray(index.search(queries[i : i + 1], 10).ids[0])

    return sweep(set_ef, search_one, len(queries), truth, efs, top_target)


def sql_sweep(
    dsn: str,
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    efs: list[int],
    top_target: float,
) -> list[dict[str, float]]:
    """The server's own share: one prepared SELECT per query, efSearch set once per session,
    query vectors formatted before the clock starts (no per-query transaction or SET)."""
    import psycopg

    texts = ["[" + ",".join(f"{v:.8g}" for v in q) + "]" for q in queries]
    sql = f"SELECT id FROM {TABLE} ORDER BY embedding <#> %s::vector LIMIT 10"
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:

        def set_ef(ef: int) -> None:
            cur.execute(f"SET hnsw.ef_search = {int(ef)}")

        def search_one(i: int) -> NDArray[np.int64]:
            rows = cur.execute(sql, (texts[i],), prepare=True).fetchall()
            return np.array([r[0] for r in rows] + [-1] * (10 - len(rows)), np.int64)

        return sweep(set_ef, search_one, len(queries), truth, efs, top_target)


def faiss_side(
    base: NDArray[np.float32], queries: NDArray[np.float32], truth: NDArray[np.int64], args: Any
) -> tuple[dict[str, Any], list[tuple[str, list[dict[str, float]]]]]:
    index = create_index("hnsw", base.shape[1], m=args.m, ef_construction=args.ef_construction)
    ids = np.arange(len(base), dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(base), 100_000):
        index.add(ids[s : s + 100_000], base[s : s + 100_000])
    build = time.perf_counter() - t0
    graph = index._index  # the faiss IndexHNSWFlat
    hnsw = graph.hnsw
    nbytes = (
        faiss.downcast_index(graph.storage).codes.size()
        + hnsw.neighbors.size() * 4
        + hnsw.offsets.size() * 8
        + hnsw.levels.size() * 4
    )
    info = {
        "build_s": build,
        "load_s": 0.0,
        "bytes": nbytes,
        "detail": f"graph {nbytes / 1e6:.0f} MB",
    }
    return info, [
        (
            "faiss HNSW (snapshop hnsw)",
            index_sweep(index, queries, truth, args.ef, max(args.targets)),
        )
    ]


def copy_binary(cur: Any, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
    """Rows of (bigint, vector) in PostgreSQL's binary COPY format (pgvector's ``vector_recv``:
    int16 dim, int16 unused, float4 × dim; all big-endian)."""
    dim = vectors.shape[1]
    row = np.dtype([("nfields", ">i2"), ("len_id", ">i4"), ("id", ">i8"), ("len_vec", ">i4"),
                    ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dim,))])  # fmt: skip
    with cur.copy(f"COPY {TABLE} (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.write(b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big"))
        for s in range(0, len(ids), 20_000):
            e = min(len(ids), s + 20_000)
            rows = np.empty(e - s, row)
            rows["nfields"], rows["len_id"], rows["len_vec"] = 2, 8, 4 + 4 * dim
            rows["id"], rows["dim"], rows["unused"], rows["vec"] = ids[s:e], dim, 0, vectors[s:e]
            copy.write(rows.tobytes())
        copy.write((-1).to_bytes(2, "big", signed=True))


def pgvector_side(
    base: NDArray[np.float32],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    args: Any,
    dsn: str,
) -> tuple[dict[str, Any], list[tuple[str, list[dict[str, float]]]]]:
    import psycopg

    dim = base.shape[1]
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cur.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, embedding vector({dim}) NOT NULL)"
        )
        t0 = time.perf_counter()
        with conn.transaction():
            copy_binary(cur, np.arange(len(base), dtype=np.int64), base)
        load = time.perf_counter() - t0
        cur.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        cur.execute(f"SET max_parallel_maintenance_workers = {args.parallel_workers}")
        t0 = time.perf_counter()
        cur.execute(
            f"CREATE INDEX {TABLE}_hnsw ON {TABLE} USING hnsw (embedding vector_ip_ops)"
            f" WITH (m = {args.m}, ef_construction = {args.ef_construction})"
        )
        build = time.perf_counter() - t0
        cur.execute(f"VACUUM ANALYZE {TABLE}")
        table_bytes, index_bytes, total = cur.execute(
            f"SELECT pg_table_size('{TABLE}'), pg_relation_size('{TABLE}_hnsw'),"
            f" pg_total_relation_size('{TABLE}')"
        ).fetchone()
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        cur.execute(f"SELECT pg_prewarm('{TABLE}_hnsw'), pg_prewarm('{TABLE}')")
    info = {
        "build_s": build,
        "load_s": load,
        "bytes": table_bytes + index_bytes,
        "detail": f"table {table_bytes / 1e6:.0f} MB + hnsw {index_bytes / 1e6:.0f} MB"
        f" (total with pkey {total / 1e6:.0f} MB)",
    }
    index = create_index(
        "pgvector", dim, dsn=dsn, table=TABLE, m=args.m, ef_construction=args.ef_construction
    )
    try:
        through_index = index_sweep(index, queries, truth, args.ef, max(args.targets))
        prepared = sql_sweep(dsn, queries, truth, args.ef, max(args.targets))
    finally:
        index.drop()
    return info, [
        ("pgvector HNSW (snapshop pgvector)", through_index),
        ("pgvector HNSW (prepared SQL)", prepared),
    ]


def report(
    label: str,
    n: int,
    rows: list[dict[str, float]],
    info: dict[str, Any],
    targets: list[float],
    summary: list[str],
) -> None:
    """Print the sweep rows; add one summary row per recall target."""
    for r in rows:
        print(f"| {label} | {r['ef']:.0f} | {r['recall']:.4f} | {r['p50']:.3f} | {r['p95']:.3f} |",
              flush=True)  # fmt: skip
    for target in targets:
        hit = next((r for r in rows if r["recall"] >= target), None)
        cells = (
            f"{hit['ef']:.0f} | {hit['recall']:.4f} | {hit['p50']:.3f} | {hit['p95']:.3f}"
            if hit
            else "not reached | – | – | –"
        )
        summary.append(
            f"| {label} | {n:,} | {target:.2f} | {cells} | {info['build_s']:.1f} |"
            f" {info['load_s']:.1f} | {info['bytes'] / n:,.0f} | {info['detail']} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument(
        "--side", nargs="+", choices=["faiss", "pgvector"], default=["faiss", "pgvector"]
    )
    ap.add_argument("--m", type=int, default=16, help="HNSW M on both sides (pgvector's default)")
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument(
        "--ef", type=int, nargs="+", default=[10, 15, 20, 30, 40, 60, 80, 120, 160, 240, 320]
    )
    ap.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.99])
    ap.add_argument("--maintenance-work-mem", default="4GB")
    ap.add_argument("--parallel-workers", type=int, default=1)
    ap.add_argument("--shared-buffers", default="1GB", help="PostgreSQL shared_buffers")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}", flush=True)

    dsn, pg_dir = "", None
    if "pgvector" in args.side:
        pg_dir = Path(tempfile.mkdtemp(prefix="snapshop-bench-db-"))
        pg_dir.chmod(0o755)
        dsn = start_database(pg_dir / "pg", port=0)
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET shared_buffers = '{args.shared_buffers}'")
        stop_database(pg_dir / "pg")
        dsn = start_database(pg_dir / "pg")  # shared_buffers needs a restart
    summary: list[str] = []
    try:
        for n in args.n:
            clusters = max(10, n // 100)
            base = spectral(n, args.dim, seed=1, n_clusters=clusters)
            queries = spectral(args.queries, args.dim, seed=2, n_clusters=clusters)
            truth = exact_topk(base, queries, 10)
            print(f"\nN = {n:,}, d = {args.dim}, M = {args.m}, efConstruction = "
                  f"{args.ef_construction}, {args.queries} queries", flush=True)  # fmt: skip
            print("| side | efSearch | recall@10 | p50 ms | p95 ms |\n|---|---|---|---|---|")
            for side in args.side:
                if side == "faiss":
                    info, results = faiss_side(base, queries, truth, args)
                else:
                    info, results = pgvector_side(base, queries, truth, args, dsn)
                load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
                print(f"(load average after the {side} side: {load})", flush=True)
                for label, rows in results:
                    report(label, n, rows, info, args.targets, summary)
                gc.collect()
            del base
            gc.collect()
    finally:
        if pg_dir is not None:
            stop_database(pg_dir / "pg")
            shutil.rmtree(pg_dir, ignore_errors=True)
    print("\n| side | N | recall target | efSearch | recall@10 | p50 ms | p95 ms | build s |"
          " load s | bytes/vector | memory |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(summary), flush=True)


if __name__ == "__main__":
    main()
