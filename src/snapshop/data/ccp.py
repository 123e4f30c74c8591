"""Clothing Co-Parsing (CCP) in the ccp-dev layout: ``manifest.csv`` (path, image_id, ...),
``masks/<image_id>.png`` (one CCP label index per pixel) and ``mask_labels.csv`` (index, label).

CCP's 59 labels are grouped by name. Which group a one-piece garment (dress, romper) joins is
the model's choice, so it is never hidden in a constant: the learned segmenter gives it a class
of its own (``{..., DRESS: CCP_ONE_PIECE}``), the pose detector's cell classifier counts it as
the upper garment (``{UPPER: CCP_UPPER + CCP_ONE_PIECE}``), as the groups of boxes.csv do.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from snapshop.errors import ManifestError

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


def label_table(mask_labels_csv: Path, groups: Mapping[int, Sequence[str]]) -> NDArray[np.uint8]:
    """(256,) CCP label index -> class index: ``c`` for the labels named in ``groups[c]``, 0 for
    every other label (the background class)."""
    class_of: dict[str, int] = {}
    for cls, names in groups.items():
        for name in names:
            if class_of.setdefault(name, cls) != cls:
                raise ValueError(f"CCP label {name!r} is in two groups")
    table = np.zeros(256, np.uint8)
    with open(mask_labels_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            found = class_of.get(row["label"].strip().lower())
            if found is not None:
                table[int(row["index"])] = found
    return table


def has_parity(image_id: str, parity: str) -> bool:
    """Whether the integer ``image_id`` is in the ``even`` / ``odd`` half (``all``: always);
    the two halves are the folds of ccp-dev's two-fold cross-validation."""
    if parity not in PARITIES:
        raise ManifestError(f"parity must be one of {', '.join(PARITIES)}, got {parity!r}")
    return parity == "all" or int(image_id) % 2 == (0 if parity == "even" else 1)


def manifest_rows(root: Path, parity: str = "all") -> Iterator[dict[str, str]]:
    """Rows of ``root/manifest.csv`` whose image id has ``parity``."""
    with open(root / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if has_parity(row["image_id"].strip(), parity):
                yield row


def list_images(root: Path, parity: str, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(photo, mask) pairs of ``manifest.csv`` whose integer image id has ``parity`` (photos
    without a mask are left out)."""
    pairs = []
    for row in manifest_rows(root, parity):
        mask = root / "masks" / f"{row['image_id'].strip()}.png"
        if mask.exists():
            pairs.append((root / row["path"], mask))
    return pairs[:limit] if limit else pairs
