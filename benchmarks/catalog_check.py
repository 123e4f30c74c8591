"""How long `snapshop catalog check` takes, stage by stage, on a synthetic catalog.

Builds a directory catalog of N random unit vectors (one image a product, a crop at "upper"
on every other image, no blob files: ``--no-blobs`` territory), saves its indexes and its
product-vector cache, then times `integrity.check_catalog` and prints a table of its stages.

    python benchmarks/catalog_check.py --n 100000 --dim 512 --kind flat
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.catalog.store import NewCrop
from snapshop.integrity import check_catalog
from snapshop.product_vectors import ProductVectors


def build(directory: Path, n: int, dim: int, kind: str) -> float:
    start = time.perf_counter()
    catalog = create_catalog(directory, model_id="bench@000000000000", model_ref="bench",
                             dim=dim, index_kind=kind)  # fmt: skip
    rng = np.random.default_rng(0)
    try:
        for lo in range(0, n, 10_000):
            vectors = rng.standard_normal((min(10_000, n - lo), dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            image_ids, crop_ids, crops = [], [], []
            with catalog.write_lock(), catalog.store.transaction() as db:
                for j, v in enumerate(vectors):
                    n_image = lo + j
                    product = catalog.store.upsert_product(db, f"p{n_image}")
                    crop = [NewCrop("upper", "top", 0.9, (0, 0, 8, 8), v)] if n_image % 2 else []
                    image_id, ids = catalog.store.insert_image(
                        db, product, source=f"{n_image}.jpg", blob=None,
                        sha256=f"{n_image:064x}", width=8, height=8, vector=v, crops=crop,
                    )  # fmt: skip
                    image_ids.append(image_id)
                    crop_ids += ids
                    crops += [v] * len(ids)
            catalog.applied(catalog.store.last_commit())
            catalog.add_vectors(None, np.array(image_ids), vectors)
            if crop_ids:
                catalog.add_vectors("upper", np.array(crop_ids), np.array(crops))
        with catalog.write_lock():
            catalog.save_indexes(measure=False)
        ProductVectors(catalog)  # its cache file, as a catalog that served searches has
    finally:
        catalog.close()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kind", default="flat")
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: /tmp)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        built = build(root / "catalog", args.n, args.dim, args.kind)
        stages: list[tuple[str, float]] = []
        with open_catalog(root / "catalog") as catalog:
            last = time.perf_counter()
            start = last

            def progress(stage: str) -> None:
                nonlocal last
                now = time.perf_counter()
                if stages:
                    stages[-1] = (stages[-1][0], now - last)
                stages.append((stage, 0.0))
                last = now

            report = check_catalog(catalog, blobs=False, progress=progress)
            end = time.perf_counter()
            stages[-1] = (stages[-1][0], end - last)
        print(f"built {args.n} images x {args.dim} ({args.kind}) in {built:.1f} s;"
              f" problems: {len(report.problems)}")  # fmt: skip
        print("| stage | s |\n|---|---|")
        for stage, seconds in stages:
            print(f"| {stage} | {seconds:.2f} |")
        print(f"| **total** | **{end - start:.2f}** |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
