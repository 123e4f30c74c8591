"""Search-stage time of image-based results by product vector (the default) vs by best image.

Builds a catalog of synthetic vectors (``--images-per-product`` clustered vectors per
product, ten categories) for each of ``--products``, then times ``Searcher.rank_products``
(the image-based part of ``Searcher.search``'s search stage) for random queries near product
centres: by product vector (``ranking="product"``) and by best image (``"image"``), without a
filter and with a one-category filter (10 % of the products). Also prints what the product
ranking costs around the searches: computing the product vectors at first open (no cache),
and, after one image is written, the refresh and the first search (which rebuilds the
product index): medians of 5 writes.

    python benchmarks/ranking_speed.py --products 10000 100000
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.catalog import Catalog, create_catalog
from snapshop.search import ProductFilter, Searcher

MODEL_ID = "synthetic@000000000000"
CATEGORIES = 10
BATCH = 20_000  # images per write transaction


class VectorsOnly:
    """The searcher's embedder, for its model id only: queries are given as vectors."""

    model_id = MODEL_ID


def unit_rows(x: NDArray[np.float32]) -> NDArray[np.float32]:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fill(catalog: Catalog, centres: NDArray[np.float32], per_product: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    n = 0
    for lo in range(0, len(centres), BATCH // per_product):
        with catalog.writing() as write:
            for p in range(lo, min(lo + BATCH // per_product, len(centres))):
                pid = write.upsert_product(f"p{p}", category=f"c{p % CATEGORIES}", price=1.0)
                noise = rng.normal(size=(per_product, dim)).astype(np.float32)
                for vec in unit_rows(centres[p] + 0.5 * noise / np.sqrt(dim) * 4):
                    write.insert_image(pid, source=f"{n}.jpg", blob=None, sha256=f"{n:064x}",
                                       width=1, height=1, vector=vec)  # fmt: skip
                    n += 1


def time_ms(run, queries: NDArray[np.float32]) -> tuple[float, float]:
    """(p50, mean) ms per query after a warm-up."""
    for q in queries[:10]:
        run(q)
    times = []
    for q in queries:
        t = time.perf_counter()
        run(q)
        times.append(1e3 * (time.perf_counter() - t))
    return float(np.median(times)), float(np.mean(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--images-per-product", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()

    rows = []
    around = []
    for n_products in args.products:
        rng = np.random.default_rng(n_products)
        centres = unit_rows(rng.normal(size=(n_products, args.dim)).astype(np.float32))
        picked = centres[rng.choice(n_products, args.queries)]
        noise = rng.normal(size=picked.shape).astype(np.float32)
        queries = unit_rows(picked + 0.5 * noise / np.sqrt(args.dim) * 4)
        with tempfile.TemporaryDirectory() as tmp:
            catalog = create_catalog(Path(tmp) / "cat", model_id=MODEL_ID, model_ref="synthetic",
                                     dim=args.dim, index_kind="flat")  # fmt: skip
            with catalog:
                t = time.perf_counter()
                fill(catalog, centres, args.images_per_product, seed=1)
                fill_s = time.perf_counter() - t
                t = time.perf_counter()
                searcher = Searcher(catalog, VectorsOnly(), ranking="product")  # type: ignore[arg-type]
                build_s = time.perf_counter() - t
                searcher.auto_refresh = False
                images = n_products * args.images_per_product
                for label, filters in (("none", None), ("1 category (10 %)", ProductFilter("c3"))):
                    cells = []
                    for ranking in ("product", "image"):
                        run = functools.partial(searcher.rank_products, k=args.k,
                                                filters=filters, ranking=ranking)  # fmt: skip
                        cells.append(time_ms(run, queries))
                    rows.append((n_products, images, label, *cells))
                refresh_ms, first_ms = [], []
                for n in range(5):  # one more image each, as an ingest would add
                    with catalog.writing() as write:
                        write.insert_image(n + 1, source=f"new{n}.jpg", blob=None,
                                           sha256=f"{n:x}".rjust(64, "e"), width=1, height=1,
                                           vector=queries[n])  # fmt: skip
                    t = time.perf_counter()
                    searcher.refresh()
                    refresh_ms.append(1e3 * (time.perf_counter() - t))
                    t = time.perf_counter()
                    searcher.rank_products(queries[n], args.k)  # rebuilds the product index
                    first_ms.append(1e3 * (time.perf_counter() - t))
                around.append(
                    (
                        n_products,
                        images,
                        fill_s,
                        build_s,
                        float(np.median(refresh_ms)),
                        float(np.median(first_ms)),
                    )
                )

    print(f"\ndim {args.dim}, exact (flat) indexes, k = {args.k}, {args.queries} queries\n")
    print(
        "| products | images | filter | product vector p50 / mean ms | best image p50 / mean ms |"
    )
    print("|---|---|---|---|---|")
    for n, images, label, (pp50, pmean), (ip50, imean) in rows:
        print(f"| {n:,} | {images:,} | {label} | {pp50:.2f} / {pmean:.2f} |"
              f" {ip50:.2f} / {imean:.2f} |")  # fmt: skip
    print("\n| products | images | catalog fill s | product vectors at first open s |"
          " refresh after one write ms | first search after it ms |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, images, fill_s, build_s, refresh_ms, first_ms in around:
        print(f"| {n:,} | {images:,} | {fill_s:.1f} | {build_s:.1f} | {refresh_ms:.0f} |"
              f" {first_ms:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
