"""Default offline garment detector: BlazePose keypoints + person mask -> upper / lower boxes.

Pipeline for one image:

1. mediapipe 0.10.21 BlazePose (bundled full model, static images) gives 33 keypoints and a
   person segmentation mask. No confident person (both shoulders and hips visible) -> one
   whole-product box (``label="product"``, ``position=None``): the bounding box of what
   differs from the border colour, or the whole image. Position None means no garment crop is
   stored or searched; the image is still searched as a whole image.
2. The image is cut into cells of 8 x 8 px. Each cell gets features relative to the body
   (:func:`pixel_features`): colour, skin probability (a colour table learned on CCP's skin
   pixels), person probability, height from the hips / knees / ankles in torso lengths,
   offset from the body axis, and colour distances to the person's chest, thigh and shin.
3. A tiny per-cell classifier (:class:`GarmentSegmenter`, 7.6 KB ONNX, fitted on CCP's even
   image ids by :mod:`snapshop.train.pose`) labels cells other / upper / lower. A dress
   is labelled *upper* from shoulders to hem, so it yields no lower box unless enough cells
   look like a lower garment (``min_area``).
4. Each class's box spans the rows and columns holding at least ``line_fraction`` of its
   busiest row / column (robust to stray cells); its score is the mean class probability.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.detect.base import LOWER, PRODUCT, UPPER, Box, Detection, product_box
from snapshop.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# BlazePose landmark indices.
L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 11, 12, 23, 24
L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 25, 26, 27, 28

WEIGHTS = "pose_seg.onnx"
SKIN_LUT = "skin_lut.npy"


@dataclass(frozen=True)
class PoseConfig:
    """Thresholds of the pose detector (defaults tuned on ccp-dev even image ids)."""

    min_visibility: float = 0.5
    mask_threshold: float = 0.5
    upper_threshold: float = 0.5
    lower_threshold: float = 0.4
    min_area: float = 0.3  # smallest garment area kept, in squared torso lengths
    line_fraction: float = 0.2  # box edges: rows/columns with >= this share of the busiest

    def __post_init__(self) -> None:
        for name in ("min_visibility", "mask_threshold", "upper_threshold", "lower_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1]")
        if self.min_area < 0 or not 0.0 <= self.line_fraction <= 1.0:
            raise ConfigError("min_area must be >= 0 and line_fraction in [0, 1]")


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


@dataclass(frozen=True)
class BodyFrame:
    """Body geometry in pixels: the y of shoulders, hips, knees, ankles and the torso length."""

    shoulder: NDArray[np.float32]  # (2,) mid-shoulder x, y
    hip: NDArray[np.float32]
    knee: NDArray[np.float32]
    ankle: NDArray[np.float32]
    torso: float
    width: float  # shoulder width in pixels


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
    ankle = (
        ankle
        if ankle[1] > knee[1] + 0.4 * torso
        else knee + np.array([0, 0.85 * torso], np.float32)
    )
    width = float(abs(pts[L_SHOULDER, 0] - pts[R_SHOULDER, 0]))
    return BodyFrame(
        shoulder,
        hip,
        knee.astype(np.float32),
        ankle.astype(np.float32),
        torso,
        max(width, 0.3 * torso),
    )


GRID = 8  # pixel features are computed on the image downscaled by this factor
N_FEATURES = 15
CLASSES = ("other", UPPER, LOWER)


@dataclass(frozen=True)
class PixelGrid:
    """Per-cell features of the downscaled image: (h, w, N_FEATURES) and the person mask."""

    features: NDArray[np.float32]
    person: NDArray[np.bool_]
    scale: float  # original pixels per cell


def _reference(lab: NDArray[np.float32], sel: NDArray[np.bool_]) -> NDArray[np.float32]:
    return (
        np.median(lab[sel], axis=0).astype(np.float32)
        if sel.sum() >= 4
        else np.zeros(3, np.float32)
    )


def pixel_features(
    frame: BodyFrame, rgb: NDArray[np.uint8], mask: NDArray[np.float32], threshold: float = 0.5
) -> PixelGrid:
    """Features of every cell of the image downscaled by :data:`GRID`.

    Per cell: Lab colour, skin probability, person probability, body coordinates (height v
    from the hips and offset u from the body axis, in torso lengths / shoulder widths; v
    relative to knees and ankles), Lab distances to the chest, thigh and shin colours (medians
    of the person's non-skin pixels there), and the image's chest-thigh and thigh-shin
    contrasts, which tell a dress (one colour across the hips) from separates.
    """
    import cv2

    h, w = rgb.shape[:2]
    gh, gw = max(1, h // GRID), max(1, w // GRID)
    small = np.asarray(cv2.resize(rgb, (gw, gh), interpolation=cv2.INTER_AREA), np.uint8)
    pmask = cv2.resize(mask.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    scale_y, scale_x = h / gh, w / gw
    lab = _lab(small)
    skin = skin_probability(small)
    ys = (np.arange(gh, dtype=np.float32) + 0.5) * scale_y
    xs = (np.arange(gw, dtype=np.float32) + 0.5) * scale_x
    centre = np.interp(
        ys,
        [frame.shoulder[1], frame.hip[1], frame.knee[1], frame.ankle[1]],
        [frame.shoulder[0], frame.hip[0], frame.knee[0], frame.ankle[0]],
    )
    v = np.repeat(((ys - frame.hip[1]) / frame.torso)[:, None], gw, axis=1)
    u = (xs[None, :] - centre[:, None]) / frame.width
    knee_v = float((frame.knee[1] - frame.hip[1]) / frame.torso)
    ankle_v = float((frame.ankle[1] - frame.hip[1]) / frame.torso)
    person = pmask > threshold
    cloth = person & (skin < 0.5) & (np.abs(u) < 0.6)
    chest = _reference(lab, cloth & (v > -0.85) & (v < -0.35))
    thigh = _reference(lab, cloth & (v > 0.25) & (v < 0.25 + 0.5 * knee_v))
    shin = _reference(lab, cloth & (v > knee_v + 0.15) & (v < ankle_v - 0.1))

    def dist(ref: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.linalg.norm(lab - ref, axis=2) / 50.0

    ones = np.ones((gh, gw), np.float32)
    feats = np.stack(
        [
            lab[..., 0] / 100.0,
            (lab[..., 1] - 128) / 50.0,
            (lab[..., 2] - 128) / 50.0,
            skin,
            pmask,
            v,
            u,
            v - knee_v,
            v - ankle_v,
            dist(chest),
            dist(thigh),
            dist(shin),
            ones * float(np.linalg.norm(chest - thigh) / 50.0),
            ones * float(np.linalg.norm(thigh - shin) / 50.0),
            ones * knee_v,
        ],
        axis=2,
    ).astype(np.float32)
    return PixelGrid(feats, person, float((scale_x + scale_y) / 2))


# Issue #21, "pose as a prior": the body as extra input channels of the `segmenter` head, on
# its stride-8 grid. Heights and offsets in torso lengths / shoulder widths, clipped: far from
# the body they carry no more information, and unbounded values would dominate the head.
BODY_CHANNELS: tuple[str, ...] = ("person", "found", "v_hip", "v_knee", "v_ankle", "u_axis")
BODY_CLIP = 4.0


def body_channels(
    obs: PoseObservation,
    image_hw: tuple[int, int],
    grid_hw: tuple[int, int],
    cell: float,
    min_visibility: float = PoseConfig.min_visibility,
) -> NDArray[np.float32]:
    """(len(BODY_CHANNELS), gh, gw) channels of a grid laid over the image from its top-left
    corner, each cell ``cell`` image pixels wide (cells past the image, the padding, are 0).

    ``person``: the pose model's person probability at the cell centre (0 without one);
    ``found``: 1 inside the image when :func:`body_frame` found a body, else 0 — the body
    coordinates are then 0 too: ``v_hip`` / ``v_knee`` / ``v_ankle``, the height below the
    hips / knees / ankles in torso lengths, and ``u_axis``, the offset from the body axis in
    shoulder widths (see :func:`pixel_features`)."""
    h, w = image_hw
    gh, gw = grid_hw
    out = np.zeros((len(BODY_CHANNELS), gh, gw), np.float32)
    ys = (np.arange(gh, dtype=np.float32) + 0.5) * cell
    xs = (np.arange(gw, dtype=np.float32) + 0.5) * cell
    rows, cols = ys < h, xs < w
    nr, nc = int(rows.sum()), int(cols.sum())
    if nr == 0 or nc == 0:
        return out
    ys, xs = ys[:nr], xs[:nc]
    if obs.mask is not None:
        my = np.minimum((ys * obs.mask.shape[0] / h).astype(int), obs.mask.shape[0] - 1)
        mx = np.minimum((xs * obs.mask.shape[1] / w).astype(int), obs.mask.shape[1] - 1)
        out[0, :nr, :nc] = obs.mask[np.ix_(my, mx)]
    frame = None if obs.keypoints is None else body_frame(obs.keypoints, min_visibility)
    if frame is None:
        return out
    centre = np.interp(
        ys,
        [frame.shoulder[1], frame.hip[1], frame.knee[1], frame.ankle[1]],
        [frame.shoulder[0], frame.hip[0], frame.knee[0], frame.ankle[0]],
    )
    v = (ys - frame.hip[1]) / frame.torso
    knee_v = float((frame.knee[1] - frame.hip[1]) / frame.torso)
    ankle_v = float((frame.ankle[1] - frame.hip[1]) / frame.torso)
    out[1, :nr, :nc] = 1.0
    for k, offset in ((2, 0.0), (3, knee_v), (4, ankle_v)):
        out[k, :nr, :nc] = (v - offset)[:, None]
    out[5, :nr, :nc] = (xs[None, :] - centre[:, None]) / frame.width
    np.clip(out[2:], -BODY_CLIP, BODY_CLIP, out=out[2:])
    return out


N_INPUTS = 12  # the per-cell features the segmenter reads (the rest are image constants)


class GarmentSegmenter:
    """A small dilated CNN (ONNX, ``detect/weights/pose_seg.onnx``): cell features
    ``[1, N_INPUTS, h, w]`` -> class probabilities ``[1, 3, h, w]`` (other, upper, lower).

    Fitted by :mod:`snapshop.train.pose` on CCP pixel labels (even image ids of ccp-dev);
    its card ``pose_seg.json`` names the data and the held-out scores.
    """

    def __init__(self, path: Any = None) -> None:
        from snapshop.models.runtime import cpu_session

        source = _resource(WEIGHTS) if path is None else path
        try:
            data = (
                source.read_bytes() if hasattr(source, "read_bytes") else Path(source).read_bytes()
            )
            self.session = cpu_session(data, threads=1)
        except Exception as exc:  # onnxruntime raises untyped errors
            raise ModelError(f"garment segmenter {source}: unreadable ({exc})") from None
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, feats: NDArray[np.float32]) -> NDArray[np.float32]:
        """(h, w, >= N_INPUTS) features -> (h, w, 3) class probabilities."""
        x = np.ascontiguousarray(feats[..., :N_INPUTS].transpose(2, 0, 1)[None], np.float32)
        probs = self.session.run(None, {self.input_name: x})[0][0]
        return np.ascontiguousarray(probs.transpose(1, 2, 0), np.float32)


def _extent(counts: NDArray[np.float32], fraction: float) -> tuple[int, int] | None:
    """First and last index (inclusive) whose count reaches ``fraction`` of the maximum."""
    if counts.size == 0 or counts.max() <= 0:
        return None
    idx = np.flatnonzero(counts >= fraction * counts.max())
    return int(idx[0]), int(idx[-1])


def boxes_from_observation(
    obs: PoseObservation,
    rgb: NDArray[np.uint8],
    model: GarmentSegmenter,
    config: PoseConfig = PoseConfig(),
) -> list[Detection]:
    """Garment detections of one image from its pose observation (no mediapipe needed)."""
    frame = None
    if obs.keypoints is not None and obs.mask is not None:
        frame = body_frame(obs.keypoints, config.min_visibility)
    if frame is None or obs.mask is None:
        return [Detection(product_box(rgb), PRODUCT, None, 1.0)]
    grid = pixel_features(frame, rgb, obs.mask, config.mask_threshold)
    probs = model.predict(grid.features)
    h, w = rgb.shape[:2]
    return boxes_from_probabilities(probs, grid.person, (w, h), frame.torso, config)


def boxes_from_probabilities(
    probs: NDArray[np.float32],
    person: NDArray[np.bool_],
    size: tuple[int, int],
    torso: float,
    config: PoseConfig = PoseConfig(),
) -> list[Detection]:
    """Upper / lower boxes from per-cell class probabilities (gh, gw, 3) on the person."""
    w, h = size
    gh, gw = person.shape
    sy, sx = h / gh, w / gw
    out: list[Detection] = []
    for col, position, threshold in (
        (1, UPPER, config.upper_threshold),
        (2, LOWER, config.lower_threshold),
    ):
        hit = (probs[..., col] > threshold) & person
        area = float(hit.sum()) * sx * sy
        if area < config.min_area * torso * torso:
            continue
        rows = _extent(hit.sum(axis=1).astype(np.float32), config.line_fraction)
        cols = _extent(hit.sum(axis=0).astype(np.float32), config.line_fraction)
        if rows is None or cols is None:
            continue
        box = Box(cols[0] * sx, rows[0] * sy, (cols[1] + 1) * sx, (rows[1] + 1) * sy).clip(w, h)
        out.append(Detection(box, position, position, float(probs[..., col][hit].mean())))
    return out


class BlazePose:
    """mediapipe 0.10.21 BlazePose (bundled full model, static images, with the person mask):
    :meth:`observe` turns an RGB image into a :class:`PoseObservation`. Thread safe: one graph,
    serialised by a lock."""

    def __init__(self) -> None:
        try:
            import mediapipe as mp  # noqa: F401
            from mediapipe.python.solutions import pose as mp_pose
        except ImportError as exc:
            raise ModelError(
                f"BlazePose needs mediapipe 0.10.21 ({exc}); install it with"
                " `pip install 'snapshop[detect]' && pip install --no-deps mediapipe==0.10.21`"
            ) from None
        self._pose = mp_pose.Pose(
            static_image_mode=True,
            model_complexity=1,
            enable_segmentation=True,
            min_detection_confidence=0.5,
        )
        self._lock = threading.Lock()  # a mediapipe graph runs one image at a time

    def observe(self, rgb: NDArray[np.uint8]) -> PoseObservation:
        h, w = rgb.shape[:2]
        with self._lock:
            result = self._pose.process(np.ascontiguousarray(rgb))
        if result.pose_landmarks is None or result.segmentation_mask is None:
            return PoseObservation(None, None)
        kp = np.array(
            [[lm.x * w, lm.y * h, lm.visibility] for lm in result.pose_landmarks.landmark],
            np.float32,
        )
        return PoseObservation(kp, np.asarray(result.segmentation_mask, np.float32))


class PoseDetector:
    """``pose``: mediapipe BlazePose + segmentation, then :func:`boxes_from_observation`."""

    name = "pose"
    thread_safe = True  # BlazePose serialises its graph

    def __init__(
        self, config: PoseConfig = PoseConfig(), model: GarmentSegmenter | None = None
    ) -> None:
        self.config = config
        self.pose = BlazePose()
        self.model = model or GarmentSegmenter()

    @classmethod
    def from_spec(cls, args: str) -> PoseDetector:
        if args.strip():
            raise ConfigError(f"the pose detector takes no arguments, got {args!r}")
        return cls()

    def observe(self, rgb: NDArray[np.uint8]) -> PoseObservation:
        return self.pose.observe(rgb)

    def detect(self, image: Image.Image) -> list[Detection]:
        rgb = np.asarray(image.convert("RGB"))
        return boxes_from_observation(self.observe(rgb), rgb, self.model, self.config)
