"""Shop photos embedded at a higher input resolution than catalog images, the size cross-fitted,
on grocery-dev's held-out folds (issue #20).

Training crops at random scales shows the model items larger than a centre-cropped test photo
does (FixRes, Touvron et al. 2019), and a shop photo's items are small to begin with: a heap of
oranges, where the catalog image shows one orange filling the frame. Embedding the photo at a
higher resolution with the same weights makes its items larger in pixels: each fold model is
copied at every size (``snapshop resize-model``, ``models.export.resize_model``).

Settings: shop photos (queries and gallery photos) at S px, catalog images at the card's size;
S is chosen on the other folds' queries (most R@1 hits; ties to the smaller S) and applied to
the fold. Every S on all folds, and every image at S (catalog images too), are printed in
hindsight, for reading only. ``--every-image-at S`` adds a column with one size fixed beforehand
for every image, catalog images too (no choice on the folds), paired with the card's size;
``--multiscale S1 S2`` one where every image's vector is the mean of its vectors at those sizes
(a multi-scale descriptor, Radenović et al. 2018), also paired with ``--every-image-at``'s.

    python benchmarks/photo_resolution.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/Dcd0 runs/grocery-cv/Dcd1 runs/grocery-cv/Dcd2 \
        --work /tmp/snapshop-photo-size --every-image-at 384
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from snapshop.images import load_image
from snapshop.models.card import read_card
from snapshop.models.embedder import load_embedder, unit_rows
from snapshop.models.export import resize_model

DEFAULT_SIZES = (260, 320, 384, 448)
# (the sizes whose vectors are averaged, whether catalog images are embedded so too; if not,
# they stay at the card's size)
Setting = tuple[tuple[int, ...], bool]


@dataclass
class FoldScores:
    """One fold, one protocol: the queries against the shown gallery, per setting."""

    sims: dict[Setting, NDArray[np.float32]]  # (queries, shown gallery)
    queries: list[ManifestRow]
    shown: list[ManifestRow]

    def ranks(self, setting: Setting, label_of: dict[str, int]) -> Ranks:
        return similarity_ranks(
            self.sims[setting], [r.sku for r in self.queries], [r.sku for r in self.shown], label_of
        )


def embed_sizes(
    model: str, rows: list[ManifestRow], sizes: tuple[int, ...], work: Path
) -> dict[int, NDArray[np.float32]]:
    """Every row's vector at every size (each image decoded once)."""
    images = []
    for r in rows:
        try:
            images.append(load_image(str(r.path)))
        except SnapshopError as exc:
            raise SnapshopError(f"unreadable image {r.path}: {exc}") from None
    out = {}
    for size in sizes:
        resized = work / f"{Path(model).name}-{size}"
        resize_model(model, size, resized, overwrite=True)  # this script's own work folder
        embedder = load_embedder(resized)
        out[size] = embedder.embed_images(images)
    return out


def score_folds(
    models: list[str],
    held_out: list[list[ManifestRow]],
    catalog: dict[str, str],
    sizes: tuple[int, ...],
    settings: list[Setting],
    work: Path,
) -> dict[str, list[FoldScores]]:
    base = sizes[0]
    out: dict[str, list[FoldScores]] = {p: [] for p in PROTOCOLS}
    for model, fold in zip(models, held_out, strict=True):
        queries = [r for r in fold if r.role == "query"]
        gallery = [r for r in fold if r.role == "gallery"]
        vecs = embed_sizes(model, queries + gallery, sizes, work)
        q = {s: v[: len(queries)] for s, v in vecs.items()}
        g = {s: v[len(queries) :] for s, v in vecs.items()}
        in_catalog = np.array([matches(r, catalog) for r in gallery])
        for protocol, keep in (
            ("photo -> catalog", in_catalog),
            ("photo -> all", np.ones(len(gallery), bool)),
        ):
            sims: dict[Setting, NDArray[np.float32]] = {}
            for setting in settings:
                scales, catalog_too = setting
                q_vecs, g_vecs = mean_vector(q, scales), mean_vector(g, scales)
                shown = np.where(in_catalog[:, None] & ~catalog_too, g[base], g_vecs)
                sims[setting] = (q_vecs @ shown[keep].T).astype(np.float32)
            shown_rows = [r for r, k in zip(gallery, keep, strict=True) if k]
            out[protocol].append(FoldScores(sims, queries, shown_rows))
    return out


def mean_vector(
    vecs: dict[int, NDArray[np.float32]], scales: tuple[int, ...]
) -> NDArray[np.float32]:
    """The unit vectors at ``scales``, averaged and normalised (one scale: its vectors)."""
    if len(scales) == 1:
        return vecs[scales[0]]
    return unit_rows(np.mean([vecs[s] for s in scales], axis=0)).astype(np.float32)


def label(setting: Setting) -> str:
    scales, catalog_too = setting
    size = "+".join(str(s) for s in scales)
    return f"every image at {size} px" if catalog_too else f"photos at {size} px"


def main(argv: list[str] | None = None) -> int:
    parser = fold_parser(__doc__)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        help="photo sizes in px; the first is the baseline, the card's own size",
    )
    parser.add_argument("--work", type=Path, required=True, help="where the resized copies go")
    parser.add_argument(
        "--every-image-at",
        type=int,
        help="one more column: every image (catalog images too) at this size, fixed beforehand",
    )
    parser.add_argument(
        "--multiscale",
        type=int,
        nargs="+",
        help="one more column: every image's vector the mean of its vectors at these sizes"
        " (paired with --every-image-at's column too, when given)",
    )
    args = parser.parse_args(argv)
    sizes = tuple(args.sizes)
    if min(sizes) < 32 or len(set(sizes)) != len(sizes):
        parser.error("--sizes must be distinct and at least 32 px")
    if args.every_image_at is not None and args.every_image_at not in sizes[1:]:
        parser.error("--every-image-at must be one of --sizes other than the first")
    multiscale = tuple(args.multiscale or ())
    if multiscale and (len(set(multiscale)) < 2 or not set(multiscale) <= set(sizes)):
        parser.error("--multiscale takes two or more distinct sizes of --sizes")
    folds = load_folds(parser, args)
    if any(read_card(Path(m)).input_size != sizes[0] for m in folds.models):
        parser.error("the first --sizes entry must be the models' own input size")
    photo_sizes: list[Setting] = [((s,), False) for s in sizes]
    every_image: list[Setting] = [((s,), True) for s in sizes[1:]]
    extra: list[Setting] = [(multiscale, True)] if multiscale else []
    where = parse_where([args.catalog_where])
    settings = photo_sizes + every_image + extra
    scores = score_folds(folds.models, folds.held_out, where, sizes, settings, args.work)
    chosen = Column[Setting](
        "photo size (cross-fitted)",
        lambda others: best_setting(photo_sizes, hits_on(others, folds.label_of)),
        label,
    )
    columns = [baseline(label(photo_sizes[0]), photo_sizes[0]), chosen]
    fixed: list[Setting] = [((args.every_image_at,), True)] if args.every_image_at else []
    columns += [baseline(label(setting), setting) for setting in fixed + extra]
    results = cross_fitted(scores, columns, folds)
    for protocol, fold_scores in scores.items():
        n = sum(len(f.queries) for f in fold_scores)
        for setting in photo_sizes + every_image:
            r1 = hits_on(fold_scores, folds.label_of)(setting) / n
            print(f"{protocol}, every fold, {label(setting)}: R@1 {r1:.3f} (in hindsight)")
    names = [c.name for c in columns]
    print("\n".join(CrossValidation(len(folds.models), names, results, names[0]).markdown()))
    if fixed and extra:  # the multi-scale vector against the one fixed size
        pair = [label(fixed[0]), label(extra[0])]
        report = CrossValidation(len(folds.models), pair, results, pair[0])
        print("\n".join(report.markdown()))
    return 0


if __name__ == "__main__":
    run(main)
