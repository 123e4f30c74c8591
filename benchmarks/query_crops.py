"""Crops of the query photo as extra views, the crop set and its aggregation cross-fitted, on
grocery-dev's held-out folds (issue #20).

A shop photo shows a bin of fruit or a shelf of cartons; the catalog image shows one item
filling the frame. Crops of the photo bring single items closer to the catalog's scale. Three
crop sets, each at most five crops so that a query costs at most six embeddings:

- ``half5``: the centre and the four corners, each half the photo's side;
- ``two3rd5``: the same at two thirds of the side;
- ``zoom3``: centre crops at 3/4, 1/2 and 1/3 of the side.

Two ways to combine the photo and its crops: ``mean`` (the normalised mean vector,
``tta.mean_view``) and ``max`` (per gallery image, the highest cosine over the views). The
variant (or the plain photo) is chosen on the other folds' queries (most R@1 hits; ties to fewer
views, then ``mean``) and applied to the fold: no fold is scored with the variant it chose.
Both protocols, each choosing its own variant; R@1 pooled with a 95 % bootstrap interval over
products, the paired difference to the plain photo, R@1 by category, and every variant's
pooled R@1 (in hindsight, for reading only).

    python benchmarks/query_crops.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/Dcd0 runs/grocery-cv/Dcd1 runs/grocery-cv/Dcd2

``--ensemble-with DIR DIR DIR`` (one per fold; repeatable) scores an ensemble instead: each
fold's model and these, their vectors concatenated as ensemble_cv.py does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from ensemble_cv import ensemble  # benchmarks/
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
from PIL import Image

from snapshop.data.manifest import ManifestRow, matches, parse_where
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import CrossValidation, similarity_ranks
from snapshop.evaluate.retrieval import embed_paths
from snapshop.images import load_image
from snapshop.models.embedder import load_embedder, unit_rows

Box = tuple[float, float, float, float]  # left, top, right, bottom as fractions of the photo


def corners(side: float) -> list[Box]:
    """The centre crop and the four corner crops, each ``side`` of the photo's width and height."""
    lo, hi, c = side, 1 - side, (1 - side) / 2
    return [
        (c, c, c + side, c + side),
        (0, 0, lo, lo),
        (hi, 0, 1, lo),
        (0, hi, lo, 1),
        (hi, hi, 1, 1),
    ]


def centres(sides: tuple[float, ...]) -> list[Box]:
    return [((1 - s) / 2, (1 - s) / 2, (1 + s) / 2, (1 + s) / 2) for s in sides]


CROP_SETS: dict[str, list[Box]] = {
    "zoom3": centres((3 / 4, 1 / 2, 1 / 3)),
    "half5": corners(1 / 2),
    "two3rd5": corners(2 / 3),
}
AGGREGATIONS = ("mean", "max")
Variant = tuple[str, str] | None  # (crop set, aggregation); None: the photo alone


def crop(image: Image.Image, box: Box) -> Image.Image:
    w, h = image.size
    left, top, right, bottom = box
    return image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))


@dataclass
class FoldScores:
    """One fold, one protocol: each query's views (the photo first) against the gallery."""

    view_sims: dict[str, NDArray[np.float32]]  # crop set -> (queries, 1 + crops, gallery)
    mean_sims: dict[str, NDArray[np.float32]]  # crop set -> (queries, gallery)
    queries: list[ManifestRow]
    shown: list[ManifestRow]

    def ranks(self, variant: Variant, label_of: dict[str, int]) -> Ranks:
        if variant is None:
            sims = next(iter(self.view_sims.values()))[:, 0]
        elif variant[1] == "mean":
            sims = self.mean_sims[variant[0]]
        else:
            sims = self.view_sims[variant[0]].max(axis=1)
        return similarity_ranks(
            sims, [r.sku for r in self.queries], [r.sku for r in self.shown], label_of
        )


def embed_views(
    model: str, gallery: list[ManifestRow], queries: list[ManifestRow], boxes: list[Box]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """One model: the gallery's vectors (rows, dim), each query's views (queries, boxes, dim)."""
    embedder = load_embedder(model)
    vecs, _, skipped, _ = embed_paths(embedder, [str(r.path) for r in gallery])
    if skipped:
        raise SnapshopError(f"unreadable images: {skipped[:3]}")
    views = np.stack(
        [
            embedder.embed_images([crop(image, b) for b in boxes])
            for image in (load_image(str(r.path)) for r in queries)
        ]
    )
    return vecs, views


def score_folds(
    members: list[list[str]], held_out: list[list[ManifestRow]], catalog: dict[str, str]
) -> dict[str, list[FoldScores]]:
    """``members[i]``: fold ``i``'s model, or its ensemble's members (vectors concatenated,
    ensemble_cv.py's ``ensemble``)."""
    out: dict[str, list[FoldScores]] = {p: [] for p in PROTOCOLS}
    for models, fold in zip(members, held_out, strict=True):
        queries = [r for r in fold if r.role == "query"]
        gallery = [r for r in fold if r.role == "gallery"]
        boxes = [(0.0, 0.0, 1.0, 1.0)] + [b for bs in CROP_SETS.values() for b in bs]
        embedded = [embed_views(model, gallery, queries, boxes) for model in models]
        g_all = ensemble([g for g, _ in embedded])
        n_queries, n_views, _ = embedded[0][1].shape
        flat = ensemble([views.reshape(n_queries * n_views, -1) for _, views in embedded])
        views = flat.reshape(n_queries, n_views, -1)  # (queries, 1 + all crops, dim)
        vector = {str(r.path): g_all[i] for i, r in enumerate(gallery)}
        starts = list(itertools.accumulate([1] + [len(bs) for bs in CROP_SETS.values()]))
        per_set = {
            name: np.concatenate([views[:, :1], views[:, start : start + len(bs)]], axis=1)
            for (name, bs), start in zip(CROP_SETS.items(), starts, strict=False)
        }
        for protocol, shown in (
            ("photo -> catalog", [r for r in gallery if matches(r, catalog)]),
            ("photo -> all", gallery),
        ):
            g = np.stack([vector[str(r.path)] for r in shown])
            view_sims = {name: (v @ g.T).astype(np.float32) for name, v in per_set.items()}
            mean_sims = {
                name: (unit_rows(v.mean(axis=1)) @ g.T).astype(np.float32)
                for name, v in per_set.items()
            }
            out[protocol].append(FoldScores(view_sims, mean_sims, queries, shown))
    return out


def variants() -> list[Variant]:
    """Every variant, the preferred first: the photo alone, then fewer views, then mean."""
    by_views = sorted(CROP_SETS, key=lambda name: len(CROP_SETS[name]))
    return [None] + [(name, agg) for name in by_views for agg in AGGREGATIONS]


def label(variant: Variant) -> str:
    return "photo" if variant is None else f"photo + {variant[0]}, {variant[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = fold_parser(__doc__)
    parser.add_argument(
        "--ensemble-with",
        nargs="+",
        action="append",
        default=[],
        help="another member's fold models: each fold's vectors are the ensemble (repeatable)",
    )
    args = parser.parse_args(argv)
    folds = load_folds(parser, args)
    extra = args.ensemble_with
    if any(len(models) != len(folds.models) for models in extra):
        parser.error("--ensemble-with needs one model directory per fold")
    members = [[m, *(models[i] for models in extra)] for i, m in enumerate(folds.models)]
    scores = score_folds(members, folds.held_out, parse_where([args.catalog_where]))
    chosen = Column[Variant](
        "crops (cross-fitted)",
        lambda others: best_setting(variants(), hits_on(others, folds.label_of)),
        label,
    )
    results = cross_fitted(scores, [baseline("photo", None), chosen], folds)
    for protocol, fold_scores in scores.items():
        queries = sum(len(f.queries) for f in fold_scores)
        for variant in variants():
            r1 = hits_on(fold_scores, folds.label_of)(variant) / queries
            print(f"{protocol}, every fold, {label(variant)}: R@1 {r1:.3f} (in hindsight)")
    names = ["photo", chosen.name]
    print("\n".join(CrossValidation(len(folds.models), names, results, "photo").markdown()))
    return 0


if __name__ == "__main__":
    run(main)
