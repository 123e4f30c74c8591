"""The segmenter's presence gate (issue #21), cross-validated: no photo is scored by a head
(or a threshold) fitted on it.

The shipped segmenter runs once per photo of ccp-tags (1,094) and ccp-dev (502), ungated; its
boxes and the gate's features are cached (``--cache``, outside the repo). Then, one change at a
time (the lower threshold is chosen on out-of-fold probabilities of the training photos, three
folds, or fixed at 0.5 where a row says so; the weight decay ``--l2`` is fixed):

1. Presence on ccp-tags (the segmenter never saw these photos), k-fold over ccp-tags: each
   fold's head fitted on all of ccp-dev (+ the other ccp-tags folds). Scored as
   ``benchmarks/tag_presence.py`` scores: a position is found when it has a box.
2. Boxes on ccp-dev (IoU 0.5, as ``snapshop evaluate-detector``), two folds by image-id parity:
   each fold's head fitted on the other fold (+ all of ccp-tags). The shipped segmenter was
   fitted on all of ccp-dev, so these absolute numbers flatter it; the gate's effect is the
   held-out part.

    python benchmarks/presence_gate.py ../shared/datasets/ccp-tags/tags.csv \\
        ../shared/datasets/ccp-dev --cache /tmp/presence_cache.npz
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from snapshop.detect.base import LOWER, POSITIONS, UPPER, Box, Detection
from snapshop.detect.presence import FEATURE_DIM
from snapshop.detect.segmenter import SegmenterDetector
from snapshop.evaluate.detection import PositionScore, load_ground_truth, score_image
from snapshop.train.segmenter.presence import (
    GateFit,
    cache_photos,
    choose_threshold,
    fit_gate,
    has_position,
    out_of_fold,
    predict,
    training_photos,
)

LOW = POSITIONS.index(LOWER)


def gate_probabilities(
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    found_lower: NDArray[np.bool_],
    train: NDArray[np.bool_],
    fit: GateFit,
    fixed: float | None,
) -> tuple[NDArray[np.float32], float]:
    """P(lower) of the photos outside ``train`` from a head fitted on ``train``, and the
    threshold (out-of-fold on ``train`` unless ``fixed``)."""
    x, y = features[train], labels[train]
    if fixed is None:
        oof = out_of_fold(x, y, fit, folds=3)[LOWER]
        threshold = choose_threshold(oof, found_lower[train], has_position(y, LOWER))
    else:
        threshold = fixed
    prob = predict(fit_gate(x, y, fit), features[~train])[LOWER]
    return prob, threshold


def presence_row(
    name: str, found: dict[str, NDArray[np.bool_]], truth: dict[str, NDArray[np.bool_]]
) -> str:
    cells = []
    for pos in POSITIONS:
        tp = int((found[pos] & truth[pos]).sum())
        fp = int((found[pos] & ~truth[pos]).sum())
        fn = int((~found[pos] & truth[pos]).sum())
        cells.append(f"{tp / max(tp + fn, 1):.3f} / {tp / max(tp + fp, 1):.3f}")
        if pos == LOWER:
            cells.append(f"{tp} / {fp} / {fn}")
    return f"| {name} | " + " | ".join(cells) + " |"


def box_cell(score: PositionScore) -> str:
    (rl, rh), (pl, ph) = score.intervals()["recall"], score.intervals()["precision"]
    return f"{score.recall:.3f} ({rl:.3f}–{rh:.3f}) / {score.precision:.3f} ({pl:.3f}–{ph:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tags", type=Path, help="ccp-tags/tags.csv")
    parser.add_argument("ccp_dev", type=Path, help="ccp-dev folder")
    parser.add_argument("--cache", type=Path, required=True, help="feature cache (.npz)")
    parser.add_argument("--folds", type=int, default=5, help="k of the ccp-tags k-fold")
    parser.add_argument("--hidden", type=int, default=32, help="units of the MLP row")
    parser.add_argument("--l2", type=float, default=1.0, help="weight decay of every head")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps per fit")
    parser.add_argument("--lr", type=float, default=0.03, help="Adam learning rate")
    args = parser.parse_args(argv)

    photos, labels, source = training_photos(args.tags, args.ccp_dev)
    data = cache_photos(SegmenterDetector(gate=False), photos, args.cache)
    features, boxes = data["features"], data["boxes"]
    found = {pos: ~np.isnan(boxes[:, i, 0]) for i, pos in enumerate(POSITIONS)}
    truth = {pos: has_position(labels, pos) for pos in POSITIONS}
    is_tags, is_dev = source == "ccp-tags", source == "ccp-dev"
    logistic = GateFit(l2=args.l2, steps=args.steps, lr=args.lr)
    mlp = GateFit(hidden=args.hidden, l2=args.l2, steps=args.steps, lr=args.lr)
    whole = np.r_[0 : 112 + 320, FEATURE_DIM - 4 : FEATURE_DIM]  # no region pooling
    every = np.arange(FEATURE_DIM)
    variants: list[tuple[str, GateFit, bool, float | None, NDArray[np.int64]]] = [
        ("gate fitted on ccp-dev only", logistic, False, None, every),
        ("gate fitted on ccp-dev + ccp-tags", logistic, True, None, every),
        ("the same, whole-photo features only", logistic, True, None, whole),
        ("the same as row 3, threshold fixed at 0.5", logistic, True, 0.5, every),
        (f"the same as row 3, MLP ({args.hidden} hidden units)", mlp, True, None, every),
    ]

    # 1. presence on ccp-tags, k-fold over ccp-tags
    tags_idx = np.flatnonzero(is_tags)
    fold_of = np.full(len(features), -1)
    fold_of[tags_idx] = np.random.default_rng(0).permutation(len(tags_idx)) % args.folds
    print(f"## Presence on ccp-tags ({len(tags_idx)} photos, {args.folds}-fold)\n")
    print(
        "| segmenter | upper recall / precision | lower recall / precision | lower tp / fp / fn |"
    )
    print("|---|---|---|---|")
    t_truth = {pos: truth[pos][is_tags] for pos in POSITIONS}
    print(
        presence_row("ungated (shipped before)", {p: found[p][is_tags] for p in POSITIONS}, t_truth)
    )
    for name, fit, with_tags, fixed, cols in variants:
        kept = found[LOWER].copy()
        thresholds = []
        for k in range(args.folds):
            test = fold_of == k
            train = is_dev | (with_tags & is_tags & ~test)
            prob, threshold = gate_probabilities(
                features[:, cols], labels, found[LOWER], train, fit, fixed
            )
            # the head scored every photo outside train; keep the test fold's
            outside = np.flatnonzero(~train)
            sel = test[outside]
            kept[outside[sel]] &= prob[sel] >= threshold
            thresholds.append(threshold)
        gated = {UPPER: found[UPPER][is_tags], LOWER: kept[is_tags]}
        label = f"{name} (t {min(thresholds):.2f}–{max(thresholds):.2f})"
        print(presence_row(label, gated, t_truth))

    # 2. boxes on ccp-dev, two folds by image-id parity
    truth_boxes = load_ground_truth(args.ccp_dev / "boxes.csv")
    keys = list(data["paths"])
    parity = np.array(
        [int(Path(k).stem) % 2 if d else -1 for k, d in zip(keys, is_dev, strict=True)]
    )
    print(
        f"\n## Boxes on ccp-dev ({int(is_dev.sum())} photos, two folds by parity; 95 % intervals)\n"
    )
    print("| segmenter | upper R / P | lower R / P |\n|---|---|---|")

    def score(keep_lower: Callable[[int], bool]) -> dict[str, PositionScore]:
        scores = {pos: PositionScore() for pos in POSITIONS}
        for i in np.flatnonzero(is_dev):
            dets = [
                Detection(Box(*map(float, boxes[i, j, :4])), pos, pos, float(boxes[i, j, 4]))
                for j, pos in enumerate(POSITIONS)
                if not np.isnan(boxes[i, j, 0]) and (pos != LOWER or keep_lower(i))
            ]
            score_image(truth_boxes[keys[i].removeprefix("ccp-dev/")], dets, scores)
        return scores

    base = score(lambda i: True)
    print(f"| ungated (shipped before) | {box_cell(base[UPPER])} | {box_cell(base[LOWER])} |")
    for name, fit, with_tags, fixed, cols in variants:
        keep = np.ones(len(features), bool)
        for fold in (0, 1):
            test = is_dev & (parity == fold)
            train = (is_dev & ~test) | (with_tags & is_tags)
            prob, threshold = gate_probabilities(
                features[:, cols], labels, found[LOWER], train, fit, fixed
            )
            outside = np.flatnonzero(~train)
            sel = test[outside]
            keep[outside[sel]] = prob[sel] >= threshold
        gated = score(lambda i, keep=keep: bool(keep[i]))
        print(f"| {name} | {box_cell(gated[UPPER])} | {box_cell(gated[LOWER])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
