"""Replicas and memory of a server catalog (issue #14 item 9).

Two measurements, one subcommand each:

``service``: throughput of ``snapshop serve --catalog DSN`` with 1 and then 2 replicas (distinct
ports, one catalog), clients spread round-robin over the replicas (client i talks to replica
i mod R), at each ``--clients`` count. Reuses ``load_search.py`` (server start, readiness,
query photos); per request it keeps the client latency and the response's ``timings_ms``, and
per run the CPU seconds the replicas and the PostgreSQL processes used (``/proc``), which gives
the database's share of the work measured rather than guessed::

    python benchmarks/replicas.py service --catalog "$DSN" --pgdata pg/data \
        --queries demo/source/queries --replicas 1 2 --clients 4 16 --requests 200

``memory``: peak RSS of a replica at N vectors. Spectral synthetic unit vectors
(``index_latency.spectral``, d = 512), ``--images-per-product`` images per product, bulk-loaded
into a server catalog (binary ``COPY`` with the ``images`` HNSW index dropped during the load
and re-created after, by SQL here only) and into an embedded catalog (SQLite ``executemany`` in
one transaction, then the catalog's faiss ``hnsw`` index built and saved by opening it once).
Each replica is then opened in a fresh process as ``snapshop serve`` opens one
(``api.open_searcher``, the catalog's model loaded, no detector) and searched through
``Searcher.rank_products`` with a fixed query vector; RSS after open, after the first search
and the peak (VmHWM) are printed::

    python benchmarks/replicas.py memory --dsn "$DSN" --n 100000 --workdir /tmp/rb

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from index_latency import spectral  # noqa: E402
from load_search import free_port, load, query_files, run_load, start_server, wait_ready  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- service: 1 vs N replicas ---------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(parent: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def postgres_cpu(pgdata: Path | None) -> float:
    """CPU seconds of the postmaster and its children so far (backends that exited are not
    counted: the replicas' pooled connections live through a run)."""
    if pgdata is None:
        return float("nan")
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    return cpu_seconds(postmaster) + sum(cpu_seconds(p) for p in children(postmaster))


def service(args: argparse.Namespace) -> None:
    files = query_files(args.queries, args.max_queries)
    extra = [*(["--detector", args.detector] if args.detector else []), *args.serve_arg]
    print(f"# host: {platform.machine()}, {os.cpu_count()} cores; load average: {load()}")
    print(f"# queries: {len(files)} photos from {args.queries}; k={args.k}; serve args {extra}")
    rows = []
    for n_replicas in args.replicas:
        procs, urls = [], []
        try:
            for _ in range(n_replicas):
                port = free_port()
                urls.append(f"http://127.0.0.1:{port}")
                procs.append(start_server(args.catalog, port, extra))  # type: ignore[arg-type]
            for url, proc in zip(urls, procs, strict=True):
                wait_ready(url, proc)
            for i, clients in enumerate(args.clients):
                before = load()
                cpu0 = [cpu_seconds(p.pid) for p in procs], postgres_cpu(args.pgdata)
                warmup = args.warmup if i == 0 else 0  # pools, caches, first allocations
                r = run_load(urls, files, clients, args.requests, args.duration, args.k, warmup)
                cpu1 = [cpu_seconds(p.pid) for p in procs], postgres_cpu(args.pgdata)
                served = max(r["ok"] + r["errors"], 1)
                r["req_s"] = r["throughput"]
                r.update(
                    replicas=n_replicas,
                    clients=clients,
                    load_before=before,
                    load_after=load(),
                    replica_cpu_ms=1e3 * (sum(cpu1[0]) - sum(cpu0[0])) / served,
                    db_cpu_ms=1e3 * (cpu1[1] - cpu0[1]) / served,
                )
                rows.append(r)
                print(f"# done: {n_replicas} replica(s), {clients} clients: {r['req_s']:.2f} req/s",
                      flush=True)  # fmt: skip
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print()
    print("| replicas | clients | ok | errors | req/s | p50 ms | p95 ms | server total ms |"
          " server embed ms | server detect ms | server search ms | replica CPU ms/req |"
          " PostgreSQL CPU ms/req | load before → after |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["server"]
        print(f"| {r['replicas']} | {r['clients']} | {r['ok']} | {r['errors']} | {r['req_s']:.2f}"
              f" | {r['p50']:.1f} | {r['p95']:.1f} | {s['total']:.1f} | {s['embed']:.1f}"
              f" | {s['detect']:.1f} | {s['search']:.1f} | {r['replica_cpu_ms']:.1f}"
              f" | {r['db_cpu_ms']:.1f} | {r['load_before']} → {r['load_after']} |")  # fmt: skip
    print(f"\n# load average after: {load()}")


# --- memory: a replica at N vectors -----------------------------------------------------------
def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(n: int, dim: int, images_per_product: int) -> tuple[np.ndarray, np.ndarray]:
    """(product index per image (n,), (n, dim) unit vectors)."""
    vectors = spectral(n, dim, seed=1, n_clusters=max(1, n // 100))
    return np.arange(n) // images_per_product, vectors


def card_model() -> tuple[str, str]:
    """The default model's id and reference: the catalog a replica opens loads it."""
    from snapshop.api import _model_ref
    from snapshop.models.embedder import load_embedder

    ref = _model_ref(None)
    return load_embedder(ref).model_id, ref


def load_server(
    dsn: str, n: int, dim: int, ipp: int, dbname: str, model: tuple[str, str] | None = None
) -> dict[str, float]:
    """A fresh database ``dbname`` on the server of ``dsn`` holding a catalog of ``n`` images
    (``model``: the card's model id and reference; None: the default model's)."""
    import psycopg

    from snapshop.catalog.catalog import create_catalog
    from snapshop.catalog.migrations import HNSW

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {dbname}")
        admin.execute(f"CREATE DATABASE {dbname}")
    target = urlsplit(dsn)._replace(path=f"/{dbname}").geturl()
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    model_id, ref = model or card_model()
    create_catalog(target, model_id=model_id, model_ref=ref, dim=dim).close()
    owners, vectors = synthetic(n, dim, ipp)
    n_products = int(owners[-1]) + 1
    now = "2026-12-03T00:00:00+00:00"
    t0 = time.perf_counter()
    with psycopg.connect(target) as conn, conn.cursor() as cur:
        cur.execute("DROP INDEX images_vector")
        with cur.copy("COPY products (sku, title, price, currency, category, created_at,"
                      " updated_at) FROM STDIN") as copy:  # fmt: skip
            for p in range(n_products):
                copy.write_row((f"sku-{p:07d}", f"product {p}", 9.99, "EUR", "upper", now, now))
        product_ids = np.array([r[0] for r in cur.execute("SELECT id FROM products ORDER BY id")])
        copy_images(cur, product_ids[owners], vectors, now)
        cur.execute("UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'generation'")
        conn.commit()
        load_s = time.perf_counter() - t0
        conn.autocommit = True
        cur.execute("SET maintenance_work_mem = '2GB'")
        t0 = time.perf_counter()
        cur.execute(f"CREATE INDEX images_vector ON images {HNSW}")
        build_s = time.perf_counter() - t0
        cur.execute("VACUUM ANALYZE images")
    return {"load_s": load_s, "build_s": build_s, "target": target}  # type: ignore[dict-item]


def copy_images(cur: Any, product_ids: np.ndarray, vectors: np.ndarray, now: str) -> None:
    """``images`` rows in PostgreSQL's binary COPY format (fixed-width text fields, so one
    numpy record per row; vectors in pgvector's ``vector_recv`` layout)."""
    n, dim = vectors.shape
    src_len, sha_len, now_b = 22, 64, now.encode()
    row = np.dtype([
        ("nfields", ">i2"),
        ("l_product", ">i4"), ("product", ">i8"),
        ("l_source", ">i4"), ("source", f"S{src_len}"),
        ("l_sha", ">i4"), ("sha", f"S{sha_len}"),
        ("l_w", ">i4"), ("w", ">i4"), ("l_h", ">i4"), ("h", ">i4"),
        ("l_created", ">i4"), ("created", f"S{len(now_b)}"),
        ("l_vec", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dim,)),
    ])  # fmt: skip
    cols = "product_id, source, sha256, width, height, created_at, vector"
    with cur.copy(f"COPY images ({cols}) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.write(b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big"))
        for s in range(0, n, 20_000):
            e = min(n, s + 20_000)
            rows = np.zeros(e - s, row)
            rows["nfields"] = 7
            rows["l_product"], rows["product"] = 8, product_ids[s:e]
            rows["l_source"] = src_len
            rows["source"] = [f"synthetic/{i:08d}.jpg".encode().ljust(src_len) for i in range(s, e)]
            rows["l_sha"], rows["sha"] = sha_len, [f"{i:064x}".encode() for i in range(s, e)]
            rows["l_w"], rows["w"], rows["l_h"], rows["h"] = 4, 320, 4, 320
            rows["l_created"], rows["created"] = len(now_b), now_b
            rows["l_vec"], rows["dim"], rows["vec"] = 4 + 4 * dim, dim, vectors[s:e]
            copy.write(rows.tobytes())
        copy.write((-1).to_bytes(2, "big", signed=True))


def load_embedded(
    directory: Path, n: int, dim: int, ipp: int, model: tuple[str, str] | None = None
) -> dict[str, float]:
    """An embedded catalog (faiss ``hnsw``) of the same vectors; its index built and saved."""
    import shutil
    import sqlite3

    from snapshop.catalog.catalog import DB_FILE, create_catalog, open_catalog
    from snapshop.product_vectors import ProductVectors

    shutil.rmtree(directory, ignore_errors=True)
    model_id, ref = model or card_model()
    create_catalog(directory, model_id=model_id, model_ref=ref, dim=dim, index_kind="hnsw").close()
    owners, vectors = synthetic(n, dim, ipp)
    now = "2026-12-03T00:00:00+00:00"
    t0 = time.perf_counter()
    with sqlite3.connect(directory / DB_FILE) as db:
        db.executemany(
            "INSERT INTO products(id, sku, title, price, currency, category, created_at,"
            " updated_at) VALUES (?, ?, ?, 9.99, 'EUR', 'upper', ?, ?)",
            ((p + 1, f"sku-{p:07d}", f"product {p}", now, now) for p in range(int(owners[-1]) + 1)),
        )
        db.executemany(
            "INSERT INTO images(product_id, source, sha256, width, height, created_at, vector)"
            " VALUES (?, ?, ?, 320, 320, ?, ?)",
            ((int(owners[i]) + 1, f"synthetic/{i:08d}.jpg", f"{i:064x}", now, vectors[i].tobytes())
             for i in range(n)),
        )  # fmt: skip
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open_catalog(directory) as catalog:  # builds the hnsw index from the store
        catalog.save_indexes()
        ProductVectors(catalog)  # and the product-vector cache a replica loads
    return {"load_s": load_s, "build_s": time.perf_counter() - t0}


def probe(args: argparse.Namespace) -> None:
    """In a fresh process: open a replica's searcher over ``--catalog``, search, report RSS."""
    from snapshop.api import open_searcher

    out: dict[str, Any] = {"rss_start_mb": status_mb("VmRSS")}
    t0 = time.perf_counter()
    searcher = open_searcher(args.catalog, detector="none", ranking=args.ranking)
    out["open_s"] = time.perf_counter() - t0
    out["rss_open_mb"] = status_mb("VmRSS")
    query = np.random.default_rng(7).standard_normal(args.dim).astype(np.float32)
    query /= np.linalg.norm(query)
    t0 = time.perf_counter()
    hits = searcher.rank_products(query, 10)
    out["first_ms"] = (time.perf_counter() - t0) * 1e3
    out["rss_first_mb"] = status_mb("VmRSS")
    lat = []
    for _ in range(args.searches):
        t0 = time.perf_counter()
        searcher.rank_products(query, 10)
        lat.append((time.perf_counter() - t0) * 1e3)
    out["p50_ms"] = float(np.percentile(lat, 50))
    out["hits"] = len(hits)
    out["rss_end_mb"] = status_mb("VmRSS")
    out["peak_mb"] = status_mb("VmHWM")
    searcher.catalog.close()
    print(json.dumps(out))


def run_probe(catalog: str, dim: int, ranking: str, searches: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "probe", "--catalog", catalog, "--dim", str(dim),
           "--ranking", ranking, "--searches", str(searches)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"probe failed: {done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def memory(args: argparse.Namespace) -> None:
    print(f"# host: {platform.machine()}, {os.cpu_count()} cores; load average: {load()}")
    rows = []
    for n in args.n:
        print(f"# loading {n:,} vectors × {args.dim}, {args.images_per_product} images/product",
              flush=True)  # fmt: skip
        sides: list[tuple[str, str, dict[str, Any]]] = []
        if not args.skip_server:
            info = load_server(args.dsn, n, args.dim, args.images_per_product, f"replica_{n}")
            sides.append(("server (pgvector HNSW)", str(info.pop("target")), info))
            print(f"# server loaded: {info}", flush=True)
        if not args.skip_embedded:
            directory = args.workdir / f"embedded-{n}"
            info = load_embedded(directory, n, args.dim, args.images_per_product)
            sides.append(("embedded (faiss hnsw)", str(directory), info))
            print(f"# embedded loaded: {info}", flush=True)
        for side, catalog, info in sides:
            for ranking in args.ranking:
                r = run_probe(catalog, args.dim, ranking, args.searches)
                r.update(side=side, n=n, ranking=ranking, **info)
                rows.append(r)
                print(f"# {side} {n} {ranking}: {r}", flush=True)
    print()
    print("| catalog | vectors | products | ranking | load s | index build s | open s |"
          " RSS after open MB | RSS after 1st search MB | peak RSS MB | 1st search ms |"
          " search p50 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['n']:,} | {r['n'] // args.images_per_product:,} | {r['ranking']}"
              f" | {r['load_s']:.1f} | {r['build_s']:.1f} | {r['open_s']:.1f}"
              f" | {r['rss_open_mb']:.0f} | {r['rss_first_mb']:.0f} | **{r['peak_mb']:.0f}**"
              f" | {r['first_ms']:.1f} | {r['p50_ms']:.2f} |")  # fmt: skip
    print(f"\n# load average after: {load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("service", help="throughput with 1 vs N replicas")
    s.add_argument("--catalog", required=True, help="the server catalog's DSN")
    s.add_argument("--pgdata", type=Path, help="the server's data dir (its CPU is measured)")
    s.add_argument("--queries", type=Path, required=True)
    s.add_argument("--max-queries", type=int, default=200)
    s.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    s.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    s.add_argument("--requests", type=int, default=200)
    s.add_argument("--duration", type=float, default=90.0)
    s.add_argument("--warmup", type=int, default=4)
    s.add_argument("--detector", help="serve --detector (default: the catalog's)")
    s.add_argument("--serve-arg", action="append", default=[])
    s.add_argument("-k", type=int, default=10)
    m = sub.add_parser("memory", help="peak RSS of a replica at N vectors")
    m.add_argument("--dsn", help="a PostgreSQL server (a database per N is created on it)")
    m.add_argument("--n", type=int, nargs="+", default=[100_000])
    m.add_argument("--dim", type=int, default=512)
    m.add_argument("--images-per-product", type=int, default=4)
    m.add_argument("--ranking", nargs="+", default=["product", "image"])
    m.add_argument("--searches", type=int, default=50)
    m.add_argument("--workdir", type=Path, default=Path("/tmp/replicas-bench"))
    m.add_argument("--skip-server", action="store_true")
    m.add_argument("--skip-embedded", action="store_true")
    p = sub.add_parser("probe", help="(internal) one replica's RSS, in a fresh process")
    p.add_argument("--catalog", required=True)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ranking", default="product")
    p.add_argument("--searches", type=int, default=50)
    args = ap.parse_args()
    {"service": service, "memory": memory, "probe": probe}[args.command](args)


if __name__ == "__main__":
    main()
