"""Product field limits and checks (issue #19): one set, in ``catalog.fields``, at every entry
point (store, CatalogRecord, CSV reader, folder reader, Python API), and reads that survive rows
written before the checks existed."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import write_csv
from test_catalog import add_image, new_catalog

from snapshop.catalog import fields
from snapshop.catalog.catalog import open_catalog
from snapshop.catalog.fields import (
    LIMITS,
    check_attributes,
    check_product_fields,
    check_text,
    json_nesting,
    normalise_sku,
    parse_attributes,
    stored_attributes,
)
from snapshop.data.readers import read_folder_tree
from snapshop.data.sources import CatalogRecord, read_csv_manifest, read_source
from snapshop.errors import CatalogError, ManifestError


def nested(depth: int) -> dict:
    """An attributes object ``depth`` levels deep: {"a": [[...[1]...]]} (the object is 1)."""
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return {"a": value}


def nested_text(depth: int) -> str:
    return '{"a": ' + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "}"


# --- skus ---------------------------------------------------------------------------------------
def test_skus_are_nfc_and_stripped() -> None:
    assert normalise_sku("  Cafe\u0301-1 ") == "Caf\u00e9-1"
    assert normalise_sku("T 1") == "T 1"  # a plain space inside is fine
    assert normalise_sku("T1\u0085") == normalise_sku("\u3000T1\u00a0") == "T1"  # ends: stripped
    assert normalise_sku("商品-1") == "商品-1"


@pytest.mark.parametrize(
    "sku",
    [
        "T1\u200b",
        "T\u202e1",
        "T\u00851",
        "T\u20281",
        "T\u00a01",
        "T1\x1b[31m",
        "p\x007",
        "T\ud8001",
        "T\ue0001",
        "\u200b",
        "   ",
        "",
    ],
)
def test_invisible_control_and_separator_characters_are_refused_in_skus(sku: str) -> None:
    with pytest.raises(CatalogError, match="sku"):
        normalise_sku(sku)


def test_sku_length_and_type() -> None:
    assert normalise_sku("x" * LIMITS.sku) == "x" * LIMITS.sku
    with pytest.raises(CatalogError, match=f"limit {LIMITS.sku}"):
        normalise_sku("x" * (LIMITS.sku + 1))
    with pytest.raises(CatalogError, match="text"):
        normalise_sku(12)  # type: ignore[arg-type]


# --- text fields --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "a\x00b",
        "\x1b[2J\x1b[31mred",
        "tab\there",
        "two\nlines",
        "rtl \u202e gnp.exe",
        "c1 \x9b",
        "\ud800",
        "del\x7f",
    ],
)
@pytest.mark.parametrize("name", fields.TEXT_FIELDS)
def test_control_characters_are_refused_in_every_text_field(name: str, value: str) -> None:
    with pytest.raises(CatalogError, match=name):
        check_product_fields({name: value})


def test_text_limits_and_ordinary_text() -> None:
    assert check_text("title", "Caf\u00e9 \u2014 \U0001f469\u200d\U0001f4bb tee") is not None
    for name in ("title", "currency", "category"):
        limit = getattr(LIMITS, name)
        assert check_text(name, "x" * limit) == "x" * limit
        with pytest.raises(CatalogError, match=f"limit {limit}"):
            check_text(name, "x" * (limit + 1))
    long_url = "https://shop.example/" + "x" * (LIMITS.url - 21)
    assert check_product_fields({"url": long_url})["url"] == long_url
    with pytest.raises(CatalogError, match=f"limit {LIMITS.url}"):
        check_product_fields({"url": long_url + "x"})
    with pytest.raises(CatalogError, match="text"):
        check_product_fields({"title": 5})


@pytest.mark.parametrize("price", [True, "3", float("nan"), float("inf"), -1])
def test_prices_are_finite_non_negative_numbers(price: object) -> None:
    with pytest.raises(CatalogError, match="price"):
        check_product_fields({"price": price})


# --- attributes ---------------------------------------------------------------------------------
def test_attribute_depth_limit() -> None:
    assert check_attributes(nested(LIMITS.attributes_depth))
    for depth in (LIMITS.attributes_depth + 1, 300, 5000):
        with pytest.raises(CatalogError, match="nested deeper"):
            check_attributes(nested(depth))
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(CatalogError, match="nested deeper"):
        check_attributes(loop)


def test_attribute_size_limit_counts_compact_json() -> None:
    room = LIMITS.attributes_chars - len('{"k":""}')
    assert check_attributes({"k": "x" * room})
    with pytest.raises(CatalogError, match=f"limit {LIMITS.attributes_chars}"):
        check_attributes({"k": "x" * (room + 1)})


@pytest.mark.parametrize(
    "value",
    [
        {"n": float("nan")},
        {"n": float("inf")},
        {"n": 2**64},
        {"n": -(2**63) - 1},
        {1: "a"},
        {"s": "\udc80"},
        {"\ud800": 1},
        {"s": {1, 2}},
        {"b": b"x"},
    ],
)
def test_attributes_are_plain_json(value: dict) -> None:
    with pytest.raises(CatalogError, match="plain JSON"):
        check_attributes(value)


def test_json_nesting_ignores_brackets_in_strings() -> None:
    assert json_nesting(nested_text(7)) == 7
    assert json_nesting('{"a": "[[[[{{{\\"[["}') == 1
    assert json_nesting("[]" * 50) == 1


def test_parse_attributes_refuses_what_json_cannot_parse_safely() -> None:
    assert parse_attributes('{"colour": "red", "sizes": [38, 40]}')["sizes"] == [38, 40]
    assert parse_attributes('{"note": "' + "[" * 300 + '"}')  # brackets in a string are text
    cases = {
        nested_text(5000): "nested deeper",  # json.loads: RecursionError
        nested_text(300): "nested deeper",
        '{"n": ' + "9" * 4400 + "}": "not valid JSON",  # json.loads: int-digits ValueError
        '{"n": ' + "9" * 30 + "}": "64 bits",
        '{"n": NaN}': "plain JSON",
        "[1, 2]": "JSON object",
        "{oops": "not valid JSON",
        '{"k": "' + "x" * LIMITS.attributes_chars + '"}': f"limit {LIMITS.attributes_chars}",
    }
    for text, message in cases.items():
        with pytest.raises(CatalogError, match=message):
            parse_attributes(text)


def test_stored_attributes_that_cannot_be_served_read_as_empty_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="snapshop.catalog.fields")
    fields._warned.clear()
    deep = json.dumps(nested(300))
    for text in (deep, nested_text(5000), "{oops", "[1]", '{"s": "\\ud800"}'):
        assert stored_attributes(text, 7) == {}
    assert len(caplog.records) == 1 and "product 7" in caplog.text  # once per product
    big = {"k": "x" * (2 * LIMITS.attributes_chars)}  # over today's size limit, yet safe to serve
    assert stored_attributes(json.dumps(big), 8) == big
    assert stored_attributes("", 9) == {} and stored_attributes(None, 9) == {}


# --- the store ----------------------------------------------------------------------------------
def _write_raw(catalog_dir: Path, sku: str, **columns: object) -> None:
    """Change a product row the way an older snapshop version could have written it."""
    db = sqlite3.connect(catalog_dir / "catalog.sqlite")
    try:
        sets = ", ".join(f"{k} = ?" for k in columns)
        db.execute(f"UPDATE products SET {sets} WHERE sku = ?", (*columns.values(), sku))
        db.commit()
    finally:
        db.close()


def test_rows_written_by_older_versions_do_not_break_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    catalog = new_catalog(tmp_path / "cat")
    try:
        for sku in ("p0", "p1", "p2"):
            add_image(catalog, sku, rng)
    finally:
        catalog.close()
    _write_raw(tmp_path / "cat", "p1", attributes=json.dumps(nested(300)), title="x\x1b[2Jy")
    catalog = open_catalog(tmp_path / "cat")
    try:
        store = catalog.store
        bad = store.find_product("p1")
        assert bad is not None and bad.attributes == {} and bad.title == "x\x1b[2Jy"
        assert [p.sku for p in store.list_products()] == ["p0", "p1", "p2"]
        assert store.products_by_ids([bad.id])[bad.id].attributes == {}
        assert store.update_product(bad.id, price=3.0).price == 3.0  # other fields: writable
        assert store.update_product(bad.id, attributes={"fit": "slim"}).attributes == {
            "fit": "slim"
        }  # the unreadable value is replaced, not merged
    finally:
        catalog.close()


def test_store_refuses_bad_fields_and_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    catalog = new_catalog(tmp_path / "cat")
    try:
        add_image(catalog, "T1", rng)
        store = catalog.store
        product = store.find_product("T1")
        assert product is not None
        generation = store.generation
        bad_updates = [
            {"attributes": nested(300)},
            {"attributes": {"blob": "x" * (LIMITS.attributes_chars + 1)}},  # PATCH had no cap
            {"title": "\x1b]0;pwned\x07"},
            {"title": "x" * (LIMITS.title + 1)},
            {"category": "tops\x00"},
            {"currency": "EUR\u202e"},
            {"price": True},
        ]
        for update in bad_updates:
            with pytest.raises(CatalogError):
                store.update_product(product.id, **update)
        for sku in ("T1\u200b", "x" * 100_000, "T\u00851"):
            with pytest.raises(CatalogError, match="sku"), store.transaction() as db:
                store.upsert_product(db, sku, title="twin")
        assert store.generation == generation  # nothing committed
        assert store.get_product(product.id) == product
        # the merge of two acceptable halves is checked too
        half = LIMITS.attributes_chars // 2
        store.update_product(product.id, attributes={"a": "x" * half})
        with pytest.raises(CatalogError, match="limit"):
            store.update_product(product.id, attributes={"b": "x" * half})
        assert set(store.get_product(product.id).attributes) == {"a"}
    finally:
        catalog.close()


def test_one_product_per_normalised_sku(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    catalog = new_catalog(tmp_path / "cat")
    try:
        add_image(catalog, "Cafe\u0301", rng)  # decomposed é
        add_image(catalog, "Caf\u00e9", rng)  # composed é: the same product
        assert catalog.store.counts()["products"] == 1
        assert catalog.store.find_product("Cafe\u0301").sku == "Caf\u00e9"  # type: ignore[union-attr]
        assert catalog.store.find_product("Caf\u00e9\u200b") is None
    finally:
        catalog.close()


# --- records, CSV and folder sources ------------------------------------------------------------
def test_catalog_records_are_checked_when_built() -> None:
    record = CatalogRecord("Cafe\u0301 ", Path("a.jpg"), {"title": "Tee", "price": 3})
    assert record.sku == "Caf\u00e9" and record.metadata["price"] == 3.0
    for sku, meta in [
        ("T1\u200b", {}),
        ("T1", {"title": "a\x1bb"}),
        ("T1", {"colour": "red"}),
        ("T1", {"attributes": nested(300)}),
    ]:
        with pytest.raises(CatalogError):
            CatalogRecord(sku, Path("a.jpg"), meta)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["x" * 100_000, "a.jpg", "t"], "sku"),
        (["p1", "a.jpg", "x" * 100_000], "title"),
        (["p1", "a.jpg", "red\x1b[31m"], "title"),
        (["p1\u200b", "a.jpg", "t"], "U\\+200B"),
        (["p1", "a.jpg", "t", "x" * (LIMITS.attributes_chars + 1)], "attributes"),
    ],
)
def test_csv_rows_are_checked_with_the_same_limits(
    tmp_path: Path, row: list[str], message: str
) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    row = row + [""] * (4 - len(row))
    path = write_csv(
        tmp_path / "m.csv",
        [["ok", "a.jpg", "fine", ""], row],
        header=["product_id", "image_path", "title", "notes"],
    )
    with pytest.raises(ManifestError, match=f"m\\.csv:3: .*{message}"):
        read_csv_manifest(path)


def test_csv_skus_are_normalised(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "m.csv",
        [["Cafe\u0301", "a.jpg"], ["Caf\u00e9", "b.jpg"]],
        header=["product_id", "image_path"],
    )
    assert {r.sku for r in read_csv_manifest(path)} == {"Caf\u00e9"}


def test_folder_names_are_skus_and_checked(tmp_path: Path) -> None:
    (tmp_path / "shop" / "Cafe\u0301").mkdir(parents=True)
    (tmp_path / "shop" / "Cafe\u0301" / "a.jpg").write_bytes(b"x")
    assert [r.sku for r in read_source(tmp_path / "shop")] == ["Caf\u00e9"]
    assert [r.sku for r in read_folder_tree(tmp_path / "shop")] == ["Caf\u00e9"]
    (tmp_path / "shop" / "T1\u200b").mkdir()
    (tmp_path / "shop" / "T1\u200b" / "a.jpg").write_bytes(b"x")
    for read in (read_source, read_folder_tree):  # a bad input, as a bad CSV row is
        with pytest.raises(ManifestError, match="U\\+200B"):
            read(tmp_path / "shop")
