"""Text of product fields at the edges: form fields that are not UTF-8, values that show nothing
(whitespace, invisible characters) and the headers of an unexpected 500."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from catalog_helpers import write_csv
from fastapi.testclient import TestClient
from service_fixtures import API_KEY, jpeg_bytes, small_catalog

from snapshop.catalog.fields import TEXT_FIELDS, check_text, is_blank, normalise_sku
from snapshop.data.sources import CatalogRecord, read_csv_manifest
from snapshop.errors import FieldError
from snapshop.service import ServiceSettings, create_app

AUTH = {"X-API-Key": API_KEY}
# Each shows nothing: spaces, zero-width and BOM characters, a lone accent, a Hangul filler.
BLANK = ["", "   ", "\u00a0\u3000", "\u200b", "\u2060", "\ufeff", " \u200b\u200d ", "\u0301",
         "\ufe0f", "\u3164"]  # fmt: skip
# Ordinary text that holds invisible characters inside: an emoji ZWJ sequence, Arabic, a
# right-to-left mark before Hebrew, a Devanagari conjunct with a joiner, a keycap.
VISIBLE = ["👩\u200d💻", "مرحبا بالعالم", "\u200fשלום", "क्\u200dष", "1\ufe0f\u20e3", "Café"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    app = create_app(ServiceSettings(small_catalog(tmp_path_factory.mktemp("field-text")),
                                     api_key=API_KEY))  # fmt: skip
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def multipart(
    fields: list[tuple[str, bytes]], image: bytes, image_field: str = "images"
) -> tuple[bytes, dict[str, str]]:
    """A multipart body built by hand, so a field can hold bytes no client library would
    send; returns (body, headers)."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                 .encode() + value + b"\r\n")  # fmt: skip
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{image_field}";'
             ' filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n').encode()  # fmt: skip
    body += image + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}


def skus(client: TestClient) -> set[str]:
    items = client.get("/v1/products", params={"limit": 100}).json()["items"]
    return {item["sku"] for item in items}


# --- 1: form fields must be UTF-8 --------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ([("sku", b"utf8-title"), ("title", b"Caf\xe9")], "title"),
        ([("sku", b"utf8-category"), ("category", b"\xff\xfe")], "category"),
        ([("sku", b"utf8-sku-\xe9")], "sku"),
    ],
)
def test_a_form_field_that_is_not_utf8_is_a_400_naming_it(client, fields, named):
    before = skus(client)
    body, headers = multipart(fields, jpeg_bytes())
    r = client.post("/v1/products", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json() == {"code": "bad_request", "detail": f"{named} is not valid UTF-8"}
    assert skus(client) == before  # nothing written


@pytest.mark.parametrize("path", ["/v1/search", "/v1/search/crop"])
def test_a_search_filter_that_is_not_utf8_is_a_400(client, path):
    """The category filter read b"Caf\xe9" as Latin-1 "Café", a filter matching nothing."""
    box = [(name, b"8") for name in ("x1", "y1")] + [(name, b"40") for name in ("x2", "y2")]
    fields = [("category", b"Caf\xe9"), *(box if path.endswith("crop") else [])]
    body, headers = multipart(fields, jpeg_bytes(), image_field="image")
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json() == {"code": "bad_request", "detail": "category is not valid UTF-8"}
    fields[0] = ("category", "Café".encode())
    body, headers = multipart(fields, jpeg_bytes(), image_field="image")
    assert client.post(path, content=body, headers=headers).status_code == 200


def test_a_hand_built_utf8_form_is_stored_as_sent(client):
    body, headers = multipart([("sku", b"utf8-ok"), ("title", "Café 👩‍💻".encode())],
                              jpeg_bytes())  # fmt: skip
    r = client.post("/v1/products", content=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["product"]["title"] == "Café 👩‍💻"


# --- 2: blank text is empty text ---------------------------------------------------------------
@pytest.mark.parametrize("value", BLANK)
def test_blank_text_reads_as_empty_and_a_blank_sku_is_refused(value):
    assert is_blank(value)
    for name in TEXT_FIELDS:
        assert check_text(name, value) == ""
    with pytest.raises(FieldError, match="blank"):
        normalise_sku(value)
    record = CatalogRecord("blank-1", Path("a.jpg"), {"title": value, "category": value})
    assert record.metadata == {"title": "", "category": ""}


@pytest.mark.parametrize("value", VISIBLE)
def test_text_with_invisible_characters_inside_is_kept(value):
    assert not is_blank(value)
    assert check_text("title", value) == value
    try:
        normalise_sku(value)
    except FieldError as exc:  # skus refuse invisible characters, but not as blank
        assert "blank" not in str(exc)


def test_csv_reads_a_blank_cell_as_an_empty_one(tmp_path: Path):
    path = write_csv(tmp_path / "m.csv", [["p1", "a.jpg", "\u200b\u2060", "\ufeff"]],
                     header=["product_id", "image_path", "title", "currency"])  # fmt: skip
    (record,) = read_csv_manifest(path)
    # as an empty cell: not sent, so a re-ingest keeps what the catalog holds
    assert "title" not in record.metadata and "currency" not in record.metadata


def test_the_service_treats_blank_text_as_empty(client):
    image = [("images", ("a.jpg", jpeg_bytes(), "image/jpeg"))]
    # the form: a blank field is one not sent (the title defaults to the sku)
    form = {"sku": "blank-form", "title": " \u200b ", "category": "\ufeff", "currency": "\u0301"}
    r = client.post("/v1/products", data=form, files=image, headers=AUTH)
    assert r.status_code == 201, r.text
    product = r.json()["product"]
    assert [product[k] for k in ("title", "category", "currency")] == ["blank-form", None, None]
    # a blank sku is refused like an empty one
    r = client.post("/v1/products", data={"sku": "\u200b\u0301"}, files=image, headers=AUTH)
    assert r.status_code == 400 and "blank" in r.json()["detail"], r.text
    # JSON: a blank title is stored as "" (the page then shows the sku), as "" itself is
    r = client.patch(f"/v1/products/{product['id']}", json={"title": "\u2060 "}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["title"] == ""


# --- 3: the catch-all 500 says nosniff too -----------------------------------------------------
def test_an_unexpected_500_says_nosniff(client, monkeypatch: pytest.MonkeyPatch):
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unexpected")

    product_id = client.get("/v1/products", params={"limit": 1}).json()["items"][0]["id"]
    monkeypatch.setattr("snapshop.service.routes.products.product_out", boom)
    r = client.get(f"/v1/products/{product_id}")
    assert r.status_code == 500
    assert r.json()["code"] == "internal"
    assert r.headers.get("x-content-type-options") == "nosniff"
