"""Warm query latency per stage with garment detection, and each stage against its compute floor.

    python benchmarks/query_latency.py --dataset ../shared/datasets/ccp-dev --queries 60 \
        --variant fp32=efficientnet_lite2,segmenter:precision=fp32 --fp32 fp32 \
        --variant default=efficientnet_lite2,segmenter [--levers]

A variant is ``NAME=MODEL,DETECTOR``: MODEL is a backbone name or model directory (an int8
model from ``snapshop quantize``, say), DETECTOR a detector spec (``segmenter``,
``segmenter:precision=fp32``...). Each variant indexes its own generated catalog
(``snapshop.demo``, ``--products`` × 4 photos, with the detector, so crops are indexed too) and
answers the same street photos (the first ``--queries`` of the dataset's manifest; generated
photos when there is no ``--dataset``), read from disk so decoding is timed. Variants
alternate query by query (their order flips every round), so a load change on a shared
machine hits every variant alike.

Per stage: wall-clock p50 / p95 (the searcher's own ``timings_ms``), the CPU time the process
spent (p50; every thread counted: the work done, which a busy machine changes far less than
the wall clock) and the compute floor: the FLOPs of the stage's ONNX graphs at the shapes
actually fed (convolutions and matrix products) divided by the machine's sgemm speed,
measured by the script (numpy, 1024³, before and after). ``--levers`` then times, on the same
photos and interleaved, the embedding of photo + crops in one batched call vs one call each,
one vs two intra-op threads, and detection beside the photo's embedding in two threads.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop import api
from snapshop.demo import demo_products, generate_demo_catalog, render
from snapshop.detect.base import Detector, frame_crop, keep_best_per_position
from snapshop.images import load_image
from snapshop.models.embedder import Embedder, preprocess
from snapshop.models.flops import graph_flops, sgemm_gflops
from snapshop.search import Searcher

STAGES = ("decode", "detect", "embed", "search", "total")


@dataclass
class CpuMeter:
    """CPU seconds of the whole process spent inside wrapped calls, per query."""

    spent: dict[str, float] = field(default_factory=dict)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[stage] = self.spent.get(stage, 0.0) + time.process_time() - start

        return timed


@dataclass
class Variant:
    name: str
    model: str
    detector: str
    searcher: Searcher | None = None
    meter: CpuMeter = field(default_factory=CpuMeter)
    trunk_inputs: list[tuple[int, int]] = field(default_factory=list)  # per query: (h, w) fed
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    flops: dict[str, list[float]] = field(default_factory=dict)
    counter: FlopCounter | None = None


def parse_variant(text: str) -> Variant:
    name, eq, rest = text.partition("=")
    model, comma, detector = rest.partition(",")
    if not eq or not comma or not name or not model:
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL,DETECTOR, got {text!r}")
    return Variant(name, model, detector)


def query_photos(dataset: Path | None, n: int, workdir: Path) -> list[Path]:
    """Street photos from ``dataset``'s manifest, or generated photos without one."""
    if dataset is not None:
        with open(dataset / "manifest.csv", newline="") as fh:
            return [dataset / row["path"] for row in list(csv.DictReader(fh))[:n]]
    out = workdir / "queries"
    out.mkdir(parents=True, exist_ok=True)
    products = demo_products(24, seed=1)
    paths = []
    for i in range(n):
        path = out / f"{i:03d}.jpg"
        render(products[i % len(products)], 10_000 + i, size=640).save(path, quality=90)
        paths.append(path)
    return paths


def serial_submit(embedder: Embedder) -> Callable[[Any], Future[NDArray[np.float32]]]:
    """``Embedder.submit`` that returns a future the searcher resolves after detecting: the
    photo is then embedded beside nothing, after the detector (before issue #16)."""

    class Deferred(Future[NDArray[np.float32]]):
        def __init__(self, image: Any) -> None:
            super().__init__()
            self.image = image

        def result(self, timeout: float | None = None) -> NDArray[np.float32]:
            return embedder.embed_images([self.image])

    return Deferred


def instrument(variant: Variant) -> None:
    """Count CPU time in the detector and the embedder, and the trunk's input shapes."""
    searcher = variant.searcher
    assert searcher is not None
    meter = variant.meter
    embedder = searcher.embedder
    embedder.embed_images = meter.wrap("embed", embedder.embed_images)  # type: ignore[method-assign]
    detector = searcher.detector
    if detector is None:
        return
    detector.detect = meter.wrap("detect", detector.detect)  # type: ignore[method-assign]
    run_once = getattr(detector, "_probabilities", None)
    if run_once is not None:  # the segmenter: record what its trunk is fed (each trunk run)

        def recorded(rgb: Any, *args: Any, **kwargs: Any) -> Any:
            variant.trunk_inputs.append(rgb.shape[:2])
            return run_once(rgb, *args, **kwargs)

        detector._probabilities = recorded  # type: ignore[attr-defined]


class FlopCounter:
    """FLOPs per stage of a query, from the ONNX graphs at the shapes fed (cached by shape)."""

    def __init__(self, embedder: Embedder, detector: Detector | None) -> None:
        size = embedder.input_size
        self.per_image = graph_flops(
            embedder.model_dir / "model.onnx", {"images": (1, 3, size, size)}
        ).total
        self.detector = detector
        self._trunk: dict[tuple[int, int], float] = {}

    def detect(self, shapes: list[tuple[int, int]]) -> float:
        det = self.detector
        if det is None or not hasattr(det, "trunk"):
            return float("nan")
        from snapshop.detect.segmenter import preprocess as seg_preprocess

        total = 0.0
        for h, w in shapes:
            x, _ = seg_preprocess(np.zeros((h, w, 3), np.uint8), det.config.long_side)
            key = x.shape[2:]
            if key not in self._trunk:
                from snapshop.detect.pose import BODY_CHANNELS
                from snapshop.detect.segmenter import trunk_onnx_path

                # the int8 trunk runs the same convolutions: count its float original
                trunk = graph_flops(
                    trunk_onnx_path(det.trunk_overlay, det.trunk_spec), {"images": x.shape}
                )
                maps = [o.shape for o in det.trunk(x)]
                inputs = dict(zip(("s8", "s16", "s32"), maps, strict=True))
                if det.body_pose is not None:  # the pose prior's channels (issue #21)
                    inputs["body"] = (maps[0][0], len(BODY_CHANNELS), *maps[0][2:])
                head = graph_flops(det.head_model, inputs)
                self._trunk[key] = trunk.total + head.total
            total += self._trunk[key]
        return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_queries(variants: list[Variant], photos: list[Path], k: int, warmup: int) -> None:
    for round_no, photo in enumerate([*photos[:warmup], *photos]):
        order = variants if round_no % 2 == 0 else variants[::-1]
        for variant in order:
            searcher = variant.searcher
            assert searcher is not None
            variant.meter.spent.clear()
            variant.trunk_inputs.clear()
            cpu_start = time.process_time()
            result = searcher.search(photo, k)
            cpu_total = (time.process_time() - cpu_start) * 1e3
            if round_no < warmup:
                continue
            for stage in STAGES:
                variant.wall.setdefault(stage, []).append(result.timings_ms.get(stage, 0.0))
            for stage in ("detect", "embed"):
                variant.cpu.setdefault(stage, []).append(variant.meter.spent.get(stage, 0) * 1e3)
            variant.cpu.setdefault("total", []).append(cpu_total)
            n_embedded = 1 + len(result.item_results)
            counter = variant.counter
            assert counter is not None
            variant.flops.setdefault("embed", []).append(counter.per_image * n_embedded)
            variant.flops.setdefault("detect", []).append(counter.detect(variant.trunk_inputs))
            # exact search: one multiply-add per stored value per query vector
            catalog = searcher.catalog
            searched = [catalog.index(None)] + [
                catalog.index(r.position) for r in result.item_results
            ]
            n_values = sum(len(ix) * ix.dim for ix in searched if ix is not None)
            variant.flops.setdefault("search", []).append(2.0 * n_values)


def print_table(variants: list[Variant], gflops: float) -> None:
    print(
        "| variant | stage | wall p50 ms | wall p95 ms | CPU p50 ms | GFLOP (mean) |"
        " floor ms | wall p50 / floor | CPU p50 / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        for stage in STAGES:
            wall = variant.wall.get(stage, [])
            cpu = variant.cpu.get(stage)
            cpu_cell = f"{statistics.median(cpu):.1f}" if cpu else "–"
            flops = [f for f in variant.flops.get(stage, []) if np.isfinite(f)]
            if stage == "total":
                parts = [variant.flops.get(s, []) for s in ("detect", "embed", "search")]
                flops = [float(np.nansum(t)) for t in zip(*parts, strict=True)]
            if flops:
                gflop = float(np.mean(flops)) / 1e9
                floor = gflop / gflops * 1e3
                cells = f"{gflop:.3g} | {floor:.3g} | {statistics.median(wall) / floor:.1f}×"
                cells += f" | {statistics.median(cpu) / floor:.1f}×" if cpu else " | –"
            else:
                cells = "– | – | – | –"
            print(
                f"| {variant.name} | {stage} | {statistics.median(wall):.1f} |"
                f" {percentile(wall, 95):.1f} | {cpu_cell} | {cells} |"
            )


def time_pair(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Interleaved runs of each function: {name: (wall p50 ms, CPU p50 ms)}."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats + 1):
        for name in names if r % 2 == 0 else names[::-1]:
            t, c = time.perf_counter(), time.process_time()
            fns[name]()
            if r:  # the first round warms up
                wall[name].append((time.perf_counter() - t) * 1e3)
                cpu[name].append((time.process_time() - c) * 1e3)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def levers(variant: Variant, photos: list[Path], repeats: int) -> None:
    """Embedding photo + crops batched vs one call each; 1 vs 2 threads; detect ∥ embed."""
    from snapshop.models.runtime import cpu_session

    searcher = variant.searcher
    assert searcher is not None and searcher.detector is not None
    embedder, detector = searcher.embedder, searcher.detector
    images = [load_image(p) for p in photos[: max(4, repeats)]]
    batches = []
    for image in images:
        best = keep_best_per_position(detector.detect(image))
        crops = [frame_crop(image, d.box, searcher.catalog.crop_mode) for d in best.values()]
        pixels = [image] + [c for c in crops if c is not None]
        batches.append(np.stack([preprocess(p, embedder.input_size) for p in pixels]))
    one_thread = cpu_session(embedder.model_dir / "model.onnx", threads=1)
    name = embedder.input_name
    state = {"i": 0}

    def batch() -> NDArray[np.float32]:
        return batches[state["i"] % len(batches)]

    def batched(session: Any = embedder.session) -> None:
        session.run(None, {name: batch()})

    def one_by_one(session: Any = embedder.session) -> None:
        for row in batch():
            session.run(None, {name: row[None]})

    def detect_then_embed() -> None:
        image = images[state["i"] % len(images)]
        detector.detect(image)
        embedder.session.run(None, {name: batch()[:1]})

    def detect_beside_embed() -> None:
        image = images[state["i"] % len(images)]
        worker = threading.Thread(target=lambda: one_thread.run(None, {name: batch()[:1]}))
        worker.start()
        detector.detect(image)
        worker.join()

    fns: dict[str, Callable[[], object]] = {
        "photo + crops, one batched call (2 threads)": batched,
        "photo + crops, one call each (2 threads)": one_by_one,
        "photo + crops, one batched call (1 thread)": lambda: batched(one_thread),
        "photo + crops, one call each (1 thread)": lambda: one_by_one(one_thread),
        "detect, then embed the photo": detect_then_embed,
        "detect beside embedding the photo (2nd thread, 1 intra-op thread)": detect_beside_embed,
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for i in range(len(batches)):
        state["i"] = i
        for key, value in time_pair(fns, max(2, repeats // len(batches))).items():
            results[key].append(value)
    print(f"\nLevers ({variant.name}; {len(batches)} photos, interleaved, load "
          f"{os.getloadavg()[0]:.1f}; images per embedding call: "
          f"{np.mean([len(b) for b in batches]):.1f})")  # fmt: skip
    print("| lever | wall p50 ms | CPU p50 ms |")
    print("|---|---|---|")
    for key, values in results.items():
        print(f"| {key} | {statistics.median(v[0] for v in values):.1f} |"
              f" {statistics.median(v[1] for v in values):.1f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=None, help="street photos (ccp-dev)")
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--products", type=int, default=50, help="catalog: 4 photos each")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--variant", type=parse_variant, action="append", default=None)
    ap.add_argument(
        "--one-call", action="append", default=[], metavar="NAME",
        help="this variant embeds photo + crops in one batched call on ONNX Runtime's threads"
        " (Embedder parallel=0, the behaviour before issue #16)",
    )  # fmt: skip
    ap.add_argument(
        "--photo-after-detect", action="append", default=[], metavar="NAME",
        help="this variant embeds the photo after detection, not beside it (issue #16)",
    )  # fmt: skip
    ap.add_argument(
        "--fp32", action="append", default=[], metavar="NAME",
        help="this variant's embedder runs in fp32 on ONNX Runtime's CPU provider (the default"
        " before issue #16's bf16; give the detector `:precision=fp32` for its side)",
    )  # fmt: skip
    ap.add_argument(
        "--flip-query", action="append", default=[], metavar="NAME",
        help="this variant's image-based results use the photo's and its mirror's mean"
        " embedding (Searcher flip_query, issue #20): a second embedding per query",
    )  # fmt: skip
    ap.add_argument("--levers", action="store_true", help="also time the levers (last variant)")
    ap.add_argument("--lever-repeats", type=int, default=24)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--floor-gflops", type=float, default=None,
        help="GFLOP/s for the floors instead of the sgemm measured in this run (a shared"
        " machine's in-run sgemm measures the load, not the hardware); both are printed",
    )  # fmt: skip
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    variants: list[Variant] = args.variant or [
        parse_variant("fp32=efficientnet_lite2,segmenter:precision=fp32"),
        parse_variant("default=efficientnet_lite2,segmenter"),
    ]
    if args.variant is None:
        args.fp32.append("fp32")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="query-latency-"))
    manifest = work / "shop" / "catalog.csv"
    if not manifest.exists():
        generate_demo_catalog(work / "shop", n_products=args.products, images_per_product=4)
    photos = query_photos(args.dataset, args.queries, work)
    load_start = os.getloadavg()
    gflops = [sgemm_gflops(repeats=15)]
    for variant in variants:
        catalog = work / f"catalog-{variant.name}"
        if not catalog.exists():
            t = time.perf_counter()
            report = api.index_source(manifest, catalog, model=variant.model,
                                      detector=variant.detector)  # fmt: skip
            print(f"{variant.name}: indexed {report.added} photos, {report.crops} crops in"
                  f" {time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
        variant.searcher = api.open_searcher(catalog, model=variant.model,
                                             detector=variant.detector)  # fmt: skip
        if variant.name in args.one_call or variant.name in args.fp32:
            variant.searcher.embedder = Embedder(
                variant.searcher.embedder.model_dir,
                parallel=0 if variant.name in args.one_call else None,
                precision="fp32" if variant.name in args.fp32 else None,
            )
        variant.searcher.flip_query = variant.name in args.flip_query
        if variant.name in args.photo_after_detect:
            variant.searcher.embedder.submit = serial_submit(  # type: ignore[method-assign]
                variant.searcher.embedder
            )
        instrument(variant)
        variant.counter = FlopCounter(variant.searcher.embedder, variant.searcher.detector)
    run_queries(variants, photos, args.k, args.warmup)
    gflops.append(sgemm_gflops(repeats=15))
    load_end = os.getloadavg()
    machine_gflops = args.floor_gflops or max(gflops)
    source = args.dataset or "generated 640 px photos"
    print(f"\n{len(photos)} queries ({source}), catalog {4 * args.products} photos, k {args.k};"
          f" sgemm {gflops[0]:.0f} / {gflops[1]:.0f} GFLOP/s (before / after); floors at"
          f" {machine_gflops:.0f} GFLOP/s"
          f" load average {load_start[0]:.1f} -> {load_end[0]:.1f}")  # fmt: skip
    for variant in variants:
        assert variant.searcher is not None
        calls = variant.searcher.embedder.parallel or "one batched call"
        print(f"- {variant.name}: model {variant.model} ({variant.searcher.embedder.precision}),"
              f" detector {variant.detector}, embedding calls side by side: {calls}")  # fmt: skip
    print()
    print_table(variants, machine_gflops)
    if args.levers:
        levers(variants[-1], photos, args.lever_repeats)
    for variant in variants:
        assert variant.searcher is not None
        variant.searcher.catalog.close()


if __name__ == "__main__":
    main()
