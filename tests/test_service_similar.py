"""GET /v1/products/{id}/similar (more like this) and GET /v1/crops/{id}/thumb (issue #18),
driven through FastAPI's TestClient on a generated catalog whose images all have an upper and
a lower garment crop (the fixed test detector). Results are checked against brute force over
the stored vectors."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_fixtures import FixedGarmentDetector, build_catalog

from snapshop.errors import NotFoundError
from snapshop.service import ServiceSettings, create_app
from snapshop.service.thumbs import blob_path, crop_pixels


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    catalog, _ = build_catalog(tmp_path_factory.mktemp("service-similar"), n_products=8)
    return create_app(ServiceSettings(catalog), detector=FixedGarmentDetector())


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def products(client) -> list[dict]:
    return client.get("/v1/products", params={"limit": 100}).json()["items"]


def brute_force(app, product_id: int, position: str | None, k: int) -> list[tuple[int, float]]:
    """Every other product's best similarity between any of its vectors and any of
    ``product_id``'s (images, or crops at ``position``), best first."""
    catalog = app.state.snapshop.catalog
    table = "images" if position is None else "crops"
    batches = list(catalog.store.iter_vectors(table, catalog.dim, position=position))
    ids = np.concatenate([i for i, _ in batches])
    vectors = np.concatenate([v for _, v in batches])
    owner = catalog.owners(position, [int(i) for i in ids])
    mine = np.array([owner[int(i)] == product_id for i in ids])
    sims = vectors[mine] @ vectors[~mine].T  # (own, other)
    best: dict[int, float] = {}
    for j, entry in enumerate(ids[~mine]):
        p = owner[int(entry)]
        best[p] = max(best.get(p, -2.0), float(sims[:, j].max()))
    return sorted(best.items(), key=lambda t: (-t[1], t[0]))[:k]


def positions_of(app, product: dict) -> set[str]:
    store = app.state.snapshop.catalog.store
    return {c.position for i in product["images"] for c in store.crops_of_image(i["id"])}


def test_similar_matches_brute_force_and_excludes_the_product(app, client, products):
    target = products[2]
    r = client.get(f"/v1/products/{target['id']}/similar", params={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"query_size", "detections", "image_results", "item_results",
                         "timings_ms"}  # the shape of POST /v1/search  # fmt: skip
    assert body["detections"] == []
    first = target["images"][0]
    assert body["query_size"] == [first["width"], first["height"]]

    got = [(h["product_id"], h["score"]) for h in body["image_results"]]
    expected = brute_force(app, target["id"], None, 5)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert all(h["crop_id"] is None and h["crop_thumbnail_url"] is None
               for h in body["image_results"])  # fmt: skip

    rows = {row["position"]: row for row in body["item_results"]}
    assert rows and set(rows) == positions_of(app, target)
    for position, row in rows.items():
        expected = brute_force(app, target["id"], position, 5)
        assert [h["product_id"] for h in row["results"]] == [p for p, _ in expected]
        assert [h["score"] for h in row["results"]] == pytest.approx(
            [s for _, s in expected], abs=1e-4)  # fmt: skip
    every = body["image_results"] + [h for row in rows.values() for h in row["results"]]
    assert target["id"] not in {h["product_id"] for h in every}


def test_item_hits_link_their_crop_thumbnail(app, client, products):
    body = client.get(f"/v1/products/{products[0]['id']}/similar", params={"k": 3}).json()
    hit = body["item_results"][0]["results"][0]
    assert hit["crop_thumbnail_url"] == f"/v1/crops/{hit['crop_id']}/thumb?size=256"
    r = client.get(hit["crop_thumbnail_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content)).convert("RGB")

    # the crop, not the whole photo: compare with the box cut from the stored image
    catalog = app.state.snapshop.catalog
    image = catalog.store.get_image(hit["image_id"])
    x1, y1, x2, y2 = hit["crop_box"]
    stored = Image.open(blob_path(catalog.directory, image)).convert("RGB")
    expected = stored.crop((int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))))
    assert abs(thumb.width / thumb.height - expected.width / expected.height) < 0.05
    assert max(thumb.size) == min(256, max(expected.size))
    whole = stored.resize(thumb.size)
    diff_crop = np.abs(np.asarray(expected.resize(thumb.size), float) - np.asarray(thumb, float))
    diff_whole = np.abs(np.asarray(whole, float) - np.asarray(thumb, float))
    assert diff_crop.mean() < 8 < diff_whole.mean()

    # cached on disk, named by the image's content and the box; served again with its ETag
    cached = list((catalog.directory / "thumbs" / "crops" / "256").rglob(f"{image.sha256}-*.jpg"))
    assert len(cached) >= 1
    again = client.get(hit["crop_thumbnail_url"])
    assert again.content == r.content and again.headers["etag"] == r.headers["etag"]
    small = client.get(f"/v1/crops/{hit['crop_id']}/thumb", params={"size": 50})
    assert max(Image.open(io.BytesIO(small.content)).size) <= 64  # snapped to 64


def test_search_item_hits_carry_crop_thumbnails(client, products):
    data = client.get(products[1]["images"][0]["url"]).content
    body = client.post("/v1/search", files={"image": ("q.jpg", data, "image/jpeg")},
                       data={"k": "3"}).json()  # fmt: skip
    assert all(h["crop_thumbnail_url"] is None for h in body["image_results"])
    hits = [h for row in body["item_results"] for h in row["results"]]
    assert hits and all(h["crop_thumbnail_url"] == f"/v1/crops/{h['crop_id']}/thumb?size=256"
                        for h in hits)  # fmt: skip
    assert "decode" in body["timings_ms"]  # a search still reports its decode time


def test_filters_and_position(app, client, products):
    target = products[0]
    prices = sorted(p["price"] for p in products if p["id"] != target["id"])
    ceiling = prices[len(prices) // 2]
    r = client.get(f"/v1/products/{target['id']}/similar",
                   params={"k": 20, "max_price": ceiling})  # fmt: skip
    hits = r.json()["image_results"] + [h for row in r.json()["item_results"]
                                        for h in row["results"]]  # fmt: skip
    assert hits and all(h["price"] <= ceiling for h in hits)
    assert len(r.json()["image_results"]) == sum(p <= ceiling for p in prices)

    category = next(p["category"] for p in products if p["id"] != target["id"])
    r = client.get(f"/v1/products/{target['id']}/similar", params={"category": category})
    assert r.json()["image_results"]
    assert {h["category"] for h in r.json()["image_results"]} == {category}

    position = sorted(positions_of(app, target))[0]
    r = client.get(f"/v1/products/{target['id']}/similar", params={"position": position})
    body = r.json()
    assert body["image_results"] == []
    assert [row["position"] for row in body["item_results"]] == [position]
    missing = sorted({"upper", "lower"} - positions_of(app, target))
    if missing:  # a position the product has no crop at is a bad parameter, not "no results"
        r = client.get(f"/v1/products/{target['id']}/similar", params={"position": missing[0]})
        assert r.status_code == 400 and "no garment crop" in r.json()["detail"]


@pytest.mark.parametrize(("path", "params", "status"), [
    ("/v1/products/999999/similar", {}, 404),
    ("/v1/products/99999999999999999999999/similar", {}, 404),
    ("/v1/products/abc/similar", {}, 422),
    ("/v1/products/{id}/similar", {"k": 0}, 422),
    ("/v1/products/{id}/similar", {"k": 101}, 422),
    ("/v1/products/{id}/similar", {"position": "middle"}, 400),
    ("/v1/products/{id}/similar", {"min_price": 5, "max_price": 1}, 400),
    ("/v1/products/{id}/similar", {"max_price": "nan"}, 422),
    ("/v1/products/{id}/similar", {"min_price": -1}, 422),
    ("/v1/crops/999999/thumb", {}, 404),
    ("/v1/crops/99999999999999999999999/thumb", {}, 404),
    ("/v1/crops/1/thumb", {"size": 0}, 422),
])  # fmt: skip
def test_bad_requests_get_json_errors(client, products, path, params, status):
    r = client.get(path.format(id=products[0]["id"]), params=params)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"code", "detail"}
    if status == 404:
        assert r.json()["code"] == "not_found"


def test_a_stored_box_outside_its_image_is_not_found(app, client, products):
    catalog = app.state.snapshop.catalog
    image = catalog.store.get_image(products[0]["images"][0]["id"])
    crop = catalog.store.crops_of_image(image.id)[0]
    assert crop_pixels(replace(crop, box=(-5.0, -5.0, 1e9, 1e9)), image) == (
        0, 0, image.width, image.height)  # clamped  # fmt: skip
    for box in [(image.width + 1.0, 0.0, image.width + 9.0, 9.0), (3.0, 3.0, 3.0, 9.0),
                (float("nan"), 0.0, 4.0, 4.0)]:  # fmt: skip
        with pytest.raises(NotFoundError):
            crop_pixels(replace(crop, box=box), image)


def test_similar_waits_for_a_catalog_write(app, client, products):
    """A more-like-this request reads the indexes under the service's read lock, so it cannot
    run while a write (ingest, delete, refresh) holds the write side."""
    state = app.state.snapshop
    results: list[int] = []
    holding = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with state.lock.write():
            holding.set()
            release.wait(10)

    def reader() -> None:
        results.append(client.get(f"/v1/products/{products[0]['id']}/similar").status_code)

    w = threading.Thread(target=writer)
    w.start()
    holding.wait(5)
    r = threading.Thread(target=reader)
    r.start()
    r.join(0.5)
    assert r.is_alive() and results == []  # blocked behind the writer
    release.set()
    w.join(10)
    r.join(30)
    assert results == [200]


def test_openapi_declares_the_routes_and_p_serves_the_page(client, products):
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v1/products/{product_id}/similar"]["get"]
    params = {p["name"] for p in op["parameters"]}
    assert params == {"product_id", "k", "position", "category", "min_price", "max_price"}
    assert {"200", "404", "422"} <= set(op["responses"])
    assert "/v1/crops/{crop_id}/thumb" in doc["paths"]
    assert "/p/{product_id}" not in doc["paths"]
    page = client.get(f"/p/{products[0]['id']}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/p/not-a-number").status_code == 404


def test_service_refreshes_before_similar(app, client, products):
    """The route passes refresh=False: the catalog is refreshed by the service itself, under
    its write lock, when another writer changed it (here: a product deleted directly)."""
    from snapshop.catalog.catalog import open_catalog

    state = app.state.snapshop
    victim = products[-1]
    indexed = len(state.catalog.index(None))
    other = open_catalog(state.catalog.directory)  # as another process would
    try:
        other.remove_product(victim["id"])
    finally:
        other.close()
    r = client.get(f"/v1/products/{products[0]['id']}/similar", params={"k": 20})
    assert r.status_code == 200
    assert victim["id"] not in {h["product_id"] for h in r.json()["image_results"]}
    assert len(state.catalog.index(None)) == indexed - len(victim["images"])  # refreshed
    assert client.get(f"/v1/products/{victim['id']}/similar").status_code == 404
