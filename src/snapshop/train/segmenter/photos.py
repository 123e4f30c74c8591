"""Fine-tuning data: photos and class maps in memory, augmented on the fly.

Each sample is a random scale and crop that keeps the person, a horizontal flip and colour
jitter (optionally a new colour per garment, or another labelled person pasted in:
:func:`paste_person`); the labels follow with nearest resizing. Inputs have one fixed
portrait size (:func:`canvas_size`), so batches need no padding logic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.data.ccp import read_training_pair
from snapshop.detect.segmenter import DRESS_CLS, LOWER_CLS, STRIDE, UPPER_CLS
from snapshop.errors import ConfigError
from snapshop.models.card import normalise_pixels
from snapshop.train.segmenter.config import IGNORE, FinetuneConfig
from snapshop.train.segmenter.samples import synthetic_negative_images


@dataclass(frozen=True)
class TrainImage:
    rgb: NDArray[np.uint8]  # (H, W, 3)
    labels: NDArray[np.uint8]  # (H, W) class per pixel
    person: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive) of the labelled person
    # the person's own pixels (CCP's non-null labels: skin and hair too); None: pixel classes
    # without a person outline (pseudo-labels, negatives), not pasted into other photos
    silhouette: NDArray[np.bool_] | None = None


def load_training_images(
    pairs: list[tuple[Path, Path]],
    table: NDArray[np.uint8],
    silhouettes: bool = False,
    labels: int = 256,
) -> list[TrainImage]:
    """Photos and class maps in memory; ``person`` is the extent of CCP's non-null labels,
    ``silhouette`` (when asked for) those labels' pixels; ``labels``: how many mask values
    ``table`` maps (:func:`snapshop.data.ccp.read_mask`)."""
    images = []
    for photo, mask_path in pairs:
        rgb, raw = read_training_pair(photo, mask_path, labels)
        ys, xs = np.nonzero(raw)
        h, w = raw.shape
        person = (
            (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if len(xs)
            else (0, 0, w, h)
        )
        images.append(TrainImage(rgb, table[raw], person, raw != 0 if silhouettes else None))
    return images


def paste_person(
    image: TrainImage,
    source: TrainImage,
    rng: Any,
    height: tuple[float, float] = (0.4, 0.9),
) -> TrainImage:
    """Copy-paste augmentation (Ghiasi et al., CVPR 2021): ``source``'s labelled person (its
    silhouette), resized to a random share ``height`` of ``image``'s height, mirrored half the
    time, pasted at a random place in ``image``. Pasted pixels take ``source``'s classes, the
    others keep ``image``'s (a garment the paste covers loses those pixels), so garments meet
    other bodies, backgrounds and sizes."""
    import cv2

    if source.silhouette is None:
        raise ConfigError("copy-paste needs a source image with a person silhouette")
    x1, y1, x2, y2 = source.person
    h, w = image.labels.shape
    scale = min(float(rng.uniform(*height)) * h / (y2 - y1), w / (x2 - x1))
    nh, nw = max(1, round((y2 - y1) * scale)), max(1, round((x2 - x1) * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR

    def resized(a: NDArray[Any], how: int = cv2.INTER_NEAREST_EXACT) -> NDArray[Any]:
        return np.asarray(
            cv2.resize(np.ascontiguousarray(a[y1:y2, x1:x2]), (nw, nh), interpolation=how)
        )

    rgb = resized(source.rgb, interpolation)
    labels = resized(source.labels)
    silhouette = resized(source.silhouette.astype(np.uint8))
    if rng.random() < 0.5:
        rgb, labels, silhouette = rgb[:, ::-1], labels[:, ::-1], silhouette[:, ::-1]
    top, left = int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1))
    where = silhouette.astype(bool)
    out_rgb, out_labels = image.rgb.copy(), image.labels.copy()
    out_rgb[top : top + nh, left : left + nw][where] = rgb[where]
    out_labels[top : top + nh, left : left + nw][where] = labels[where]
    out_silhouette = None
    if image.silhouette is not None:
        out_silhouette = image.silhouette.copy()
        out_silhouette[top : top + nh, left : left + nw] |= where
    px1, py1, px2, py2 = image.person
    person = (min(px1, left), min(py1, top), max(px2, left + nw), max(py2, top + nh))
    return TrainImage(out_rgb, out_labels, person, out_silhouette)


def negative_training_images(n: int, long_side: int, seed: int = 0) -> list[TrainImage]:
    """:func:`synthetic_negative_images` labelled *other* everywhere."""
    return [
        TrainImage(img, np.zeros(img.shape[:2], np.uint8), (0, 0, img.shape[1], img.shape[0]))
        for img in synthetic_negative_images(n, long_side, seed)
    ]


def canvas_size(long_side: int) -> tuple[int, int]:
    """(H, W) of the fixed training input: portrait, the width 3/4 of the height (CCP photos
    are about 2:3), rounded up to the stride; what does not fit is cropped, the rest padded."""
    return long_side, -(-(long_side * 3 // 4) // STRIDE) * STRIDE


def _crop_or_place(size: int, canvas: int, lo: int, hi: int, rng: Any) -> tuple[int, int]:
    """(source start, canvas start) on one axis: a crop that keeps ``[lo, hi)`` (the person)
    when it fits, else stays inside it; a smaller image lands at a random canvas offset."""
    if size <= canvas:
        return 0, int(rng.integers(0, canvas - size + 1)) if rng is not None else 0
    hi = min(hi, size)  # rounding may put the person's end one past the resized image
    first, last = sorted((max(0, hi - canvas), min(max(lo, 0), size - canvas)))
    return (int(rng.integers(first, last + 1)) if rng is not None else first), 0


def render_sample(
    image: TrainImage, long_side: int, config: FinetuneConfig, rng: Any
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """One training input (3, H, W), normalised as :func:`preprocess`, zero (mid grey) padding)
    and its stride-4 target (labels at the 4x4 cell centres, IGNORE in padding).

    ``rng`` None: no augmentation (the image at the inference scale, top-left)."""
    import cv2

    ch, cw = canvas_size(long_side)
    rgb, labels = image.rgb, image.labels
    x1, y1, x2, y2 = image.person
    h, w = labels.shape
    scale = long_side / max(h, w)
    if rng is not None:
        scale *= float(rng.uniform(config.min_scale, config.max_scale))
        if rng.random() < 0.5:
            rgb, labels = rgb[:, ::-1], labels[:, ::-1]
            x1, x2 = w - x2, w - x1
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    rgb = np.asarray(
        cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=interpolation), np.uint8
    )
    # NEAREST_EXACT samples pixel centres as the image's resize does (NEAREST: half a pixel off)
    labels = np.asarray(
        cv2.resize(np.ascontiguousarray(labels), (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT),
        np.uint8,
    )
    sy, dy = _crop_or_place(nh, ch, int(y1 * scale), math.ceil(y2 * scale), rng)
    sx, dx = _crop_or_place(nw, cw, int(x1 * scale), math.ceil(x2 * scale), rng)
    th, tw = min(nh, ch), min(nw, cw)
    crop_labels = labels[sy : sy + th, sx : sx + tw]
    crop_rgb = rgb[sy : sy + th, sx : sx + tw]
    if rng is not None and config.recolour > 0 and rng.random() < config.recolour:
        crop_rgb = recolour_garments(crop_rgb, crop_labels, rng)
    crop = crop_rgb.astype(np.float32)
    if rng is not None and config.jitter > 0:
        lo, hi = 1.0 - config.jitter, 1.0 + config.jitter
        crop *= float(rng.uniform(lo, hi))  # brightness
        crop = (crop - crop.mean()) * float(rng.uniform(lo, hi)) + crop.mean()  # contrast
        grey = crop.mean(axis=2, keepdims=True)
        crop = (crop - grey) * float(rng.uniform(lo, hi)) + grey  # saturation
        np.clip(crop, 0.0, 255.0, out=crop)
    x = np.zeros((3, ch, cw), np.float32)
    x[:, dy : dy + th, dx : dx + tw] = normalise_pixels(crop.transpose(2, 0, 1))
    target = np.full((ch, cw), IGNORE, np.uint8)
    target[dy : dy + th, dx : dx + tw] = crop_labels
    return x, target[2::4, 2::4]


def recolour_garments(
    rgb: NDArray[np.uint8], labels: NDArray[np.uint8], rng: Any
) -> NDArray[np.uint8]:
    """Each garment class (upper, lower, dress) in ``rgb`` gets its own random hue rotation
    and saturation / brightness factor: a top and a skirt of one colour, or of two, whatever
    the photo had, so that colour alone does not tell separates from a dress."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).astype(np.float32)
    garment = np.zeros(labels.shape, bool)
    for cls in (UPPER_CLS, LOWER_CLS, DRESS_CLS):
        where = labels == cls
        if not where.any():
            continue
        garment |= where
        part = hsv[where]
        part[:, 0] = (part[:, 0] + rng.uniform(0, 180)) % 180  # OpenCV's 8-bit hue: 0..179
        part[:, 1] *= rng.uniform(0.5, 1.5)
        part[:, 2] *= rng.uniform(0.7, 1.3)
        hsv[where] = part
    np.clip(hsv, 0, 255, out=hsv)
    out = rgb.copy()  # only garment pixels change (an HSV round trip is not exact)
    out[garment] = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[garment]
    return out


class AugmentedImages:
    """Map-style dataset for torch's DataLoader: item ``i`` -> a freshly augmented sample."""

    def __init__(self, images: list[TrainImage], config: FinetuneConfig) -> None:
        self.images = images
        self.config = config
        self.rng = np.random.default_rng(config.seed)  # replaced per DataLoader worker
        self.sources = [i for i, image in enumerate(images) if image.silhouette is not None]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        rng = self.rng if self.config.augment else None
        image = self.images[i]
        others = len(self.sources) - (image.silhouette is not None)
        if rng is not None and others and rng.random() < self.config.copy_paste:
            source = i
            while source == i:
                source = self.sources[int(rng.integers(len(self.sources)))]
            image = paste_person(image, self.images[source], rng)
        x, target = render_sample(image, self.config.long_side, self.config, rng)
        return x, target.astype(np.int64)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: each worker draws its augmentations from its own seeded rng."""
    import torch

    info = torch.utils.data.get_worker_info()
    if info is None:  # called outside a worker: the dataset keeps its seeded rng
        return
    dataset: Any = info.dataset  # our AugmentedImages (torch types it as a plain Dataset)
    dataset.rng = np.random.default_rng(info.seed % 2**32)
