"""Indexing throughput (images/s) of the batch pipeline on a generated folder of product photos.

    python benchmarks/ingest_throughput.py --folder /tmp/snapshop-bench/shop --images 2000 \
        --model efficientnet_lite0 --workers 0 2 [--detector segmenter] [--embed-parallel 0 ""] \
        [--precision bf16 fp32] [--mappers 0 ""] [--pinning "" off] [--rounds 2]

The folder (``<sku>/<n>.jpg``, drawn garments from ``snapshop.demo.render`` at ``--size`` px)
is generated once if missing; ``--images`` also caps how many of its photos are indexed.
Each configuration indexes them into a fresh catalog; with ``--rounds N`` the whole list of
configurations runs N times, alternated, so that a busy machine hits every one alike.
``--precision`` sets ``SNAPSHOP_PRECISION`` per run (bf16: the OpenVINO provider, the
default; fp32: ONNX Runtime's CPU provider). ``--mappers 0 ""`` compares no mapper threads
(``Ingestor(mappers=0)``: decode workers decode, the writer's thread detects and embeds) with
the default (one mapper thread per core, overlapping the writer). Run against the code before
this pipeline (``PYTHONPATH`` to an older ``src``) with the default ``--mappers``.
``--pinning "" off`` runs with OpenVINO's CPU pinning as the runtime sets it and with
``ENABLE_CPU_PINNING=NO`` added to every OpenVINO session (a lever of
``snapshop.models.runtime``, measured here from outside: with pinning on, every OpenVINO call
of a process ran on one core). ``--embed-parallel 0 ""`` compares one batched embedding
call per batch (before issue #16) with the default one-image calls side by side.
"CPU s" is the CPU time of the indexing process and of its decode workers together, "CPU
ms/photo" that divided by the photos added; "idle" is the share of the machine's CPU time no
process used during the run (Linux: /proc/stat; what the pipeline left unused, whatever else
ran); "load" is the 1-minute load average at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from snapshop import api
from snapshop.data.sources import CatalogRecord, read_source
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


def shop_records(folder: Path, n_images: int, size: int) -> list[CatalogRecord]:
    """The first ``n_images`` records of ``folder``, generated first when it is missing."""
    if not folder.exists():
        t = time.perf_counter()
        generate_folder(folder, n_images, size)
        print(f"generated {n_images} images in {time.perf_counter() - t:.0f} s", flush=True)
    return read_source(folder)[:n_images]


def with_mappers(mappers: str) -> type[Ingestor]:
    """``Ingestor`` as ``api.index_source`` makes it, with ``mappers`` ("": the default)."""

    if not mappers:
        return Ingestor  # also what code older than ``mappers`` runs

    class Mapped(Ingestor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, mappers=int(mappers))

    return Mapped


_SESSION_INIT = ort.InferenceSession.__init__


def openvino_pinning(pinning: str) -> None:
    """``off``: every OpenVINO session made from now on gets ``ENABLE_CPU_PINNING=NO`` in its
    CPU load_config; empty: sessions are made as the runtime makes them."""

    def without_pinning(self: Any, model: Any, options: Any = None, providers: Any = None,
                        *args: Any, **kwargs: Any) -> None:  # fmt: skip
        fixed = []
        for provider in providers or []:
            if isinstance(provider, tuple) and provider[0] == "OpenVINOExecutionProvider":
                settings = dict(provider[1])
                config = json.loads(settings.get("load_config", "{}"))
                config.setdefault("CPU", {})["ENABLE_CPU_PINNING"] = "NO"
                settings["load_config"] = json.dumps(config)
                provider = (provider[0], settings)
            fixed.append(provider)
        _SESSION_INIT(self, model, options, fixed or providers, *args, **kwargs)

    ort.InferenceSession.__init__ = without_pinning if pinning == "off" else _SESSION_INIT


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def idle_jiffies() -> tuple[int, int]:
    """(idle, total) CPU jiffies of the whole machine so far; (0, 0) where /proc/stat is not."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return fields[3] + fields[4], sum(fields)  # idle + iowait


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
                    help="Ingestor(mappers=N) per run: 0 = no mapper threads; empty: the"
                    " default (one per core)")  # fmt: skip
    ap.add_argument("--pinning", nargs="+", default=[""], metavar="P",
                    help="OpenVINO CPU pinning per run: empty = the runtime's; off")  # fmt: skip
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
    records = shop_records(args.folder, args.images, args.size)
    print(f"{len(records)} images of {args.folder}, {args.size}px JPEG, detector {args.detector},"
          f" load average at the start {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(
        "| model | precision | pinning | mappers | workers | batch | embed calls | images | crops |"
        " seconds | images/s | CPU s | CPU ms/photo | idle | load | peak RSS main MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    runs = [
        (m, w, p, prec, mappers, pinning)
        for m in args.model
        for w in args.workers
        for p in args.embed_parallel
        for prec in args.precision
        for mappers in args.mappers
        for pinning in args.pinning
    ]
    for model in args.model:
        api.load_embedder(model)  # export once, outside the timing
    for _ in range(args.rounds):
        for model, workers, parallel, precision, mappers, pinning in runs:
            openvino_pinning(pinning)
            os.environ[PARALLEL_ENV] = parallel
            os.environ[PRECISION_ENV] = precision
            api.Ingestor = with_mappers(mappers)  # type: ignore[misc]
            cpu, idle = cpu_seconds(), idle_jiffies()
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
            idle_now = idle_jiffies()
            total = idle_now[1] - idle[1]
            idle_share = f"{(idle_now[0] - idle[0]) / total:.0%}" if total > 0 else "–"
            main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
            name = Path(model).name if Path(model).exists() else model
            calls = {"": "default", "0": "one batched"}.get(parallel, parallel)
            per_photo = 1e3 * cpu / max(1, report.added)
            print(
                f"| {name} | {precision or 'default'} | {pinning or 'default'} |"
                f" {mappers or 'default'} | {workers} |"
                f" {args.batch_size} | {calls} |"
                f" {report.added} | {report.crops} | {report.seconds:.1f} |"
                f" {report.images_per_second:.1f} | {cpu:.0f} | {per_photo:.0f} | {idle_share} |"
                f" {os.getloadavg()[0]:.1f} | {main_mb:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
