"""Colour as a second opinion: a hue histogram of the product region fused into the cosine,
its weight cross-fitted on grocery-dev's held-out folds (issue #20, rule 18 in
docs/benchmarks/retrieval.md).

Each image gets a 39-bin HSV histogram of its product region: a packshot's foreground (the
pixels that are not near-white), a photo's main-object crop, on a copy at most 128 px long.
A gallery image's score becomes ``cos + w * BC``, BC the Bhattacharyya coefficient of the
query's and the image's histograms. ``w`` is chosen on the other folds' queries (most R@1
hits; ties to the smaller ``w``) and applied to the fold, per protocol. R@1 pooled with a 95 %
bootstrap interval over products, the paired difference to plain cosine, R@1 by category, and
the descriptor's time per query photo.

    python benchmarks/colour_rerank.py ../shared/datasets/grocery-dev/manifest.csv \\
        --fold-models runs/grocery-cv/Es0_0 runs/grocery-cv/Es0_1 runs/grocery-cv/Es0_2 \\
        --cache /tmp/colour-cache
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
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
from PIL import Image

from snapshop.data.manifest import ManifestRow, matches, parse_where
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import CrossValidation, similarity_ranks
from snapshop.evaluate.retrieval import embed_paths
from snapshop.images import load_image
from snapshop.models.embedder import load_embedder
from snapshop.models.tta import foreground_mask, is_packshot, main_object_crop

WEIGHTS = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3)
THUMB = 128
HUE_BINS = 18
CHROMA_FLOOR = 51  # S and V below this (of 255): no reliable hue
SATURATION_SPLIT = 141
BRIGHT_FLOOR = 171
BINS = HUE_BINS * 2 + 3


def colour_histogram(image: Image.Image) -> NDArray[np.float32]:
    """The product region's 39-bin HSV histogram, summing to 1 (rule 18)."""
    packshot = is_packshot(image)
    region = image.convert("RGB") if packshot else main_object_crop(image)
    region.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    hsv = np.asarray(region.convert("HSV"), dtype=np.int32).reshape(-1, 3)
    if packshot:
        keep = foreground_mask(region).reshape(-1)
        hsv = hsv[keep] if keep.any() else hsv
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    chromatic = (sat >= CHROMA_FLOOR) & (val >= CHROMA_FLOOR)
    bins = np.where(
        chromatic,
        (hue * HUE_BINS // 256) * 2 + (sat >= SATURATION_SPLIT),
        HUE_BINS * 2 + (val >= CHROMA_FLOOR).astype(np.int32) + (val >= BRIGHT_FLOOR),
    )
    counts = np.bincount(bins, minlength=BINS).astype(np.float32)
    return counts / max(float(counts.sum()), 1.0)


def bhattacharyya(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float32]:
    """(len(a), len(b)) Bhattacharyya coefficients of two stacks of histograms."""
    return (np.sqrt(a) @ np.sqrt(b).T).astype(np.float32)


@dataclass
class FoldScores:
    """One fold, one protocol: cosines and colour coefficients, queries x gallery images."""

    sims: NDArray[np.float32]
    colour: NDArray[np.float32]
    queries: list[ManifestRow]
    shown: list[ManifestRow]

    def ranks(self, weight: float, label_of: dict[str, int]) -> Ranks:
        return similarity_ranks(
            self.sims + weight * self.colour,
            [r.sku for r in self.queries],
            [r.sku for r in self.shown],
            label_of,
        )


def cached(path: Path, compute: Callable[[], NDArray[np.float32]]) -> NDArray[np.float32]:
    if path.exists():
        return np.load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, value)
    return value


def key(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def embed(model: str, rows: list[ManifestRow], cache: Path) -> NDArray[np.float32]:
    def compute() -> NDArray[np.float32]:
        vecs, kept, skipped, _ = embed_paths(load_embedder(model), [str(r.path) for r in rows])
        if skipped:
            raise SnapshopError(f"{len(skipped)} unreadable images")
        return vecs

    card = (Path(model) / "model.json").read_text(encoding="utf-8")
    return cached(cache / f"emb-{key(card, *(str(r.path) for r in rows))}.npy", compute)


def histograms(rows: list[ManifestRow], cache: Path, times: list[float]) -> NDArray[np.float32]:
    def compute() -> NDArray[np.float32]:
        out = []
        for row in rows:
            image = load_image(row.path)
            start = time.perf_counter()
            out.append(colour_histogram(image))
            if row.role == "query":
                times.append(time.perf_counter() - start)
        return np.stack(out)

    return cached(cache / f"hist-{key(*(str(r.path) for r in rows))}.npy", compute)


def score_folds(
    models: list[str],
    held_out: list[list[ManifestRow]],
    catalog: dict[str, str],
    cache: Path,
    times: list[float],
) -> dict[str, list[FoldScores]]:
    out: dict[str, list[FoldScores]] = {p: [] for p in PROTOCOLS}
    for model, fold in zip(models, held_out, strict=True):
        position = {str(r.path): i for i, r in enumerate(fold)}
        vectors, colours = embed(model, fold, cache), histograms(fold, cache, times)
        queries = [r for r in fold if r.role == "query"]
        gallery = [r for r in fold if r.role == "gallery"]
        q = [position[str(r.path)] for r in queries]
        for protocol, shown in (
            ("photo -> catalog", [r for r in gallery if matches(r, catalog)]),
            ("photo -> all", gallery),
        ):
            g = [position[str(r.path)] for r in shown]
            sims = (vectors[q] @ vectors[g].T).astype(np.float32)
            colour = bhattacharyya(colours[q], colours[g])
            out[protocol].append(FoldScores(sims, colour, queries, shown))
    return out


def picker(
    weights: Sequence[float], label_of: dict[str, int]
) -> Callable[[Sequence[FoldScores]], float]:
    return lambda others: best_setting(weights, hits_on(others, label_of))


def main(argv: list[str] | None = None) -> int:
    parser = fold_parser(__doc__)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/snapshop-colour"))
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=WEIGHTS,
        help="the grid of w, preferred (smaller) first; rule 18's by default",
    )
    args = parser.parse_args(argv)
    folds = load_folds(parser, args)
    times: list[float] = []
    scores = score_folds(
        folds.models, folds.held_out, parse_where([args.catalog_where]), args.cache, times
    )
    if times:
        ms = np.array(times) * 1000
        print(
            f"colour histogram of a query photo: p50 {np.median(ms):.2f} ms, "
            f"p95 {np.percentile(ms, 95):.2f} ms ({len(ms)} photos)"
        )
    print(f"grid: w {tuple(args.weights)}")
    columns: list[Column[float]] = [
        baseline("cosine", 0.0),
        Column(
            "cosine + w colour (cross-fitted)",
            picker(args.weights, folds.label_of),
            lambda w: f"w {w}",
        ),
    ]
    results = cross_fitted(scores, columns, folds)
    names = [c.name for c in columns]
    print("\n".join(CrossValidation(len(folds.models), names, results, "cosine").markdown()))
    return 0


if __name__ == "__main__":
    run(main)
