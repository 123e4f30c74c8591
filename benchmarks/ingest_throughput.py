"""Indexing throughput (images/s) of the batch pipeline on a generated folder of product photos.

    python benchmarks/ingest_throughput.py --folder /tmp/snapshop-bench/shop --images 2000 \
        --model efficientnet_lite0 --workers 0 2 [--detector segmenter] [--embed-parallel 0 ""]

The folder (``<sku>/<n>.jpg``, drawn garments from ``snapshop.demo.render`` at ``--size`` px)
is generated once if missing. Each configuration indexes it into a fresh catalog.
``--embed-parallel 0 ""`` compares one batched embedding call per batch (before issue #16)
with the default one-image calls side by side; "CPU s (main)" is the indexing process's CPU
time (decode workers not counted).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from snapshop import api
from snapshop.data.sources import read_source
from snapshop.demo import demo_products, render
from snapshop.models.embedder import PARALLEL_ENV


def generate_folder(folder: Path, n_images: int, size: int) -> None:
    products = demo_products(128)
    per_product = -(-n_images // len(products))
    n = 0
    for p_index, product in enumerate(products):
        for j in range(per_product):
            if n == n_images:
                return
            path = folder / product.sku / f"{j:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            render(product, p_index * 1000 + j, size=size).save(path, quality=90)
            n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/snapshop-bench/shop"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--model", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--detector", default="none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--embed-parallel", nargs="+", default=[""], metavar="N",
        help="SNAPSHOP_EMBED_PARALLEL per run: 0 = one batched call per batch (before issue"
        " #16), N = N one-image calls side by side; empty: the default (one per core)",
    )  # fmt: skip
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.folder.exists():
        t = time.perf_counter()
        generate_folder(args.folder, args.images, args.size)
        print(f"generated {args.images} images in {time.perf_counter() - t:.0f} s", flush=True)
    n = len(read_source(args.folder))
    print(f"{n} images in {args.folder}, {args.size}px JPEG, detector {args.detector}")
    print("| model | workers | batch | embed calls | images | crops | seconds | images/s |"
          " CPU s (main) | load | peak RSS main MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    runs = [(m, w, p) for m in args.model for w in args.workers for p in args.embed_parallel]
    for model, workers, parallel in runs:
        api.load_embedder(model)  # export once, outside the timing
        os.environ[PARALLEL_ENV] = parallel
        cpu = time.process_time()
        out = Path(tempfile.mkdtemp(prefix="snapshop-ingest-"))
        try:
            report = api.index_source(
                args.folder, out / "catalog", model=model, detector=args.detector,
                batch_size=args.batch_size, workers=workers,
            )  # fmt: skip
        finally:
            shutil.rmtree(out, ignore_errors=True)
        cpu = time.process_time() - cpu
        main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        name = Path(model).name if Path(model).exists() else model
        calls = {"": "default", "0": "one batched"}.get(parallel, parallel)
        print(f"| {name} | {workers} | {args.batch_size} | {calls} | {report.added} |"
              f" {report.crops} | {report.seconds:.1f} | {report.images_per_second:.1f} |"
              f" {cpu:.0f} | {os.getloadavg()[0]:.1f} | {main_mb:.0f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
