"""End-to-end: the web page in headless Chromium against a live server on loopback.

Upload a photo, see the detected boxes, click one (and use the keyboard and a drawn box),
see both result sections; "More like this" and the product page /p/{id}; screenshots land in
the test's output directory.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
from service_fixtures import (
    BROWSER_TIMEOUT_MS,
    FixedGarmentDetector,
    build_catalog,
    launch_browser,
    require_browser,
    serve_in_thread,
)

pytestmark = pytest.mark.browser

TIMEOUT_MS = BROWSER_TIMEOUT_MS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    require_browser()
    from snapshop.service import ServiceSettings, create_app

    catalog, queries = build_catalog(tmp_path_factory.mktemp("service-browser"), n_products=6)
    app = create_app(ServiceSettings(catalog), detector=FixedGarmentDetector())
    with serve_in_thread(app) as url:
        yield url, queries


@pytest.fixture(scope="module")
def browser(server):
    with launch_browser() as b:
        yield b


def test_upload_boxes_click_and_results(server, browser, tmp_path):
    url, queries = server
    query, sku = queries[0]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.goto(url)
    assert page.title().startswith("snapshop")
    page.wait_for_function(
        "() => document.getElementById('stats').textContent.includes('6 products')"
    )

    page.set_input_files("[data-testid=file-input]", str(query))
    boxes = page.locator("[data-testid=box]")
    boxes.first.wait_for()
    assert boxes.count() == 2
    assert sorted(boxes.nth(i).get_attribute("data-position") for i in range(2)) == [
        "lower",
        "upper",
    ]
    image_cards = page.locator("[data-testid=image-results] [data-testid=card]")
    image_cards.first.wait_for()
    assert image_cards.count() == 6  # every product, one card each
    assert page.get_by_role("heading", name="Similar images").is_visible()
    assert page.get_by_role("heading", name="Similar items").is_visible()
    rows = page.locator("[data-testid=item-row]")
    assert sorted(rows.nth(i).get_attribute("data-position") for i in range(rows.count())) == [
        "lower", "upper"]  # fmt: skip
    first = image_cards.first
    assert first.locator(".price").inner_text().strip()
    assert "% match" in first.locator(".score").inner_text()
    assert first.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    link = first.locator("a.card-link")
    assert f"/{sku}" in link.get_attribute("href")  # the held-out photo's product
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

    # click the upper box: one "selected" row of items for that garment
    page.locator("[data-testid=box][data-position=upper]").click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=status]').textContent.includes('items like')"
    )
    assert rows.count() == 1 and rows.first.get_attribute("data-position") == "upper"
    assert "(selected)" in rows.first.locator(".row-head").inner_text()
    assert rows.first.locator("[data-testid=card]").count() > 0
    assert image_cards.count() == 6  # the image results stay
    assert "selected" in (page.locator("[data-testid=box][data-position=upper]")
                          .get_attribute("class"))  # fmt: skip
    page.evaluate("window.scrollTo({top: 0, behavior: 'instant'})")
    page.wait_for_timeout(300)  # let the smooth scroll to the results settle
    page.screenshot(path=str(tmp_path / "box-selected.png"), full_page=True)
    if os.environ.get("SNAPSHOP_DOCS_SCREENSHOT"):
        shutil.copy(tmp_path / "box-selected.png", os.environ["SNAPSHOP_DOCS_SCREENSHOT"])

    # keyboard: focus the lower box, resize the window (the boxes are redrawn), press Enter
    lower = page.locator("[data-testid=box][data-position=lower]")
    lower.focus()
    before_resize = lower.element_handle()
    page.set_viewport_size({"width": 1180, "height": 900})
    page.wait_for_function("g => !g.isConnected", arg=before_resize)
    assert page.evaluate("document.activeElement.dataset.position") == "lower"
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=item-row]')?.dataset.position === 'lower'"
    )

    # draw a box with the mouse
    page.get_by_role("button", name="Draw a box").click()
    overlay = page.locator("[data-testid=overlay]").bounding_box()
    x, y, w, h = overlay["x"], overlay["y"], overlay["width"], overlay["height"]
    page.mouse.move(x + 0.2 * w, y + 0.2 * h)
    page.mouse.down()
    page.mouse.move(x + 0.6 * w, y + 0.5 * h, steps=5)
    page.mouse.up()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=item-row]')?.dataset.position === 'box'"
    )
    assert page.locator("[data-testid=box][data-position=box]").count() == 1
    assert page.locator("[data-testid=item-row] [data-testid=card]").count() > 0
    assert page_errors == []
    page.close()


def test_error_state_and_phone_layout(server, browser, tmp_path):
    url, queries = server
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                            is_mobile=True, has_touch=True)  # fmt: skip
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is text, not a photo")
    page.set_input_files("[data-testid=file-input]", str(not_image))
    status = page.locator("[data-testid=status]")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=status]').dataset.state === 'error'"
    )
    assert "not a supported image" in status.inner_text()
    assert page.locator("[data-testid=image-results]").is_hidden()

    page.set_input_files("[data-testid=file-input]", str(queries[1][0]))
    page.locator("[data-testid=image-results] [data-testid=card]").first.wait_for()
    assert page.locator("[data-testid=box]").count() == 2
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
    camera = page.locator("#camera-input")
    assert camera.get_attribute("capture") == "environment"
    # every control is reachable by keyboard and labelled
    for name in ("Choose a photo", "Take a photo", "Draw a box"):
        assert page.get_by_role("button", name=name).is_enabled()
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    page.close()


def _wait_for_product(page, title: str | None = None) -> None:
    page.wait_for_function(
        "() => document.querySelector('[data-testid=status]')"
        ".textContent.includes('look like this')"
    )
    if title is not None:
        assert page.get_by_test_id("product-title").inner_text() == title


def test_more_like_this_and_the_product_page(server, browser, tmp_path):
    url, queries = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.goto(url)
    page.set_input_files("[data-testid=file-input]", str(queries[0][0]))
    image_cards = page.locator("[data-testid=image-results] [data-testid=card]")
    image_cards.first.wait_for()

    # the item rows of a photo search show the matched crop, not the whole catalog photo
    item_img = page.locator("[data-testid=item-row] [data-testid=card] img").first
    assert "/v1/crops/" in item_img.get_attribute("src")
    assert "/v1/crops/" not in image_cards.first.locator("img").get_attribute("src")

    # "More like this" by keyboard on the second result: the product and its similar products
    chosen = image_cards.nth(1)
    product_id = chosen.get_attribute("data-product-id")
    title = chosen.locator(".title").inner_text()
    more = chosen.get_by_test_id("more")
    assert more.get_attribute("aria-label") == f"More like {title}"
    more.focus()
    page.keyboard.press("Enter")
    _wait_for_product(page, title)
    assert page.url == f"{url}/p/{product_id}"
    assert page.evaluate("document.activeElement.id") == "product-title"
    assert page.locator("#upload").is_hidden()
    gallery = page.get_by_test_id("product-image")
    assert gallery.count() == 2  # the fixture's products have two photos each
    gallery.first.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=product-image]')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")  # fmt: skip
    similar = page.locator("[data-testid=image-results] [data-testid=card]")
    assert similar.count() == 5  # every other product
    ids = {similar.nth(i).get_attribute("data-product-id") for i in range(similar.count())}
    assert product_id not in ids

    # item-based rows show crop thumbnails (by crop id) that load
    rows = page.locator("[data-testid=item-row]")
    assert rows.count() >= 1
    crop_imgs = rows.locator("[data-testid=card] img")
    assert crop_imgs.count() >= 1
    for i in range(crop_imgs.count()):
        assert re.fullmatch(r"/v1/crops/\d+/thumb\?size=256", crop_imgs.nth(i).get_attribute("src"))
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=item-row] img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")  # fmt: skip
    page.screenshot(path=str(tmp_path / "product.png"), full_page=True)
    if os.environ.get("SNAPSHOP_PRODUCT_SCREENSHOT"):
        shutil.copy(tmp_path / "product.png", os.environ["SNAPSHOP_PRODUCT_SCREENSHOT"])

    # back to the search: the photo's results are still there
    page.go_back()
    page.wait_for_function("() => !document.getElementById('upload').hidden")
    assert page.url == f"{url}/"
    assert page.locator("[data-testid=image-results] [data-testid=card]").count() == 6
    assert page.get_by_test_id("product").is_hidden()
    assert page_errors == []
    page.close()


def test_product_page_opened_directly_shows_text_as_text(server, browser):
    url, _ = server
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    hostile = '<img src=x onerror="window.__pwned=1">Jacket & <b>co</b>'

    def hostile_title(route):  # a title can hold anything: the page must show it as text
        response = route.fetch()
        body = response.json()
        body["title"] = hostile
        route.fulfill(response=response, json=body)

    page.route(re.compile(r".*/v1/products/\d+$"), hostile_title)
    page.goto(f"{url}/v1/products?limit=1")
    product_id = page.evaluate("JSON.parse(document.body.innerText).items[0].id")
    page.goto(f"{url}/p/{product_id}")
    _wait_for_product(page, hostile)
    assert page.title() == f"{hostile} · snapshop"
    assert page.locator("[data-testid=product-title] *").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator("[data-testid=image-results] [data-testid=card]").count() == 5
    assert page.locator("[data-testid=item-row] [data-testid=card]").count() >= 1

    # an unknown product: a clear message, no results
    page.goto(f"{url}/p/987654321")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=status]').dataset.state === 'error'"
    )
    assert "no product with id 987654321" in page.get_by_test_id("status").inner_text()
    assert page.get_by_test_id("product-title").inner_text() == "Product not found"
    assert page.locator("[data-testid=image-results]").is_hidden()
    assert page_errors == []
    page.close()
