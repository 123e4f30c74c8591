"""REST API of the service (issue #5), driven through FastAPI's TestClient.

One small generated catalog (Lite0 + a deterministic two-box detector) serves every test;
tests that write use their own skus, so they do not depend on each other's order.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_fixtures import API_KEY, FixedGarmentDetector, build_catalog, jpeg_bytes

from snapshop.errors import ConfigError
from snapshop.service import ServiceSettings, create_app
from snapshop.service.app import decode_cursor, encode_cursor
from snapshop.service.errors import ApiError
from snapshop.service.state import ReadWriteLock, ServiceState
from snapshop.service.thumbs import snap_size

MAX_UPLOAD = 300_000
MAX_PIXELS = 4_000_000
AUTH = {"X-API-Key": API_KEY}


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize(size).save(buf, format="PNG")
    return buf.getvalue()


TRUNCATED_PNG = _png((200, 150))[:400]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Path, str]]]:
    return build_catalog(tmp_path_factory.mktemp("service-api"), n_products=10)


@pytest.fixture(scope="module")
def settings(catalog) -> ServiceSettings:
    return ServiceSettings(
        catalog[0],
        api_key=API_KEY,
        max_upload_bytes=MAX_UPLOAD,
        max_pixels=MAX_PIXELS,
        max_images_per_product=4,
    )


@pytest.fixture(scope="module")
def client(settings):
    app = create_app(settings, detector=FixedGarmentDetector())
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def readonly_client(catalog):
    app = create_app(ServiceSettings(catalog[0]), detector=FixedGarmentDetector())
    with TestClient(app) as c:
        yield c


def upload(data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg") -> dict:
    return {"image": (name, data, ctype)}


def query(catalog, n: int = 0) -> tuple[bytes, str]:
    path, sku = catalog[1][n]
    return path.read_bytes(), sku


def noise_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=95
    )
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def all_products(client, **params) -> list[dict]:
    items, cursor = [], None
    for _ in range(1000):
        page = client.get(
            "/v1/products", params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination never ended")


# --- service basics -------------------------------------------------------------------------
def test_health_stats_docs_and_page(client, catalog):
    health = client.get("/healthz").json()
    stats = client.get("/v1/stats").json()
    assert health["status"] == "ok" and health["products"] == stats["products"] > 0
    assert stats["images"] == health["images"] > 0
    # the detector boxes upper and lower on every image; the demo products' categories name
    # one position each, and only that crop is kept ("bag" has no position)
    assert stats["crops"] == stats["images"]
    assert set(stats["indexes"]) == {"images", "crops-upper", "crops-lower"}
    assert stats["index_kind"] == "flat" and stats["dim"] == stats["model_card"]["output_dim"]
    assert stats["model_card"]["backbone"] and stats["model_id"].startswith(
        stats["model_card"]["name"]
    )
    assert stats["detector"] == FixedGarmentDetector.name
    assert stats["limits"]["writes_enabled"] is True
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/search",
        "/v1/search/crop",
        "/v1/products",
        "/v1/products/{product_id}",
        "/v1/images/{image_id}",
        "/v1/images/{image_id}/thumb",
        "/v1/stats",
        "/healthz",
    ):
        assert path in schema["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()  # works on closed networks
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ("Similar images", "Similar items", 'capture="environment"', "aria-live"):
        assert needle in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200
    missing = client.get("/static/..%2Fapp.py")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    unknown = client.get("/v1/nothing")
    assert unknown.status_code == 404 and "detail" in unknown.json()


# --- search ---------------------------------------------------------------------------------
def test_search_returns_images_items_and_timings(client, catalog):
    data, sku = query(catalog)
    r = client.post("/v1/search", files=upload(data), data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    w, h = Image.open(io.BytesIO(data)).size
    assert body["query_size"] == [w, h]
    assert [d["label"] for d in body["detections"]] == ["short_sleeve_top", "trousers", "bag"]
    assert body["detections"][0]["box"] == pytest.approx(
        [0.1 * w, 0.05 * h, 0.9 * w, 0.55 * h], abs=0.01
    )
    assert len(body["image_results"]) == 3
    assert sku in [hit["sku"] for hit in body["image_results"]]
    scores = [hit["score"] for hit in body["image_results"]]
    assert scores == sorted(scores, reverse=True)
    hit = body["image_results"][0]
    for key in ("product_id", "title", "price", "currency", "url", "image_id", "thumbnail_url"):
        assert hit[key] is not None, key
    assert hit["thumbnail_url"].startswith(f"/v1/images/{hit['image_id']}/thumb")
    items = {r["position"]: r for r in body["item_results"]}
    assert set(items) == {"upper", "lower"}
    for item in items.values():
        assert 1 <= len(item["results"]) <= 3
        assert all(
            res["crop_id"] is not None and len(res["crop_box"]) == 4 for res in item["results"]
        )
    assert {"decode", "embed", "search", "total", "request"} <= set(body["timings_ms"])


def test_search_position_filters_and_k(client, catalog):
    data, _ = query(catalog, 1)
    only_upper = client.post("/v1/search", files=upload(data), data={"position": "upper"}).json()
    assert [r["position"] for r in only_upper["item_results"]] == ["upper"]
    no_detect = client.post("/v1/search", files=upload(data), data={"detect": "false"}).json()
    assert no_detect["detections"] == [] and no_detect["item_results"] == []

    stats = client.get("/v1/stats").json()
    everything = client.post("/v1/search", files=upload(data), data={"k": "100"}).json()
    assert len(everything["image_results"]) == stats["products"]
    prices = sorted(h["price"] for h in everything["image_results"])
    lo, hi = prices[2], prices[-3]
    cat = everything["image_results"][0]["category"]
    r = client.post(
        "/v1/search",
        files=upload(data),
        data={"k": "100", "min_price": str(lo), "max_price": str(hi), "category": cat},
    )
    assert r.status_code == 200
    hits = r.json()["image_results"] + [h for i in r.json()["item_results"] for h in i["results"]]
    assert hits and all(lo <= h["price"] <= hi and h["category"] == cat for h in hits)
    expected = {
        h["sku"]
        for h in everything["image_results"]
        if lo <= h["price"] <= hi and h["category"] == cat
    }
    assert {h["sku"] for h in r.json()["image_results"]} == expected

    for bad, code in [
        ({"k": "0"}, 422),
        ({"k": "101"}, 422),
        ({"k": "many"}, 422),
        ({"position": "middle"}, 400),
        ({"min_price": "-1"}, 422),
        ({"min_price": "5", "max_price": "1"}, 400),
        ({"min_price": "nan"}, 422),
    ]:
        r = client.post("/v1/search", files=upload(data), data=bad)
        assert r.status_code == code, (bad, r.text)
        assert r.json()["detail"], bad


def test_search_crop(client, catalog):
    data, sku = query(catalog, 2)
    w, h = Image.open(io.BytesIO(data)).size
    box = {"x1": "-20", "y1": str(0.05 * h), "x2": str(w + 50), "y2": str(0.55 * h)}
    r = client.post("/v1/search/crop", files=upload(data), data={**box, "k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_results"] == [] and len(body["item_results"]) == 1
    item = body["item_results"][0]
    assert item["position"] == "box" and item["box"] == pytest.approx([0, 0.05 * h, w, 0.55 * h])
    assert len(item["results"]) == 4
    positioned = client.post(
        "/v1/search/crop", files=upload(data), data={**box, "position": "lower"}
    )
    assert positioned.json()["item_results"][0]["position"] == "lower"
    for bad in (
        {"x1": "50", "y1": "10", "x2": "40", "y2": "90"},  # x2 < x1
        {"x1": "10", "y1": "10", "x2": "14", "y2": "14"},  # under 8x8
        {"x1": str(w + 10), "y1": "0", "x2": str(w + 90), "y2": "50"},
    ):  # outside
        r = client.post("/v1/search/crop", files=upload(data), data=bad)
        assert r.status_code == 400 and "box" in r.json()["detail"], r.text
    assert client.post("/v1/search/crop", files=upload(data), data={"x1": "1"}).status_code == 422


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"", 400, "empty_upload"),
        (TRUNCATED_PNG, 400, "bad_image"),
        (b"This is plain text pretending to be a JPEG\n" * 3, 415, "unsupported_media_type"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 415, "unsupported_media_type"),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
            415,
            "unsupported_media_type",
        ),
        (png_header(3000, 3000), 413, "too_many_pixels"),  # over the service's 4 MP limit
        (png_header(60000, 60000), 413, "too_many_pixels"),  # a header bomb (3.6 G pixels)
    ],
)
def test_bad_uploads_are_clear_4xx(client, payload, status, code):
    for path, form in (
        ("/v1/search", {}),
        ("/v1/search/crop", {"x1": 0, "y1": 0, "x2": 9, "y2": 9}),
    ):
        r = client.post(path, files=upload(payload), data=form)
        assert r.status_code == status, (path, r.text)
        assert r.json()["code"] == code and len(r.json()["detail"]) > 10


def test_truncated_jpeg_and_type_from_content(client, catalog):
    data, _ = query(catalog)
    r = client.post("/v1/search", files=upload(data[: len(data) // 2]))
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    # The client's name and content-type do not matter; the bytes do.
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    r = client.post("/v1/search", files=upload(png.getvalue(), "photo.txt", "text/plain"))
    assert r.status_code == 200
    assert (
        client.post("/v1/search", files=upload(data, "x.jpg", "application/json")).status_code
        == 200
    )
    assert client.post("/v1/search", data={"k": "3"}).status_code == 422  # no image at all


def test_upload_size_limits(client):
    big = noise_jpeg((560, 560))
    assert MAX_UPLOAD < len(big) < 2 * MAX_UPLOAD
    r = client.post("/v1/search", files=upload(big))
    assert r.status_code == 413 and str(MAX_UPLOAD) in r.json()["detail"]
    huge_body = b"\xff\xd8" + b"\0" * (MAX_UPLOAD * 4 + 2 * 1024 * 1024)
    r = client.post("/v1/search", files=upload(huge_body))
    assert r.status_code == 413 and "request body" in r.json()["detail"]


# --- products, pagination, images -----------------------------------------------------------
def test_product_pagination(client):
    stats = client.get("/v1/stats").json()
    every = all_products(client, limit=3)
    ids = [p["id"] for p in every]
    assert len(ids) == stats["products"] and ids == sorted(set(ids))
    assert all(p["images"] for p in every)
    first = client.get("/v1/products", params={"limit": 3}).json()
    assert len(first["items"]) == 3 and decode_cursor(first["next_cursor"]) == ids[2]
    whole = client.get("/v1/products", params={"limit": 200}).json()
    assert whole["next_cursor"] is None and [p["id"] for p in whole["items"]] == ids
    category = every[0]["category"]
    in_cat = all_products(client, category=category, limit=2)
    assert in_cat and {p["category"] for p in in_cat} == {category}
    assert len(in_cat) == sum(p["category"] == category for p in every)
    assert client.get("/v1/products", params={"category": "no-such"}).json() == {
        "items": [],
        "next_cursor": None,
    }
    for bad in (
        {"limit": 0},
        {"limit": 201},
        {"cursor": "!!"},
        {"cursor": "cA"},  # decodes to "p": no id
    ):
        r = client.get("/v1/products", params=bad)
        assert r.status_code in (400, 422) and r.json()["detail"], bad


def test_cursor_round_trip():
    for n in (0, 1, 17, 2**40):
        assert decode_cursor(encode_cursor(n)) == n
    with pytest.raises(ApiError):
        decode_cursor("bm9wZQ")  # "nope"


def test_product_and_image_by_id(client, catalog):
    product = client.get("/v1/products", params={"limit": 1}).json()["items"][0]
    got = client.get(f"/v1/products/{product['id']}").json()
    assert got == product
    image = got["images"][0]
    r = client.get(image["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    decoded = Image.open(io.BytesIO(r.content))
    assert decoded.size == (image["width"], image["height"])
    etag = r.headers["etag"]

    thumbs = catalog[0] / "thumbs"
    for asked, expected in [(100, 128), (None, 256), (5000, 512), (1, 64)]:
        t = client.get(
            f"/v1/images/{image['id']}/thumb", params={} if asked is None else {"size": asked}
        )
        assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
        assert t.headers["etag"] == etag
        assert max(Image.open(io.BytesIO(t.content)).size) == min(expected, max(decoded.size))
        cached = list((thumbs / str(expected)).rglob("*.jpg"))
        assert any(p.read_bytes() == t.content for p in cached)
    assert client.get(f"/v1/images/{image['id']}/thumb", params={"size": 0}).status_code == 422

    for path in ("/v1/products/999999", "/v1/images/999999", "/v1/images/999999/thumb"):
        r = client.get(path)
        assert r.status_code == 404 and "999999" in r.json()["detail"]
    for path in ("/v1/products/abc", "/v1/images/..%2F..%2Fcatalog.sqlite", "/v1/images/-1x"):
        assert client.get(path).status_code in (404, 422)


def test_ids_beyond_64_bits_are_404_not_500(client):
    """SQLite integers are 64-bit: a longer id in a path or a cursor names nothing."""
    huge = "9" * 30
    for method, path in [("GET", f"/v1/products/{huge}"), ("GET", f"/v1/images/{huge}"),
                         ("GET", f"/v1/images/{huge}/thumb"), ("DELETE", f"/v1/products/{huge}"),
                         ("PATCH", f"/v1/products/{huge}")]:  # fmt: skip
        r = client.request(method, path, headers=AUTH, json={"title": "x"})
        assert r.status_code == 404 and huge in r.json()["detail"], (method, path, r.text)
    r = client.get("/v1/products", params={"cursor": encode_cursor(int(huge))})
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}


def test_snap_size():
    assert [snap_size(s, (64, 128, 256)) for s in (None, 1, 64, 65, 200, 256, 9999)] == [
        128,
        64,
        64,
        128,
        256,
        256,
        256,
    ]


# --- writes ---------------------------------------------------------------------------------
def test_writes_need_the_api_key(client, readonly_client):
    product_id = client.get("/v1/products", params={"limit": 1}).json()["items"][0]["id"]
    files = [("images", ("a.jpg", jpeg_bytes(), "image/jpeg"))]
    calls = [
        lambda c, h: c.post("/v1/products", data={"sku": "auth-1"}, files=files, headers=h),
        lambda c, h: c.patch(f"/v1/products/{product_id}", json={"title": "x"}, headers=h),
        lambda c, h: c.delete(f"/v1/products/{product_id}", headers=h),
    ]
    for call in calls:
        missing = call(client, {})
        assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
        assert call(client, {"X-API-Key": API_KEY + "x"}).status_code == 403
        assert call(client, {"X-API-Key": ""}).status_code == 401
        disabled = call(readonly_client, AUTH)
        assert disabled.status_code == 403 and "disabled" in disabled.json()["detail"]
    assert client.get(f"/v1/products/{product_id}").json()["title"] != "x"
    assert client.get("/v1/products/999999").status_code == 404  # nothing was created or deleted
    assert all(p["sku"] != "auth-1" for p in all_products(client, limit=200))


def test_add_product_then_find_it_then_delete(client):
    before = client.get("/v1/stats").json()
    photos = [noise_jpeg((120, 160), seed=s) for s in (1, 2)]
    form = {
        "sku": "new-001",
        "title": "Noise tee",
        "price": "0",
        "currency": "EUR",
        "category": "upper",
        "url": "https://shop.example/new-001",
        "attributes": '{"colour": "noise"}',
    }
    files = [("images", (f"p{i}.jpg", b, "image/jpeg")) for i, b in enumerate(photos)]
    r = client.post("/v1/products", data=form, files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["created"] is True and body["added"] == 2 and body["crops"] == 2  # upper only
    product = body["product"]
    assert product["sku"] == "new-001" and product["price"] == 0.0
    assert product["attributes"] == {"colour": "noise"} and len(product["images"]) == 2
    after = client.get("/v1/stats").json()
    assert (after["products"], after["images"], after["crops"]) == (
        before["products"] + 1,
        before["images"] + 2,
        before["crops"] + 2,
    )

    hits = client.post("/v1/search", files=upload(photos[0]), data={"k": "1"}).json()
    assert hits["image_results"][0]["sku"] == "new-001"
    # the score of its product vector (the mean of its two photos), not of the photo alone
    assert 0.9 < hits["image_results"][0]["score"] < 1.0 - 1e-3

    again = client.post("/v1/products", data={"sku": "new-001"}, files=files[:1], headers=AUTH)
    assert again.status_code == 200 and again.json()["created"] is False
    assert (again.json()["added"], again.json()["skipped"]) == (0, 1)
    more = client.post(
        "/v1/products",
        data={"sku": "new-001"},
        headers=AUTH,
        files=[("images", ("p3.jpg", noise_jpeg((90, 90), 3), "image/jpeg"))],
    )
    assert more.json()["added"] == 1 and len(more.json()["product"]["images"]) == 3
    assert more.json()["product"]["title"] == "Noise tee"  # omitted fields kept

    deleted = client.delete(f"/v1/products/{product['id']}", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["images_removed"] == 3
    assert client.get(f"/v1/products/{product['id']}").status_code == 404
    hits = client.post("/v1/search", files=upload(photos[0]), data={"k": "100"}).json()
    assert "new-001" not in {h["sku"] for h in hits["image_results"]}
    assert client.delete(f"/v1/products/{product['id']}", headers=AUTH).status_code == 404
    assert client.get("/v1/stats").json()["images"] == before["images"]


def test_add_product_rejects_bad_input_and_writes_nothing(client):
    before = client.get("/v1/stats").json()
    good = ("images", ("ok.jpg", jpeg_bytes(), "image/jpeg"))
    cases = [
        (
            {"sku": "bad-1"},
            [good, ("images", ("x.jpg", b"not an image at all", "image/jpeg"))],
            415,
        ),
        ({"sku": "bad-2"}, [good, ("images", ("e.jpg", b"", "image/jpeg"))], 400),
        ({"sku": "bad-3", "attributes": "[1, 2]"}, [good], 400),
        ({"sku": "bad-4", "attributes": "{oops"}, [good], 400),
        ({"sku": "bad-5", "price": "-3"}, [good], 422),
        ({"sku": "   "}, [good], 400),
        ({"sku": "bad-6"}, [], 422),
        ({"sku": "bad-7"}, [good] * 5, 413),  # over max_images_per_product
        ({}, [good], 422),
    ]
    for form, files, status in cases:
        r = client.post("/v1/products", data=form, files=files or None, headers=AUTH)
        assert r.status_code == status, (form, r.text)
        assert r.json()["detail"]
    after = client.get("/v1/stats").json()
    assert (after["products"], after["images"]) == (before["products"], before["images"])


def test_patch_product(client):
    product = client.get("/v1/products", params={"limit": 1}).json()["items"][0]
    r = client.patch(
        f"/v1/products/{product['id']}",
        headers=AUTH,
        json={"price": 12.5, "title": "Renamed", "attributes": {"fit": "slim"}},
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched["price"], patched["title"], patched["sku"]) == (12.5, "Renamed", product["sku"])
    assert patched["attributes"]["fit"] == "slim" and patched["category"] == product["category"]
    assert client.get(f"/v1/products/{product['id']}").json()["title"] == "Renamed"
    for body, status in [
        ({}, 400),
        ({"price": -1}, 422),
        ({"colour": "red"}, 422),
        ({"title": "x" * 501}, 422),
        ({"url": "javascript:alert(document.cookie)"}, 400),  # the page links to it
        ({"url": "data:text/html,<script>alert(1)</script>"}, 400),
    ]:
        assert (
            client.patch(f"/v1/products/{product['id']}", json=body, headers=AUTH).status_code
            == status
        )
    r = client.patch("/v1/products/999999", json={"title": "x"}, headers=AUTH)
    assert r.status_code == 404
    bad_json = client.patch(
        f"/v1/products/{product['id']}",
        content=b"{nope",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert bad_json.status_code == 422


def test_concurrent_adds_and_searches(client, catalog):
    before = client.get("/v1/stats").json()
    data, _ = query(catalog, 3)
    errors: list[str] = []
    n_writers, per_writer, n_searchers, per_searcher = 2, 4, 3, 3

    def writer(w: int) -> None:
        for i in range(per_writer):
            files = [
                ("images", ("c.jpg", noise_jpeg((64, 80), seed=100 + 10 * w + i), "image/jpeg"))
            ]
            r = client.post(
                "/v1/products", data={"sku": f"conc-{w}-{i}"}, files=files, headers=AUTH
            )
            if r.status_code != 201:
                errors.append(f"add {w}/{i}: {r.status_code} {r.text}")

    def searcher() -> None:
        for _ in range(per_searcher):
            r = client.post("/v1/search", files=upload(data), data={"k": "5"})
            if r.status_code != 200 or not r.json()["image_results"]:
                errors.append(f"search: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(n_writers)]
    threads += [threading.Thread(target=searcher) for _ in range(n_searchers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    skus = {p["sku"] for p in all_products(client, limit=7)}
    wanted = {f"conc-{w}-{i}" for w in range(n_writers) for i in range(per_writer)}
    assert wanted <= skus
    after = client.get("/v1/stats").json()
    added = n_writers * per_writer
    assert after["products"] == before["products"] + added
    assert after["images"] == before["images"] + added
    assert after["indexes"]["images"] == after["images"]  # every vector reached the index
    # each new product is findable by its own photo
    probe = noise_jpeg((64, 80), seed=100 + 10 * 1 + 2)
    top = client.post("/v1/search", files=upload(probe), data={"k": "1"}).json()["image_results"]
    assert top[0]["sku"] == "conc-1-2"


# --- building blocks ------------------------------------------------------------------------
def test_search_slots_answer_429_when_full(settings, client):
    state: ServiceState = client.app.state.snapshop
    tight = ServiceState(
        ServiceSettings(settings.catalog_dir, max_concurrent_searches=1, queue_timeout_s=0.05),
        state.searcher,
    )
    with tight.search_slot(), pytest.raises(ApiError) as info, tight.search_slot():
        pass
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    with tight.search_slot():  # released again
        pass


def test_read_write_lock_excludes_writers():
    lock = ReadWriteLock()
    events: list[str] = []
    in_read = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with lock.read():
            events.append("read-start")
            in_read.set()
            release.wait(5)
            events.append("read-end")

    def writer() -> None:
        in_read.wait(5)
        with lock.write():
            events.append("write")

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    in_read.wait(5)
    threading.Event().wait(0.1)
    assert events == ["read-start"]  # the writer waits for the reader
    release.set()
    for t in threads:
        t.join(5)
    assert events == ["read-start", "read-end", "write"]


def test_settings_validation(tmp_path):
    with pytest.raises(ConfigError):
        ServiceSettings(tmp_path, api_key="short")
    with pytest.raises(ConfigError):
        ServiceSettings(tmp_path, max_k=0)
    with pytest.raises(ConfigError):
        ServiceSettings(tmp_path, thumb_sizes=(8,))
    with pytest.raises(ConfigError, match="PIL"):
        ServiceSettings(tmp_path, max_pixels=10**9)  # PIL refuses such images before we can
    assert ServiceSettings(tmp_path, thumb_sizes=(256, 64, 64)).thumb_sizes == (64, 256)


def test_serve_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from snapshop.cli import app

    runner = CliRunner()
    assert "--api-key-env" in runner.invoke(app, ["serve", "--help"]).output
    result = runner.invoke(app, ["serve", "--catalog", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no catalog here" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_detectors_see_one_image_at_a_time(catalog):
    from snapshop.detect.base import SerialDetector

    class Recording:
        name = "recording"

        def __init__(self) -> None:
            self.active = 0
            self.peak = 0
            self.lock = threading.Lock()

        def detect(self, image):
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            threading.Event().wait(0.02)
            with self.lock:
                self.active -= 1
            return []

    inner = Recording()
    serial = SerialDetector(inner)
    image = Image.new("RGB", (32, 32))
    threads = [threading.Thread(target=lambda: [serial.detect(image) for _ in range(3)])
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert inner.peak == 1 and serial.name == "recording"


def test_packshot_upload_stores_the_whole_product_as_its_crop(client):
    from snapshop.detect.base import product_box

    pixels = np.full((160, 120, 3), 250, np.uint8)
    pixels[30:140, 20:100] = (30, 60, 150)  # a garment on a plain background
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    form = {"sku": "pack-001", "category": "Trousers", "packshot": "true"}
    r = client.post("/v1/products", data=form, headers=AUTH,
                    files=[("images", ("p.jpg", buf.getvalue(), "image/jpeg"))])  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["crops"] == 1  # lower only; the fixed detector's boxes are not used
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    x1, y1, x2, y2 = product_box(decoded).as_tuple()
    box = {"x1": str(x1), "y1": str(y1), "x2": str(x2), "y2": str(y2), "position": "lower"}
    r = client.post("/v1/search/crop", files=upload(buf.getvalue()), data={**box, "k": "1"})
    best = r.json()["item_results"][0]["results"][0]
    assert best["sku"] == "pack-001" and best["score"] == pytest.approx(1.0, abs=1e-3)
    assert best["crop_box"] == pytest.approx([x1, y1, x2, y2])


def test_concurrent_adds_of_one_new_sku_create_it_once(client):
    """Whether a POST created its product is decided inside the write: of 6 racing uploads
    of a new sku exactly one answers 201 / created, the rest 200."""
    data = noise_jpeg((64, 80), seed=777)
    answers: list[tuple[int, bool]] = []

    def post() -> None:
        files = [("images", ("r.jpg", data, "image/jpeg"))]
        r = client.post("/v1/products", data={"sku": "race-1"}, files=files, headers=AUTH)
        answers.append((r.status_code, r.json()["created"]))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(answers) == [(200, False)] * 5 + [(201, True)]
    product = next(p for p in all_products(client, limit=50) if p["sku"] == "race-1")
    assert len(product["images"]) == 1
    assert client.delete(f"/v1/products/{product['id']}", headers=AUTH).status_code == 200


def test_uploads_are_ingested_under_the_service_limits(catalog, tmp_path):
    """The service may allow more pixels than ingest's defaults (50 Mpx): a photo it accepts
    is stored, not refused by a second, stricter check."""
    shutil.copytree(catalog[0], tmp_path / "cat")
    settings = ServiceSettings(tmp_path / "cat", api_key=API_KEY, max_pixels=60_000_000)
    buf = io.BytesIO()
    Image.new("L", (7_800, 7_000), 128).save(buf, format="PNG")  # 54.6 Mpx, a small file
    with TestClient(create_app(settings, detector=FixedGarmentDetector())) as c:
        files = [("images", ("big.png", buf.getvalue(), "image/png"))]
        r = c.post("/v1/products", data={"sku": "big-1"}, files=files, headers=AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["added"] == 1 and r.json()["failed"] == []
        assert r.json()["product"]["images"][0]["width"] == 7_800


def test_uploading_a_stored_image_again_repairs_its_lost_or_damaged_copy(client, catalog):
    data = noise_jpeg((64, 80), seed=4242)
    files = [("images", ("x.jpg", data, "image/jpeg"))]
    first = client.post("/v1/products", data={"sku": "repair-1"}, files=files, headers=AUTH)
    image_id = first.json()["product"]["images"][0]["id"]
    blob = next(catalog[0].glob(f"blobs/*/{hashlib.sha256(data).hexdigest()}.*"))
    blob.write_bytes(data[:100])  # truncated: its thumbnail cannot be made
    assert client.get(f"/v1/images/{image_id}/thumb").status_code == 500
    again = client.post("/v1/products", data={"sku": "repair-1"}, files=files, headers=AUTH)
    assert again.json()["skipped"] == 1 and again.json()["added"] == 0
    assert blob.read_bytes() == data
    assert client.get(f"/v1/images/{image_id}/thumb").status_code == 200
    blob.unlink()  # lost
    assert client.get(f"/v1/images/{image_id}").status_code == 404
    client.post("/v1/products", data={"sku": "repair-1"}, files=files, headers=AUTH)
    assert client.get(f"/v1/images/{image_id}").content == data
    pid = first.json()["product"]["id"]
    assert client.delete(f"/v1/products/{pid}", headers=AUTH).status_code == 200


def test_a_crop_box_too_small_after_reduction_is_a_400(client):
    """A 4,000-px photo is searched reduced to 2,048 px: a 12-px box is 6 px there, and says
    so, instead of an answer with no results."""
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((4000, 900)).save(buf, format="PNG")
    box = {"x1": "100", "y1": "100", "x2": "112", "y2": "112"}
    r = client.post("/v1/search/crop", files=upload(buf.getvalue(), "big.png", "image/png"),
                    data=box)  # fmt: skip
    assert r.status_code == 400, r.text
    assert "too small once the photo is reduced" in r.json()["detail"]


def test_an_upload_whose_product_is_deleted_meanwhile_is_a_409(client, monkeypatch):
    """Another request (another replica) deleting the product between the upload's commit and
    its answer: the upload was stored, so not a 400 "no image could be ingested"."""
    ingest = ServiceState.ingest

    def ingest_then_lose_it(self, records):
        report = ingest(self, records)
        self.catalog.remove_product(self.catalog.find_product("gone-001").id)
        return report

    monkeypatch.setattr(ServiceState, "ingest", ingest_then_lose_it)
    files = [("images", ("a.jpg", noise_jpeg((64, 64), seed=9), "image/jpeg"))]
    r = client.post("/v1/products", data={"sku": "gone-001"}, files=files, headers=AUTH)
    assert r.status_code == 409 and "deleted by another request" in r.json()["detail"]
