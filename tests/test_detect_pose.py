"""The default pose detector: geometry, boxes from class maps, the no-person path, CCP scores."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import dataset_path
from PIL import Image, ImageDraw

from snapshop.detect.base import keep_best_per_position
from snapshop.detect.factory import create_detector
from snapshop.detect.pose import (
    CLASSES,
    PRODUCT,
    GarmentSegmenter,
    PoseConfig,
    PoseObservation,
    body_frame,
    boxes_from_observation,
    boxes_from_probabilities,
    pixel_features,
    product_box,
)
from snapshop.errors import ConfigError, ModelError


def test_product_box_finds_the_object() -> None:
    image = Image.new("RGB", (120, 90), (250, 250, 250))
    ImageDraw.Draw(image).rectangle((30, 20, 79, 69), fill=(200, 30, 40))
    box = product_box(np.asarray(image))
    assert box.as_tuple() == (30.0, 20.0, 80.0, 70.0)
    blank = product_box(np.asarray(Image.new("RGB", (50, 40), (10, 10, 10))))
    assert blank.as_tuple() == (0.0, 0.0, 50.0, 40.0)


def keypoints(vis: float = 0.9) -> np.ndarray:
    kp = np.zeros((33, 3), np.float32)
    kp[:, 2] = vis
    kp[11], kp[12] = (60, 40, vis), (40, 40, vis)  # shoulders
    kp[23], kp[24] = (58, 80, vis), (42, 80, vis)  # hips: torso 40 px
    kp[25], kp[26] = (58, 115, vis), (42, 115, vis)
    kp[27], kp[28] = (58, 150, vis), (42, 150, vis)
    return kp


def test_body_frame_geometry_and_visibility() -> None:
    frame = body_frame(keypoints(), 0.5)
    assert frame is not None
    assert frame.torso == 40 and frame.width == 20 and tuple(frame.knee) == (50, 115)
    assert body_frame(keypoints(vis=0.2), 0.5) is None
    tucked = keypoints()
    tucked[25:29, 1] = 0  # legs not found: average proportions below the hips
    legs = body_frame(tucked, 0.5)
    assert legs is not None and legs.knee[1] == pytest.approx(80 + 0.85 * 40)


def test_boxes_from_class_maps() -> None:
    gh, gw = 20, 10  # cells of 8 px on a 80 x 160 image
    probs = np.zeros((gh, gw, 3), np.float32)
    probs[..., 0] = 1.0
    probs[2:8, 3:7] = (0.1, 0.9, 0.0)  # upper block
    probs[8:16, 4:6] = (0.2, 0.0, 0.8)  # lower block
    person = np.ones((gh, gw), bool)
    found = {d.position: d for d in boxes_from_probabilities(probs, person, (80, 160), 40.0)}
    assert found["upper"].box.as_tuple() == (24.0, 16.0, 56.0, 64.0)
    assert found["lower"].box.as_tuple() == (32.0, 64.0, 48.0, 128.0)
    assert found["upper"].score == pytest.approx(0.9) and found["lower"].label == "lower"
    # a sliver of "lower" under a dress is below the minimum area: no lower box
    probs[8:16, 4:6] = (1.0, 0.0, 0.0)
    probs[8:9, 4:5] = (0.2, 0.0, 0.8)
    found = boxes_from_probabilities(probs, person, (80, 160), 40.0, PoseConfig(min_area=0.15))
    assert [d.position for d in found] == ["upper"]
    # cells off the person never count
    assert boxes_from_probabilities(probs, np.zeros_like(person), (80, 160), 40.0) == []
    with pytest.raises(ConfigError):
        PoseConfig(line_fraction=2.0)


def test_segmenter_probabilities_are_a_distribution() -> None:
    rgb = np.zeros((160, 80, 3), np.uint8)
    rgb[40:100, 30:70] = (200, 40, 40)
    rgb[100:150, 35:65] = (30, 30, 160)
    mask = np.zeros((160, 80), np.float32)
    mask[30:155, 30:70] = 1.0
    frame = body_frame(keypoints(), 0.5)
    assert frame is not None
    grid = pixel_features(frame, rgb, mask)
    probs = GarmentSegmenter().predict(grid.features)
    assert probs.shape == (20, 10, len(CLASSES))
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-5)
    dets = boxes_from_observation(PoseObservation(keypoints(), mask), rgb, GarmentSegmenter())
    assert all(d.position in ("upper", "lower") and 0 < d.score <= 1 for d in dets)
    # no keypoints: one whole-product box and no garment position
    (only,) = boxes_from_observation(PoseObservation(None, None), rgb, GarmentSegmenter())
    assert only.label == PRODUCT and only.position is None


def test_missing_mediapipe_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(ModelError, match="mediapipe"):
        create_detector("pose")
    with pytest.raises(ConfigError):
        create_detector("pose:extra")


@pytest.fixture(scope="module")
def pose_detector():
    pytest.importorskip("mediapipe.python.solutions.pose")
    return create_detector("pose")


def test_flat_product_shot_has_no_garment_boxes(pose_detector) -> None:
    image = Image.new("RGB", (300, 400), (245, 245, 245))
    ImageDraw.Draw(image).rounded_rectangle((80, 60, 219, 339), 20, fill=(30, 90, 160))
    dets = pose_detector.detect(image)
    assert [(d.label, d.position) for d in dets] == [(PRODUCT, None)]
    assert dets[0].box.as_tuple() == pytest.approx((80, 60, 220, 340), abs=2)
    assert keep_best_per_position(dets) == {}  # nothing to store as a crop


@pytest.mark.dataset
def test_ccp_held_out_scores(pose_detector) -> None:
    """40 held-out (odd id) CCP photos: loose floors well under the full-set numbers."""
    from snapshop.evaluate.detection import evaluate_detector

    root = dataset_path("ccp-dev")
    odd = {f"images/{i:04d}.jpg" for i in range(1, 2000, 2)}
    report = evaluate_detector(
        root / "boxes.csv", pose_detector, limit=40, where=lambda p: p in odd
    )
    assert report.images == 40
    up, low = report.positions["upper"], report.positions["lower"]
    assert up.recall >= 0.7 and up.precision >= 0.7
    assert low.recall >= 0.5 and low.precision >= 0.5
