"""Issue #19, memory: large images are decoded at reduced size, boxes stay in the original
file's pixels, and concurrent decodes are bounded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import db_rows
from PIL import Image, ImageDraw

from snapshop import api, images
from snapshop.catalog.catalog import open_catalog
from snapshop.demo import demo_products, render
from snapshop.detect.base import Box, Detection, product_box
from snapshop.images import (
    DecodeLimits,
    decode_slots,
    image_size,
    load_image,
    original_size,
    scale_to_original,
    set_decode_slots,
)
from snapshop.models.embedder import Embedder
from snapshop.search import Searcher

REPO = Path(__file__).resolve().parents[1]
# A red garment at known original pixels on a white 5000 x 3000 photo.
PHOTO_SIZE, GARMENT = (5000, 3000), (1200.0, 600.0, 2400.0, 2700.0)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def garment_photo(fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", PHOTO_SIZE, (255, 255, 255))
    ImageDraw.Draw(image).rectangle(GARMENT, fill=(200, 30, 30))
    return encode(image, fmt, quality=92) if fmt == "JPEG" else encode(image, fmt)


class RedThingDetector:
    """Finds the non-white region of whatever image it is given (in that image's pixels)."""

    name = "red-thing"

    def __init__(self) -> None:
        self.seen_sizes: list[tuple[int, int]] = []

    def detect(self, image: Image.Image) -> list[Detection]:
        self.seen_sizes.append(image.size)
        return [Detection(product_box(np.asarray(image)), "top", "upper", 0.9)]


def close_to(box: tuple[float, ...], expected: tuple[float, ...], tolerance: float) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(box, expected, strict=True))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_image_is_decoded_reduced_and_remembers_its_size(fmt: str) -> None:
    data = garment_photo(fmt)
    image = load_image(data)
    assert max(image.size) == images.DEFAULT_MAX_SIDE and image.size == (2048, 1229)
    assert original_size(image) == PHOTO_SIZE
    assert scale_to_original(image) == pytest.approx((5000 / 2048, 3000 / 1229))
    assert image_size(data) == PHOTO_SIZE
    full = load_image(data, DecodeLimits(max_side=None))
    assert full.size == PHOTO_SIZE and original_size(full) == PHOTO_SIZE
    # The same picture: the garment's box, mapped back, lands where it is in the file.
    box = product_box(np.asarray(image)).scaled(*scale_to_original(image))
    assert close_to(box.as_tuple(), GARMENT, tolerance=6)


def test_small_image_is_untouched() -> None:
    image = load_image(encode(Image.new("RGB", (2048, 100), (1, 2, 3)), "PNG"))
    assert image.size == (2048, 100) and scale_to_original(image) == (1.0, 1.0)


def test_quarter_turn_exif_swaps_the_original_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (6000, 3000), (9, 99, 199)), "JPEG", exif=exif)
    image = load_image(data)
    assert original_size(image) == (3000, 6000) and image.size == (1024, 2048)


def test_full_size_jpeg_bitmap_never_exists(tmp_path: Path) -> None:
    """Peak memory of decoding a 42-Mpx JPEG, in a fresh process: reduced (JPEG decodes at
    1/4 scale here), it stays far below the 126 MB of one full-size RGB bitmap."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (8192, 5120), (120, 60, 30)).save(path, quality=90)
    # VmHWM: this process's peak RSS (ru_maxrss would start from the forking parent's).
    probe = (
        "import re, sys\nfrom pathlib import Path\n"
        "from snapshop.images import DecodeLimits, load_image\n"
        "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status')"
        ".read_text())[1]) * 1024\n"
        "before = peak()\n"
        "limits = DecodeLimits() if sys.argv[2] == 'reduced' else DecodeLimits(max_side=None)\n"
        "image = load_image(sys.argv[1], limits)\n"
        "print(image.size[0], peak() - before)\n"
    )
    grown = {}
    for mode in ("reduced", "full"):
        out = subprocess.run(
            [sys.executable, "-c", probe, str(path), mode],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            check=True,
            timeout=120,
        ).stdout.split()
        grown[mode] = int(out[1])
    bitmap = 8192 * 5120 * 3
    assert grown["full"] >= 0.9 * bitmap, grown  # the probe sees a full-size decode
    assert grown["reduced"] < 0.25 * bitmap, grown


def test_concurrent_decodes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (64, 64), (5, 5, 5)), "PNG")
    decode = images._decode
    active, peak, lock, release = 0, 0, threading.Lock(), threading.Event()

    def counting_decode(*args: object) -> Image.Image:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        release.wait(0.2)  # hold the slot a while, so the others queue behind it
        with lock:
            active -= 1
        return decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "_decode", counting_decode)
    previous = decode_slots()
    set_decode_slots(2)
    try:
        threads = [threading.Thread(target=load_image, args=(data,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        set_decode_slots(previous)
    assert peak == 2
    with pytest.raises(ValueError, match="positive integer"):
        set_decode_slots(0)


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("zero", None), ("", None)])
def test_decode_slots_from_the_environment(value: str, expected: int | None) -> None:
    code = (
        "from snapshop.images import decode_slots; import os; print(decode_slots(), os.cpu_count())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), images.DECODE_SLOTS_ENV: value}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    slots, cpus = map(int, out.stdout.split())
    assert slots == (expected or min(4, cpus))
    if value == "zero":
        assert "is not a positive integer" in out.stderr


def test_ingest_and_search_report_original_pixels(tmp_path: Path, lite0_model_dir: Path) -> None:
    photo = tmp_path / "shop" / "p1" / "big.png"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(garment_photo("PNG"))
    detector = RedThingDetector()
    api.index_source(
        tmp_path / "shop",
        tmp_path / "cat",
        model=str(lite0_model_dir),
        detector=detector,
        workers=0,
    )
    assert detector.seen_sizes == [(2048, 1229)]  # it worked on the reduced image
    [(width, height)] = db_rows(tmp_path / "cat", "SELECT width, height FROM images")
    assert (width, height) == PHOTO_SIZE
    [(x1, y1, x2, y2)] = db_rows(tmp_path / "cat", "SELECT x1, y1, x2, y2 FROM crops")
    assert close_to((x1, y1, x2, y2), GARMENT, tolerance=6)

    catalog = open_catalog(tmp_path / "cat")
    try:
        searcher = Searcher(catalog, Embedder(lite0_model_dir), RedThingDetector())
        result = searcher.search(photo, k=1)
        assert result.query_size == PHOTO_SIZE
        assert close_to(result.detections[0].box.as_tuple(), GARMENT, tolerance=6)
        assert close_to(result.item_results[0].box, GARMENT, tolerance=6)
        hit = result.item_results[0].results[0]
        assert hit.score > 0.99 and close_to(hit.crop_box, GARMENT, tolerance=6)
        # A box drawn by a user is in the file's pixels too: the stored crop's box finds it.
        drawn = searcher.search(photo, k=1, box=Box(*hit.crop_box), position="upper")
        assert drawn.item_results[0].box == pytest.approx(hit.crop_box)
        assert drawn.item_results[0].results[0].score > 0.99
        json.dumps(result.to_dict())
    finally:
        catalog.close()


def test_reduced_decode_keeps_embeddings(tmp_path: Path, lite0_embedder: Embedder) -> None:
    """The embedder sees 224 px: a 4,000 px photo decoded at 2,048 px embeds the same."""
    big = render(demo_products(1)[0], 7, size=4000)
    data = encode(big, "JPEG", quality=92)
    reduced, full = load_image(data), load_image(data, DecodeLimits(max_side=None))
    assert reduced.size == (2048, 2048) and full.size == (4000, 4000)
    vectors = lite0_embedder.embed_images([reduced, full])
    assert float(vectors[0] @ vectors[1]) > 0.995


DECODE_IN_THREADS = """
import re, sys, threading
from pathlib import Path
from snapshop.images import load_image

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) * 1024

data = Path(sys.argv[1]).read_bytes()
load_image(data)  # imports and first-use allocations out of the way
start = status("VmRSS")
threads = [threading.Thread(target=load_image, args=(data,)) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(status("VmHWM") - start, status("VmRSS") - start)
"""


def test_memory_of_decodes_in_many_threads_is_bounded_and_given_back(tmp_path: Path) -> None:
    """Eight threads decode a 20-Mpx PNG (which has no reduced decode), two at a time: the
    peak stays near two decodes' worth (each: the bitmap and its resize, about 1.6 bitmaps;
    eight at once would be 13), and the memory is given back afterwards rather than kept by
    the threads' heaps."""
    path = tmp_path / "big.png"
    Image.new("RGB", (5000, 4000), (20, 120, 220)).save(path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), images.DECODE_SLOTS_ENV: "2"}
    out = subprocess.run(
        [sys.executable, "-c", DECODE_IN_THREADS, str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    peak, after = map(int, out.stdout.split())
    bitmap = 5000 * 4000 * 3
    assert peak < 5 * bitmap, (peak, after)
    assert after < bitmap, (peak, after)
