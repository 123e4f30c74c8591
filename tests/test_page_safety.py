"""The web page against hostile or odd catalog text and odd API answers, and the headers the
service sends with the page and everything else.

Catalog text (titles, skus, categories, prices) is written by whoever holds the API key and
can be markup, a word longer than a phone screen, or a pile of combining marks; the page must
show it as text, inside its own box. The API (or a proxy in front of it) can answer with HTML,
an empty status text or JSON of another shape; the page must say something a person can read.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from service_fixtures import (
    API_KEY,
    BROWSER_TIMEOUT_MS,
    FixedGarmentDetector,
    build_catalog,
    jpeg_bytes,
    launch_browser,
    require_browser,
    serve_in_thread,
)

from snapshop.service import ServiceSettings, create_app

TIMEOUT_MS = BROWSER_TIMEOUT_MS
AUTH = {"X-API-Key": API_KEY}
MARKUP = '<script>window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">'
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    """A catalog with three hostile products besides the generated ones: (app, ids, queries)."""
    root = tmp_path_factory.mktemp("page-safety")
    catalog, queries = build_catalog(root, n_products=3, images_per_product=1)
    app = create_app(ServiceSettings(catalog, api_key=API_KEY), detector=FixedGarmentDetector())
    hostile = {  # name: (sku, fields)
        "markup": ("markup", {"title": MARKUP, "category": "<b>bold</b>", "currency": "<i>",
                              "url": 'https://shop.example/"><img/src=x/onerror=alert(1)>'}),
        "long": ("S" * 200, {"title": "W" * 500, "category": "C" * 200, "price": "1e300"}),
        "stacked": ("stacked", {"title": "Z" + "\u0301" * 499}),
    }  # fmt: skip
    client = TestClient(app)  # no lifespan: leaving it would close the catalog
    ids = {}
    for name, (sku, fields) in hostile.items():
        r = client.post("/v1/products", headers=AUTH, data={"sku": sku, **fields},
                        files={"images": ("a.jpg", jpeg_bytes(), "image/jpeg")})  # fmt: skip
        assert r.status_code == 201, r.text
        ids[name] = r.json()["product"]["id"]
    return app, ids, queries


@pytest.fixture(scope="module")
def client(service):
    return TestClient(service[0])


# ---------------------------------------------------------------- headers


def test_every_answer_says_nosniff(client):
    answers = {
        "page": client.get("/"),
        "script": client.get("/static/app.js"),
        "thumbnail": client.get("/v1/images/1/thumb?size=256"),
        "image": client.get("/v1/images/1"),
        "error quoting the request": client.get("/static/%3Cscript%3E"),
        "guard refusal": client.patch("/v1/products/1", headers={**AUTH, "Content-Length": "9"
                                      + "9" * 9, "Content-Type": "application/json"}),
    }  # fmt: skip
    assert answers["guard refusal"].status_code == 413
    assert answers["thumbnail"].headers["content-type"] == "image/jpeg"
    assert answers["error quoting the request"].headers["content-type"] == "application/json"
    for name, r in answers.items():
        assert r.headers.get("x-content-type-options") == "nosniff", name


def test_the_page_carries_a_content_security_policy(client):
    for path in ("/", "/p/1", "/static/index.html"):
        r = client.get(path)
        assert r.headers["content-type"].startswith("text/html"), path
        policy = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in policy, path
        assert "frame-ancestors 'none'" in policy, path
        assert "'unsafe-inline'" not in policy, path
        assert r.headers.get("x-frame-options") == "DENY", path
    assert "content-security-policy" not in client.get("/static/app.js").headers


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def server(service):
    require_browser()
    with serve_in_thread(service[0]) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    with launch_browser() as b:
        yield b


@pytest.fixture
def tab(browser):
    """A fresh phone-sized page and the script errors, dialogs and CSP violations it met."""
    page = browser.new_page(viewport=PHONE)
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda d: (errors.append(f"dialog {d.message}"), d.dismiss()))
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e =>"
        " (window.__violations = window.__violations || []).push(e.violatedDirective))"
    )
    yield page, errors
    page.close()


def _settled(page) -> str:
    # arrow functions: Playwright polls a bare expression with eval, which a CSP may refuse
    page.wait_for_function(
        "() => document.querySelector('[data-testid=status]').dataset.state !== 'loading'"
    )
    return page.get_by_test_id("status").inner_text()


def _overflow(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")


@pytest.mark.browser
def test_catalog_markup_shows_as_text(server, service, tab):
    page, errors = tab
    _, ids, queries = service
    page.goto(f"{server}/p/{ids['markup']}")
    assert "look like this" in _settled(page)
    assert page.get_by_test_id("product-title").inner_text() == MARKUP
    assert page.locator("#product-category").inner_text().lower() == "<b>bold</b>"
    assert page.locator("#product-link").get_attribute("href").startswith("https://shop.")
    assert page.locator("main script, main img[src='x'], #product-info b").count() == 0

    page.goto(server)  # and in the results of a photo search
    page.set_input_files("[data-testid=file-input]", str(queries[0][0]))
    page.locator("[data-testid=image-results] [data-testid=card]").first.wait_for()
    titles = page.locator("[data-testid=image-results] .title").all_inner_texts()
    assert MARKUP in titles
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("window.__violations || []") == []  # the page lives with its CSP
    assert errors == []


@pytest.mark.browser
def test_long_catalog_text_wraps_on_a_phone(server, service, tab):
    page, errors = tab
    _, ids, _ = service
    page.goto(f"{server}/p/{ids['long']}")
    assert "look like this" in _settled(page)
    assert _overflow(page) <= 0, "a long title, sku or category widens the page"
    box = page.get_by_test_id("product-title").bounding_box()
    assert box is not None and box["x"] + box["width"] <= PHONE["width"]
    assert errors == []


@pytest.mark.browser
def test_stacked_combining_marks_stay_inside_the_title(server, service, tab):
    page, errors = tab
    _, ids, _ = service
    page.set_viewport_size({"width": 1280, "height": 900})
    band = {"x": 0, "y": 0, "width": 1280, "height": 125}  # top bar, the card's back link

    def top_of(product_id: int) -> bytes:
        page.goto(f"{server}/p/{product_id}")
        _settled(page)
        page.wait_for_function("() => document.getElementById('stats').textContent.includes('ima')")
        page.evaluate("document.activeElement.blur()")
        return page.screenshot(clip=band)

    plain = top_of(ids["markup"])
    stacked = top_of(ids["stacked"])
    # the product title sits below this band: it must look the same whatever the title holds
    assert stacked == plain, "combining marks spill over the top bar"


ANSWERS = {
    "HTML from a proxy, 200": (
        {"status": 200, "content_type": "text/html", "body": "<html>sign in</html>"},
        "cannot read",
    ),
    "JSON of another shape": (
        {"status": 200, "content_type": "application/json", "body": "{}"},
        "cannot read",
    ),
    "a proxy's 413 page": (
        {"status": 413, "content_type": "text/html", "body": "<h1>413 Too Large</h1>"},
        "That photo is too large for the server",
    ),
    "an unknown status without text": ({"status": 499, "body": ""}, "The server answered 499"),
    "detail that is not text": (
        {"status": 400, "content_type": "application/json", "body": '{"detail": [{"msg": "x"}]}'},
        "The server answered 400",
    ),
}  # fmt: skip


@pytest.mark.browser
@pytest.mark.parametrize("answer", ANSWERS, ids=list(ANSWERS))
def test_odd_search_answers_read_as_sentences(server, service, tab, answer):
    page, errors = tab
    response, expected = ANSWERS[answer]
    page.route("**/v1/search", lambda route: route.fulfill(**response))
    page.goto(server)
    page.set_input_files("[data-testid=file-input]", str(service[2][0][0]))
    text = _settled(page)
    assert page.get_by_test_id("status").get_attribute("data-state") == "error"
    assert expected.lower() in text.lower(), text
    assert not re.search(r"undefined|null|\[object|properties of|not iterable", text), text
    assert page.locator("[data-testid=image-results]").is_hidden()
    assert errors == []


@pytest.mark.browser
def test_product_page_errors_name_the_right_product_and_cause(server, tab):
    page, errors = tab
    long_id = "1" + "0" * 24  # Number() would make it 1e+24
    page.goto(f"{server}/p/{long_id}")
    assert f"no product with id {long_id}" in _settled(page)
    assert page.get_by_test_id("product-title").inner_text() == "Product not found"
    assert _overflow(page) <= 0

    body = '{"code": "catalog_unavailable", "detail": "retry shortly"}'
    unavailable = {"status": 503, "content_type": "application/json", "body": body}
    page.route(re.compile(r".*/v1/products/\d+$"), lambda route: route.fulfill(**unavailable))
    page.goto(f"{server}/p/1")
    assert "retry shortly" in _settled(page)
    assert page.get_by_test_id("product-title").inner_text() == "Product unavailable"
    assert errors == []
