"""Detector protocol, boxes and the DeepFashion2 class -> garment position map."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageStat

from snapshop.config import check_int
from snapshop.errors import ConfigError

UPPER = "upper"
LOWER = "lower"
POSITIONS: tuple[str, ...] = (UPPER, LOWER)

# DeepFashion2's 13 categories, in its category_id order (1-based in the dataset).
DF2_CLASSES: tuple[str, ...] = (
    "short_sleeve_top",
    "long_sleeve_top",
    "short_sleeve_outwear",
    "long_sleeve_outwear",
    "vest",
    "sling",
    "shorts",
    "trousers",
    "skirt",
    "short_sleeve_dress",
    "long_sleeve_dress",
    "vest_dress",
    "sling_dress",
)

DF2_GROUP: dict[str, str] = {
    "short_sleeve_top": "top",
    "long_sleeve_top": "top",
    "vest": "top",
    "sling": "top",
    "short_sleeve_outwear": "outwear",
    "long_sleeve_outwear": "outwear",
    "short_sleeve_dress": "dress",
    "long_sleeve_dress": "dress",
    "vest_dress": "dress",
    "sling_dress": "dress",
    "trousers": "trousers",
    "shorts": "shorts",
    "skirt": "skirt",
}

GROUP_POSITION: dict[str, str] = {
    "top": UPPER,
    "outwear": UPPER,
    "dress": UPPER,
    "trousers": LOWER,
    "shorts": LOWER,
    "skirt": LOWER,
}


def position_of(label: str) -> str | None:
    """Garment position of a DeepFashion2 class or garment group; None for anything else."""
    key = label.strip().lower().replace(" ", "_").replace("-", "_")
    if key in POSITIONS:
        return key
    group = DF2_GROUP.get(key, key)
    return GROUP_POSITION.get(group)


# Words of shop categories that name one garment position ("Women > Tops", "Skinny jeans").
# Full-body pieces (jumpsuits, suits, sets) name none: their crops are kept as detected.
CATEGORY_WORDS: dict[str, str] = {
    **{w: UPPER for w in (
        "top", "tee", "shirt", "blouse", "sweater", "jumper", "pullover", "hoodie", "sweatshirt",
        "cardigan", "jacket", "coat", "blazer", "outerwear", "outwear", "vest", "tank",
        "camisole", "polo", "tunic", "parka", "dress", "gown", "sling",
    )},
    **{w: LOWER for w in (
        "trousers", "pants", "jeans", "leggings", "shorts", "skirt", "chinos", "joggers",
        "culottes", "sweatpants", "trouser", "pant", "short",
    )},
}  # fmt: skip


def position_of_category(category: str | None) -> str | None:
    """The garment position a product category names, or None.

    The last segment of a path-like category counts ("Women > Tops" -> tops), its words from
    the last ("Shirt dress" -> dress), each also without a plural ending; a position name,
    DeepFashion2 class or garment group is taken as it is.
    """
    if not category or not category.strip():
        return None
    last = re.split(r"[/>|\\]", category.strip().lower())[-1].strip() or category.lower()
    direct = position_of(last)
    if direct is not None:
        return direct
    for word in reversed(re.findall(r"[a-z]+", last)):
        for form in (word, word.removesuffix("s"), word.removesuffix("es")):
            if form in CATEGORY_WORDS:
                return CATEGORY_WORDS[form]
    return None


# Every detector's network input side (YOLO's size, the segmenter's long side, a model file's
# static input): past 4096 one query's tensors take gigabytes, under 32 no stride-32 map is left.
INPUT_SIDES = (32, 4096)


def check_input_side(side: object, what: str) -> int:
    """``side`` as a detector input side in :data:`INPUT_SIDES`, else a :class:`ConfigError`
    naming ``what``."""
    return check_int(f"{what} (pixels)", side, *INPUT_SIDES)


@dataclass(frozen=True)
class Box:
    """Pixel box, ``x1 < x2`` and ``y1 < y2``, in the coordinates of the decoded image."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return max(0.0, self.x2 - self.x1)

    @property
    def height(self) -> float:
        return max(0.0, self.y2 - self.y1)

    @property
    def area(self) -> float:
        return self.width * self.height

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def clip(self, width: int, height: int) -> Box:
        return Box(
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width),
            min(max(self.y2, 0.0), height),
        )

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def scaled(self, sx: float, sy: float) -> Box:
        """The box in an image scaled by (sx, sy): e.g. from a reduced decode to the file's
        pixels with ``images.scale_to_original``."""
        return Box(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)

    def to_int(self) -> tuple[int, int, int, int]:
        return (int(round(self.x1)), int(round(self.y1)), int(round(self.x2)), int(round(self.y2)))


@dataclass(frozen=True)
class Detection:
    box: Box
    label: str
    position: str | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["box"] = list(self.box.as_tuple())
        return data


PRODUCT = "product"  # label of a whole-product box (no garment position of its own)


def product_box(rgb: NDArray[np.uint8], threshold: float = 30.0) -> Box:
    """Bounding box of what differs from the border colour (the whole image if nothing does)."""
    import cv2

    h, w = rgb.shape[:2]
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    fg = np.linalg.norm(lab - np.median(border, axis=0), axis=2) > threshold
    rows, cols = np.flatnonzero(fg.mean(axis=1) > 0.01), np.flatnonzero(fg.mean(axis=0) > 0.01)
    if len(rows) < 2 or len(cols) < 2 or fg.mean() < 0.01:
        return Box(0.0, 0.0, float(w), float(h))
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


@runtime_checkable
class Detector(Protocol):
    """Image -> every detection (any order). Callers keep the best per position."""

    name: str

    def detect(self, image: Image.Image) -> list[Detection]: ...


class SerialDetector:
    """Runs a detector on one image at a time: one that does not declare
    ``thread_safe = True`` (e.g. an OpenCV DNN net with its ``setInput``/``forward`` state)
    must not see two images at once, and service requests and ingest mappers run on many
    threads. :func:`serial_if_needed` wraps only such detectors."""

    thread_safe = True

    def __init__(self, inner: Detector) -> None:
        self.inner = inner
        self.name = str(getattr(inner, "name", type(inner).__name__))
        self._lock = threading.Lock()

    def detect(self, image: Image.Image) -> list[Detection]:
        with self._lock:
            return self.inner.detect(image)


def serial_if_needed(detector: Detector | None) -> Detector | None:
    """``detector`` itself when it is thread-safe (or None), else a :class:`SerialDetector`."""
    if detector is None or getattr(detector, "thread_safe", False):
        return detector
    return SerialDetector(detector)


def keep_best_per_position(detections: Iterable[Detection]) -> dict[str, Detection]:
    """The most confident detection for each garment position."""
    best: dict[str, Detection] = {}
    for det in detections:
        if det.position is None:
            continue
        current = best.get(det.position)
        if current is None or det.score > current.score:
            best[det.position] = det
    return best


def crop(image: Image.Image, box: Box, min_side: int = 8) -> Image.Image | None:
    """The pixels inside ``box`` (clipped), or None when the box is smaller than ``min_side``."""
    x1, y1, x2, y2 = box.clip(*image.size).to_int()
    if x2 - x1 < min_side or y2 - y1 < min_side:
        return None
    return image.crop((x1, y1, x2, y2))


# How garment crops are framed for the embedder, recorded in each catalog's card: catalog and
# query crops must be framed alike. "center": the crop as it is, so the embedder's centre crop
# keeps only the middle of a tall garment (a trousers crop loses its waist and hem); "pad": the
# crop centred on a square of its mean colour, so all of it is embedded.
CROP_MODES: tuple[str, ...] = ("center", "pad")
DEFAULT_CROP_MODE = "pad"  # catalogs created before the mode was recorded used "center"
MAX_PAD_SIDE = 4096


def square_pad(image: Image.Image, max_side: int = MAX_PAD_SIDE) -> Image.Image:
    """``image`` centred on a square canvas filled with its mean colour; a crop longer than
    ``max_side`` is first scaled down to it (a 10 x 50,000 crop would need a 7.5 GB canvas,
    and the embedder sees a few hundred pixels of it anyway)."""
    w, h = image.size
    if w == h:
        return image
    rgb = image.convert("RGB")
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    side = max(w, h)
    fill = tuple(round(c) for c in ImageStat.Stat(rgb).mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return canvas


def frame_crop(image: Image.Image, box: Box, mode: str, min_side: int = 8) -> Image.Image | None:
    """:func:`crop`, framed for the embedder as ``mode`` (one of :data:`CROP_MODES`) says."""
    if mode not in CROP_MODES:
        raise ConfigError(f"crop mode must be one of {list(CROP_MODES)}, got {mode!r}")
    pixels = crop(image, box, min_side)
    return square_pad(pixels) if pixels is not None and mode == "pad" else pixels
