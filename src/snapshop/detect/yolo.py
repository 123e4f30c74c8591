"""YOLO detectors: ONNX exports (YOLOv5 / YOLOv8 / YOLO11 layouts) and Darknet YOLOv3 via OpenCV.

Specs (see :func:`snapshop.detect.factory.create_detector`)::

    yolo:MODEL.onnx[,names=FILE][,conf=0.25][,iou=0.45][,size=640]
    darknet:MODEL.cfg,MODEL.weights[,names=FILE][,conf=0.25][,iou=0.45]

``names`` is a text file with one class name per line (or a JSON list); the default is the
13 DeepFashion2 classes in their category order. Class names map to garment positions with
:func:`snapshop.detect.base.position_of`; other names get position None.

Output layouts of ONNX exports, told apart by shape and the number of classes C:

* YOLOv5: ``[1, N, 5 + C]`` rows ``cx, cy, w, h, objectness, class scores`` -> score =
  objectness x class score;
* YOLOv8 / YOLO11: ``[1, 4 + C, N]`` columns ``cx, cy, w, h, class scores``.

Boxes are in letterboxed input pixels and are mapped back to the original image.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.detect.base import DF2_CLASSES, Box, Detection, check_input_side, position_of
from snapshop.detect.spec import parse_spec_args
from snapshop.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

PAD_VALUE = 114


@dataclass(frozen=True)
class YoloConfig:
    """Thresholds shared by the YOLO backends."""

    conf_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf_threshold <= 1.0:
            raise ConfigError(f"conf must be in [0, 1], got {self.conf_threshold}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"iou must be in (0, 1], got {self.iou_threshold}")
        if self.max_detections < 1:
            raise ConfigError("max_detections must be positive")


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network input: ``input = original * scale + pad``."""

    scale: float
    pad_x: float
    pad_y: float

    def to_original(
        self, xyxy: NDArray[np.float32], width: int, height: int
    ) -> NDArray[np.float32]:
        """(N, 4) input-pixel boxes -> original-image pixels, clipped to the image."""
        out = xyxy.astype(np.float32).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
        return out


def letterbox(image: Image.Image, size: tuple[int, int]) -> tuple[NDArray[np.uint8], Letterbox]:
    """Resize keeping the aspect ratio and pad (value 114, centred) to ``size = (height, width)``.

    Returns the (H, W, 3) uint8 RGB array and the transform back to the original image.
    """
    target_h, target_w = size
    w, h = image.size
    scale = min(target_w / w, target_h / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = np.full((target_h, target_w, 3), PAD_VALUE, dtype=np.uint8)
    pad_x, pad_y = (target_w - new_w) // 2, (target_h - new_h) // 2
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = np.asarray(resized)
    return canvas, Letterbox(scale, float(pad_x), float(pad_y))


def cxcywh_to_xyxy(boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)


def nms(boxes: NDArray[np.float32], scores: NDArray[np.float32], iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best first. ``boxes`` (N, 4) xyxy."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
        boxes[:, 3] - boxes[:, 1], 0, None
    )
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        ix = np.clip(
            np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]),
            0,
            None,
        )
        iy = np.clip(
            np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]),
            0,
            None,
        )
        inter = ix * iy
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return keep


def class_aware_nms(
    boxes: NDArray[np.float32],
    scores: NDArray[np.float32],
    classes: NDArray[np.int64],
    iou_threshold: float,
    max_detections: int,
) -> list[int]:
    """NMS within each class (boxes of different classes never suppress each other)."""
    keep: list[int] = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        keep += [int(idx[j]) for j in nms(boxes[idx], scores[idx], iou_threshold)]
    keep.sort(key=lambda i: -float(scores[i]))
    return keep[:max_detections]


def decode_predictions(
    output: NDArray[np.float32], num_classes: int
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """Raw YOLO output -> (boxes cx,cy,w,h (N, 4), best class score (N,), class id (N,)).

    Accepts ``[1, N, 5 + C]`` (YOLOv5, objectness) or ``[1, 4 + C, N]`` (YOLOv8/11); the
    leading batch axis is optional.
    """
    out = np.asarray(output, dtype=np.float32)
    if out.ndim == 3:
        if out.shape[0] != 1:
            raise ModelError(f"expected a batch of one, got output shape {list(out.shape)}")
        out = out[0]
    if out.ndim != 2:
        raise ModelError(f"unsupported YOLO output shape {list(np.shape(output))}")
    rows, cols = out.shape
    v5 = cols == 5 + num_classes
    v8 = rows == 4 + num_classes
    if v5 and v8:  # ambiguous only for tiny N: the anchor axis is the longer one in practice
        v5, v8 = rows >= cols, rows < cols
    if v8:
        preds = out.T
        class_scores = preds[:, 4:]
    elif v5:
        preds = out
        class_scores = preds[:, 5:] * preds[:, 4:5]
    else:
        raise ModelError(
            f"YOLO output shape {list(np.shape(output))} fits neither [1, N, 5+C] nor [1, 4+C, N]"
            f" with C={num_classes} class names; pass names=FILE listing the model's classes"
        )
    if class_scores.shape[1] == 0:
        raise ModelError("the model has no class scores")
    class_ids = class_scores.argmax(axis=1).astype(np.int64)
    best = class_scores[np.arange(len(class_ids)), class_ids].astype(np.float32)
    return preds[:, :4].astype(np.float32), best, class_ids


def load_names(path: str | Path | None) -> tuple[str, ...]:
    """Class names from a file (one per line, or a JSON list); DeepFashion2's 13 by default."""
    if path is None:
        return DF2_CLASSES
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read class names ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: class names are not UTF-8 text ({exc.reason})") from None
    if text.lstrip().startswith("["):
        try:
            names = [str(n) for n in json.loads(text)]
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON list of class names ({exc})") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"{p}: no class names")
    return tuple(names)


def to_detections(
    xyxy: NDArray[np.float32],
    scores: NDArray[np.float32],
    class_ids: NDArray[np.int64],
    names: tuple[str, ...],
    config: YoloConfig,
) -> list[Detection]:
    """Threshold, class-aware NMS and naming of boxes already in original-image pixels."""
    mask = scores >= config.conf_threshold
    xyxy, scores, class_ids = xyxy[mask], scores[mask], class_ids[mask]
    if class_ids.size and int(class_ids.max()) >= len(names):
        raise ModelError(
            f"the model predicts class {int(class_ids.max())} but names lists {len(names)}"
        )
    keep = class_aware_nms(xyxy, scores, class_ids, config.iou_threshold, config.max_detections)
    out = []
    for i in keep:
        box = Box(*(float(v) for v in xyxy[i]))
        if box.width <= 0 or box.height <= 0:
            continue
        label = names[int(class_ids[i])]
        out.append(Detection(box, label, position_of(label), float(scores[i])))
    return out


def _float_arg(kwargs: dict[str, str], key: str, default: float) -> float:
    if key not in kwargs:
        return float(default)
    try:
        value = float(kwargs[key])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"detector option {key}={kwargs[key]!r} is not a finite number")
    return value


def _int_arg(kwargs: dict[str, str], key: str, default: int) -> int:
    value = _float_arg(kwargs, key, default)
    if not value.is_integer():
        raise ConfigError(f"detector option {key}={kwargs[key]!r} is not a whole number")
    return int(value)


def _config_from(kwargs: dict[str, str]) -> YoloConfig:
    return YoloConfig(
        _float_arg(kwargs, "conf", 0.25),
        _float_arg(kwargs, "iou", 0.45),
        _int_arg(kwargs, "max_det", 100),
    )


def _existing(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    return p


class YoloOnnxDetector:
    """A YOLO model exported to ONNX, run with ONNX Runtime (input ``[1, 3, H, W]`` RGB 0-1)."""

    thread_safe = True  # ONNX Runtime sessions may run concurrently

    def __init__(
        self,
        model_path: str | Path,
        names: tuple[str, ...] = DF2_CLASSES,
        config: YoloConfig = YoloConfig(),
        input_size: tuple[int, int] | None = None,
    ) -> None:
        from snapshop.models.runtime import cpu_session

        self.model_path = Path(model_path)
        self.names = names
        self.config = config
        self.name = f"yolo:{self.model_path.name}"
        try:
            self.session = cpu_session(self.model_path)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{self.model_path}: not a loadable ONNX model ({exc})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(
                f"{self.model_path}: expected one [1, 3, H, W] input, not {len(inputs)}"
            )
        channels = inputs[0].shape[1] if len(inputs[0].shape) == 4 else None
        # a symbolic channel axis (a name or None) is taken on trust; a fixed one must be RGB
        if (
            len(inputs[0].shape) != 4
            or isinstance(channels, int)
            and channels != 3
            or inputs[0].type != "tensor(float)"
        ):
            raise ModelError(
                f"{self.model_path}: expected one float [1, 3, H, W] input, not"
                f" {inputs[0].type} {inputs[0].shape}"
            )
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        static = [d if isinstance(d, int) and d > 0 else None for d in shape[2:]]
        if input_size is not None:
            self.input_size = input_size
        elif static[0] is not None and static[1] is not None:
            self.input_size = (int(static[0]), int(static[1]))
        else:
            self.input_size = (640, 640)
        try:
            for side in self.input_size:
                check_input_side(side, "the input side")
        except ConfigError as exc:
            raise ModelError(f"{self.model_path}: {exc}") from None

    @classmethod
    def from_spec(cls, args: str) -> YoloOnnxDetector:
        positional, kwargs = parse_spec_args(args, {"names", "conf", "iou", "size", "max_det"})
        if len(positional) != 1:
            raise ConfigError("usage: yolo:MODEL.onnx[,names=FILE][,conf=C][,iou=T][,size=S]")
        size = None
        if "size" in kwargs:
            side = check_input_side(_int_arg(kwargs, "size", 640), "size")
            size = (side, side)
        return cls(
            _existing(positional[0], "YOLO model"),
            load_names(kwargs.get("names")),
            _config_from(kwargs),
            size,
        )

    def detect(self, image: Image.Image) -> list[Detection]:
        pixels, lb = letterbox(image, self.input_size)
        blob = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        try:
            output = self.session.run(None, {self.input_name: blob})[0]
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{self.model_path}: the model failed to run ({exc})") from None
        boxes, scores, class_ids = decode_predictions(output, len(self.names))
        xyxy = lb.to_original(cxcywh_to_xyxy(boxes), *image.size)
        return to_detections(xyxy, scores, class_ids, self.names, self.config)


class DarknetDetector:
    """Darknet YOLOv3 ``.cfg`` + ``.weights`` run by OpenCV's DNN module (needs OpenCV 4.x).

    Darknet resizes the image to the network size without letterboxing and predicts boxes
    normalised to it, so they scale straight back to the original width and height.
    """

    def __init__(
        self,
        cfg: str | Path,
        weights: str | Path,
        names: tuple[str, ...] = DF2_CLASSES,
        config: YoloConfig = YoloConfig(),
    ) -> None:
        import cv2

        if not hasattr(cv2.dnn, "readNetFromDarknet"):
            raise ModelError(
                f"OpenCV {cv2.__version__} cannot read Darknet models (OpenCV 5 dropped them);"
                " install opencv-python-headless<5"
            )
        self.cfg, self.weights = Path(cfg), Path(weights)
        self.names = names
        self.config = config
        self.name = f"darknet:{self.cfg.name}"
        try:
            self.net = cv2.dnn.readNetFromDarknet(str(self.cfg), str(self.weights))
        except cv2.error as exc:
            raise ModelError(
                f"{self.cfg}, {self.weights}: OpenCV cannot load them ({exc})"
            ) from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.output_names = list(self.net.getUnconnectedOutLayersNames())
        self.input_size = _darknet_input_size(self.cfg)

    @classmethod
    def from_spec(cls, args: str) -> DarknetDetector:
        positional, kwargs = parse_spec_args(args, {"names", "conf", "iou", "max_det"})
        if len(positional) != 2:
            raise ConfigError("usage: darknet:MODEL.cfg,MODEL.weights[,names=FILE][,conf=C]")
        return cls(
            _existing(positional[0], "Darknet cfg"),
            _existing(positional[1], "Darknet weights"),
            load_names(kwargs.get("names")),
            _config_from(kwargs),
        )

    def detect(self, image: Image.Image) -> list[Detection]:
        import cv2

        net_h, net_w = self.input_size
        pixels = np.asarray(image.convert("RGB"))
        blob = cv2.dnn.blobFromImage(pixels, 1 / 255.0, (net_w, net_h), swapRB=False, crop=False)
        self.net.setInput(blob)
        outputs = self.net.forward(self.output_names)
        rows = np.concatenate([np.asarray(o, np.float32).reshape(-1, o.shape[-1]) for o in outputs])
        n_classes = rows.shape[1] - 5
        if n_classes != len(self.names):
            raise ModelError(
                f"the network predicts {n_classes} classes but names lists {len(self.names)}"
            )
        # OpenCV's yolo layer already multiplies class probabilities by objectness.
        class_scores = rows[:, 5:]
        class_ids = class_scores.argmax(axis=1).astype(np.int64)
        scores = class_scores[np.arange(len(rows)), class_ids].astype(np.float32)
        w, h = image.size
        xyxy = cxcywh_to_xyxy(rows[:, :4] * np.array([w, h, w, h], np.float32))
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
        return to_detections(xyxy, scores, class_ids, self.names, self.config)


def _darknet_input_size(cfg: Path) -> tuple[int, int]:
    """(height, width) from the ``[net]`` section of a Darknet cfg (416 x 416 when absent)."""
    size = {"width": 416, "height": 416}
    in_net = False
    for raw in cfg.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            in_net = line.lower() in ("[net]", "[network]")
            continue
        key, _, value = line.partition("=")
        if in_net and key.strip() in size:
            try:
                side = int(value.strip())
            except ValueError:
                raise ConfigError(f"{cfg}: {key.strip()} is not an integer") from None
            size[key.strip()] = check_input_side(side, f"{cfg}: {key.strip()}")
    return size["height"], size["width"]
