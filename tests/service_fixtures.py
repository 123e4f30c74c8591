"""Helpers shared by the service tests: a deterministic garment detector, tiny catalogs and a
live `snapshop serve` subprocess."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from snapshop.detect.base import Box, Detection

API_KEY = "test-key-123456"


class FixedGarmentDetector:
    """Deterministic stand-in for a garment detector: an upper box over the top half of the
    picture and a lower box over the bottom half, so item-based search always has boxes."""

    name = "fixed-test"

    def detect(self, image: Image.Image) -> list[Detection]:
        w, h = image.size
        return [
            Detection(Box(0.1 * w, 0.05 * h, 0.9 * w, 0.55 * h), "short_sleeve_top", "upper", 0.9),
            Detection(Box(0.15 * w, 0.45 * h, 0.85 * w, 0.95 * h), "trousers", "lower", 0.8),
            Detection(Box(0.4 * w, 0.4 * h, 0.6 * w, 0.6 * h), "bag", None, 0.5),
        ]


def build_catalog(root: Path, n_products: int = 10, images_per_product: int = 2):
    """A generated demo catalog indexed with Lite0 and the fixed detector.

    Returns (catalog dir, [(held-out query photo, expected sku)])."""
    from snapshop import api
    from snapshop.demo import generate_demo_catalog

    manifest, queries = generate_demo_catalog(
        root / "source", n_products=n_products, images_per_product=images_per_product
    )
    catalog = root / "catalog"
    api.index_source(manifest, catalog, model="efficientnet_lite0", detector=FixedGarmentDetector())
    return catalog, queries


def jpeg_bytes(
    size: tuple[int, int] = (96, 128), colour: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def small_catalog(root: Path, n_products: int = 4) -> Path:
    """A generated catalog indexed with Lite0 and no detector (``snapshop serve`` in a
    subprocess cannot load the test detector above); one image per product."""
    from snapshop import api
    from snapshop.demo import generate_demo_catalog

    manifest, _ = generate_demo_catalog(root / "source", n_products=n_products,
                                        images_per_product=1)  # fmt: skip
    catalog = root / "catalog"
    api.index_source(manifest, catalog, model="efficientnet_lite0", detector="none", workers=0)
    return catalog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_serve(catalog: Path, log_path: Path, *args: str) -> Iterator[str]:
    """``snapshop serve`` (the real CLI, uvicorn and all) in a subprocess on 127.0.0.1 with
    ``API_KEY``; yields its base URL and stops it on exit."""
    import snapshop

    port = free_port()
    src = str(Path(snapshop.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "SNAPSHOP_API_KEY": API_KEY,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-c",
        "from snapshop.cli import app; app()",
        "serve",
        "--catalog",
        str(catalog),
        "--port",
        str(port),
        "--detector",
        "none",
        *args,
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"snapshop serve exited: {log_path.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("snapshop serve did not start in 120 s") from None
                    time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-gpu"]  # fmt: skip
BROWSER_TIMEOUT_MS = 60_000


def require_browser() -> None:
    """Skip the calling test unless Debian Chromium and Playwright are installed."""
    import pytest

    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (scripts/setup-test-extras.sh installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    import threading

    import pytest
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@contextmanager
def launch_browser() -> Iterator[Any]:
    """Headless Debian Chromium through Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=LAUNCH_ARGS)  # fmt: skip
        try:
            yield browser
        finally:
            browser.close()
