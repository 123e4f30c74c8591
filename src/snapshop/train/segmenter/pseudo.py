"""Tag-constrained pseudo-labels (issue #21): a trained segmenter labels photos that carry only
image-level tags (ccp-tags), and the tags decide which classes a photo may hold.

Each pixel's probability of a class the tags exclude moves to the garment class the tags allow
that the pixel prefers (a dress pixel on a photo tagged *top* + *skirt* becomes upper or lower,
whichever is more probable there; a lower pixel on a photo tagged *dress* alone becomes dress):
the "folded" decoding of ``benchmarks/segmenter_ceiling.py``, which lifted held-out lower
precision from 0.73 to 0.86 when it knew the outfit type. Pixels whose folded probability stays
below ``min_confidence`` are ignored by the loss. A photo is dropped when a position its tags
name covers under ``min_share`` of it (the teacher missed the garment: its map would teach
absence), or when its tags name no garment.

The result is a folder the trainer reads as extra labelled photos (``--tags`` of
``train-detector`` makes one with the run's own teacher)::

    pseudo_labels.json   card: teacher, settings, counts (checked on open)
    manifest.csv         path (the photo, absolute), image_id, groups
    labels/ID.png        class per pixel (CLASSES order; 255 = ignored), the photo's size
                         (its reduced decoded size past 2,048 px) and stored orientation
                         (training reads the stored pixels, whatever the EXIF says)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.data.ccp import EXIF_ORIENTATION, check_mask_fits
from snapshop.detect.base import LOWER, UPPER
from snapshop.detect.presence import GROUPS, POSITION_GROUPS
from snapshop.detect.segmenter import CLASSES, DRESS_CLS, LOWER_CLS, OTHER, UPPER_CLS
from snapshop.errors import ConfigError, ManifestError
from snapshop.train.segmenter.config import IGNORE

log = logging.getLogger(__name__)

CARD_FILE = "pseudo_labels.json"
MANIFEST_FILE = "manifest.csv"
FORMAT = "snapshop-pseudo-labels-1"
# Which detector classes each tag group allows (a romper is in the dress group, as in CCP).
GROUP_CLASSES: dict[str, int] = {
    "top": UPPER_CLS,
    "outwear": UPPER_CLS,
    "dress": DRESS_CLS,
    "trousers": LOWER_CLS,
    "shorts": LOWER_CLS,
    "skirt": LOWER_CLS,
}
POSITION_CLASSES = {UPPER: (UPPER_CLS, DRESS_CLS), LOWER: (LOWER_CLS,)}  # as the boxes count
# Pseudo-label maps hold class indexes already: the label table is the identity.
IDENTITY_TABLE: NDArray[np.uint8] = np.arange(256, dtype=np.uint8)


@dataclass(frozen=True)
class PseudoLabelConfig:
    min_confidence: float = 0.6  # folded probability below this: ignored by the loss
    min_share: float = 0.005  # a tagged position covering less of the photo: photo dropped
    mirror: bool = True  # average the photo's and its mirror image's probabilities

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence < 1.0 or not 0.0 <= self.min_share < 1.0:
            raise ConfigError("min_confidence and min_share must be in [0, 1)")


def allowed_classes(groups: set[str]) -> NDArray[np.bool_]:
    """(len(CLASSES),) which classes a photo tagged with ``groups`` may hold (other: always)."""
    unknown = groups - set(GROUPS)
    if unknown:
        raise ManifestError(f"unknown garment groups {sorted(unknown)}; known: {GROUPS}")
    allowed = np.zeros(len(CLASSES), bool)
    allowed[OTHER] = True
    for group in groups:
        allowed[GROUP_CLASSES[group]] = True
    return allowed


def fold_probabilities(
    probs: NDArray[np.float32], allowed: NDArray[np.bool_]
) -> NDArray[np.float32]:
    """(H, W, K) probabilities with each excluded class's mass moved to the allowed garment
    class the pixel prefers (to *other* when the tags allow no garment)."""
    garments = [c for c in range(len(CLASSES)) if c != OTHER and allowed[c]]
    folded = np.where(allowed, probs, 0.0).astype(np.float32)
    excluded = probs[..., ~allowed].sum(axis=-1)
    if garments:
        best = np.asarray(garments)[np.argmax(probs[..., garments], axis=-1)]
    else:
        best = np.full(probs.shape[:2], OTHER)
    rows, cols = np.indices(best.shape)
    folded[rows, cols, best] += excluded
    return folded


def constrained_labels(
    probs: NDArray[np.float32], groups: set[str], config: PseudoLabelConfig
) -> tuple[NDArray[np.uint8] | None, str]:
    """(H, W) class per pixel (IGNORE where unsure) of a photo tagged ``groups``, or None and
    why the photo is dropped."""
    allowed = allowed_classes(groups)
    if not allowed[1:].any():
        return None, "no garment tags"
    folded = fold_probabilities(probs, allowed)
    labels = np.argmax(folded, axis=-1).astype(np.uint8)
    labels[folded.max(axis=-1) < config.min_confidence] = IGNORE
    area = labels.size
    for position, names in POSITION_GROUPS.items():
        if groups & set(names):
            share = np.isin(labels, POSITION_CLASSES[position]).sum() / area
            if share < config.min_share:
                return None, f"tagged {position} garment not found"
    return labels, ""


def photo_probabilities(detector: Any, rgb: NDArray[np.uint8], mirror: bool) -> NDArray[np.float32]:
    """(H, W, K) class probabilities of ``rgb`` at its own size (the mean with the mirror
    image's, flipped back, when ``mirror``)."""
    import cv2

    probs, _ = detector.probabilities(rgb)
    if mirror:
        flipped, _ = detector.probabilities(np.ascontiguousarray(rgb[:, ::-1]))
        probs = (probs + flipped[:, ::-1]) / 2
    h, w = rgb.shape[:2]
    up = cv2.resize(np.ascontiguousarray(probs), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(up, np.float32).reshape(h, w, len(CLASSES))


def read_tags(tags_csv: Path) -> list[tuple[Path, str, set[str]]]:
    """ccp-tags ``tags.csv`` -> [(photo path, image id, garment groups)]."""
    try:
        with tags_csv.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{tags_csv}: unreadable ({exc})") from None
    needed = {"path", "image_id", "groups"}
    if not rows or not needed <= set(rows[0]):
        raise ManifestError(f"{tags_csv}: expected a ccp-tags CSV with columns {sorted(needed)}")
    out = []
    seen: set[str] = set()
    for line, r in enumerate(rows, start=2):
        image_id = (r["image_id"] or "").strip()
        if not (r["path"] or "").strip():
            raise ManifestError(f"{tags_csv}, line {line}: no photo path")
        if not image_id or "/" in image_id or "\\" in image_id:
            raise ManifestError(f"{tags_csv}, line {line}: bad image_id {image_id!r}")
        if image_id in seen:  # one label map per id: a second row would overwrite the first
            raise ManifestError(f"{tags_csv}, line {line}: image_id {image_id!r} repeated")
        seen.add(image_id)
        groups = {g for g in (r["groups"] or "").split(";") if g}
        if groups - set(GROUPS):
            raise ManifestError(
                f"{tags_csv}, line {line}: unknown garment groups {sorted(groups - set(GROUPS))}"
                f" (known: {', '.join(GROUPS)})"
            )
        out.append((tags_csv.parent / r["path"], image_id, groups))
    return out


def write_pseudo_labels(
    detector: Any,
    tags_csv: Path,
    out: Path,
    config: PseudoLabelConfig = PseudoLabelConfig(),
    teacher: str = "",
) -> dict[str, Any]:
    """Label every photo of ``tags_csv`` with ``detector`` (a :class:`SegmenterDetector`,
    ungated) under its tags; write the folder described in the module docstring into ``out``
    and return its card. Unreadable photos are skipped and counted."""
    from snapshop.errors import ImageDecodeError
    from snapshop.images import DecodeLimits, load_image

    rows = read_tags(tags_csv)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    dropped: dict[str, int] = {}
    kept: list[tuple[Path, str, set[str]]] = []
    pixels = np.zeros(len(CLASSES) + 1, np.int64)  # per class, then ignored
    t0 = time.perf_counter()
    for n, (photo, image_id, groups) in enumerate(rows, start=1):
        try:
            # default limits: a very large photo is labelled at a reduced size (bounded
            # memory); training resizes a label map to its photo (nearest) when they differ
            rgb = np.asarray(load_image(photo, DecodeLimits()).convert("RGB"))
        except ImageDecodeError as exc:
            dropped["unreadable photo"] = dropped.get("unreadable photo", 0) + 1
            log.warning("%s: skipped (%s)", photo, exc)
            continue
        probs = photo_probabilities(detector, rgb, config.mirror)
        labels, why = constrained_labels(probs, groups, config)
        if labels is None:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        # training reads the photo's stored pixels, the teacher saw it turned upright
        stored = Image.fromarray(labels)
        undo = _UNDO_ORIENTATION.get(_orientation(photo))
        if undo is not None:
            stored = stored.transpose(undo)
        stored.save(out / "labels" / f"{image_id}.png")
        counts = np.bincount(labels.ravel(), minlength=256)
        pixels += np.append(counts[: len(CLASSES)], counts[IGNORE])
        kept.append((photo.resolve(), image_id, groups))
        if n % 200 == 0:
            log.info(
                "pseudo-labels: %d / %d photos (%.0f s)", n, len(rows), time.perf_counter() - t0
            )
    with (out / MANIFEST_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "image_id", "groups"])
        for photo, image_id, groups in kept:
            writer.writerow([str(photo), image_id, ";".join(sorted(groups))])
    shares = pixels / max(int(pixels.sum()), 1)
    card = {
        "format": FORMAT,
        "teacher": teacher,
        "tags": str(tags_csv.resolve()),
        "settings": asdict(config),
        "photos": len(rows),
        "kept": len(kept),
        "dropped": dropped,
        "pixel_shares": {
            **{name: round(float(s), 4) for name, s in zip(CLASSES, shares, strict=False)},
            "ignored": round(float(shares[-1]), 4),
        },
        "manifest_sha256": hashlib.sha256((out / MANIFEST_FILE).read_bytes()).hexdigest(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    log.info("pseudo-labels: kept %d of %d photos (%s)", len(kept), len(rows), dropped)
    return card


def pseudo_label_pairs(folder: Path) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    """(photo, label map) pairs of a folder written by :func:`write_pseudo_labels`, and its
    card; a missing, foreign or changed folder is a :class:`ConfigError`, a label map that
    does not fit its photo a :class:`ManifestError`."""
    try:
        card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
        manifest = (folder / MANIFEST_FILE).read_bytes()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: not a pseudo-label folder ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ConfigError(f"{folder}/{CARD_FILE}: not a {FORMAT} card")
    if hashlib.sha256(manifest).hexdigest() != card.get("manifest_sha256"):
        raise ConfigError(f"{folder}/{MANIFEST_FILE} does not match its card (changed by hand?)")
    pairs = []
    try:
        text = manifest.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{folder}/{MANIFEST_FILE}: not UTF-8 text ({exc.reason})") from None
    for row in csv.DictReader(text.splitlines()):
        labels = folder / "labels" / f"{row['image_id']}.png"
        if not labels.is_file():
            raise ConfigError(f"{folder}: {labels.name} is missing")
        photo = Path(row["path"])
        if not photo.is_file():  # moved or deleted since labelling
            raise ConfigError(f"{folder}: photo {photo} is missing (label again with --tags)")
        try:
            with Image.open(photo) as stored, Image.open(labels) as label_map:
                sizes = label_map.size, stored.size
        except Exception as exc:  # PIL raises several types for a damaged file
            raise ConfigError(f"{folder}: cannot read {photo} or {labels.name} ({exc})") from None
        check_mask_fits(*sizes, labels, photo)
        pairs.append((photo, labels))
    return pairs, card


# The transposition that takes a photo turned upright by its EXIF orientation (as
# images.load_image turns it; PIL's ImageOps.exif_transpose table) back to its stored pixels.
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _orientation(photo: Path) -> int:
    """The photo's EXIF orientation (1 when it has none or it cannot be read)."""
    try:
        with Image.open(photo) as image:
            return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF: load_image keeps the pixels as stored too
        return 1


def pseudo_label_note(photos: int, card: dict[str, Any]) -> str:
    """The model card's words for the pseudo-labelled photos a run trained on ("" for none)."""
    if not photos:
        return ""
    return (
        f"; {photos} photos pseudo-labelled under their image-level tags ({card.get('tags')},"
        f" teacher {card.get('teacher') or 'unnamed'})"
    )
