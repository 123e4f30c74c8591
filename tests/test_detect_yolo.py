"""YOLO ONNX and Darknet backends: decoding, letterbox rescaling and NMS on tiny known models."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from snapshop.detect.base import DF2_CLASSES
from snapshop.detect.factory import create_detector
from snapshop.detect.spec import parse_spec_args
from snapshop.detect.yolo import (
    YoloConfig,
    class_aware_nms,
    decode_predictions,
    letterbox,
    nms,
)
from snapshop.errors import ConfigError, ModelError

C = len(DF2_CLASSES)
TROUSERS, SKIRT, LS_TOP = DF2_CLASSES.index("trousers"), DF2_CLASSES.index("skirt"), 1


def constant_model(path: Path, output: np.ndarray, size: int = 64) -> Path:
    """An ONNX graph with a [1, 3, size, size] input whose output is ``output`` (+ 0 * input)."""
    const = numpy_helper.from_array(output.astype(np.float32), "raw")
    nodes = [
        helper.make_node("ReduceMax", ["images"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["raw", "z"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))],
        initializer=[const, numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def v8_rows(boxes: list[tuple[float, float, float, float, int, float]]) -> np.ndarray:
    """[(cx, cy, w, h, class, score)] -> [1, 4 + C, N] YOLOv8 output."""
    out = np.zeros((1, 4 + C, len(boxes)), np.float32)
    for j, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[0, :4, j] = (cx, cy, w, h)
        out[0, 4 + cls, j] = score
    return out


def test_letterbox_geometry() -> None:
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    pixels, lb = letterbox(image, (64, 64))
    assert pixels.shape == (64, 64, 3)
    assert (lb.scale, lb.pad_x, lb.pad_y) == (0.5, 0.0, 16.0)
    assert (pixels[:16] == 114).all() and (pixels[48:] == 114).all()
    assert (pixels[16:48, :, 0] == 255).all()
    back = lb.to_original(np.array([[22.0, 27.0, 42.0, 37.0]], np.float32), 128, 64)
    np.testing.assert_allclose(back, [[44.0, 22.0, 84.0, 42.0]])


def test_nms_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (40, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (40, 2)).astype(np.float32)], axis=1)
    scores = rng.uniform(0, 1, 40).astype(np.float32)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    expected: list[int] = []
    for i in np.argsort(-scores):
        if all(iou(boxes[i], boxes[k]) <= 0.45 for k in expected):
            expected.append(int(i))
    assert nms(boxes, scores, 0.45) == expected
    # class-aware: the same boxes in two classes never suppress across classes
    classes = np.array([0] * 20 + [1] * 20)
    keep = class_aware_nms(boxes, scores, classes, 0.45, 1000)
    per_class = [int(i) for i in np.flatnonzero(classes == 0)[nms(boxes[:20], scores[:20], 0.45)]]
    per_class += [20 + i for i in nms(boxes[20:], scores[20:], 0.45)]
    assert sorted(keep) == sorted(per_class)
    assert [scores[i] for i in keep] == sorted(scores[keep], reverse=True)


def test_yolov8_layout_decode_rescale_nms(tmp_path: Path) -> None:
    raw = v8_rows(
        [
            (32, 32, 20, 10, TROUSERS, 0.9),  # kept
            (33, 32, 20, 10, TROUSERS, 0.8),  # same class, IoU > 0.45 with the first: suppressed
            (33, 32, 20, 10, SKIRT, 0.7),  # other class: kept despite the overlap
            (10, 40, 8, 8, LS_TOP, 0.1),  # under conf 0.25: dropped
        ]
    )
    det = create_detector(f"yolo:{constant_model(tmp_path / 'v8.onnx', raw)}")
    found = det.detect(Image.new("RGB", (128, 64)))
    assert [(d.label, d.position) for d in found] == [("trousers", "lower"), ("skirt", "lower")]
    assert found[0].score == pytest.approx(0.9)
    # input box (22, 27, 42, 37) -> original: x / 0.5, (y - 16) / 0.5
    assert found[0].box.as_tuple() == pytest.approx((44.0, 22.0, 84.0, 42.0))
    assert found[1].box.as_tuple() == pytest.approx((46.0, 22.0, 86.0, 42.0))


def test_yolov5_layout_uses_objectness(tmp_path: Path) -> None:
    raw = np.zeros((1, 3, 5 + C), np.float32)
    raw[0, 0, :5] = (32, 32, 16, 16, 0.5)  # obj 0.5 x class 0.9 = 0.45: kept
    raw[0, 0, 5 + LS_TOP] = 0.9
    raw[0, 1, :5] = (16, 16, 8, 8, 0.2)  # obj 0.2 x class 1.0 = 0.2 < 0.25: dropped
    raw[0, 1, 5 + TROUSERS] = 1.0
    raw[0, 2, :5] = (48, 48, 8, 8, 0.9)  # 0.9 x 0.5 = 0.45 at the padded border: clipped
    raw[0, 2, 5 + SKIRT] = 0.5
    det = create_detector(f"yolo:{constant_model(tmp_path / 'v5.onnx', raw)},conf=0.25")
    found = det.detect(Image.new("RGB", (64, 128)))  # portrait: scale 0.5, pad_x 16
    assert [d.label for d in found] == ["long_sleeve_top", "skirt"]
    assert [d.score for d in found] == pytest.approx([0.45, 0.45])
    assert found[0].box.as_tuple() == pytest.approx((16.0, 48.0, 48.0, 80.0))
    assert found[1].box.as_tuple() == pytest.approx((56.0, 88.0, 64.0, 104.0))
    assert found[0].position == "upper"


def test_names_file_and_unknown_positions(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("person\ntrousers\n")
    raw = np.zeros((1, 6, 2), np.float32)  # v8 layout with 2 classes
    raw[0, :4, 0], raw[0, 4, 0] = (10, 10, 4, 4), 0.9
    raw[0, :4, 1], raw[0, 5, 1] = (40, 40, 10, 10), 0.8
    det = create_detector(f"yolo:{constant_model(tmp_path / 'm.onnx', raw)},names={names}")
    found = det.detect(Image.new("RGB", (64, 64)))
    assert [(d.label, d.position) for d in found] == [("person", None), ("trousers", "lower")]
    assert found[1].box.as_tuple() == pytest.approx((35.0, 35.0, 45.0, 45.0))


def test_bad_models_and_specs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="fits neither"):
        decode_predictions(np.zeros((1, 7, 9), np.float32), C)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError):
        create_detector(f"yolo:{bad}")
    with pytest.raises(ConfigError, match="does not exist"):
        create_detector(f"yolo:{tmp_path / 'missing.onnx'}")
    with pytest.raises(ConfigError, match="unknown detector option"):
        create_detector(f"yolo:{bad},colour=red")
    with pytest.raises(ConfigError):
        YoloConfig(conf_threshold=1.5)
    assert parse_spec_args("a.cfg, b.weights ,names=n.txt", {"names"}) == (
        ["a.cfg", "b.weights"],
        {"names": "n.txt"},
    )


# --- Darknet -------------------------------------------------------------------------------
CFG = """[net]
width=32
height=32
channels=3

[convolutional]
filters=14
size=32
stride=32
pad=0
activation=linear

[yolo]
mask=0,1
anchors=8,8, 16,24
classes=2
num=2
"""


def write_darknet(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 1x1-grid YOLOv3 head whose outputs are its biases: two boxes of two classes."""
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(CFG)
    biases = np.zeros((2, 7), np.float32)  # per anchor: tx, ty, tw, th, obj, cls0, cls1
    biases[0, 4:] = (5.0, 3.0, -3.0)
    biases[1, 4:] = (5.0, -3.0, 3.0)
    weights = tmp_path / "tiny.weights"
    with open(weights, "wb") as fh:
        fh.write(struct.pack("<iiiq", 0, 2, 0, 0))
        fh.write(biases.reshape(-1).tobytes())
        fh.write(np.zeros(14 * 3 * 32 * 32, np.float32).tobytes())
    names = tmp_path / "names.txt"
    names.write_text("top\nskirt\n")
    return cfg, weights, names


def test_darknet_decodes_into_image_coordinates(tmp_path: Path) -> None:
    cfg, weights, names = write_darknet(tmp_path)
    det = create_detector(f"darknet:{cfg},{weights},names={names}")
    found = det.detect(Image.new("RGB", (200, 100), (90, 120, 30)))
    score = 1 / (1 + np.exp(-5.0)) / (1 + np.exp(-3.0))
    assert [(d.label, d.position) for d in found] == [("top", "upper"), ("skirt", "lower")]
    assert [d.score for d in found] == pytest.approx([score, score], rel=1e-4)
    # centre (0.5, 0.5); anchor 8x8 and 16x24 of a 32x32 network -> scaled to 200x100
    assert found[0].box.as_tuple() == pytest.approx((75.0, 37.5, 125.0, 62.5), abs=1e-3)
    assert found[1].box.as_tuple() == pytest.approx((50.0, 12.5, 150.0, 87.5), abs=1e-3)


def test_darknet_class_count_must_match_names(tmp_path: Path) -> None:
    cfg, weights, _ = write_darknet(tmp_path)
    det = create_detector(f"darknet:{cfg},{weights}")  # default: 13 DF2 names
    with pytest.raises(ModelError, match="2 classes"):
        det.detect(Image.new("RGB", (40, 40)))
    with pytest.raises(ConfigError, match="usage"):
        create_detector(f"darknet:{cfg}")
