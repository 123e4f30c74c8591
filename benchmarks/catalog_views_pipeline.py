"""Issue #20's test-time levers measured through the shipped pipeline: catalog views averaged
into packshot vectors at indexing time (``Ingestor`` with the card's ``catalog_views``) and
query flip averaging (``Searcher(flip_query=True)``), on grocery-dev's held-out folds.

For each cross-validation fold (``snapshop prepare --folds 3`` seed 0, as grocery_cv.py and
catalog_levers.py), and for each catalog-views setting, the fold's held-out products are
indexed with ImageNet Lite2 (no training) into two catalogs, the catalog images only
("photo -> catalog") and the whole held-out gallery ("photo -> all"), and every held-out
query photo is searched in both, with and without flip averaging (k = every product, the
searcher's ranking). R@1 pooled over the folds with a 95 % bootstrap interval over products;
Δ is the paired difference to the baseline (no lever) with a paired bootstrap interval.
Indexing cost per catalog image: the wall time of ingesting the catalog images alone (the
ingest report's seconds), per image, with and without views.

    python benchmarks/catalog_views_pipeline.py ../shared/datasets/grocery-dev/manifest.csv \
        --views 24 --work /tmp/snapshop-views

With ``--fold-models DIR0 DIR1 DIR2`` each fold is indexed and searched with its own trained
model (``snapshop train`` on ``snapshop prepare --folds 3 --fold N``'s training rows), so
every score is a model's on products it never saw. ``--verify`` adds a setting: searches with
spatial verification at its defaults (``Searcher(verify=VerifyConfig())``, no views).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from catalog_levers import Ranked, paired_delta  # this folder's script: one paired bootstrap
from numpy.typing import NDArray

from snapshop.catalog.catalog import create_catalog
from snapshop.data.manifest import ManifestRow
from snapshop.data.readers import read_dataset
from snapshop.data.sources import CatalogRecord
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import held_out_folds
from snapshop.evaluate.retrieval import recall_interval
from snapshop.ingest import Ingestor
from snapshop.models.embedder import Embedder, load_embedder
from snapshop.models.tta import is_packshot
from snapshop.search import Searcher
from snapshop.verify import VerifyConfig

log = logging.getLogger("catalog_views_pipeline")
PROTOCOLS = ("photo -> catalog", "photo -> all")


def index(
    embedder: Embedder, directory: Path, rows: Sequence[ManifestRow], views: int
) -> tuple[float, int]:
    """A new catalog in ``directory`` holding ``rows`` with ``views`` catalog views: the
    ingest's seconds and the images added."""
    with create_catalog(
        directory, model_id=embedder.model_id, model_ref=str(embedder.model_dir),
        dim=embedder.dim, index_kind="flat",
    ) as catalog:  # fmt: skip
        catalog.record_catalog_views(views)
        records = [CatalogRecord(r.sku, r.path) for r in rows]
        report = Ingestor(catalog, embedder, workers=0).ingest(records)
        if report.failed:
            raise SystemExit(
                f"{directory}: {len(report.failed)} images failed: {report.failed[:3]}"
            )
        return report.seconds, report.added


def add(embedder: Embedder, directory: Path, rows: Sequence[ManifestRow]) -> None:
    """``rows`` ingested into the catalog in ``directory`` (its card's views apply)."""
    from snapshop.catalog.catalog import open_catalog

    with open_catalog(directory) as catalog:
        Ingestor(catalog, embedder, workers=0).ingest([CatalogRecord(r.sku, r.path) for r in rows])


def ranks(
    embedder: Embedder,
    directory: Path,
    queries: Sequence[ManifestRow],
    flip: bool,
    verify: bool = False,
) -> tuple[NDArray[np.int64], float]:
    """0-based rank of each query's product among the catalog's products, and the mean
    search wall time per query in ms (``verify``: with spatial verification's defaults)."""
    from snapshop.catalog.catalog import open_catalog

    with open_catalog(directory) as catalog:
        config = VerifyConfig() if verify else None
        searcher = Searcher(catalog, embedder, flip_query=flip, verify=config)
        n_products = catalog.store.counts()["products"]
        out = np.empty(len(queries), np.int64)
        start = time.perf_counter()
        for i, q in enumerate(queries):
            hits = searcher.search(q.path, k=n_products, detect=False).image_results
            skus = [h.sku for h in hits]
            out[i] = skus.index(q.sku) if q.sku in skus else n_products
        return out, (time.perf_counter() - start) / max(1, len(queries)) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="grocery-dev's manifest.csv")
    parser.add_argument("--views", type=int, default=24, help="catalog views of the lever")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/snapshop-views"))
    parser.add_argument("--max-queries", type=int, default=0, help="per fold (0: all)")
    parser.add_argument("--model", default="efficientnet_lite2", help="backbone or model dir")
    parser.add_argument("--fold-models", nargs="+", help="one model dir per fold, in fold order")
    parser.add_argument(
        "--verify", action="store_true", help="add a setting: search --verify (no views)"
    )
    args = parser.parse_args(argv)
    if args.views < 1:
        parser.error("--views must be at least 1 (the lever measured against none)")
    if args.fold_models and len(args.fold_models) != args.folds:
        parser.error(f"--fold-models needs {args.folds} directories, one per fold")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    rows = read_dataset(args.dataset)
    folds = held_out_folds(rows, args.folds, seed=0, max_images=0, keep_roles=True)
    label_of = {p: i for i, p in enumerate(sorted({r.sku for f in folds for r in f}))}
    embedders = [load_embedder(m) for m in args.fold_models or [args.model] * args.folds]
    if args.work.exists():
        shutil.rmtree(args.work)
    settings = {"baseline": (0, False, False), "query flip": (0, True, False),
                f"catalog views {args.views}": (args.views, False, False),
                f"catalog views {args.views} + query flip": (args.views, True, False)}  # fmt: skip
    if args.verify:
        settings["verify"] = (0, False, True)
    found: dict[tuple[str, str], list[NDArray[np.int64]]] = {}
    labels: list[NDArray[np.int64]] = []
    index_s: dict[int, float] = {0: 0.0, args.views: 0.0}
    query_ms: dict[str, list[float]] = {}
    packshots = catalog_images = 0
    for n, (held, embedder) in enumerate(zip(folds, embedders, strict=True)):
        queries = [r for r in held if r.role == "query"]
        if args.max_queries:
            queries = queries[: args.max_queries]
        catalog_rows = [r for r in held if r.role == "gallery" and r.extra["domain"] == "iconic"]
        photos = [r for r in held if r.role == "gallery" and r.extra["domain"] != "iconic"]
        catalog_images += len(catalog_rows)
        packshots += sum(is_packshot(_load(r)) for r in catalog_rows)
        labels.append(np.array([label_of[q.sku] for q in queries], np.int64))
        for views in sorted(index_s):
            only = args.work / f"fold{n}-views{views}-catalog"
            seconds, added = index(embedder, only, catalog_rows, views)
            index_s[views] += seconds
            everything = args.work / f"fold{n}-views{views}-all"
            shutil.copytree(only, everything)
            add(embedder, everything, photos)
            for name, (setting_views, flip, verify) in settings.items():
                if setting_views != views:
                    continue
                for protocol, directory in zip(PROTOCOLS, (only, everything), strict=True):
                    r, ms = ranks(embedder, directory, queries, flip, verify)
                    found.setdefault((name, protocol), []).append(r)
                    query_ms.setdefault(name, []).append(ms)
            log.warning("fold %d, %d views: done", n, views)
    pooled = np.concatenate(labels)

    print(
        "python benchmarks/catalog_views_pipeline.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    model_ids = ", ".join(dict.fromkeys(e.model_id for e in embedders))
    print(f"\n{model_ids} ({embedders[0].precision}); "
          f"{len(folds)} folds, {len(label_of)} products, {len(pooled)} queries; "
          f"{packshots} of {catalog_images} catalog images taken for packshots")  # fmt: skip
    print("| setting | catalog R@1 [95 % CI] | Δ catalog R@1 [95 % CI] | all R@1 [95 % CI]"
          " | Δ all R@1 [95 % CI] |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in settings:
        cells = []
        for protocol in PROTOCOLS:
            r = np.concatenate(found[name, protocol])
            base = np.concatenate(found["baseline", protocol])
            lo, hi = recall_interval(r, pooled, 1)
            delta = paired_delta(Ranked([r], [r], [pooled]), Ranked([base], [base], [pooled]))
            cells += [f"{(r < 1).mean():.3f} [{lo:.3f}, {hi:.3f}]", delta]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nindexing the catalog images alone (ingest wall time per image, this machine):")
    for views, seconds in index_s.items():
        print(f"  {views} catalog views: {seconds / catalog_images * 1e3:.1f} ms per catalog image")
    for name, times in query_ms.items():
        print(f"  {name}: {np.mean(times):.1f} ms per search (mean)")
    return 0


def _load(row: ManifestRow):  # type: ignore[no-untyped-def]
    from snapshop.images import load_image

    return load_image(row.path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SnapshopError as exc:
        sys.exit(f"error: {exc}")
