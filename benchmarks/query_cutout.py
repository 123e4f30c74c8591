"""The query photo's main object, found by a salient-object model (ISNet, isnet_model.py), as the
query's view, on grocery-dev's held-out folds (issue #20: "query framing" with a mask model).

The catalog shows the product alone on white; the shop photo shows it on a shelf, in a hand, in a
bin. From ISNet's saliency of the photo (``--side`` px square, min-max normalised per photo as
DIS's own inference does), two views:

- ``box``: the photo cropped to the box of its salient pixels (saliency >= 0.5), widened by a
  tenth of the box on each side;
- ``cutout``: the same box with every pixel blended onto white by its saliency: a packshot made
  from the photo.

Where under 2 % of the photo is salient (ISNet found no object: a pile filling the frame often
reads as background), or the model returns NaN, both views are the photo itself; the script
counts those photos. The variants: a view alone, or averaged with the photo
(``tta.mean_view``). The variant (or the photo alone) is chosen on the other folds' queries
(most R@1 hits; ties to the photo, then to averaging) and applied to the fold, as
query_crops.py does. Both protocols; R@1 pooled with a 95 % bootstrap interval over products,
paired with the photo alone, R@1 by category, every variant in hindsight.

    python benchmarks/isnet_model.py --out runs/isnet/isnet_small
    python benchmarks/query_cutout.py ../shared/datasets/grocery-dev/manifest.csv \
        --isnet runs/isnet/isnet_small.onnx --cache runs/isnet/masks \
        --fold-models runs/grocery-cv/Dcd0 runs/grocery-cv/Dcd1 runs/grocery-cv/Dcd2

``--cache DIR`` keeps each photo's saliency as a PNG, so a second set of fold models does not
run ISNet again (the masks do not depend on the embedder).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from snapshop.errors import ConfigError, SnapshopError
from snapshop.evaluate.crossval import CrossValidation, similarity_ranks
from snapshop.evaluate.retrieval import embed_paths
from snapshop.images import load_image
from snapshop.models.embedder import load_embedder
from snapshop.models.runtime import cpu_session
from snapshop.models.tta import mean_view

SALIENT = 0.5  # saliency at or above it is the object
MIN_SALIENT = 0.02  # fraction of the photo below which ISNet found nothing
MARGIN = 0.1  # of the box's width / height, on each side
VIEWS = ("box", "cutout")
VARIANTS = ("photo", "photo + box", "photo + cutout", "box", "cutout")  # preferred first


def saliency(session: Any, image: Image.Image, side: int) -> NDArray[np.uint8]:
    """(side, side) saliency of ``image`` in 0..255; all zeros where the model returns NaN."""
    pixels = np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR), np.float32)
    x = ((pixels - 128) / 256).transpose(2, 0, 1)[None]
    out = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})[0][0, 0]
    if not np.isfinite(out).all():
        return np.zeros((side, side), np.uint8)
    span = float(out.max() - out.min())
    scaled = (out - out.min()) / span if span > 0 else np.zeros_like(out)
    return np.round(scaled * 255).astype(np.uint8)


def framed(image: Image.Image, mask: NDArray[np.uint8]) -> tuple[Image.Image, Image.Image] | None:
    """(box view, cut-out view) of ``image`` from its saliency ``mask`` (any size), or None
    where under ``MIN_SALIENT`` of the photo is salient."""
    image = image.convert("RGB")
    weight = np.asarray(Image.fromarray(mask).resize(image.size, Image.BILINEAR), np.float32) / 255
    salient = weight >= SALIENT
    if salient.mean() < MIN_SALIENT:
        return None
    rows, cols = np.flatnonzero(salient.any(axis=1)), np.flatnonzero(salient.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dy, dx = MARGIN * (bottom - top), MARGIN * (right - left)
    w, h = image.size
    box = (
        max(0, round(left - dx)),
        max(0, round(top - dy)),
        min(w, round(right + dx)),
        min(h, round(bottom + dy)),
    )
    pixels = np.asarray(image, np.float32)
    on_white = pixels * weight[..., None] + 255 * (1 - weight[..., None])
    cutout = Image.fromarray(np.round(on_white).astype(np.uint8))
    return image.crop(box), cutout.crop(box)


class Masks:
    """Each photo's saliency from ISNet, kept as PNGs in ``cache`` when given."""

    def __init__(self, model: str, side: int, cache: Path | None) -> None:
        try:
            self.session = cpu_session(model, precision="fp32")
        except Exception as exc:  # ONNX Runtime raises its own types for a bad file
            raise ConfigError(f"{model}: not an ONNX model ({exc})") from exc
        self.side, self.cache = side, cache
        self.computed, self.seconds = 0, 0.0

    def __call__(self, path: Path, image: Image.Image) -> NDArray[np.uint8]:
        name = hashlib.sha1(f"{path.resolve()}|{self.side}".encode()).hexdigest()
        stored = self.cache / f"{name}.png" if self.cache else None
        if stored is not None and stored.exists():
            return np.asarray(Image.open(stored))
        start = time.perf_counter()
        mask = saliency(self.session, image, self.side)
        self.seconds += time.perf_counter() - start
        self.computed += 1
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(stored)
        return mask


@dataclass
class FoldScores:
    """One fold, one protocol: each variant's query-to-gallery similarities."""

    sims: dict[str, NDArray[np.float32]]  # variant -> (queries, gallery)
    queries: list[ManifestRow]
    shown: list[ManifestRow]

    def ranks(self, variant: str, label_of: dict[str, int]) -> Ranks:
        return similarity_ranks(
            self.sims[variant], [r.sku for r in self.queries], [r.sku for r in self.shown], label_of
        )


def query_vectors(
    model: str, queries: list[ManifestRow], masks: Masks
) -> tuple[dict[str, NDArray[np.float32]], int]:
    """Each variant's query vectors, and how many photos had no salient object."""
    embedder = load_embedder(model)
    by_view: dict[str, list[NDArray[np.float32]]] = {"photo": [], **{v: [] for v in VIEWS}}
    unframed = 0
    for row in queries:
        image = load_image(str(row.path))
        views = framed(image, masks(row.path, image))
        unframed += views is None
        vectors = embedder.embed_images([image, *(views or (image, image))])
        for name, vector in zip(by_view, vectors, strict=True):
            by_view[name].append(vector)
    alone = {name: np.stack(vectors) for name, vectors in by_view.items()}
    averaged = {
        f"photo + {view}": np.stack(
            [mean_view(np.stack(pair)) for pair in zip(alone["photo"], alone[view], strict=True)]
        )
        for view in VIEWS
    }
    return alone | averaged, unframed


def score_folds(
    models: list[str], held_out: list[list[ManifestRow]], catalog: dict[str, str], masks: Masks
) -> tuple[dict[str, list[FoldScores]], int]:
    out: dict[str, list[FoldScores]] = {p: [] for p in PROTOCOLS}
    unframed = 0
    for model, fold in zip(models, held_out, strict=True):
        queries = [r for r in fold if r.role == "query"]
        gallery = [r for r in fold if r.role == "gallery"]
        vecs, _, skipped, _ = embed_paths(load_embedder(model), [str(r.path) for r in gallery])
        if skipped:
            raise SnapshopError(f"unreadable images: {skipped[:3]}")
        vector = {str(r.path): vecs[i] for i, r in enumerate(gallery)}
        q, missed = query_vectors(model, queries, masks)
        unframed += missed
        for protocol, shown in (
            ("photo -> catalog", [r for r in gallery if matches(r, catalog)]),
            ("photo -> all", gallery),
        ):
            g = np.stack([vector[str(r.path)] for r in shown])
            sims = {name: (v @ g.T).astype(np.float32) for name, v in q.items()}
            out[protocol].append(FoldScores(sims, queries, shown))
    return out, unframed


def main(argv: list[str] | None = None) -> int:
    parser = fold_parser(__doc__)
    parser.add_argument("--isnet", required=True, help="isnet_model.py's ONNX file")
    parser.add_argument("--side", type=int, default=512, help="ISNet's input side, px")
    parser.add_argument("--cache", type=Path, help="keep the saliency masks here")
    args = parser.parse_args(argv)
    if args.side < 64 or args.side % 64:
        parser.error("--side must be a multiple of 64")
    folds = load_folds(parser, args)
    masks = Masks(args.isnet, args.side, args.cache)
    scores, unframed = score_folds(
        folds.models, folds.held_out, parse_where([args.catalog_where]), masks
    )
    queries = sum(len(f.queries) for f in scores[PROTOCOLS[0]])
    print(f"no salient object in {unframed} of {queries} query photos (the photo stands in)")
    if masks.computed:
        print(f"ISNet at {args.side} px: {1000 * masks.seconds / masks.computed:.0f} ms a photo")
    chosen = Column[str](
        "cut-out (cross-fitted)",
        lambda others: best_setting(VARIANTS, hits_on(others, folds.label_of)),
    )
    results = cross_fitted(scores, [baseline("photo", "photo"), chosen], folds)
    for protocol, fold_scores in scores.items():
        for variant in VARIANTS:
            r1 = hits_on(fold_scores, folds.label_of)(variant) / queries
            print(f"{protocol}, every fold, {variant}: R@1 {r1:.3f} (in hindsight)")
    names = ["photo", chosen.name]
    print("\n".join(CrossValidation(len(folds.models), names, results, "photo").markdown()))
    return 0


if __name__ == "__main__":
    run(main)
