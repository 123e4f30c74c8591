"""Hubness correction (CSLS, Conneau et al. 2018) of the gallery on grocery-dev's held-out
folds, its two parameters cross-fitted (issue #20).

A few catalog images sit close to many shop photos of other products ("hubs": Satsumas' catalog
image is the top-1 of most orange photos). CSLS scores ``cos(q, g) - beta * r_g``, where ``r_g``
is the mean cosine of gallery image ``g`` to its ``k`` nearest photos in a bank of unlabelled
shop photos. The query's own term ``r_q`` is the same for every candidate and does not change
the ranking, so the correction is one number per gallery image, computed at index time.

Two banks, each fold embedded by its own model:

- ``train``: the photos the fold model trained on (the other folds' products), which a shop
  has when it builds its catalog;
- ``held-out``: the fold's own gallery photos without their labels, standing for a log of past
  shopper photos of the catalog's products (a gallery photo is never its own neighbour).

``k`` and ``beta`` are chosen on the other folds' queries (most R@1 hits; ties to the smaller
``beta``, then the smaller ``k``) and applied to the fold. Both protocols, each choosing its
own parameters; R@1 pooled with a 95 % bootstrap interval over products, the paired difference
to plain cosine, and R@1 by category.

    python benchmarks/hubness.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/Dcd0 runs/grocery-cv/Dcd1 runs/grocery-cv/Dcd2
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from grocery_folds import (  # benchmarks/
    PROTOCOLS,
    Column,
    Ranks,
    baseline,
    best_setting,
    cross_fitted,
    fold_parser,
    hits_on,
    load_folds,
    run,
)
from numpy.typing import NDArray

from snapshop.data.manifest import ManifestRow, matches, parse_where
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import CrossValidation, similarity_ranks
from snapshop.evaluate.retrieval import embed_paths
from snapshop.models.embedder import load_embedder

NEIGHBOURS = (5, 10, 20, 50)
BETAS = (0.25, 0.5, 0.75, 1.0)
BANKS = ("train", "held-out")
Setting = tuple[str, int, float] | None  # (bank, k, beta); None: plain cosine


def neighbourhood(
    gallery: NDArray[np.float32], bank: NDArray[np.float32], k: int, self_index: NDArray[np.int64]
) -> NDArray[np.float32]:
    """Mean cosine of each gallery vector to its ``k`` nearest bank vectors; ``self_index[i]``
    is gallery ``i``'s own row in the bank (-1: none), never counted as its neighbour."""
    sims = gallery @ bank.T
    rows = np.flatnonzero(self_index >= 0)
    sims[rows, self_index[rows]] = -np.inf
    k = min(k, bank.shape[0] - int((self_index >= 0).any()))
    top = -np.partition(-sims, k - 1, axis=1)[:, :k]
    return top.mean(axis=1).astype(np.float32)


@dataclass
class FoldScores:
    """One fold, one protocol: cosines and each gallery image's neighbourhood per bank and k."""

    sims: NDArray[np.float32]
    spread: dict[tuple[str, int], NDArray[np.float32]]
    queries: list[ManifestRow]
    shown: list[ManifestRow]

    def ranks(self, setting: Setting, label_of: dict[str, int]) -> Ranks:
        sims = self.sims
        if setting is not None:
            bank, k, beta = setting
            sims = sims - beta * self.spread[bank, k][None, :]
        return similarity_ranks(
            sims, [r.sku for r in self.queries], [r.sku for r in self.shown], label_of
        )


def embed(model: str, rows: list[ManifestRow]) -> dict[str, NDArray[np.float32]]:
    vecs, kept, skipped, _ = embed_paths(load_embedder(model), [str(r.path) for r in rows])
    if skipped:
        raise SnapshopError(f"{len(skipped)} unreadable images")
    return {str(rows[i].path): v for v, i in zip(vecs, kept, strict=True)}


def score_folds(
    models: list[str],
    rows: list[ManifestRow],
    held_out: list[list[ManifestRow]],
    catalog: dict[str, str],
) -> dict[str, list[FoldScores]]:
    out: dict[str, list[FoldScores]] = {p: [] for p in PROTOCOLS}
    for model, fold in zip(models, held_out, strict=True):
        fold_products = {r.sku for r in fold}
        trained = [r for r in rows if r.sku not in fold_products and not matches(r, catalog)]
        vector = embed(model, fold + trained)
        queries = [r for r in fold if r.role == "query"]
        gallery = [r for r in fold if r.role == "gallery"]
        photos = [r for r in gallery if not matches(r, catalog)]
        banks = {
            "train": np.stack([vector[str(r.path)] for r in trained]),
            "held-out": np.stack([vector[str(r.path)] for r in photos]),
        }
        own = {str(r.path): i for i, r in enumerate(photos)}
        q = np.stack([vector[str(r.path)] for r in queries])
        for protocol, shown in (
            ("photo -> catalog", [r for r in gallery if matches(r, catalog)]),
            ("photo -> all", gallery),
        ):
            g = np.stack([vector[str(r.path)] for r in shown])
            none = np.full(len(shown), -1, dtype=np.int64)
            self_index = {
                "train": none,
                "held-out": np.array([own.get(str(r.path), -1) for r in shown], dtype=np.int64),
            }
            spread = {
                (bank, k): neighbourhood(g, banks[bank], k, self_index[bank])
                for bank, k in itertools.product(BANKS, NEIGHBOURS)
            }
            out[protocol].append(FoldScores((q @ g.T).astype(np.float32), spread, queries, shown))
    return out


def confusions(folds: Sequence[FoldScores], top: int = 8) -> list[str]:
    """The most frequent (product, product taken for it) pairs at rank 1 by plain cosine, as
    ``"name -> name: wrong of photos"``, most frequent first."""
    wrong: Counter[tuple[str, str]] = Counter()
    photos: Counter[str] = Counter()
    for fold in folds:
        for row, best in zip(fold.queries, fold.sims.argmax(axis=1), strict=True):
            taken = fold.shown[int(best)]
            photos[row.sku] += 1
            if taken.sku != row.sku:
                wrong[row.sku, taken.sku] += 1
    names = {r.sku: r.extra.get("product_name") or r.sku for f in folds for r in f.shown}
    return [f"{names[a]} -> {names[b]}: {n} of {photos[a]}" for (a, b), n in wrong.most_common(top)]


def choose(folds: Sequence[FoldScores], label_of: dict[str, int], bank: str) -> Setting:
    """The grid's (bank, k, beta) with the most R@1 hits on ``folds`` (ties: smaller beta, then
    smaller k)."""
    grid: list[Setting] = [(bank, k, beta) for beta, k in itertools.product(BETAS, NEIGHBOURS)]
    return best_setting(grid, hits_on(folds, label_of))


def picker(bank: str, label_of: dict[str, int]) -> Callable[[Sequence[FoldScores]], Setting]:
    return lambda others: choose(others, label_of, bank)


def describe(setting: Setting) -> str:
    return "" if setting is None else f"k {setting[1]}, beta {setting[2]}"


def main(argv: list[str] | None = None) -> int:
    parser = fold_parser(__doc__)
    args = parser.parse_args(argv)
    folds = load_folds(parser, args)
    scores = score_folds(
        folds.models, folds.rows, folds.held_out, parse_where([args.catalog_where])
    )
    columns: list[Column[Setting]] = [
        baseline("cosine", None),
        *(
            Column(f"CSLS, {bank} bank (cross-fitted)", picker(bank, folds.label_of), describe)
            for bank in BANKS
        ),
    ]
    print(
        "photo -> catalog, cosine, most frequent errors: "
        + "; ".join(confusions(scores["photo -> catalog"]))
    )
    print(f"grid: k {NEIGHBOURS} x beta {BETAS}")
    results = cross_fitted(scores, columns, folds)
    names = [c.name for c in columns]
    print("\n".join(CrossValidation(len(folds.models), names, results, "cosine").markdown()))
    return 0


if __name__ == "__main__":
    run(main)
