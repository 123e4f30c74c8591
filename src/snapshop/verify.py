"""Spatial verification (issue #20): re-rank an embedding's top candidates by local-feature
matches that agree on one geometric transform.

A global embedding confuses two cartons of the same shape and colours; the printed text and
logos that tell them apart are local. Each image gets RootSIFT features (Arandjelović &
Zisserman 2012) at a fixed long side; a query's features are matched to a candidate's with
Lowe's ratio test, and RANSAC counts the matches that agree on one homography (one plane seen
from any angle) or, with fewer degrees of freedom, one similarity transform: the inliers. Two
images of the same printed package share dozens of inliers; unrelated images, and different
pieces of fruit, share few (random matches that RANSAC still fits). The fused score is the
embedding's cosine plus ``weight * clip((inliers - min_inliers) / min_inliers, 0, 1)``: below
``min_inliers`` a candidate is untouched, at twice that it gains ``weight``.

The embedding's ranking comes from the caller (``search.Searcher(verify=...)``); a catalog's
images get their features on first use (:class:`CatalogFeatures`).
"""

from __future__ import annotations

import logging
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.catalog.blobs import LOCAL_FEATURES, blob_file
from snapshop.catalog.catalog import Catalog
from snapshop.catalog.fields import is_sha256
from snapshop.catalog.store import ImageRow
from snapshop.config import atomic_file, check_int, check_number
from snapshop.errors import ConfigError, NotFoundError, SnapshopError, StoredFileError
from snapshop.images import load_image, stored_file_limits

log = logging.getLogger(__name__)

DESCRIPTOR_DIM = 128
TRANSFORMS = ("homography", "similarity")


@dataclass(frozen=True)
class VerifyConfig:
    """How local features are extracted, matched and fused with the embedding's score."""

    long_side: int = 400  # both images are resized to this long side before extraction
    max_features: int = 500
    ratio: float = 0.8  # Lowe's ratio test
    ransac_px: float = 8.0  # reprojection threshold, px at ``long_side``
    transform: str = "homography"  # or "similarity" (rotation, scale, shift: 4 degrees of freedom)
    top_k: int = 10  # candidates verified per query
    # chosen on grocery-dev's three folds pooled with the CPU recipe's models (local_rerank.py)
    min_inliers: int = 15
    weight: float = 0.1

    def __post_init__(self) -> None:
        # a whole number checked here, not by OpenCV or a slice at every search
        for name in ("long_side", "max_features", "top_k", "min_inliers"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        for name in ("ratio", "ransac_px", "weight"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), 0.0))
        if not 64 <= self.long_side <= 4096:
            raise ConfigError(f"long_side must be in 64..4096, got {self.long_side}")
        if self.max_features < 4:
            raise ConfigError(f"max_features must be >= 4, got {self.max_features}")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")
        if not self.ransac_px > 0:
            raise ConfigError(f"ransac_px must be > 0, got {self.ransac_px}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(
                f"transform must be one of {', '.join(TRANSFORMS)}, not {self.transform!r}"
            )
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.min_inliers < 4:
            raise ConfigError(f"min_inliers must be >= 4 (a homography), got {self.min_inliers}")
        if not (np.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"weight must be a non-negative number, got {self.weight}")


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoint positions (N, 2) at the config's long side and their SIFT descriptors as
    OpenCV computes them (integers 0..255, kept as uint8: 64 KB for 500 features);
    :attr:`descriptors` are their RootSIFT form, which matching uses."""

    points: NDArray[np.float32]
    raw: NDArray[np.uint8]

    def __post_init__(self) -> None:
        if (
            self.raw.dtype != np.uint8
            or self.raw.ndim != 2
            or self.raw.shape[1] != DESCRIPTOR_DIM
            or self.points.shape != (len(self.raw), 2)
        ):
            raise ConfigError(
                f"local features need (N, 2) points and (N, {DESCRIPTOR_DIM}) uint8 descriptors,"
                f" got {self.points.shape} and {self.raw.shape} {self.raw.dtype}"
            )

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def descriptors(self) -> NDArray[np.float32]:
        """RootSIFT: the square root of each L1-normalised descriptor (unit L2 norm)."""
        counts = self.raw.astype(np.float32)
        return np.sqrt(counts / (counts.sum(axis=1, keepdims=True) + 1e-7))

    def save(self, target: IO[bytes]) -> None:
        np.savez(target, points=self.points, raw=self.raw)

    @classmethod
    def load(cls, source: IO[bytes] | Path) -> LocalFeatures:
        """Features saved by :meth:`save`; content that is not (empty, torn, another array)
        is a :class:`StoredFileError`."""
        name = str(source) if isinstance(source, Path) else "local features"
        try:
            saved = np.load(source, allow_pickle=False)
            if not isinstance(saved, np.lib.npyio.NpzFile):
                raise ValueError("one array, not the archive of points and descriptors")
            with saved:
                return cls(saved["points"].astype(np.float32), saved["raw"])
        except ConfigError as exc:
            raise StoredFileError(name, str(exc)) from None
        # numpy and zipfile raise each of these for some damaged file
        except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise StoredFileError(name, f"not a local-features file ({exc})") from None


EMPTY = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_DIM), np.uint8))


def extract(image: Image.Image, config: VerifyConfig = VerifyConfig()) -> LocalFeatures:
    """SIFT features of ``image`` resized to ``config.long_side`` (at most
    ``config.max_features``, the strongest)."""
    import cv2

    gray = image.convert("L")
    scale = config.long_side / max(gray.size)
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    pixels = np.asarray(gray.resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)
    sift = cv2.SIFT.create(nfeatures=config.max_features)
    keypoints, descriptors = sift.detectAndCompute(pixels, None)
    if descriptors is None or not keypoints:
        return EMPTY
    keep = min(len(keypoints), config.max_features)
    points = np.array([k.pt for k in keypoints[:keep]], dtype=np.float32).reshape(-1, 2)
    raw = np.clip(np.rint(descriptors[:keep]), 0, 255).astype(np.uint8)
    return LocalFeatures(points, raw)


def ratio_matches(
    query: LocalFeatures, candidate: LocalFeatures, ratio: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Indices (into ``query``, into ``candidate``) of the query features whose nearest
    candidate descriptor is closer than ``ratio`` times the second nearest (Lowe's test)."""
    if len(query) == 0 or len(candidate) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty
    # RootSIFT descriptors have unit norm: squared distance = 2 - 2 cos
    d2 = np.maximum(2.0 - 2.0 * query.descriptors @ candidate.descriptors.T, 0.0)
    two = np.argpartition(d2, 1, axis=1)[:, :2]
    rows = np.arange(len(query))
    a, b = d2[rows, two[:, 0]], d2[rows, two[:, 1]]
    nearest = np.where(b < a, two[:, 1], two[:, 0])
    good = np.minimum(a, b) < (ratio**2) * np.maximum(a, b)
    return np.flatnonzero(good).astype(np.int64), nearest[good].astype(np.int64)


def count_inliers(
    query: LocalFeatures, candidate: LocalFeatures, config: VerifyConfig = VerifyConfig()
) -> int:
    """Ratio-test matches from ``query`` to ``candidate`` that fit one transform of
    ``config.transform`` (RANSAC)."""
    import cv2

    q, c = ratio_matches(query, candidate, config.ratio)
    if len(q) < 4:
        return 0
    src = query.points[q].reshape(-1, 1, 2)
    dst = candidate.points[c].reshape(-1, 1, 2)
    if config.transform == "similarity":
        _, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=config.ransac_px
        )
    else:
        _, mask = cv2.findHomography(src, dst, cv2.RANSAC, config.ransac_px)
    return int(mask.sum()) if mask is not None else 0


def verification_bonus(
    inliers: NDArray[np.int64] | NDArray[np.float64], config: VerifyConfig = VerifyConfig()
) -> NDArray[np.float64]:
    """What each candidate's inlier count adds to its cosine score."""
    counts = np.asarray(inliers, dtype=np.float64)
    m = float(config.min_inliers)
    return config.weight * np.clip((counts - m) / m, 0.0, 1.0)


class CatalogFeatures:
    """Local features of a catalog's images, extracted on first use and kept: in memory (the
    ``capacity`` most recent) and, in a catalog directory, as files beside its thumbnails
    (``blobs.LOCAL_FEATURES``; garbage collection removes those of deleted images). A server
    catalog's features come from its stored thumbnail (320 px), since that is all it keeps.

    An image without a readable stored copy verifies nothing (no features), with a warning:
    verification re-ranks, it never fails a search."""

    def __init__(self, catalog: Catalog, config: VerifyConfig, capacity: int = 1024) -> None:
        self.catalog = catalog
        self.config = config
        self.capacity = capacity
        self._memory: OrderedDict[str, LocalFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, image: ImageRow) -> LocalFeatures:
        with self._lock:
            found = self._memory.get(image.sha256)
            if found is not None:
                self._memory.move_to_end(image.sha256)
                return found
        features = self._load_or_extract(image)
        with self._lock:
            self._memory[image.sha256] = features
            while len(self._memory) > self.capacity:
                self._memory.popitem(last=False)
        return features

    def _file(self, image: ImageRow) -> Path | None:
        if self.catalog.is_server or not is_sha256(image.sha256):
            return None
        tag = str(self.config.max_features)
        return LOCAL_FEATURES.file(self.catalog.directory, self.config.long_side, image.sha256, tag)

    def _load_or_extract(self, image: ImageRow) -> LocalFeatures:
        target = self._file(image)
        if target is not None and target.is_file():
            try:
                return LocalFeatures.load(target)
            except (OSError, StoredFileError) as exc:  # rewritten below
                log.warning("%s: unreadable local features (%s), extracting again", target, exc)
        pixels = self._stored_pixels(image)
        if pixels is None:
            return EMPTY
        features = extract(pixels, self.config)
        if target is not None:
            try:
                with atomic_file(target) as fh:  # concurrent searches may both write, never tear
                    features.save(fh)
            except OSError as exc:  # a read-only or full catalog disk: kept in memory only
                log.warning("%s: local features not saved (%s)", target, exc)
        return features

    def _stored_pixels(self, image: ImageRow) -> Image.Image | None:
        try:
            if self.catalog.is_server:
                data, _ = self.catalog.stored_thumbnail(image)
                return load_image(data, stored_file_limits())
            path = (
                blob_file(self.catalog.directory, image.blob, image.sha256) if image.blob else None
            )
            if path is None or not path.is_file():
                raise NotFoundError("no stored file")
            return load_image(path, stored_file_limits())
        except (SnapshopError, OSError) as exc:
            log.warning("image %d: no local features (%s)", image.id, exc)
            return None
