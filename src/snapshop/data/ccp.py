"""Clothing Co-Parsing (CCP) in the ccp-dev layout: ``manifest.csv`` (path, image_id, ...),
``masks/<image_id>.png`` (one CCP label index per pixel) and ``mask_labels.csv`` (index, label).

CCP's 59 labels are grouped by name. Which group a one-piece garment (dress, romper) joins is
the model's choice, so it is never hidden in a constant: the learned segmenter gives it a class
of its own (``{..., DRESS: CCP_ONE_PIECE}``), the pose detector's cell classifier counts it as
the upper garment (``{UPPER: CCP_UPPER + CCP_ONE_PIECE}``), as the groups of boxes.csv do.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.data.manifest import nonblank_rows
from snapshop.errors import ImageDecodeError, ManifestError
from snapshop.images import DecodeLimits, load_image

# Tops and outerwear: garments of the upper body only.
CCP_UPPER = (
    "blazer", "blouse", "bodysuit", "cape", "cardigan", "coat", "hoodie", "jacket", "jumper",
    "shirt", "suit", "sweater", "sweatshirt", "t-shirt", "top", "vest",
)  # fmt: skip
# One-piece garments covering the upper body and the legs.
CCP_ONE_PIECE = ("dress", "romper")
CCP_LOWER = ("jeans", "leggings", "pants", "shorts", "skirt")

# Labels that are neither garment group but worth telling apart from the background when
# training (legs, stockings, shoes and belts look like garments).
CCP_AUX: dict[str, tuple[str, ...]] = {
    "skin": ("skin",),
    "hair": ("hair",),
    "legwear": ("socks", "stockings", "tights"),
    "footwear": (
        "boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers",
        "wedges",
    ),
    "bag": ("bag", "purse", "wallet"),
    "belt": ("belt",),
}  # fmt: skip

PARITIES = ("even", "odd", "all")
EXIF_ORIENTATION = 0x0112


def label_table(mask_labels_csv: Path, groups: Mapping[int, Sequence[str]]) -> NDArray[np.uint8]:
    """(256,) CCP label index -> class index: ``c`` for the labels named in ``groups[c]``, 0 for
    every other label (the background class)."""
    class_of: dict[str, int] = {}
    for cls, names in groups.items():
        for name in names:
            if class_of.setdefault(name, cls) != cls:
                raise ValueError(f"CCP label {name!r} is in two groups")
    table = np.zeros(256, np.uint8)
    for index, label in mask_labels(mask_labels_csv).items():
        found = class_of.get(label.lower())
        if found is not None:
            table[index] = found
    return table


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, stripped values) of the rows of the CSV ``path``, which must have
    ``columns``; an unreadable or malformed file is a :class:`ManifestError` naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, strict=True)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(f"{path}: missing column(s) {missing}; need {list(columns)}")
            yield from nonblank_rows(reader, path)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: malformed CSV ({exc})") from None


def mask_labels(mask_labels_csv: Path) -> dict[int, str]:
    """``mask_labels.csv``: mask value (0..255) -> CCP label name."""
    labels: dict[int, str] = {}
    for line, row in _csv_rows(mask_labels_csv, ("index", "label")):
        index = row["index"]
        if not re.fullmatch(r"[0-9]{1,3}", index) or int(index) > 255:
            raise ManifestError(
                f"{mask_labels_csv}:{line}: index {index!r} is not a mask value (0..255)"
            )
        labels[int(index)] = row["label"]
    return labels


def label_count(mask_labels_csv: Path) -> int:
    """One more than the largest mask value ``mask_labels.csv`` names: masks hold less."""
    return max(mask_labels(mask_labels_csv), default=-1) + 1


def read_mask(path: Path, labels: int = 256) -> NDArray[np.uint8]:
    """(H, W) label indices of a mask PNG: 8-bit (mode L or P), every value below ``labels``."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            mask = np.asarray(image) if mode in ("L", "P") else None
    except Exception as exc:  # PIL raises several types for a missing or damaged file
        raise ManifestError(f"{path}: unreadable mask ({exc})") from None
    if mask is None:
        raise ManifestError(f"{path}: mask of mode {mode}; need 8-bit L or P (a label per pixel)")
    top = int(mask.max()) if mask.size else 0
    if top >= labels:
        raise ManifestError(f"{path}: mask value {top}, but the mask labels stop at {labels - 1}")
    return mask


def has_parity(image_id: str, parity: str) -> bool:
    """Whether the integer ``image_id`` is in the ``even`` / ``odd`` half (``all``: always);
    the two halves are the folds of ccp-dev's two-fold cross-validation."""
    if parity not in PARITIES:
        raise ManifestError(f"parity must be one of {', '.join(PARITIES)}, got {parity!r}")
    return parity == "all" or int(image_id) % 2 == (0 if parity == "even" else 1)


def manifest_rows(root: Path, parity: str = "all") -> Iterator[dict[str, str]]:
    """Rows of ``root/manifest.csv`` (values stripped) whose image id has ``parity``; an id
    listed twice is a :class:`ManifestError` (both rows would take the one ``masks/ID.png``)."""
    path = root / "manifest.csv"
    first_line: dict[str, int] = {}
    for line, row in _csv_rows(path, ("path", "image_id")):
        if not row["path"] or not re.fullmatch(r"[0-9]{1,18}", row["image_id"]):
            raise ManifestError(
                f"{path}:{line}: need a path and an integer image_id, got"
                f" {row['path']!r}, {row['image_id']!r}"
            )
        seen = first_line.setdefault(row["image_id"], line)
        if seen != line:
            raise ManifestError(
                f"{path}:{line}: image_id {row['image_id']} is on line {seen} too (one mask per id)"
            )
        if has_parity(row["image_id"], parity):
            yield row


def list_images(root: Path, parity: str, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(photo, mask) pairs of ``manifest.csv`` whose integer image id has ``parity`` (photos
    without a mask are left out). Each mask must fit its photo (:func:`check_mask_fits`), and
    the photo must carry no EXIF rotation or mirroring: training reads its stored pixels, and a
    mask drawn on the photo turned upright would label other pixels."""
    pairs = []
    for row in manifest_rows(root, parity):
        mask = root / "masks" / f"{row['image_id']}.png"
        if mask.exists():
            pairs.append((root / row["path"], mask))
    pairs = pairs[:limit] if limit else pairs
    for photo, mask in pairs:
        size, orientation = _stored_size(photo, "photo")
        if orientation != 1:
            raise ManifestError(
                f"{photo}: EXIF orientation {orientation} (rotated or mirrored); training reads"
                " the stored pixels, so its mask could label other pixels: save the photo"
                " upright without the orientation tag"
            )
        check_mask_fits(_stored_size(mask, "mask")[0], size, mask, photo)
    return pairs


def _stored_size(path: Path, what: str) -> tuple[tuple[int, int], int]:
    """(W, H) of an image file as stored, and its EXIF orientation (1 when none), from its
    header alone."""
    try:
        with Image.open(path) as image:
            try:
                orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
            except Exception:  # malformed EXIF: the pixels as stored, as images.load_image does
                orientation = 1
            return image.size, orientation
    except Exception as exc:  # PIL raises several types for a missing or damaged file
        raise ManifestError(f"{path}: unreadable {what} ({exc})") from None


def check_mask_fits(
    mask_size: tuple[int, int], photo_size: tuple[int, int], mask: Path, photo: Path
) -> None:
    """A label map (W, H) must be its photo's pixels at some scale (pseudo-label maps of very
    large photos are reduced): the same aspect ratio within two pixels of rounding (a reduced
    JPEG decode rounds twice). Training resizes one to the other, so another photo's mask, or
    a transposed one, would otherwise be stretched over the photo without a word."""
    (mw, mh), (pw, ph) = mask_size, photo_size
    fits = min(mw, mh, pw, ph) >= 1 and (
        abs(mh - ph * mw / pw) <= 2.0 or abs(mw - pw * mh / ph) <= 2.0
    )
    if not fits:
        raise ManifestError(
            f"{mask}: label map of {mw}x{mh} px does not fit its photo {photo} ({pw}x{ph} px):"
            " not the photo's pixels at any scale"
        )


def read_training_pair(
    photo: Path, mask: Path, labels: int = 256
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """A training photo (H, W, 3) and its mask's label indices (H, W), at the photo's size.

    The photo is read by the decoder's rules (size limit, 16-bit and alpha to RGB as a search
    sees them) but as stored, not turned by its EXIF orientation: that is what the mask
    labels. A mask of another size must fit the photo at some scale (:func:`check_mask_fits`)
    and is resized to it, nearest label."""
    import cv2

    try:
        rgb = np.asarray(load_image(photo, DecodeLimits(max_side=None), upright=False))
    except ImageDecodeError as exc:
        raise ManifestError(f"training photo {exc}") from None
    raw = read_mask(mask, labels)
    if raw.shape != rgb.shape[:2]:
        check_mask_fits(raw.shape[::-1], rgb.shape[1::-1], mask, photo)
        size = rgb.shape[1::-1]
        raw = np.asarray(cv2.resize(raw, size, interpolation=cv2.INTER_NEAREST_EXACT), np.uint8)
    return rgb, raw
