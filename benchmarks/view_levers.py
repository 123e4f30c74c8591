"""Extra views of one side of the search, averaged into its vector, on grocery-dev's held-out
folds (issue #20): pile views of catalog images, or crops of query photos.

A shop photographs fruit in a bin and cartons on a shelf; its catalog shows one item on white.
``--lever piles``: a pile view (``tta.pile_view``) heaps copies of the cut-out item over grey or
clutter, so the catalog vector looks like the shop (``--views`` piles per catalog image, from
``random.Random(tta.VIEW_SEED)`` per image). ``--lever crops``: the query photo's centre crop and
its four corner crops, each half its side, so single items look as large as in the catalog
image. For each fold (``snapshop prepare --folds 3`` seed 0, as grocery_cv.py) the fold's model
embeds the held-out queries, gallery photos, catalog images and the views. Three vectors for
the side that gets views: the image alone, the normalised mean of the image and its views, the
views alone. Both protocols (photo -> catalog images, photo -> all, where the catalog image is
one of a product's gallery images). R@1 pooled with a 95 % bootstrap interval over products,
each column paired with the image alone.

    python benchmarks/view_levers.py ../shared/datasets/grocery-dev/manifest.csv --lever piles \
        --fold-models runs/grocery-cv/Dcd0 runs/grocery-cv/Dcd1 runs/grocery-cv/Dcd2

``--baseline efficientnet_lite2`` scores an untrained model the same way (every fold).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import numpy as np
from grocery_folds import PROTOCOLS, fold_parser, load_folds, run  # benchmarks/
from numpy.typing import NDArray
from PIL import Image
from query_crops import corners, crop  # benchmarks/

from snapshop.data.manifest import matches, parse_where
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import (
    CrossValidation,
    PooledRanks,
    fold_ranks,
)
from snapshop.evaluate.retrieval import embed_paths
from snapshop.images import load_image
from snapshop.models.embedder import Embedder, load_embedder, unit_rows
from snapshop.models.tta import VIEW_SEED, mean_view, pile_view

log = logging.getLogger("view_levers")
COLUMNS = ("image", "image + views", "views only")
LEVERS = ("piles", "crops")


def piles_of(image: Image.Image, n: int) -> list[Image.Image]:
    """``n`` pile views of ``image``, the same whatever the order images come in."""
    rng = random.Random(VIEW_SEED)
    return [pile_view(image, rng) for _ in range(n)]


def crops_of(image: Image.Image) -> list[Image.Image]:
    """The centre crop and the four corner crops, each half the image's side."""
    return [crop(image, box) for box in corners(1 / 2)]


def with_views(
    embedder: Embedder, images: list[Image.Image], views: Callable[[Image.Image], list[Image.Image]]
) -> dict[str, NDArray[np.float32]]:
    """Each column's vectors for ``images``: alone, averaged with their views, views alone."""
    alone = embedder.embed_images(images)
    extra = [embedder.embed_images(views(im)) for im in images]
    return {
        "image": alone,
        "image + views": np.stack(
            [mean_view(np.concatenate([a[None], v])) for a, v in zip(alone, extra, strict=True)]
        ),
        "views only": unit_rows(np.stack([v.mean(axis=0) for v in extra])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = fold_parser(__doc__)
    parser.add_argument("--lever", choices=LEVERS, required=True)
    parser.add_argument("--views", type=int, default=8, help="pile views per catalog image")
    args = parser.parse_args(argv)
    folds = load_folds(parser, args)
    models, fold_rows, label_of = folds.models, folds.held_out, folds.label_of
    catalog_where = parse_where([args.catalog_where])
    results = {c: {p: PooledRanks() for p in PROTOCOLS} for c in COLUMNS}
    for model, held_out in zip(models, fold_rows, strict=True):
        embedder = load_embedder(model)
        queries = [r for r in held_out if r.role == "query"]
        photos = [r for r in held_out if r.role == "gallery" and not matches(r, catalog_where)]
        catalog = [r for r in held_out if r.role == "gallery" and matches(r, catalog_where)]
        g, _, skipped, _ = embed_paths(embedder, [str(r.path) for r in photos])
        if skipped:
            raise SnapshopError(f"unreadable images: {skipped[:3]}")
        query_images = [load_image(str(r.path)) for r in queries]
        catalog_images = [load_image(str(r.path)) for r in catalog]
        if args.lever == "piles":
            q = {c: embedder.embed_images(query_images) for c in COLUMNS}
            cat = with_views(embedder, catalog_images, lambda im: piles_of(im, args.views))
        else:
            q = with_views(embedder, query_images, crops_of)
            cat = {c: embedder.embed_images(catalog_images) for c in COLUMNS}
        skus_q = [r.sku for r in queries]
        for column in COLUMNS:
            results[column]["photo -> catalog"].add(
                *fold_ranks(q[column], skus_q, cat[column], [r.sku for r in catalog], label_of)
            )
            results[column]["photo -> all"].add(
                *fold_ranks(
                    q[column], skus_q, np.concatenate([g, cat[column]]),
                    [r.sku for r in photos] + [r.sku for r in catalog], label_of,
                )
            )  # fmt: skip
        log.info("%s: %d queries, %d catalog images", model, len(queries), len(catalog))
    table = CrossValidation(len(models), list(COLUMNS), results, "image")
    views = (
        f"{args.views} pile views per catalog image"
        if args.lever == "piles"
        else ("5 crops per query photo (centre and corners, half its side)")
    )
    print(views)
    print("\n".join(table.markdown()))
    return 0


if __name__ == "__main__":
    run(main)
