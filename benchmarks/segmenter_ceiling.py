"""How far the `segmenter` detector's boxes are from the target once "dress or separates?" is
answered right: the same class probabilities decoded with the ground truth's answer.

Each ``--fold CARD=BOXES_CSV`` runs one segmenter model (one look, no second look at small
people) on the photos of its CSV, which it must not have been trained on; counts are pooled.
Decodings, each scored as ``snapshop evaluate-detector`` scores (IoU >= 0.5, one box per
position, the union of that position's garment boxes):

- ``shipped``: the detector's own decoding (upper = upper + dress pixels; no lower box when at
  least ``dress_share`` of the upper region is dress).
- ``truth gate``: the same boxes, but a lower box only on photos whose truth has one, and one
  from the lower pixels on every such photo (the best possible "has a lower garment?" gate).
- ``truth gate + folded``: on separates, each dress pixel's probability goes to upper or lower,
  whichever that pixel prefers; on one-piece outfits lower pixels count as dress.
- ``rule gate + folded``: the folding with the detector's own dress-share gate (deployable).

Then the failures of ``truth gate + folded`` per label (lower missed / off / spurious): what is
left once the outfit type is known.

    python benchmarks/segmenter_ceiling.py --images-root ../shared/datasets/ccp-dev \
        --fold runs/ccp-cv/wide_even_garment_seg.json=/tmp/boxes_odd.csv \
        --fold runs/ccp-cv/wide_odd_garment_seg.json=/tmp/boxes_even.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from snapshop.detect.base import LOWER, POSITIONS, UPPER, Box, Detection
from snapshop.detect.segmenter import (
    DRESS_CLS,
    LOWER_CLS,
    OTHER,
    UPPER_CLS,
    SegmenterConfig,
    SegmenterDetector,
    _region_box,
    boxes_from_probabilities,
)
from snapshop.errors import SnapshopError
from snapshop.evaluate.breakdown import PhotoOutcome, breakdown, photo_labels, position_outcomes
from snapshop.evaluate.detection import PositionScore, load_ground_truth, score_image
from snapshop.images import load_image


@dataclass(frozen=True)
class Photo:
    path: str
    probs: NDArray[np.float32]  # (h, w, 4) at the resized scale
    scale: float
    size: tuple[int, int]  # original (W, H)
    truth: dict[str, Box]


def rule_says_separates(probs: NDArray[np.float32], config: SegmenterConfig) -> bool:
    """The detector's own gate: less than ``dress_share`` of the upper region is dress."""
    labels = probs.argmax(axis=2)
    found = _region_box(np.isin(labels, (UPPER_CLS, DRESS_CLS)), config)
    return found is None or float((labels[found[1]] == DRESS_CLS).mean()) < config.dress_share


def folded(probs: NDArray[np.float32], separates: bool) -> NDArray[np.float32]:
    """Probabilities with the outfit type imposed: separates have no dress pixels (each goes
    to upper or lower), one-piece outfits no lower pixels (they count as dress)."""
    other, upper, lower, dress = (probs[..., c] for c in (OTHER, UPPER_CLS, LOWER_CLS, DRESS_CLS))
    zero = np.zeros_like(dress)
    if separates:
        to_upper = upper >= lower
        return np.stack([other, upper + dress * to_upper, lower + dress * ~to_upper, zero], 2)
    return np.stack([other, upper, zero, dress + lower], axis=2)


def decode_with_gate(
    photo: Photo, separates: bool, fold: bool, config: SegmenterConfig
) -> list[Detection]:
    """Upper box from upper + dress pixels; a lower box from lower pixels only if ``separates``."""
    probs = folded(photo.probs, separates) if fold else photo.probs
    labels = probs.argmax(axis=2)
    wanted = ((UPPER, (UPPER_CLS, DRESS_CLS)), (LOWER, (LOWER_CLS,)))
    out = []
    for position, classes in wanted[: 2 if separates else 1]:
        found = _region_box(np.isin(labels, classes), config)
        if found is not None:
            x1, y1, x2, y2 = (v / photo.scale for v in found[0])
            box = Box(x1, y1, x2, y2).clip(*photo.size)
            out.append(Detection(box, position, position, 1.0))
    return out


def decodings(config: SegmenterConfig) -> dict[str, Callable[[Photo], list[Detection]]]:
    def truth_gate(photo: Photo) -> list[Detection]:
        return decode_with_gate(photo, LOWER in photo.truth, fold=False, config=config)

    return {
        "shipped": lambda ph: boxes_from_probabilities(ph.probs, ph.scale, ph.size, config),
        "truth gate": truth_gate,
        "truth gate + folded": lambda ph: decode_with_gate(ph, LOWER in ph.truth, True, config),
        "rule gate + folded": lambda ph: decode_with_gate(
            ph, rule_says_separates(ph.probs, config), True, config
        ),
    }


def interval_cell(score: PositionScore, metric: str) -> str:
    low, high = score.intervals()[metric]
    return f"{getattr(score, metric):.3f} ({low:.3f}–{high:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", action="append", required=True, metavar="CARD=BOXES_CSV")
    parser.add_argument("--images-root", type=Path, required=True)
    parser.add_argument("--min-photos", type=int, default=10, help="rows for labels this common")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    photos: list[tuple[int, Photo]] = []  # (fold number, photo)
    labels: dict[str, frozenset[str]] = {}
    config = None
    for fold_no, pair in enumerate(args.fold):
        card, sep, boxes = pair.rpartition("=")
        if not sep or not card:
            parser.error(f"--fold {pair!r}: expected CARD=BOXES_CSV")
        truth = load_ground_truth(boxes)
        labels.update(photo_labels(Path(boxes)))
        detector = SegmenterDetector(card)
        if config is not None and detector.config != config:
            parser.error("the folds' cards have different box settings; compare like with like")
        config = detector.config
        for path in sorted(truth):
            rgb = np.asarray(load_image(args.images_root / path).convert("RGB"))
            probs, scale = detector.probabilities(rgb)
            size = (rgb.shape[1], rgb.shape[0])
            photos.append((fold_no, Photo(path, probs, scale, size, truth[path])))
    assert config is not None

    results: dict[str, dict[str, dict]] = {}
    print(f"{len(photos)} photos, {len(args.fold)} fold(s); recall / precision, 95 % intervals")
    header = ["decoding"] + [f"{p} {m}" for p in POSITIONS for m in ("recall", "precision")]
    header += [f"fold {i + 1} lower R / P" for i in range(len(args.fold))]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    failures: list[PhotoOutcome] = []
    for name, decode in decodings(config).items():
        pooled: dict[str, PositionScore] = {}
        per_fold: list[dict[str, PositionScore]] = [{} for _ in args.fold]
        for fold_no, photo in photos:
            detections = decode(photo)
            score_image(photo.truth, detections, pooled)
            score_image(photo.truth, detections, per_fold[fold_no])
            if name == "truth gate + folded":
                outcome = position_outcomes(photo.truth, detections)
                failures.append(
                    PhotoOutcome(photo.path, labels.get(photo.path, frozenset()), outcome)
                )
        cells = [name] + [
            interval_cell(pooled[p], m) for p in POSITIONS for m in ("recall", "precision")
        ]
        cells += [f"{f[LOWER].recall:.3f} / {f[LOWER].precision:.3f}" for f in per_fold]
        print("| " + " | ".join(cells) + " |")
        results[name] = {p: s.to_dict() for p, s in pooled.items()}

    print("\nwith the truth's outfit type and folded probabilities, lower failures per label")
    print("| label | photos | lower right | lower missed / off / spurious |\n|---|---|---|---|")
    table = breakdown(failures, args.min_photos)
    for label, n, counts in table:
        lower = counts[LOWER]
        print(
            f"| {label} | {n} | {lower['right'] / n:.2f} | {lower['missed']} / {lower['off']}"
            f" / {lower['spurious']} |"
        )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "decodings": results,
                    "truth_gate_folded_labels": [
                        {"label": label, "photos": n, LOWER: dict(c[LOWER])}
                        for label, n, c in table
                    ],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SnapshopError as exc:  # a bad CSV, model or image: one line, no traceback
        sys.exit(f"error: {exc}")
