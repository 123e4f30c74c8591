"""Default offline garment detector: BlazePose keypoints + person mask -> upper / lower boxes.

Pipeline for one image:

1. mediapipe 0.10.21 BlazePose (bundled full model, static images) gives 33 keypoints and a
   person segmentation mask. No confident person (shoulders and hips) -> one whole-product box
   (``label="product"``, ``position=None``): the foreground's bounding box against the border
   colour, or the whole image. Position None means no garment crop is stored or searched; the
   image is still searched as a whole image.
2. The body axis from the shoulders to below the ankles is cut into bins of a tenth of the
   torso length. Each bin gets colour/skin/coverage features of the *garment pixels* (person
   mask minus skin; skin from a colour lookup table learned on CCP pixel labels), measured
   relative to the chest, thigh and shin colours (see :func:`bin_features`).
3. A tiny MLP (weights in ``detect/weights/pose_bins.npz``, fitted on CCP's even image ids by
   :mod:`snapshop.detect.pose_fit`) says for every bin whether it lies in the upper garment
   and in the lower garment. A dress is one garment from the shoulders down, so its bins are
   *upper* and no lower box is produced; trousers/skirts/shorts make a *lower* run.
4. Each run's vertical extent, tightened horizontally to the garment pixels inside it, is the
   box; the score is the run's mean probability.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.detect.base import LOWER, UPPER, Box, Detection
from snapshop.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# BlazePose landmark indices.
L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 11, 12, 23, 24
L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 25, 26, 27, 28

BIN = 0.1  # bin height, in torso lengths
TOP = -0.4  # first bin starts this far above the shoulders (torso lengths)
WEIGHTS = "pose_bins.npz"
SKIN_LUT = "skin_lut.npy"
PRODUCT = "product"


@dataclass(frozen=True)
class PoseConfig:
    """Thresholds of the pose detector (defaults tuned on ccp-dev even image ids)."""

    min_visibility: float = 0.5
    mask_threshold: float = 0.5
    upper_threshold: float = 0.5
    lower_threshold: float = 0.5
    min_run_bins: int = 3
    x_percentile: float = 1.0
    min_column_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("min_visibility", "mask_threshold", "upper_threshold", "lower_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1]")
        if self.min_run_bins < 1:
            raise ConfigError("min_run_bins must be positive")


@dataclass(frozen=True)
class PoseObservation:
    """What the pose model saw: (33, 3) keypoints (x, y in pixels, visibility) and the (H, W)
    float32 person probability mask, or ``keypoints=None`` when no person was found."""

    keypoints: NDArray[np.float32] | None
    mask: NDArray[np.float32] | None


def _resource(name: str) -> Any:
    return resources.files("snapshop.detect") / "weights" / name


_LUT_CACHE: dict[str, NDArray[np.uint8]] = {}


def skin_lut() -> NDArray[np.uint8]:
    """(32, 32, 32) uint8: 255 x P(skin | RGB // 8), from CCP's skin vs garment pixel labels."""
    if "lut" not in _LUT_CACHE:
        with _resource(SKIN_LUT).open("rb") as fh:
            _LUT_CACHE["lut"] = np.load(fh)
    return _LUT_CACHE["lut"]


def skin_probability(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    q = rgb // 8
    return skin_lut()[q[..., 0], q[..., 1], q[..., 2]].astype(np.float32) / 255.0


def _lab(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)


def product_box(rgb: NDArray[np.uint8], threshold: float = 30.0) -> Box:
    """Bounding box of what differs from the border colour (the whole image if nothing does)."""
    h, w = rgb.shape[:2]
    lab = _lab(rgb)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    fg = np.linalg.norm(lab - np.median(border, axis=0), axis=2) > threshold
    rows, cols = np.flatnonzero(fg.mean(axis=1) > 0.01), np.flatnonzero(fg.mean(axis=0) > 0.01)
    if len(rows) < 2 or len(cols) < 2 or fg.mean() < 0.01:
        return Box(0.0, 0.0, float(w), float(h))
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


@dataclass(frozen=True)
class BodyFrame:
    """Body geometry in pixels: the y of shoulders, hips, knees, ankles and the torso length."""

    shoulder: NDArray[np.float32]  # (2,) mid-shoulder x, y
    hip: NDArray[np.float32]
    knee: NDArray[np.float32]
    ankle: NDArray[np.float32]
    torso: float
    width: float  # shoulder width in pixels

    def y_of_bin(self, i: int) -> float:
        return float(self.shoulder[1] + (TOP + i * BIN) * self.torso)

    def n_bins(self) -> int:
        return int(np.ceil(((self.ankle[1] - self.shoulder[1]) / self.torso + 0.4 - TOP) / BIN))

    def centre_x(self, y: float) -> float:
        ys = [self.shoulder[1], self.hip[1], self.knee[1], self.ankle[1]]
        xs = [self.shoulder[0], self.hip[0], self.knee[0], self.ankle[0]]
        return float(np.interp(y, ys, xs))


def body_frame(keypoints: NDArray[np.float32], min_visibility: float) -> BodyFrame | None:
    """Geometry from keypoints; None unless both shoulders and hips are confidently visible."""
    vis = keypoints[:, 2]
    if min(vis[[L_SHOULDER, R_SHOULDER, L_HIP, R_HIP]]) < min_visibility:
        return None
    pts = keypoints[:, :2]

    def mid(a: int, b: int) -> NDArray[np.float32]:
        return ((pts[a] + pts[b]) / 2).astype(np.float32)

    shoulder, hip = mid(L_SHOULDER, R_SHOULDER), mid(L_HIP, R_HIP)
    torso = float(hip[1] - shoulder[1])
    if torso < 8:
        return None
    knee, ankle = mid(L_KNEE, R_KNEE), mid(L_ANKLE, R_ANKLE)
    # Occluded or out-of-frame legs: fall back to average body proportions.
    knee = knee if knee[1] > hip[1] + 0.4 * torso else hip + np.array([0, 0.85 * torso], np.float32)
    ankle = ankle if ankle[1] > knee[1] + 0.4 * torso else knee + np.array([0, 0.85 * torso], np.float32)  # fmt: skip
    width = float(abs(pts[L_SHOULDER, 0] - pts[R_SHOULDER, 0]))
    return BodyFrame(shoulder, hip, knee.astype(np.float32), ankle.astype(np.float32), torso,
                     max(width, 0.3 * torso))  # fmt: skip


N_FEATURES = 16


def bin_features(
    frame: BodyFrame, rgb: NDArray[np.uint8], person: NDArray[np.bool_]
) -> tuple[NDArray[np.float32], list[tuple[int, int]]]:
    """(n_bins, N_FEATURES) features of the body-axis bins and each bin's (y0, y1) pixel rows.

    Per bin, over garment pixels (person and not skin) in a column of one shoulder width
    around the body axis: position relative to hips/knees/ankles (torso units), garment /
    skin / person coverage, Lab distance to the chest, thigh and shin colours, to the bins
    above and below, and two image-level contrasts (chest-thigh, thigh-shin).
    """
    h, w = person.shape
    lab = _lab(rgb)
    skin = skin_probability(rgb) > 0.5
    garment = person & ~skin
    n = frame.n_bins()
    spans: list[tuple[int, int]] = []
    colour = np.zeros((n, 3), np.float32)
    stats = np.zeros((n, 3), np.float32)
    for i in range(n):
        y0 = int(np.clip(round(frame.y_of_bin(i)), 0, h))
        y1 = int(np.clip(round(frame.y_of_bin(i + 1)), 0, h))
        spans.append((y0, y1))
        cx = frame.centre_x((y0 + y1) / 2)
        x0, x1 = int(np.clip(cx - 0.5 * frame.width, 0, w)), int(np.clip(cx + 0.5 * frame.width, 0, w))  # fmt: skip
        if y1 <= y0 or x1 <= x0:
            continue
        g = garment[y0:y1, x0:x1]
        p = person[y0:y1, x0:x1]
        area = g.size
        stats[i] = (g.sum() / area, (p & skin[y0:y1, x0:x1]).sum() / area, p.sum() / area)
        if g.any():
            colour[i] = lab[y0:y1, x0:x1][g].mean(axis=0)

    def ref(t0: float, t1: float) -> NDArray[np.float32]:
        ys = [(frame.y_of_bin(i) - frame.shoulder[1]) / frame.torso for i in range(n)]
        sel = [i for i in range(n) if t0 <= ys[i] < t1 and stats[i, 0] > 0.05]
        return colour[sel].mean(axis=0) if sel else colour[min(n - 1, max(0, n // 3))]

    hip_t = (frame.hip[1] - frame.shoulder[1]) / frame.torso
    knee_t = (frame.knee[1] - frame.shoulder[1]) / frame.torso
    ankle_t = (frame.ankle[1] - frame.shoulder[1]) / frame.torso
    chest = ref(0.15, 0.6)
    thigh = ref(hip_t + 0.3, (hip_t + knee_t) / 2 + 0.3)
    shin = ref(knee_t + 0.2, ankle_t - 0.1)
    scale = 50.0
    feats = np.zeros((n, N_FEATURES), np.float32)
    for i in range(n):
        t = (frame.y_of_bin(i) + frame.y_of_bin(i + 1)) / 2 - frame.shoulder[1]
        t /= frame.torso
        up = colour[max(i - 1, 0)]
        down = colour[min(i + 1, n - 1)]
        feats[i] = (
            t - hip_t, t - knee_t, t - ankle_t,
            *stats[i],
            np.linalg.norm(colour[i] - chest) / scale,
            np.linalg.norm(colour[i] - thigh) / scale,
            np.linalg.norm(colour[i] - shin) / scale,
            np.linalg.norm(colour[i] - up) / scale,
            np.linalg.norm(colour[i] - down) / scale,
            np.linalg.norm(chest - thigh) / scale,
            np.linalg.norm(thigh - shin) / scale,
            t,
            knee_t - hip_t,
            1.0,
        )  # fmt: skip
    return feats, spans


def context_features(feats: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each bin's features with those of the bins 2 above and 2 below (edge-padded)."""
    pad = np.concatenate([feats[:1], feats[:1], feats, feats[-1:], feats[-1:]])
    n = len(feats)
    return np.concatenate([pad[k : k + n] for k in range(5)], axis=1)


@dataclass(frozen=True)
class BinModel:
    """A one-hidden-layer MLP on context features -> P(upper), P(lower) per bin."""

    mean: NDArray[np.float32]
    std: NDArray[np.float32]
    w1: NDArray[np.float32]
    b1: NDArray[np.float32]
    w2: NDArray[np.float32]
    b2: NDArray[np.float32]

    def predict(self, feats: NDArray[np.float32]) -> NDArray[np.float32]:
        x = (context_features(feats) - self.mean) / self.std
        hidden = np.maximum(x @ self.w1 + self.b1, 0.0)
        return (1.0 / (1.0 + np.exp(-(hidden @ self.w2 + self.b2)))).astype(np.float32)

    def save(self, path: Any) -> None:
        np.savez(path, mean=self.mean, std=self.std, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)

    @classmethod
    def load(cls, path: Any = None) -> BinModel:
        source = _resource(WEIGHTS) if path is None else path
        try:
            with (source.open("rb") if hasattr(source, "open") else open(source, "rb")) as fh:
                data = np.load(fh)
                return cls(*(data[k].astype(np.float32) for k in ("mean", "std", "w1", "b1", "w2", "b2")))  # fmt: skip
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"pose bin model {source}: unreadable ({exc})") from None


def _runs(active: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive True values."""
    out, start = [], None
    for i, a in enumerate(active):
        if a and start is None:
            start = i
        elif not a and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(active)))
    return out


def _x_extent(
    garment: NDArray[np.bool_], y0: int, y1: int, config: PoseConfig
) -> tuple[float, float] | None:
    band = garment[y0:y1]
    if band.size == 0:
        return None
    cols = band.mean(axis=0)
    active = np.flatnonzero(cols > config.min_column_fraction * max(float(cols.max()), 1e-6))
    if len(active) == 0:
        return None
    return float(active[0]), float(active[-1] + 1)


def boxes_from_observation(
    obs: PoseObservation,
    rgb: NDArray[np.uint8],
    model: BinModel,
    config: PoseConfig = PoseConfig(),
) -> list[Detection]:
    """Garment detections of one image from its pose observation (pure; no mediapipe)."""
    frame = None
    if obs.keypoints is not None and obs.mask is not None:
        frame = body_frame(obs.keypoints, config.min_visibility)
    if frame is None:
        return [Detection(product_box(rgb), PRODUCT, None, 1.0)]
    person = obs.mask > config.mask_threshold
    feats, spans = bin_features(frame, rgb, person)
    garment = person & ~(skin_probability(rgb) > 0.5)
    return boxes_from_bins(model.predict(feats), spans, garment, person, config)


def boxes_from_bins(
    probs: NDArray[np.float32],
    spans: list[tuple[int, int]],
    garment: NDArray[np.bool_],
    person: NDArray[np.bool_],
    config: PoseConfig = PoseConfig(),
) -> list[Detection]:
    """Upper / lower boxes from per-bin probabilities (n_bins, 2) and the garment pixels."""
    h, w = garment.shape
    out: list[Detection] = []
    for col, (position, threshold) in enumerate(
        ((UPPER, config.upper_threshold), (LOWER, config.lower_threshold))
    ):
        p = probs[:, col]
        runs = [r for r in _runs(p > threshold) if r[1] - r[0] >= config.min_run_bins]
        if not runs:
            continue
        start, end = max(runs, key=lambda r: float(p[r[0] : r[1]].sum()))
        y0, y1 = spans[start][0], spans[end - 1][1]
        if y1 - y0 < 8:
            continue
        extent = _x_extent(garment, y0, y1, config) or _x_extent(person, y0, y1, config)
        if extent is None:
            continue
        box = Box(extent[0], float(y0), extent[1], float(y1)).clip(w, h)
        out.append(Detection(box, position, position, float(p[start:end].mean())))
    return out


class PoseDetector:
    """``pose``: mediapipe BlazePose + segmentation, then :func:`boxes_from_observation`."""

    name = "pose"

    def __init__(self, config: PoseConfig = PoseConfig(), model: BinModel | None = None) -> None:
        try:
            import mediapipe as mp  # noqa: F401
            from mediapipe.python.solutions import pose as mp_pose
        except ImportError as exc:
            raise ModelError(
                f"the pose detector needs mediapipe 0.10.21 ({exc}); install it with"
                " `pip install 'snapshop[detect]' && pip install --no-deps mediapipe==0.10.21`"
            ) from None
        self.config = config
        self.model = model or BinModel.load()
        self._pose = mp_pose.Pose(static_image_mode=True, model_complexity=1,
                                  enable_segmentation=True, min_detection_confidence=0.5)  # fmt: skip
        self._lock = threading.Lock()  # a mediapipe graph runs one image at a time

    @classmethod
    def from_spec(cls, args: str) -> PoseDetector:
        if args.strip():
            raise ConfigError(f"the pose detector takes no arguments, got {args!r}")
        return cls()

    def observe(self, rgb: NDArray[np.uint8]) -> PoseObservation:
        h, w = rgb.shape[:2]
        with self._lock:
            result = self._pose.process(np.ascontiguousarray(rgb))
        if result.pose_landmarks is None or result.segmentation_mask is None:
            return PoseObservation(None, None)
        kp = np.array([[lm.x * w, lm.y * h, lm.visibility] for lm in result.pose_landmarks.landmark],
                      np.float32)  # fmt: skip
        return PoseObservation(kp, np.asarray(result.segmentation_mask, np.float32))

    def detect(self, image: Image.Image) -> list[Detection]:
        rgb = np.asarray(image.convert("RGB"))
        return boxes_from_observation(self.observe(rgb), rgb, self.model, self.config)
