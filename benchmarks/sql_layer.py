"""What SQLAlchemy Core would cost on the catalog's hot read path (the choice of SQL layer).

The search answers every query with ``products_by_ids`` (the top products' rows) and the page
with ``get_product``; both are a few microseconds of SQLite work, so a layer's per-call overhead
is the whole difference. Compares raw ``sqlite3`` (the store's code path), SQLAlchemy Core with
a compiled ``select`` and with ``text()``, on one SQLite file of ``--products`` rows. Needs
``pip install sqlalchemy`` (not a dependency of snapshop: this script is the reason why).

    python benchmarks/sql_layer.py --products 10000 --repeat 2000
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from snapshop.catalog.store import CatalogStore, _product


def per_call_us(fn: Callable[[], Any], repeat: int) -> float:
    """Median of 5 runs of ``repeat`` calls, in microseconds per call."""
    fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        runs.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()

    import sqlalchemy as sa

    path = Path(tempfile.mkdtemp(prefix="sql-layer-")) / "catalog.sqlite"
    store = CatalogStore(path)
    with store.transaction() as db:
        for i in range(args.products):
            store.upsert_product(db, f"sku-{i}", title=f"t{i}", price=float(i), category="c")
    rng = np.random.default_rng(0)
    ids50 = [int(i) for i in rng.choice(np.arange(1, args.products + 1), 50, replace=False)]
    one = ids50[0]

    raw = sqlite3.connect(path, check_same_thread=False)
    raw.row_factory = sqlite3.Row
    marks = ",".join("?" * 50)

    engine = sa.create_engine(f"sqlite:///{path}")
    conn = engine.connect()
    products = sa.Table("products", sa.MetaData(), autoload_with=engine)
    by_id = sa.select(products).where(products.c.id == sa.bindparam("id"))
    by_ids = sa.select(products).where(products.c.id.in_(sa.bindparam("ids", expanding=True)))
    text_one = sa.text("SELECT * FROM products WHERE id = :id")

    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (
            "raw sqlite3",
            lambda: raw.execute("SELECT * FROM products WHERE id = ?", (one,)).fetchall(),
            lambda: raw.execute(f"SELECT * FROM products WHERE id IN ({marks})", ids50).fetchall(),
        ),
        (
            "CatalogStore (raw sqlite3 + Product)",
            lambda: store.get_product(one),
            lambda: store.products_by_ids(ids50),
        ),
        (
            "SQLAlchemy Core select()",
            lambda: conn.execute(by_id, {"id": one}).mappings().all(),
            lambda: conn.execute(by_ids, {"ids": ids50}).mappings().all(),
        ),
        (
            "SQLAlchemy Core select() + Product",
            lambda: [_product(r) for r in conn.execute(by_id, {"id": one}).mappings()],
            lambda: {r["id"]: _product(r) for r in conn.execute(by_ids, {"ids": ids50}).mappings()},
        ),
        (
            "SQLAlchemy Core text()",
            lambda: conn.execute(text_one, {"id": one}).mappings().all(),
            lambda: conn.execute(by_ids, {"ids": ids50}).mappings().all(),
        ),
    ]
    print(f"SQLite, {args.products} products, sqlalchemy {sa.__version__}")
    print("| layer | get_product (µs) | products_by_ids, 50 ids (µs) |")
    print("|---|---|---|")
    for name, get_one, get_50 in cases:
        one_us = per_call_us(get_one, args.repeat)
        many_us = per_call_us(get_50, max(args.repeat // 10, 50))
        print(f"| {name} | {one_us:.1f} | {many_us:.1f} |")
    conn.close()
    raw.close()
    store.close()


if __name__ == "__main__":
    main()
