"""A fifth adversarial round: the dataset readers and `prepare`, spatial verification's cached
features, and the inputs of detector training. Each test failed on the code before its fix."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from test_detect_segmenter import write_tiny_ccp
from verify_helpers import package

from snapshop.catalog.blobs import LOCAL_FEATURES
from snapshop.catalog.store import ImageRow
from snapshop.data.ccp import list_images
from snapshop.data.manifest import ManifestRow, check_no_self_matches, read_manifest
from snapshop.data.protocol import ProtocolConfig, prepare, split_products
from snapshop.data.readers import read_inshop, read_street2shop
from snapshop.detect.segmenter import OTHER, UPPER_CLS
from snapshop.errors import ConfigError, ManifestError
from snapshop.train.segmenter import (
    PseudoLabelConfig,
    load_training_images,
    pseudo_label_pairs,
    segmenter_label_table,
    write_pseudo_labels,
)
from snapshop.train.segmenter.pseudo import read_tags
from snapshop.verify import CatalogFeatures, VerifyConfig, extract

INSHOP_HEADER = "2\nimage_name item_id evaluation_status\n"
BOX = {"left": 1, "top": 1, "width": 3, "height": 3}

# ---------------------------------------------------------------------------------------------
# 1. Dataset readers: listings that are not UTF-8, ids and boxes Street2Shop cannot have


def inshop(root: Path, body: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "list_eval_partition.txt").write_bytes(body)
    return root


def street2shop(
    root: Path, retrieval: bytes | list[object], pairs: bytes | list[object] | None = None
) -> Path:
    meta = root / "meta" / "json"
    meta.mkdir(parents=True)
    (root / "images").mkdir()
    for photo in ("1", "2", "3"):
        Image.new("RGB", (8, 8)).save(root / "images" / f"{photo}.jpg")

    def encoded(data: bytes | list[object]) -> bytes:
        return data if isinstance(data, bytes) else json.dumps(data).encode()

    (meta / "retrieval_dresses.json").write_bytes(encoded(retrieval))
    if pairs is not None:
        (meta / "train_pairs_dresses.json").write_bytes(encoded(pairs))
    return root


def test_listings_that_are_not_utf8_or_nest_too_deeply_are_manifest_errors(
    tmp_path: Path,
) -> None:
    listing = INSHOP_HEADER.encode() + b"img/caf\xe9.jpg id_1 train\n"
    with pytest.raises(ManifestError, match="list_eval_partition.txt: not UTF-8"):
        read_inshop(inshop(tmp_path / "inshop", listing))
    latin = b'[{"photo": 1, "product": "caf\xe9"}]'
    with pytest.raises(ManifestError, match="retrieval_dresses.json: not UTF-8"):
        read_street2shop(street2shop(tmp_path / "s2s", latin))
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ManifestError, match="retrieval_dresses.json: invalid JSON"):
        read_street2shop(street2shop(tmp_path / "deep", deep))


@pytest.mark.parametrize("name", ["img/../../../etc/passwd", "/etc/passwd", "../outside.jpg"])
def test_inshop_names_outside_the_dataset_folder_are_refused_with_their_line(
    tmp_path: Path, name: str
) -> None:
    body = f"{INSHOP_HEADER}img/a.jpg id_1 train\n{name} id_1 query\n".encode()
    with pytest.raises(ManifestError, match=r"list_eval_partition.txt:4: image name"):
        read_inshop(inshop(tmp_path, body))


def test_an_image_listed_twice_in_inshop_is_refused_unless_the_row_repeats(tmp_path: Path) -> None:
    rows = "img/a.jpg id_1 train\nimg/b.jpg id_1 train\nimg/a.jpg id_1 train\n"
    assert [
        r.path.name for r in read_inshop(inshop(tmp_path / "same", (INSHOP_HEADER + rows).encode()))
    ] == ["a.jpg", "b.jpg"]
    for other in ("img/a.jpg id_2 train", "img/a.jpg id_1 query"):
        body = f"{INSHOP_HEADER}img/a.jpg id_1 train\nimg/b.jpg id_1 gallery\n{other}\n".encode()
        with pytest.raises(ManifestError, match=r"list_eval_partition.txt:5: img/a.jpg .* line 3"):
            read_inshop(inshop(tmp_path / other.split()[1] / other.split()[2], body))


def test_inshop_images_are_found_in_the_archives_img_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = f"{INSHOP_HEADER}img/MEN/id_1/a.jpg id_1 train\nimg/MEN/id_1/b.jpg id_1 query\n"
    root = inshop(tmp_path, body.encode())
    (root / "Eval").mkdir()
    (root / "list_eval_partition.txt").rename(root / "Eval" / "list_eval_partition.txt")
    (root / "Img" / "img" / "MEN" / "id_1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "Img" / "img" / "MEN" / "id_1" / "a.jpg")
    with caplog.at_level(logging.WARNING):
        rows = read_inshop(root)
    assert (
        rows[0].path == root / "Img" / "img" / "MEN" / "id_1" / "a.jpg" and rows[0].path.is_file()
    )
    assert "1 of 2 listed images are not under" in caplog.text  # b.jpg


@pytest.mark.parametrize(
    ("retrieval", "pairs", "where"),
    [
        # a street photo without its product was filed under the product "dresses/None"
        ([{"photo": 1, "product": 10}], [{"photo": 2, "bbox": BOX}], "train_pairs"),
        ([{"photo": 1, "product": None}], None, "retrieval"),
        ([{"photo": 1, "product": ""}], None, "retrieval"),
        ([{"photo": 1, "product": [10, 11]}], None, "retrieval"),
        ([{"photo": 1, "product": 10}, {"photo": True, "product": 10}], None, "retrieval"),
    ],
)
def test_street2shop_entries_without_a_photo_or_product_id_are_refused(
    tmp_path: Path, retrieval: list[object], pairs: list[object] | None, where: str
) -> None:
    root = street2shop(tmp_path, retrieval, pairs)
    with pytest.raises(ManifestError, match=rf"{where}_dresses.json: entry \d needs 'photo'"):
        read_street2shop(root)


@pytest.mark.parametrize(
    "bbox",
    [
        b'{"left": 5, "top": 2, "width": -3, "height": 4}',
        b'{"left": 5, "top": 2, "width": 3, "height": 0}',
        b'{"left": NaN, "top": 2, "width": 3, "height": 4}',
        b'{"left": 1, "top": 2, "width": Infinity, "height": 4}',
    ],
)
def test_street2shop_boxes_of_no_area_or_not_finite_are_refused(
    tmp_path: Path, bbox: bytes
) -> None:
    pairs = b'[{"photo": 2, "product": 10, "bbox": ' + bbox + b"}]"
    root = street2shop(tmp_path, [{"photo": 1, "product": 10}], pairs)
    with pytest.raises(ManifestError, match="train_pairs_dresses.json: entry 1: bbox"):
        read_street2shop(root)


# ---------------------------------------------------------------------------------------------
# 2. The protocol: one image spelt two ways, settings of the wrong type, a non-UTF-8 locale


def test_one_image_spelt_two_ways_counts_once_and_never_finds_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = [
        ManifestRow(tmp_path / f"p{p}" / f"{i}.jpg", f"p{p}", "gallery")
        for p in range(6)
        for i in range(2)
    ]
    # the same files again, as a second source would list them: relative, or through ".."
    relative = [
        ManifestRow(Path(f"p{p}/{i}.jpg"), f"p{p}", "gallery") for p in range(6) for i in range(2)
    ]
    dotted = [
        ManifestRow(tmp_path / "x" / ".." / f"p{p}" / "0.jpg", f"p{p}", "gallery") for p in range(6)
    ]
    for seed in range(5):
        rows, counts = split_products(absolute + relative + dotted, ProtocolConfig(seed=seed))
        assert len(rows) == 12 and counts.images["test"] + counts.images["train"] == 12
        check_no_self_matches(rows, f"seed {seed}")
    # a product of one image listed twice does not pass min_images=2 on its own
    lone = [
        ManifestRow(tmp_path / "q" / "0.jpg", "q", "gallery"),
        ManifestRow(Path("q/0.jpg"), "q", "gallery"),
    ]
    rows, counts = split_products(absolute + lone, ProtocolConfig())
    assert "q" not in {r.sku for r in rows} and counts.dropped_products == 1


@pytest.mark.parametrize(
    "settings",
    [
        {"test_fraction": "0.5"},
        {"min_images": True},
        {"seed": 1.5},
        {"folds": 2.5},
        {"fold": 0.5, "folds": 2},
        {"keep_roles": "no"},
    ],
)
def test_protocol_settings_of_the_wrong_type_are_config_errors(settings: dict) -> None:
    with pytest.raises(ConfigError, match=f"^{next(iter(settings))} must be"):
        ProtocolConfig(**settings)


def test_protocol_takes_numpy_integers() -> None:
    rows = [
        ManifestRow(Path(f"/d/p{p}/{i}.jpg"), f"p{p}", "gallery")
        for p in range(4)
        for i in range(2)
    ]
    config = ProtocolConfig(seed=np.int64(3), folds=np.int64(2), fold=np.int64(1))
    assert (
        split_products(rows, config)[0]
        == split_products(rows, ProtocolConfig(seed=3, folds=2, fold=1))[0]
    )


def test_prepare_writes_utf8_whatever_the_locale(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    with open(tmp_path / "shop.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "product_id"])
        for p in range(4):
            for i in range(2):
                Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{p}-{i}.jpg")
                writer.writerow([f"img/{p}-{i}.jpg", f"caf\u00e9-{p}"])
    script = (
        "import sys; from pathlib import Path; from snapshop.data.protocol import prepare;"
        " prepare([sys.argv[1]], Path(sys.argv[2]))"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = tmp_path / "manifest.csv"
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "shop.csv"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = read_manifest(out)
    assert len(rows) == 8 and {r.sku for r in rows} == {f"caf\u00e9-{p}" for p in range(4)}
    assert all(r.path.is_file() for r in rows)


def test_prepare_keeps_products_disjoint_across_merged_sources(tmp_path: Path) -> None:
    """Two sources listing the same folder (a CSV kept beside it, and the folder itself) make
    one product of each sku, on one side of the split, with each image once."""
    for p in range(5):
        (tmp_path / "shop" / f"p{p}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "shop" / f"p{p}" / f"{i}.jpg")
    (tmp_path / "lists").mkdir()
    with open(tmp_path / "lists" / "shop.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "product_id"])
        writer.writerows([f"../shop/p{p}/{i}.jpg", f"p{p}"] for p in range(5) for i in range(3))
    out = tmp_path / "out" / "manifest.csv"
    rows, _ = prepare([str(tmp_path / "lists" / "shop.csv"), f"folder:{tmp_path / 'shop'}"], out)
    assert len(rows) == 15
    written = read_manifest(out)
    sides = {(r.sku, r.extra["split"]) for r in written}
    assert len(sides) == 5  # one split per product
    check_no_self_matches([r for r in written if r.extra["split"] == "test"], "test rows")


# ---------------------------------------------------------------------------------------------
# 3. Detector training: masks that do not fit their photo, EXIF-rotated photos, class maps


def test_a_mask_that_is_not_its_photo_at_any_scale_is_refused(tmp_path: Path) -> None:
    write_tiny_ccp(tmp_path, n=2)
    pairs = list_images(tmp_path, "all")
    table = segmenter_label_table(tmp_path / "mask_labels.csv")
    mask_file = pairs[0][1]
    mask = np.asarray(Image.open(mask_file))
    Image.fromarray(mask[::2, ::2]).save(mask_file)  # the photo's pixels at half scale: fine
    assert len(load_training_images(list_images(tmp_path, "all"), table)) == 2
    Image.fromarray(np.ascontiguousarray(mask.T)).save(mask_file)  # transposed: stretched before
    with pytest.raises(ManifestError, match=r"0001.png: label map of 330x220 px does not fit"):
        list_images(tmp_path, "all")
    with pytest.raises(ManifestError, match="does not fit"):
        load_training_images(pairs, table)


def test_training_photos_are_read_by_the_decoders_rules_as_stored(tmp_path: Path) -> None:
    """Both detector trainers read photos with `Image.open(...).convert("RGB")`: a 16-bit
    photo clipped to white, transparent pixels black, no pixel limit; head training resized a
    mask of any shape onto its photo. One reader now: the decoder's rules, stored orientation."""
    from snapshop.data.ccp import read_training_pair
    from snapshop.train.segmenter.samples import build_samples

    mask = np.zeros((30, 20), np.uint8)
    mask[10:20] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    deep = np.full((30, 20), 32768, np.uint16)  # mid grey at 16 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")
    rgb, labels = read_training_pair(tmp_path / "deep.png", tmp_path / "mask.png")
    assert rgb.shape == (30, 20, 3) and 120 <= int(rgb.mean()) <= 135  # not clipped to 255
    assert (labels == mask).all()
    clear = Image.new("RGBA", (20, 30), (0, 0, 0, 0))  # fully transparent: white, as a search
    clear.save(tmp_path / "clear.png")
    assert read_training_pair(tmp_path / "clear.png", tmp_path / "mask.png")[0].min() == 255
    turned = Image.new("RGB", (20, 30), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: the mask labels the stored 20x30 pixels
    turned.save(tmp_path / "turned.jpg", exif=exif)
    stored = read_training_pair(tmp_path / "turned.jpg", tmp_path / "mask.png")[0]
    assert stored.shape[:2] == (30, 20)
    Image.fromarray(np.ascontiguousarray(mask.T)).save(tmp_path / "mask.png")  # another shape
    identity = np.arange(256, dtype=np.uint8)
    with pytest.raises(ManifestError, match="does not fit"):  # before any trunk runs
        build_samples([(tmp_path / "deep.png", tmp_path / "mask.png")], identity, 64, None)  # type: ignore[arg-type]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ManifestError, match="broken.png"):
        read_training_pair(tmp_path / "broken.png", tmp_path / "mask.png")


def test_a_ccp_image_id_listed_twice_is_refused(tmp_path: Path) -> None:
    write_tiny_ccp(tmp_path, n=2)
    Image.new("RGB", (220, 330)).save(tmp_path / "images" / "other.jpg")
    with open(tmp_path / "manifest.csv", "a", newline="") as fh:  # the same mask, another photo
        csv.writer(fh).writerow(["images/other.jpg", "0002", 220, 330, "dev"])
    with pytest.raises(ManifestError, match="manifest.csv:4: image_id .* on line 3 too"):
        list_images(tmp_path, "all")


def test_a_ccp_photo_with_an_exif_rotation_is_refused(tmp_path: Path) -> None:
    write_tiny_ccp(tmp_path, n=2)
    photo = tmp_path / "images" / "0002.jpg"
    stored = Image.open(photo).transpose(Image.Transpose.ROTATE_90)  # 330x220 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown upright (220x330, the mask's size) by every viewer
    stored.save(photo, exif=exif)
    with pytest.raises(ManifestError, match=r"0002.jpg: EXIF orientation 6"):
        list_images(tmp_path, "all")


class RedIsUpper:
    """A teacher that calls red pixels *upper*, everything else *other*."""

    def probabilities(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        red = (rgb[..., 0] > 150) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)
        probs = np.zeros((*rgb.shape[:2], 4), np.float32)
        probs[..., OTHER] = ~red
        probs[..., UPPER_CLS] = red
        return probs, 1.0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_pseudo_labels_of_an_exif_rotated_photo_label_its_stored_pixels(
    tmp_path: Path, orientation: int
) -> None:
    stored = Image.new("RGB", (330, 220), (230, 230, 230))
    stored.paste((220, 20, 20), (20, 30, 120, 200))  # a red block off every axis of symmetry
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "images").mkdir()
    stored.save(tmp_path / "images" / "1.png", exif=exif)
    (tmp_path / "tags.csv").write_text("path,image_id,groups\nimages/1.png,1,top\n")
    write_pseudo_labels(
        RedIsUpper(), tmp_path / "tags.csv", tmp_path / "pseudo", PseudoLabelConfig(mirror=False)
    )
    pairs, _ = pseudo_label_pairs(tmp_path / "pseudo")
    labels = np.asarray(Image.open(pairs[0][1]))
    red = np.zeros((220, 330), bool)
    red[30:200, 20:120] = True
    # training reads the stored pixels: the label map must match them, not the upright view
    assert labels.shape == red.shape and np.array_equal(labels == UPPER_CLS, red)


def test_a_tags_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    (tmp_path / "tags.csv").write_bytes("\ufeffpath,image_id,groups\ni/1.jpg,1,top\n".encode())
    assert [(p.name, i, g) for p, i, g in read_tags(tmp_path / "tags.csv")] == [
        ("1.jpg", "1", {"top"})
    ]


def test_a_tags_row_without_a_photo_path_is_refused(tmp_path: Path) -> None:
    # before: the tags file's folder was taken for the photo, then skipped as unreadable
    (tmp_path / "tags.csv").write_text("path,image_id,groups\ni/1.jpg,1,top\n ,2,top\n")
    with pytest.raises(ManifestError, match="tags.csv, line 3: no photo path"):
        read_tags(tmp_path / "tags.csv")


def test_a_class_map_that_maps_no_garment_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lip = ["background", "hat", "hair", "upper-clothes", "coat-ish", "trouser", "frock"]
    with open(tmp_path / "mask_labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["index", "label"], *enumerate(lip)])
    with pytest.raises(ManifestError, match="mask_labels.csv: no label is a garment"):
        segmenter_label_table(tmp_path / "mask_labels.csv")
    with open(tmp_path / "mask_labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["index", "label"], *enumerate([*lip, "pants", "skirt"])])
    with caplog.at_level(logging.WARNING):
        table = segmenter_label_table(tmp_path / "mask_labels.csv")
    assert set(np.unique(table)) == {0, 2}  # lower only
    assert "upper, dress" in caplog.text


# ---------------------------------------------------------------------------------------------
# 4. Spatial verification: a damaged features file beside the thumbnails


@pytest.mark.parametrize("damage", ["empty", "torn", "one array"])
def test_a_damaged_local_features_file_is_extracted_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    data = io.BytesIO()
    package(3).save(data, format="PNG")
    sha = hashlib.sha256(data.getvalue()).hexdigest()
    blob = Path("blobs") / sha[:2] / f"{sha}.png"
    (tmp_path / blob).parent.mkdir(parents=True)
    (tmp_path / blob).write_bytes(data.getvalue())
    image = ImageRow(1, 1, "p3.png", str(blob), sha, 300, 400, "")
    config = VerifyConfig()
    catalog = SimpleNamespace(is_server=False, directory=tmp_path)
    features = CatalogFeatures(catalog, config).of(image)  # type: ignore[arg-type]
    cached = LOCAL_FEATURES.file(tmp_path, config.long_side, sha, str(config.max_features))
    saved = cached.read_bytes()
    broken = {"empty": b"", "torn": saved[: len(saved) // 2], "one array": b""}[damage]
    if damage == "one array":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3))
        broken = buffer.getvalue()
    cached.write_bytes(broken)
    with caplog.at_level(logging.WARNING, logger="snapshop.verify"):
        again = CatalogFeatures(catalog, config).of(image)  # type: ignore[arg-type]
    assert "unreadable local features" in caplog.text
    assert np.array_equal(again.raw, features.raw) and cached.read_bytes() == saved
    assert len(extract(package(3), config)) == len(features)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2.5),
        ("max_features", 300.5),
        ("weight", "0.1"),
        ("ratio", "0.8"),
        ("ransac_px", math.inf),
    ],
)
def test_verify_settings_no_search_can_use_are_config_errors(field: str, value: object) -> None:
    # before: accepted, then every verified search failed (a slice, OpenCV) or matched anything
    with pytest.raises(ConfigError, match=field):
        VerifyConfig(**{field: value})
    assert VerifyConfig(top_k=np.int64(3), long_side=np.int32(300)).top_k == 3


def test_evaluate_detector_counts_one_image_spelt_two_ways_once(tmp_path: Path) -> None:
    """`a.jpg` and `./a.jpg` in boxes.csv were two images: one scored with the upper box only,
    the other with the lower box only."""
    from snapshop.evaluate.detection import load_ground_truth

    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "path,group,x1,y1,x2,y2\n"
        "a.jpg,upper,0,0,10,10\n"
        "./a.jpg,lower,0,10,10,20\n"
        "sub/../b.jpg,upper,1,1,5,5\n",
        encoding="utf-8",
    )
    truth = load_ground_truth(boxes)
    assert sorted(truth) == ["a.jpg", "b.jpg"]
    assert sorted(truth["a.jpg"]) == ["lower", "upper"]


def test_street2shop_photos_with_one_id_and_two_suffixes_are_refused(tmp_path: Path) -> None:
    """`1.jpg` and `1.png` in the photo folder: one of them was taken, whichever the folder
    listed last."""
    root = street2shop(tmp_path / "s2s", [{"photo": 1, "product": 7}])
    Image.new("RGB", (8, 8)).save(root / "images" / "1.png")  # beside 1.jpg
    with pytest.raises(ManifestError, match=r"two photos named '1' \(1.jpg, 1.png\)"):
        read_street2shop(root)
