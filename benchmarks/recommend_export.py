"""Similar-products export rate (``snapshop recommend``) on a synthetic catalog.

Builds a catalog of ``--products`` products with ``--images-per-product`` synthetic image
vectors each (clustered around a per-product centre, ``--dim`` dimensions, no image files),
then times the product-vector computation and the export of every product's k most similar
products, and samples the process's resident memory after every batch (flat = streaming).

    python benchmarks/recommend_export.py --products 100000 --out /tmp/similar.csv
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.product_vectors import ProductVectors
from snapshop.recommend import export_similar


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(directory: Path, products: int, per_product: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    catalog = create_catalog(
        directory,
        model_id="synthetic@000000000000",
        model_ref="synthetic",
        dim=dim,
        index_kind="flat",
    )
    store = catalog.store
    try:
        for lo in range(0, products, 10_000):
            n = min(10_000, products - lo)
            centres = rng.normal(size=(n, dim)).astype(np.float32)
            with store.transaction() as db:
                for i in range(n):
                    pid = store.upsert_product(db, f"sku-{lo + i:07d}", price=float(i % 100))
                    noise = rng.normal(size=(per_product, dim)).astype(np.float32)
                    vecs = centres[i] + 0.6 * noise
                    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                    for j, vec in enumerate(vecs):
                        store.insert_image(
                            db,
                            pid,
                            source=f"{lo + i}-{j}.jpg",
                            blob=None,
                            sha256=f"{lo + i:032x}{j:032x}",
                            width=1,
                            height=1,
                            vector=vec,
                        )
    finally:
        catalog.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--images-per-product", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="similar.csv or .parquet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "catalog"
        out = args.out or Path(tmp) / "similar.csv"
        t = time.perf_counter()
        build(directory, args.products, args.images_per_product, args.dim, args.seed)
        build_s = time.perf_counter() - t
        catalog = open_catalog(directory)
        try:
            t = time.perf_counter()
            ProductVectors(catalog)
            vectors_s = time.perf_counter() - t
            samples: list[float] = []
            before = rss_mib()
            report = export_similar(
                catalog,
                out,
                args.k,
                batch_size=args.batch_size,
                progress=lambda n: samples.append(rss_mib()),
            )
        finally:
            catalog.close()
        size = out.stat().st_size / 2**20
        print(
            f"{args.products} products x {args.images_per_product} images, dim {args.dim},"
            f" k {args.k}, batch {args.batch_size}, output {out.suffix}\n"
        )
        print("| step | seconds | rate |")
        print("|---|---|---|")
        print(f"| build synthetic catalog (SQLite) | {build_s:.1f} | |")
        images = args.products * args.images_per_product
        print(
            f"| product vectors from the store (first time) | {vectors_s:.1f} |"
            f" {images / vectors_s:.0f} images/s |"
        )
        print(
            f"| export (cached vectors, search, write) | {report.seconds:.1f} |"
            f" {report.products_per_second:.0f} products/s |"
        )
        print(
            f"\n{report.rows} rows, {size:.1f} MiB; resident memory before the export"
            f" {before:.0f} MiB, during it {min(samples):.0f}–{max(samples):.0f} MiB"
        )
        every = max(1, len(samples) // 10)
        print(
            "MiB after batches:",
            ", ".join(f"{n}: {s:.0f}" for n, s in list(enumerate(samples))[::every]),
        )


if __name__ == "__main__":
    main()
