"""Frozen-trunk training data: trunk features of every photo and its mirror image, with targets.

The frozen EfficientNet-Lite0 trunk runs once per photo and once per horizontally flipped photo
(the augmentation); its three feature maps are kept in memory (float16), and in a ``.pkl``
cache when asked, so that only the small head trains.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from snapshop.data.ccp import read_training_pair
from snapshop.detect.pose import BODY_CHANNELS, BlazePose
from snapshop.detect.segmenter import (
    DEFAULT_TRUNK,
    Trunk,
    TrunkSpec,
    body_input,
    preprocess,
)
from snapshop.models.runtime import TRAINING_PRECISION
from snapshop.train.segmenter.config import IGNORE

log = logging.getLogger(__name__)


@dataclass
class Sample:
    feats: list[NDArray[np.float16]]  # (C, h, w) maps at stride 8 / 16 / 32
    target: NDArray[np.uint8]  # (H, W) class per pixel of the padded input, IGNORE in padding
    body: NDArray[np.float16] | None = None  # (C, h, w) body channels at stride 8 (pose prior)


def build_samples(
    pairs: list[tuple[Path, Path]],
    table: NDArray[np.uint8],
    long_side: int,
    trunk: Trunk,
    pose: BlazePose | None = None,
    labels: int = 256,
) -> list[Sample]:
    """Trunk features and targets of every photo and its mirror image (and what ``pose`` sees
    in each, when given); ``labels``: how many mask values ``table`` maps
    (:func:`snapshop.data.ccp.read_mask`)."""
    samples = []
    t0 = time.perf_counter()
    for n, (photo, mask_path) in enumerate(pairs, start=1):
        rgb, raw = read_training_pair(photo, mask_path, labels)
        classes = table[raw]
        for flip in (False, True):
            img = np.ascontiguousarray(rgb[:, ::-1]) if flip else rgb
            lab = np.ascontiguousarray(classes[:, ::-1]) if flip else classes
            samples.append(trunk_sample(img, lab, long_side, trunk, pose))
        if n % 50 == 0:
            log.info("features: %d / %d photos (%.1f s)", n, len(pairs), time.perf_counter() - t0)
    return samples


def trunk_sample(
    rgb: NDArray[np.uint8],
    labels: NDArray[np.uint8],
    long_side: int,
    trunk: Trunk,
    pose: BlazePose | None = None,
) -> Sample:
    """One photo at the inference scale: its trunk features and its class map on the padded
    input (IGNORE in the padding); with ``pose``, its body channels as the detector computes
    them (:func:`~snapshop.detect.segmenter.body_input`)."""
    import cv2

    x, scale = preprocess(rgb, long_side)
    h, w = rgb.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    target = np.full(x.shape[2:], IGNORE, np.uint8)
    target[:nh, :nw] = cv2.resize(labels, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return _sample(rgb, x, scale, target, trunk, pose)


def _sample(
    rgb: NDArray[np.uint8],
    x: NDArray[np.float32],
    scale: float,
    target: NDArray[np.uint8],
    trunk: Trunk,
    pose: BlazePose | None,
) -> Sample:
    feats = [f[0].astype(np.float16) for f in trunk(x)]
    body = None
    if pose is not None:
        body = body_input(pose, rgb, scale, feats[0].shape[1:])[0].astype(np.float16)
    return Sample(feats, target, body)


def synthetic_negative_images(n: int, long_side: int, seed: int = 0) -> list[NDArray[np.uint8]]:
    """``n`` person-free (H, W, 3) images (plain, gradient, blobs, noise), sides in
    ``[long_side / 2, long_side]``."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h = int(rng.integers(long_side // 2, long_side + 1))
        w = int(rng.integers(long_side // 2, long_side + 1))
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, h)[:, None, None] if i % 2 else np.zeros((h, 1, 1))
        img = (c0 * (1 - t) + c1 * t) * np.ones((h, w, 3))
        for _ in range(int(rng.integers(0, 4))):  # a few flat blobs (objects, furniture)
            y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            y1, x1 = y0 + int(rng.integers(8, h // 2 + 9)), x0 + int(rng.integers(8, w // 2 + 9))
            img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        img += rng.normal(0.0, float(rng.choice([0.0, 4.0, 12.0])), img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def synthetic_negatives(
    n: int, long_side: int, trunk: Trunk, seed: int = 0, pose: BlazePose | None = None
) -> list[Sample]:
    """``n`` person-free images (plain, gradient, blobs, noise) labelled *other* everywhere,
    so that empty scenes and backgrounds yield no garment."""
    samples = []
    for img in synthetic_negative_images(n, long_side, seed):
        h, w = img.shape[:2]
        x, scale = preprocess(img, long_side)
        target = np.full(x.shape[2:], IGNORE, np.uint8)
        target[: min(h, x.shape[2]), : min(w, x.shape[3])] = 0
        samples.append(_sample(img, x, scale, target, trunk, pose))
    return samples


def load_or_build_samples(
    pairs: list[tuple[Path, Path]],
    table: NDArray[np.uint8],
    long_side: int,
    cache: Path | None = None,
    negatives: int = 0,
    seed: int = 0,
    body: bool = False,
    spec: TrunkSpec = DEFAULT_TRUNK,
    labels: int = 256,
) -> list[Sample]:
    """:func:`build_samples` (kept in, or read back from, a ``.pkl`` cache when given) plus
    ``negatives`` synthetic person-free samples (drawn with ``seed``); ``body``: with body
    channels (BlazePose on every image); ``spec``: the trunk whose features they hold;
    ``labels``: as :func:`build_samples`."""
    import pickle

    key = (
        "v3",
        tuple(str(p) for p, _ in pairs),
        long_side,
        spec.backbone,
        spec.blocks,
        BODY_CHANNELS if body else (),
    )
    trunk: Trunk | None = None
    pose: BlazePose | None = None  # made only when features are computed here
    samples: list[Sample] | None = None
    if cache is not None and cache.exists():
        try:
            with open(cache, "rb") as fh:
                stored_key, stored = pickle.load(fh)
        except Exception as exc:  # an older or damaged cache: compute again
            stored_key, stored = None, None
            log.info("%s: unreadable (%s)", cache, exc)
        if stored_key == key:
            log.info("features read from %s", cache)
            samples = [Sample(feats, target, body_map) for feats, target, body_map in stored]
        else:
            log.info("%s holds other features; computing again", cache)
    if samples is None:
        trunk = Trunk(precision=TRAINING_PRECISION, spec=spec)
        pose = BlazePose() if body else None
        samples = build_samples(pairs, table, long_side, trunk, pose, labels)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "wb") as fh:
                # Plain tuples: the cache must not depend on how this module was imported.
                stored = [(smp.feats, smp.target, smp.body) for smp in samples]
                pickle.dump((key, stored), fh, protocol=pickle.HIGHEST_PROTOCOL)
    if negatives:
        trunk = trunk or Trunk(precision=TRAINING_PRECISION, spec=spec)
        pose = pose or (BlazePose() if body else None)
        samples = samples + synthetic_negatives(negatives, long_side, trunk, seed, pose)
    return samples
