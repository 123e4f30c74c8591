"""Detector evaluation on CCP-format boxes: per-position recall / precision at IoU >= 0.5.

Ground truth is a CSV with at least ``path, group, x1, y1, x2, y2`` (extra columns ignored).
``group`` is a garment group (top, outwear, dress, trousers, shorts, skirt) or a DeepFashion2
class; anything without a garment position (``x_footwear``, ``x_bag``...) is ignored.

One ground-truth box per position per image: the **union** (enclosing box) of that position's
garment boxes. A top under an open coat, or a skirt over leggings, is one region a shopper
would point at, and the detector keeps one box per position, so the union is what it should
find. Dresses count as *upper* (so a dress image has no lower box, and a detector that adds
one loses precision). Every image listed in the CSV is scored, also those without garments.

Truth boxes are clipped to their image, as the detectors' boxes are; a position whose truth
box has no area inside its image is not scored there, and the report lists it (``skipped``).

A detector's prediction for a position is its best-scoring detection there
(:func:`keep_best_per_position`): a true positive when its IoU with the ground truth is >= 0.5.
recall = TP / ground-truth boxes, precision = TP / predicted boxes, per position, each with a
95 % bootstrap interval over images (a few hundred photos leave a few points of doubt).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snapshop.data.manifest import nonblank_rows
from snapshop.detect.base import (
    POSITIONS,
    Box,
    Detection,
    Detector,
    keep_best_per_position,
    position_of,
)
from snapshop.errors import ConfigError, ManifestError
from snapshop.evaluate.stats import ratio_interval

log = logging.getLogger(__name__)

REQUIRED = ("path", "group", "x1", "y1", "x2", "y2")


def load_ground_truth(boxes_csv: str | Path) -> dict[str, dict[str, Box]]:
    """path -> {position: union box}; every path in the CSV appears, possibly with no boxes."""
    path = Path(boxes_csv)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    out: dict[str, dict[str, Box]] = {}
    try:
        with fh:
            _read_boxes(csv.DictReader(fh, strict=True), path, out)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: malformed CSV ({exc})") from None
    if not out:
        raise ManifestError(f"{path}: no rows")
    return out


def _read_boxes(reader: csv.DictReader[str], path: Path, out: dict[str, dict[str, Box]]) -> None:
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; need {list(REQUIRED)}")
    for line, row in nonblank_rows(reader, path):
        if not row["path"]:
            raise ManifestError(f"{path}:{line}: empty path")
        image = os.path.normpath(row["path"])  # "a.jpg" and "./a.jpg" are one image
        boxes = out.setdefault(image, {})
        pos = position_of(row["group"] or "")
        if pos is None:
            continue
        try:
            x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
        except (TypeError, ValueError):
            raise ManifestError(f"{path}:{line}: box coordinates must be numbers") from None
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise ManifestError(f"{path}:{line}: box coordinates must be finite numbers")
        if not (x2 > x1 and y2 > y1):
            raise ManifestError(f"{path}:{line}: empty box ({x1}, {y1}, {x2}, {y2})")
        old = boxes.get(pos)
        boxes[pos] = (
            Box(x1, y1, x2, y2)
            if old is None
            else Box(min(old.x1, x1), min(old.y1, y1), max(old.x2, x2), max(old.y2, y2))
        )


@dataclass
class PositionScore:
    ground_truth: int = 0
    predicted: int = 0
    true_positive: int = 0
    ious: list[float] = field(default_factory=list)
    # (ground truth, predicted, true positive) of each scored image, 0 or 1 each
    per_image: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, truth: bool, predicted: bool, true_positive: bool) -> None:
        self.ground_truth += truth
        self.predicted += predicted
        self.true_positive += true_positive
        self.per_image.append((int(truth), int(predicted), int(true_positive)))

    @property
    def recall(self) -> float:
        return self.true_positive / self.ground_truth if self.ground_truth else 0.0

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted if self.predicted else 0.0

    def intervals(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of recall and precision, resampling images."""
        counts = np.asarray(self.per_image, np.float64).reshape(-1, 3)
        return {
            "recall": ratio_interval(counts[:, 2], counts[:, 0], level),
            "precision": ratio_interval(counts[:, 2], counts[:, 1], level),
        }

    def to_dict(self) -> dict[str, Any]:
        ci = {
            f"{name}_ci95": None if np.isnan(lo) else [round(lo, 4), round(hi, 4)]
            for name, (lo, hi) in self.intervals().items()
        }
        return {
            "ground_truth": self.ground_truth,
            "predicted": self.predicted,
            "true_positive": self.true_positive,
            "recall": round(self.recall, 4),
            "precision": round(self.precision, 4),
            **ci,
            "mean_iou_matched_gt": round(float(np.mean(self.ious)), 4) if self.ious else None,
        }


@dataclass
class DetectionReport:
    detector: str
    images: int
    iou_threshold: float
    positions: dict[str, PositionScore]
    latency_ms: list[float] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    # (path, position) of truth boxes with no area inside their image: not scored
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def latency_p50_ms(self) -> float:
        return float(np.median(self.latency_ms)) if self.latency_ms else 0.0

    @property
    def latency_mean_ms(self) -> float:
        return float(np.mean(self.latency_ms)) if self.latency_ms else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "images": self.images,
            "iou_threshold": self.iou_threshold,
            "positions": {p: s.to_dict() for p, s in self.positions.items()},
            "latency_ms": {
                "p50": round(self.latency_p50_ms, 2),
                "mean": round(self.latency_mean_ms, 2),
            },
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "skipped": [{"path": p, "position": pos} for p, pos in self.skipped],
        }


def score_image(
    truth: dict[str, Box],
    detections: Iterable[Detection],
    positions: dict[str, PositionScore],
    iou_threshold: float = 0.5,
    image_size: tuple[int, int] | None = None,
) -> list[str]:
    """Add one image's outcome to ``positions`` (best detection per position vs the truth).

    With ``image_size`` (W, H) the truth boxes are clipped to the image, as detections are; a
    position whose truth box has no area inside it is left unscored. Returns those positions.
    """
    best = keep_best_per_position(detections)
    skipped = []
    for pos in POSITIONS:
        score = positions.setdefault(pos, PositionScore())
        gt, det = truth.get(pos), best.get(pos)
        if gt is not None and image_size is not None:
            gt = gt.clip(*image_size)
            if gt.area <= 0:
                skipped.append(pos)
                continue
        iou = gt.iou(det.box) if gt is not None and det is not None else None
        if iou is not None:
            score.ious.append(iou)
        score.add(gt is not None, det is not None, iou is not None and iou >= iou_threshold)
    return skipped


def detector_to_evaluate(spec: str) -> Detector:
    """The detector a ``--detector`` spec names; ``none`` is a :class:`ConfigError` here (it
    has nothing to evaluate)."""
    from snapshop.detect.factory import create_detector

    detector = create_detector(spec)
    if detector is None:
        raise ConfigError(f"--detector {spec} has nothing to evaluate")
    return detector


def evaluate_detector(
    boxes_csv: str | Path,
    detector: Detector,
    images_root: str | Path | None = None,
    *,
    iou_threshold: float = 0.5,
    limit: int | None = None,
    where: Callable[[str], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> DetectionReport:
    """Run ``detector`` on every image of ``boxes_csv`` (paths relative to ``images_root``,
    default the CSV's folder) and score it. Latency is ``detector.detect`` alone, decoded
    image in memory."""
    from snapshop.errors import ImageDecodeError
    from snapshop.images import DecodeLimits, load_image

    if not 0.0 < iou_threshold <= 1.0:
        raise ConfigError(f"iou threshold must be in (0, 1], got {iou_threshold}")
    truth = load_ground_truth(boxes_csv)
    root = Path(images_root) if images_root is not None else Path(boxes_csv).parent
    if not root.is_dir():
        raise ConfigError(f"images root {root} is not a directory")
    paths = [p for p in sorted(truth) if where is None or where(p)]
    if limit is not None:
        paths = paths[:limit]
    report = DetectionReport(
        getattr(detector, "name", type(detector).__name__),
        0,
        iou_threshold,
        {p: PositionScore() for p in POSITIONS},
    )
    for path in paths:
        try:
            image = load_image(root / path, DecodeLimits(max_side=None))  # truth: file pixels
        except ImageDecodeError as exc:
            report.failed.append((path, exc.reason))
            continue
        t0 = time.perf_counter()
        detections = detector.detect(image)
        report.latency_ms.append((time.perf_counter() - t0) * 1e3)
        outside = score_image(truth[path], detections, report.positions, iou_threshold, image.size)
        for pos in outside:
            log.warning("%s: the %s truth box lies outside the image: not scored", path, pos)
            report.skipped.append((path, pos))
        report.images += 1
        if progress:
            progress(1)
    if report.images == 0:
        raise ManifestError(f"{boxes_csv}: no image could be read under {root}")
    return report
