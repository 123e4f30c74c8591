"""Indexing throughput (images/s) of the batch pipeline on a generated folder of product photos.

    python benchmarks/ingest_throughput.py --folder /tmp/snapshop-bench/shop --images 2000 \
        --model efficientnet_lite0 --workers 0 2 [--detector segmenter] [--embed-parallel 0 ""] \
        [--precision bf16 fp32] [--mappers 0 ""] [--rounds 2]

The folder (``<sku>/<n>.jpg``, drawn garments from ``snapshop.demo.render`` at ``--size`` px)
is generated once if missing; ``--images`` also caps how many of its photos are indexed.
Each configuration indexes them into a fresh catalog; with ``--rounds N`` the whole list of
configurations runs N times, alternated, so that a busy machine hits every one alike.
``--precision`` sets ``SNAPSHOP_PRECISION`` per run (bf16: the OpenVINO provider, the
default; fp32: ONNX Runtime's CPU provider). ``--mappers 0 ""`` compares each batch detected
and embedded at once before it is written (``Ingestor(mappers=0)``, before the per-photo
pipeline) with the default (one mapper thread per core, overlapping the writer).
``--embed-parallel 0 ""`` compares one batched embedding call per batch (before issue #16)
with the default one-image calls side by side.
"CPU s" is the CPU time of the indexing process and of its decode workers together, "CPU
ms/photo" that divided by the photos added; "load" is the 1-minute load average at the end.
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
from typing import Any

from snapshop import api
from snapshop.data.sources import read_source
from snapshop.demo import demo_products, render
from snapshop.ingest import Ingestor
from snapshop.models.embedder import PARALLEL_ENV
from snapshop.models.runtime import PRECISION_ENV


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


def with_mappers(mappers: str) -> type[Ingestor]:
    """``Ingestor`` as ``api.index_source`` makes it, with ``mappers`` ("": the default)."""

    if not mappers:
        return Ingestor  # also what code older than ``mappers`` runs

    class Mapped(Ingestor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, mappers=int(mappers))

    return Mapped


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/snapshop-bench/shop"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--model", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--detector", default="none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", nargs="+", default=[""], metavar="P",
                    help="SNAPSHOP_PRECISION per run (bf16, fp32); empty: the default")  # fmt: skip
    ap.add_argument("--mappers", nargs="+", default=[""], metavar="N",
                    help="Ingestor(mappers=N) per run: 0 = each batch at once (before);"
                    " empty: the default (one per core)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=1, help="repeat the runs, alternated")
    ap.add_argument(
        "--embed-parallel",
        nargs="+",
        default=[""],
        metavar="N",
        help="SNAPSHOP_EMBED_PARALLEL per run: 0 = one batched call per batch (before issue"
        " #16), N = N one-image calls side by side; empty: the default (one per core)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.folder.exists():
        t = time.perf_counter()
        generate_folder(args.folder, args.images, args.size)
        print(f"generated {args.images} images in {time.perf_counter() - t:.0f} s", flush=True)
    records = read_source(args.folder)[: args.images]
    print(f"{len(records)} images of {args.folder}, {args.size}px JPEG, detector {args.detector},"
          f" load average at the start {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(
        "| model | precision | mappers | workers | batch | embed calls | images | crops | seconds |"
        " images/s | CPU s | CPU ms/photo | load | peak RSS main MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    runs = [
        (m, w, p, prec, mappers)
        for m in args.model
        for w in args.workers
        for p in args.embed_parallel
        for prec in args.precision
        for mappers in args.mappers
    ]
    for model in args.model:
        api.load_embedder(model)  # export once, outside the timing
    for _ in range(args.rounds):
        for model, workers, parallel, precision, mappers in runs:
            os.environ[PARALLEL_ENV] = parallel
            os.environ[PRECISION_ENV] = precision
            api.Ingestor = with_mappers(mappers)  # type: ignore[misc]
            cpu = cpu_seconds()
            out = Path(tempfile.mkdtemp(prefix="snapshop-ingest-"))
            try:
                report = api.index_source(
                    records,
                    out / "catalog",
                    model=model,
                    detector=args.detector,
                    batch_size=args.batch_size,
                    workers=workers,
                )
            finally:
                shutil.rmtree(out, ignore_errors=True)
            cpu = cpu_seconds() - cpu
            main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
            name = Path(model).name if Path(model).exists() else model
            calls = {"": "default", "0": "one batched"}.get(parallel, parallel)
            per_photo = 1e3 * cpu / max(1, report.added)
            print(
                f"| {name} | {precision or 'default'} | {mappers or 'default'} | {workers} |"
                f" {args.batch_size} | {calls} |"
                f" {report.added} | {report.crops} | {report.seconds:.1f} |"
                f" {report.images_per_second:.1f} | {cpu:.0f} | {per_photo:.0f} |"
                f" {os.getloadavg()[0]:.1f} | {main_mb:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
