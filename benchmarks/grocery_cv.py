"""Cross-validated retrieval on unseen products: each fold's model scored on its own held-out
products, the ranks pooled over the folds, so every product of the dataset counts as unseen.

The folds are the protocol's (``snapshop prepare --folds K --fold N``, same seed and options
as the training side, benchmarks/metric_learning_cv_gpu.sh). Both protocols of grocery-dev:
photo -> the fold's whole held-out gallery, and photo -> the fold's catalog images only
(``--catalog-where``). Columns: each ``--baseline`` model (the same for every fold, embedded
once) and the fold models (``--fold-models``, one directory per fold, in fold order).
R@K with a 95 % bootstrap interval over products (all photos of a product resampled together).

    python benchmarks/grocery_cv.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/fold0 runs/grocery-cv/fold1 runs/grocery-cv/fold2 \
        --baseline efficientnet_lite2 --json-out runs/grocery-cv/cv.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from snapshop.data.manifest import ManifestRow, matches, parse_where
from snapshop.data.protocol import ProtocolConfig, split_products
from snapshop.data.readers import read_dataset
from snapshop.errors import SnapshopError
from snapshop.evaluate.retrieval import embed_paths, product_ranks, product_scores, recall_interval
from snapshop.models.embedder import load_embedder

KS = (1, 2, 4, 5, 8, 10, 100)


@dataclass
class PooledRanks:
    """Ranks of every query among its fold's held-out products, with global product labels."""

    ranks: list[NDArray[np.int64]] = field(default_factory=list)
    labels: list[NDArray[np.int64]] = field(default_factory=list)
    per_fold_r1: list[float] = field(default_factory=list)

    def add(self, ranks: NDArray[np.int64], labels: NDArray[np.int64]) -> None:
        self.ranks.append(ranks)
        self.labels.append(labels)
        self.per_fold_r1.append(float((ranks < 1).mean()))

    def recall(self, k: int) -> tuple[float, tuple[float, float]]:
        ranks, labels = np.concatenate(self.ranks), np.concatenate(self.labels)
        return float((ranks < k).mean()), recall_interval(ranks, labels, k)

    @property
    def queries(self) -> int:
        return int(sum(len(r) for r in self.ranks))


def fold_ranks(
    query_vecs: NDArray[np.float32],
    query_products: Sequence[str],
    gallery_vecs: NDArray[np.float32],
    gallery_products: Sequence[str],
    label_of: dict[str, int],
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """0-based product rank of each query within this gallery, and the queries' global labels.

    Every query's product must be in the gallery (a fold holds out whole products)."""
    products = sorted(set(gallery_products))
    local = {p: i for i, p in enumerate(products)}
    missing = sorted(set(query_products) - set(local))
    if missing:
        raise ValueError(f"queries of products without a gallery image: {missing[:5]}")
    q_local = np.array([local[p] for p in query_products], dtype=np.int64)
    g_local = np.array([local[p] for p in gallery_products], dtype=np.int64)
    sims = query_vecs @ gallery_vecs.T
    ranks = product_ranks(product_scores(sims, g_local, len(products)), q_local)
    return ranks, np.array([label_of[p] for p in query_products], dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="dataset the folds were cut from (as for `prepare`)")
    parser.add_argument("--fold-models", nargs="+", required=True, help="one model dir per fold")
    parser.add_argument("--baseline", action="append", default=[], help="model for every fold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--keep-roles", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--catalog-where", default="domain=iconic", help="catalog images")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    folds = len(args.fold_models)
    if folds < 2:
        parser.error("--fold-models needs one directory per fold (at least 2)")
    rows = read_dataset(args.dataset)
    catalog = parse_where([args.catalog_where])
    fold_rows: list[list[ManifestRow]] = []
    for fold in range(folds):
        config = ProtocolConfig(max_images=args.max_images, seed=args.seed,
                                keep_roles=args.keep_roles, folds=folds, fold=fold)  # fmt: skip
        split, _ = split_products(rows, config)
        fold_rows.append([r for r in split if r.extra["split"] == "test"])
    label_of = {p: i for i, p in enumerate(sorted({r.product_id for f in fold_rows for r in f}))}

    columns = [(name, [name] * folds) for name in args.baseline] + [
        ("trained (fold models)", args.fold_models)
    ]
    results: dict[str, dict[str, PooledRanks]] = {}
    for name, models in columns:
        pooled = results[name] = {"photo -> all": PooledRanks(), "photo -> catalog": PooledRanks()}
        cache: dict[tuple[str, str], NDArray[np.float32]] = {}
        for model, held_out in zip(models, fold_rows, strict=True):
            embedder = load_embedder(model)
            trained_on = set(embedder.card.training.get("classes", []))
            if trained_on & {r.product_id for r in held_out}:
                raise SystemExit(
                    f"{model} was trained on products this fold holds out: "
                    "not the same folds (seed, --max-images, --keep-roles?)"
                )
            paths = [str(r.path) for r in held_out]
            todo = [p for p in paths if (model, p) not in cache]
            vecs, kept, skipped, _ = embed_paths(embedder, todo)
            if skipped:
                print(f"warning: {len(skipped)} unreadable images skipped", file=sys.stderr)
            for vec, i in zip(vecs, kept, strict=True):
                cache[(model, todo[i])] = vec
            present = [r for r in held_out if (model, str(r.path)) in cache]
            vec_of = lambda rs: np.stack([cache[(model, str(r.path))] for r in rs])  # noqa: E731,B023
            queries = [r for r in present if r.role == "query"]
            for protocol, gallery in (
                ("photo -> all", [r for r in present if r.role == "gallery"]),
                ("photo -> catalog", [r for r in present if r.role == "gallery"
                                      and matches(r, catalog)]),
            ):  # fmt: skip
                in_gallery = {r.product_id for r in gallery}
                asked = [r for r in queries if r.product_id in in_gallery]
                if not asked:  # e.g. no catalog images in this dataset
                    continue
                ranks, labels = fold_ranks(vec_of(asked), [r.product_id for r in asked],
                                           vec_of(gallery), [r.product_id for r in gallery],
                                           label_of)  # fmt: skip
                pooled[protocol].add(ranks, labels)

    report: dict[str, dict[str, object]] = {}
    for protocol in ("photo -> all", "photo -> catalog"):
        asked = results[columns[0][0]][protocol]
        if not asked.queries:
            print(f"\n{protocol}: no query has a gallery image of its product (skipped)")
            continue
        products = len(np.unique(np.concatenate(asked.labels)))
        print(f"\n{protocol}: {folds} folds, {products} products, {asked.queries} queries,"
              " pooled")  # fmt: skip
        print("| metric | " + " | ".join(name for name, _ in columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for k in KS:
            cells = []
            for name, _ in columns:
                value, (lo, hi) = results[name][protocol].recall(k)
                cells.append(f"{value:.4f} [{lo:.3f}, {hi:.3f}]" if k in (1, 5, 10)
                             else f"{value:.4f}")  # fmt: skip
                report.setdefault(name, {}).setdefault(protocol, {})[f"R@{k}"] = {
                    "value": round(value, 4),
                    "ci95": [round(lo, 4), round(hi, 4)],
                }
            print(f"| R@{k} | " + " | ".join(cells) + " |")
        cells = [" / ".join(f"{r:.3f}" for r in results[name][protocol].per_fold_r1)
                 for name, _ in columns]  # fmt: skip
        print("| R@1 per fold | " + " | ".join(cells) + " |")
        for name, _ in columns:
            report[name][protocol]["per_fold_R@1"] = results[name][protocol].per_fold_r1
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SnapshopError as exc:  # a bad CSV, model or image: one line, no traceback
        sys.exit(f"error: {exc}")
