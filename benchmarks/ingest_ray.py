"""Indexing on Ray (local, N CPUs) vs in-process, on the same generated photos (issue #14).

    python benchmarks/ingest_ray.py --folder /tmp/snapshop-bench/shop --images 2000 \
        --model efficientnet_lite0 --cpus 2 [--detector none segmenter --detector-images 400]

The folder is ``benchmarks/ingest_throughput.py``'s (generated once by its
``generate_folder`` when missing). Each run indexes into a fresh catalog; in-process runs
use the default decode workers. The local Ray instance starts once, before the runs, and is
timed apart ("Ray start"), so the Ray rows show the steady overhead of the dataset, the actor
pool (each actor loads its sessions: part of the run) and shipping bytes and vectors back to
the writer. "overhead" = in-process images/s ÷ Ray images/s for the same detector.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ingest_throughput import shop_records

from snapshop import api
from snapshop.ingest_ray import RayConfig, import_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/snapshop-bench/shop"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--detector", nargs="+", default=["none"])
    ap.add_argument(
        "--detector-images", type=int, default=400,
        help="photos indexed with a detector (the first N: detection is ~3x slower)",
    )  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    records = shop_records(args.folder, args.images, args.size)
    api.load_embedder(args.model)  # export once, outside the timing

    ray = import_ray()
    t = time.perf_counter()
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False,
        object_store_memory=256 << 20, logging_level=logging.WARNING, log_to_driver=False,
    )  # fmt: skip
    started = time.perf_counter() - t
    print(f"{len(records)} images in {args.folder}, model {args.model};"
          f" local Ray with {args.cpus} CPUs: Ray start {started:.1f} s")  # fmt: skip
    print("| detector | runner | images | crops | seconds | images/s | overhead | load |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for detector in args.detector:
            n = len(records) if detector == "none" else min(len(records), args.detector_images)
            rates: dict[str, float] = {}
            for runner, on_ray in (("in-process", None), ("Ray", RayConfig())):
                out = Path(tempfile.mkdtemp(prefix="snapshop-ray-bench-"))
                try:
                    report = api.index_source(
                        records[:n], out / "catalog", model=args.model, detector=detector,
                        batch_size=args.batch_size, ray=on_ray,
                    )  # fmt: skip
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                rates[runner] = report.images_per_second
                ratio = rates["in-process"] / rates[runner] if rates[runner] else float("nan")
                print(
                    f"| {detector} | {runner} | {report.added} | {report.crops} |"
                    f" {report.seconds:.1f} | {report.images_per_second:.1f} | {ratio:.2f}× |"
                    f" {os.getloadavg()[0]:.1f} |",
                    flush=True,
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
