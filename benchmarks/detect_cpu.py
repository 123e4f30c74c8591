"""CPU time a garment detector spends per photo, detectors alternated photo by photo.

    python benchmarks/detect_cpu.py --dataset ../shared/datasets/ccp-dev --photos 40 \
        --detector segmenter --detector segmenter:precision=fp32 [--rounds 3]

Each photo is decoded once (not timed); every detector then detects it, in an order that
flips each photo, so a load change on a shared machine hits them alike. The table gives the
median and p95 of the process's CPU time per photo (every thread counted: the work done) and
of the wall time. Without ``--dataset``, generated 640 px photos. Run with another checkout's
``PYTHONPATH`` to compare code versions.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from snapshop.demo import demo_products, render
from snapshop.detect.factory import create_detector
from snapshop.images import load_image


def photos(dataset: Path | None, n: int) -> list[Image.Image]:
    if dataset is None:
        products = demo_products(24, seed=1)
        return [render(products[i % len(products)], 10_000 + i, size=640) for i in range(n)]
    with open(dataset / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [load_image(dataset / row["path"]) for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=None, help="street photos (ccp-dev)")
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--detector", action="append", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    specs = args.detector or ["segmenter", "segmenter:precision=fp32"]
    detectors = [create_detector(spec) for spec in specs]
    images = photos(args.dataset, args.photos)
    for detector in detectors:  # warm-up: exports, compiles
        for image in images[:3]:
            detector.detect(image)
    cpu: dict[str, list[float]] = {spec: [] for spec in specs}
    wall: dict[str, list[float]] = {spec: [] for spec in specs}
    load = os.getloadavg()[0]
    for n, image in enumerate(images * args.rounds):
        order = list(zip(specs, detectors, strict=True))
        for spec, detector in order if n % 2 == 0 else order[::-1]:
            w, c = time.perf_counter(), time.process_time()
            detector.detect(image)
            wall[spec].append((time.perf_counter() - w) * 1e3)
            cpu[spec].append((time.process_time() - c) * 1e3)
    print(f"{len(images)} photos × {args.rounds} rounds ({args.dataset or 'generated 640 px'}),"
          f" load average {load:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| detector | CPU p50 ms | CPU p95 ms | wall p50 ms | wall p95 ms |")
    print("|---|---|---|---|---|")
    for spec in specs:
        c, w = cpu[spec], wall[spec]
        print(f"| {spec} | {statistics.median(c):.1f} | {np.percentile(c, 95):.1f} |"
              f" {statistics.median(w):.1f} | {np.percentile(w, 95):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
