"""Dataset readers (fixtures in each real format) and the reference protocol."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from script_helpers import load_script

from snapshop.data.manifest import ManifestRow, read_manifest
from snapshop.data.protocol import ProtocolConfig, prepare, split_products
from snapshop.data.readers import (
    detect_format,
    read_catalog,
    read_dataset,
    read_folder_tree,
    read_inshop,
    read_manifest_csv,
    read_street2shop,
)
from snapshop.errors import ConfigError, ManifestError


def _image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_inshop_reader_parses_partition_file(tmp_path: Path) -> None:
    names = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
        ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
    ]
    lines = ["4", "image_name item_id evaluation_status"]
    lines += [f"{n}  {i}  {s}" for n, i, s in names]  # the real file pads with spaces
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    rows = read_inshop(tmp_path)
    assert [r.sku for r in rows] == [i for _, i, _ in names]
    assert [r.role for r in rows] == ["gallery", "gallery", "query", "gallery"]
    assert rows[2].path == tmp_path / names[2][0]
    assert rows[0].extra == {"source": "inshop", "eval_status": "train"}
    assert detect_format(tmp_path) == "inshop"
    assert read_dataset(tmp_path / "Eval" / "list_eval_partition.txt") == rows


def test_inshop_reader_rejects_missing_header(tmp_path: Path) -> None:
    (tmp_path / "list_eval_partition.txt").write_text("1\nimg/a.jpg id_1 train\n")
    with pytest.raises(ManifestError, match="header"):
        read_inshop(tmp_path)


def test_street2shop_reader_maps_photos_and_boxes(tmp_path: Path) -> None:
    meta = tmp_path / "meta" / "json"
    meta.mkdir(parents=True)
    for photo in (11, 12, 21, 31):
        _image(tmp_path / "images" / f"{photo}.jpg")
    retrieval = [
        {"photo": 11, "product": 5},
        {"photo": 12, "product": 6},
        {"photo": 99, "product": 6},
    ]  # photo 99 was never downloaded
    (meta / "retrieval_dresses.json").write_text(json.dumps(retrieval))
    pair = {"photo": 21, "product": 5, "bbox": {"width": 50, "top": 10, "height": 80, "left": 4}}
    (meta / "train_pairs_dresses.json").write_text(json.dumps([pair]))
    (meta / "test_pairs_dresses.json").write_text(
        json.dumps(
            [{"photo": 31, "product": 6, "bbox": {"width": 5, "top": 1, "height": 6, "left": 2}}]
        )
    )
    rows = read_street2shop(tmp_path)
    by_path = {r.path.name: r for r in rows}
    assert set(by_path) == {"11.jpg", "12.jpg", "21.jpg", "31.jpg"}
    assert by_path["11.jpg"].role == "gallery" and by_path["11.jpg"].sku == "dresses/5"
    street = by_path["21.jpg"]
    assert street.role == "query" and street.sku == "dresses/5"
    assert street.extra["bbox"] == "4,10,54,90" and street.extra["pair_split"] == "train"
    assert by_path["31.jpg"].extra["pair_split"] == "test"
    assert detect_format(tmp_path) == "street2shop"


def test_street2shop_reader_rejects_bad_bbox(tmp_path: Path) -> None:
    meta = tmp_path / "meta" / "json"
    meta.mkdir(parents=True)
    _image(tmp_path / "images" / "1.jpg")
    (meta / "retrieval_bags.json").write_text(json.dumps([{"photo": 1, "product": 2}]))
    (meta / "test_pairs_bags.json").write_text(json.dumps([{"photo": 1, "product": 2}]))
    with pytest.raises(ManifestError, match="bbox"):
        read_street2shop(tmp_path)


def test_csv_and_folder_readers(tmp_path: Path) -> None:
    _image(tmp_path / "shop" / "sku-1" / "a.jpg")
    _image(tmp_path / "shop" / "sku-1" / "nested" / "b.png")
    _image(tmp_path / "shop" / "sku-2" / "c.jpg")
    (tmp_path / "shop" / "sku-2" / "notes.txt").write_text("not an image")
    rows = read_folder_tree(tmp_path / "shop")
    assert Counter(r.sku for r in rows) == {"sku-1": 2, "sku-2": 1}
    assert all(r.role == "gallery" for r in rows)

    csv_path = tmp_path / "m.csv"
    csv_path.write_text(
        "image_path,product_id,role,colour\nshop/sku-1/a.jpg,sku-1,query,red\n"
        "shop/sku-2/c.jpg,sku-2,,blue\n"
    )
    rows = read_manifest_csv(csv_path)
    assert [(r.sku, r.role, r.extra["colour"]) for r in rows] == [
        ("sku-1", "query", "red"),
        ("sku-2", "gallery", "blue"),
    ]
    assert rows[0].path == tmp_path / "shop" / "sku-1" / "a.jpg"
    csv_path.write_text("path,product_id,role\na.jpg,sku-1,probe\n")
    with pytest.raises(ManifestError, match="role"):
        read_manifest_csv(csv_path)
    assert [r.sku for r in read_dataset(f"folder:{tmp_path / 'shop'}")][:1] == ["sku-1"]


@pytest.mark.slow
def test_catalog_reader_lists_stored_images(tmp_path: Path, lite0_model_dir: Path) -> None:
    from snapshop import api

    src = tmp_path / "shop"
    _image(src / "sku-a" / "1.jpg", (200, 20, 20))
    _image(src / "sku-a" / "2.jpg", (190, 30, 20))
    _image(src / "sku-b" / "1.jpg", (20, 20, 200))
    api.index_source(src, tmp_path / "cat", model=str(lite0_model_dir), detector="none")
    rows = read_catalog(tmp_path / "cat")
    assert Counter(r.sku for r in rows) == {"sku-a": 2, "sku-b": 1}
    assert all(r.path.is_file() for r in rows)
    assert detect_format(tmp_path / "cat") == "catalog"


def _rows(n_products: int, per_product: int | list[int]) -> list[ManifestRow]:
    counts = per_product if isinstance(per_product, list) else [per_product] * n_products
    return [
        ManifestRow(Path(f"/data/p{p}/{i}.jpg"), f"p{p:02d}", "gallery", {"split": "dev"})
        for p in range(n_products)
        for i in range(counts[p])
    ]


def test_protocol_split_is_product_disjoint_and_reproducible() -> None:
    rows = _rows(30, 6)
    a, counts = split_products(rows, ProtocolConfig(seed=3))
    b, _ = split_products(rows, ProtocolConfig(seed=3))
    c, _ = split_products(rows, ProtocolConfig(seed=4))
    assert [(r.path, r.role, r.extra["split"]) for r in a] == [
        (r.path, r.role, r.extra["split"]) for r in b
    ]
    train = {r.sku for r in a if r.extra["split"] == "train"}
    test = {r.sku for r in a if r.extra["split"] == "test"}
    assert train and test and not train & test
    assert len(test) == 6  # 20 % of 30 products
    assert test != {r.sku for r in c if r.extra["split"] == "test"}
    for product in test:
        roles = {r.role for r in a if r.sku == product}
        assert roles == {"query", "gallery"}
    assert all(r.extra["source_split"] == "dev" for r in a)
    assert counts.products["test"] == 6 and counts.images["train"] == 24 * 6
    assert counts.images["test/query"] + counts.images["test/gallery"] == 36


def test_protocol_folds_hold_every_product_out_exactly_once() -> None:
    rows = _rows(31, 4)
    held_out = []
    for fold in range(3):
        out, counts = split_products(rows, ProtocolConfig(seed=5, folds=3, fold=fold))
        again, _ = split_products(rows, ProtocolConfig(seed=5, folds=3, fold=fold))
        assert [(r.path, r.role) for r in out] == [(r.path, r.role) for r in again]
        test = {r.sku for r in out if r.extra["split"] == "test"}
        train = {r.sku for r in out if r.extra["split"] == "train"}
        assert not test & train and len(test | train) == 31
        assert counts.products["test"] == len(test) in (10, 11)
        held_out.append(test)
    assert set().union(*held_out) == {f"p{p:02d}" for p in range(31)}
    assert sum(len(t) for t in held_out) == 31  # disjoint: each product once
    other_seed, _ = split_products(rows, ProtocolConfig(seed=6, folds=3, fold=0))
    assert {r.sku for r in other_seed if r.extra["split"] == "test"} != held_out[0]
    for bad in ({"folds": 1}, {"folds": 3, "fold": 3}, {"folds": 0, "fold": 1}, {"folds": -2}):
        with pytest.raises(ConfigError):
            ProtocolConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least as many products"):
        split_products(_rows(3, 2), ProtocolConfig(folds=4, fold=0))


def test_protocol_filters_by_image_count_and_keeps_roles() -> None:
    rows = _rows(5, [1, 2, 30, 31, 5])
    out, counts = split_products(rows, ProtocolConfig(test_fraction=0.5, seed=0))
    assert {r.sku for r in out} == {"p01", "p02", "p04"}
    assert counts.dropped_products == 2
    out, _ = split_products(rows, ProtocolConfig(test_fraction=0.5, max_images=0, keep_roles=True))
    assert {r.sku for r in out} == {"p01", "p02", "p03", "p04"}
    assert all(r.role == "gallery" for r in out)
    with pytest.raises(ConfigError):
        split_products(_rows(1, 3))
    with pytest.raises(ConfigError):
        ProtocolConfig(test_fraction=1.0)


def test_prepare_writes_a_manifest_with_split_column(tmp_path: Path) -> None:
    for p in range(6):
        for i in range(3):
            _image(tmp_path / "shop" / f"sku-{p}" / f"{i}.jpg", (40 * p, 10 * i, 90))
    rows, _ = prepare([tmp_path / "shop"], tmp_path / "out" / "split.csv", ProtocolConfig(seed=1))
    back = read_manifest(tmp_path / "out" / "split.csv")
    assert [(r.path.resolve(), r.sku, r.role, r.extra["split"]) for r in back] == [
        (r.path.resolve(), r.sku, r.role, r.extra["split"]) for r in rows
    ]
    assert all(r.path.is_file() for r in back)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"path,product_id\na.jpg,p1\n", "role"),
        (b"path,product_id,role\na.jpg,p1,query,extra\n", "more fields"),
        (b"path,product_id,role\n\xff\xfe\x00bad\n", "UTF-8"),
        (b"path,product_id,role\n", "no rows"),
        (b"path,product_id,role\n,p1,query\n", "empty path"),
        (b'path,product_id,role\n"a.jpg,p1,query\nb.jpg,p2,gallery\n', r"bad\.csv:2: malformed"),
        (b"path,product_id,role,product_id\na.jpg,p1,query,p2\n", "more than once"),
    ],
)
def test_read_manifest_rejects_bad_csv(tmp_path: Path, content: bytes, message: str) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(csv_path)


def test_pack_manifest_copies_selected_rows_with_relative_paths(tmp_path: Path) -> None:
    """scripts/pack_manifest.py: the data of a run on another machine (re-encoded, long side
    capped, paths relative to the new folder, filters applied, unreadable files skipped)."""

    from PIL import Image

    from snapshop.data.manifest import read_manifest

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (400, 200), (200, 30, 30)).save(src / "a.png")
    Image.new("RGB", (100, 300), (30, 200, 30)).save(src / "b.jpg")
    (src / "broken.jpg").write_bytes(b"not an image")
    (src / "m.csv").write_text(
        "path,product_id,role,split\na.png,p1,query,train\nb.jpg,p2,gallery,train\n"
        "broken.jpg,p2,gallery,train\nb.jpg,p3,gallery,test\n"
    )
    module = load_script("scripts/pack_manifest.py")
    out = tmp_path / "packed"
    assert (
        module.main([str(src / "m.csv"), str(out), "--where", "split=train", "--long-side", "150"])
        == 0
    )
    rows = read_manifest(out / "manifest.csv")
    assert [(r.sku, r.role, r.extra["split"]) for r in rows] == [
        ("p1", "query", "train"),
        ("p2", "gallery", "train"),
    ]
    assert all(r.path.is_relative_to(out) for r in rows)
    assert [Image.open(r.path).size for r in rows] == [(150, 75), (50, 150)]
    (src / "bad.csv").write_text("path,role\na.png,query\n")  # no product_id column
    assert module.main([str(src / "bad.csv"), str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_catalog_csv_packshot_column(tmp_path: Path) -> None:
    from snapshop.data.sources import read_csv_manifest

    csv_path = tmp_path / "catalog.csv"
    csv_path.write_text(
        "product_id,image_path,category,packshot,colour\n"
        "a,a1.jpg,Tops,1,red\na,a2.jpg,Tops,,red\nb,b1.jpg,Jeans,Yes,blue\n"
        "b,b2.jpg,Jeans,false,blue\n"
    )
    records = read_csv_manifest(csv_path)
    assert [r.packshot for r in records] == [True, False, True, False]
    assert records[0].metadata == {"category": "Tops", "attributes": {"colour": "red"}}
    csv_path.write_text("product_id,image_path,packshot\na,a1.jpg,1\na,a2.jpg,maybe\n")
    with pytest.raises(ManifestError, match=r"catalog.csv:3: packshot: 'maybe'"):
        read_csv_manifest(csv_path)
