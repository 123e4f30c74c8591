"""Where a garment detector fails, per label: for the photos showing each label of a CCP-format
boxes CSV (``ccp_label`` when present, else ``group``), how often each position is right.

A position is right on a photo when it has no ground-truth box and none is predicted, or the
best-scoring prediction there has IoU >= 0.5 with the ground truth (the union of that
position's garment boxes, as :func:`snapshop.evaluate.detection.evaluate_detector` scores).
Failures are counted as missed (truth, no prediction), off (IoU < 0.5) or spurious
(prediction, no truth). Several (detector, boxes CSV) folds pool cross-validation folds, each
detector run only on its own CSV's photos.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapshop.data.manifest import nonblank_rows
from snapshop.detect.base import POSITIONS, Box, Detection, keep_best_per_position
from snapshop.evaluate.detection import (
    PositionScore,
    detector_to_evaluate,
    load_ground_truth,
    score_image,
)
from snapshop.images import load_image

OUTCOMES = ("right", "missed", "off", "spurious")


@dataclass(frozen=True)
class PhotoOutcome:
    path: str
    labels: frozenset[str]
    outcome: dict[str, str]  # position -> one of OUTCOMES


def position_outcomes(
    truth: dict[str, Box], detections: Iterable[Detection], iou_threshold: float = 0.5
) -> dict[str, str]:
    """Per position: right, missed, off (IoU below the threshold) or spurious."""
    best = keep_best_per_position(detections)
    out = {}
    for position in POSITIONS:
        gt, det = truth.get(position), best.get(position)
        if gt is None:
            out[position] = "right" if det is None else "spurious"
        elif det is None:
            out[position] = "missed"
        else:
            out[position] = "right" if gt.iou(det.box) >= iou_threshold else "off"
    return out


def photo_labels(boxes_csv: Path) -> dict[str, frozenset[str]]:
    """path -> the labels of its rows (``ccp_label`` when the CSV has it, else ``group``), read
    as :func:`~snapshop.evaluate.detection.load_ground_truth` reads the file (which checks it)."""
    labels: dict[str, set[str]] = defaultdict(set)
    with open(boxes_csv, newline="", encoding="utf-8-sig") as fh:
        for _, row in nonblank_rows(csv.DictReader(fh, strict=True), boxes_csv):
            labels[row["path"]].add(row.get("ccp_label") or row["group"])
    return {path: frozenset(found) for path, found in labels.items()}


def breakdown(
    outcomes: list[PhotoOutcome], min_photos: int
) -> list[tuple[str, int, dict[str, Counter[str]]]]:
    """(label, photos, {position: Counter of outcomes}) for labels on >= ``min_photos``
    photos, plus an ``all photos`` row first."""
    rows = [("all photos", outcomes)]
    by_label: dict[str, list[PhotoOutcome]] = defaultdict(list)
    for photo in outcomes:
        for label in photo.labels:
            by_label[label].append(photo)
    rows += sorted(
        (label, photos) for label, photos in by_label.items() if len(photos) >= min_photos
    )
    return [
        (label, len(photos), {p: Counter(ph.outcome[p] for ph in photos) for p in POSITIONS})
        for label, photos in rows
    ]


def score_folds(
    folds: Sequence[tuple[str, Path]], images_root: Path
) -> tuple[list[PhotoOutcome], dict[str, PositionScore]]:
    """Run each fold's detector (a ``--detector`` spec) on its own boxes CSV's photos; returns
    every photo's outcome and the pooled per-position scores (as ``evaluate-detector`` counts
    them). A fold's CSV is read before its detector loads: a bad CSV fails first."""
    outcomes: list[PhotoOutcome] = []
    pooled: dict[str, PositionScore] = {}
    for spec, boxes in folds:
        truth, labels = load_ground_truth(boxes), photo_labels(Path(boxes))
        detector = detector_to_evaluate(spec)
        for path in sorted(truth):
            detections = detector.detect(load_image(images_root / path))
            outcome = position_outcomes(truth[path], detections)
            score_image(truth[path], detections, pooled)
            outcomes.append(PhotoOutcome(path, labels.get(path, frozenset()), outcome))
    return outcomes, pooled
