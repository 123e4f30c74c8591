"""snapshop.images.load_image on odd, broken and hostile files (all generated here)."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snapshop.errors import ImageDecodeError
from snapshop.images import (
    DecodeLimits,
    image_size,
    load_image,
    original_size,
    pil_pixel_ceiling,
    read_bytes,
    sniff_format,
)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def assert_decode_error(source: object, *words: str, limits: DecodeLimits = DecodeLimits()) -> str:
    """load_image raises ImageDecodeError naming the file and containing each of ``words``."""
    with pytest.raises(ImageDecodeError) as info:
        load_image(source, limits)  # type: ignore[arg-type]
    err = info.value
    expected_name = "<bytes>" if isinstance(source, bytes) else str(source)
    assert err.source == expected_name
    assert str(err).startswith(expected_name + ": ")
    assert err.reason
    for word in words:
        assert word in err.reason.lower(), (word, err.reason)
    return err.reason


# --- orientation ----------------------------------------------------------------------------

# EXIF orientation -> (expected (width, height) of a 20x10 image, where its red top-left pixel
# must end up as (row, col) in the upright result).
ORIENTATIONS = {
    1: ((20, 10), (0, 0)),
    2: ((20, 10), (0, 19)),
    3: ((20, 10), (9, 19)),
    4: ((20, 10), (9, 0)),
    5: ((10, 20), (0, 0)),
    6: ((10, 20), (0, 9)),
    7: ((10, 20), (19, 9)),
    8: ((10, 20), (19, 0)),
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_applied(tmp_path: Path, orientation: int, fmt: str) -> None:
    arr = np.full((10, 20, 3), 40, np.uint8)
    arr[0:3, 0:3] = (255, 0, 0)  # a 3x3 marker survives JPEG
    image = Image.fromarray(arr)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = write(tmp_path, f"o{orientation}.{fmt.lower()}", encode(image, fmt, exif=exif))
    out = load_image(path)
    size, (row, col) = ORIENTATIONS[orientation]
    assert out.mode == "RGB"
    assert out.size == size
    assert image_size(path) == size
    pixels = np.asarray(out).astype(int)
    assert pixels[row, col, 0] > 200 and pixels[row, col, 1] < 60
    # the opposite corner stays grey
    assert abs(pixels[size[1] - 1 - row, size[0] - 1 - col] - 40).max() < 30


@pytest.mark.parametrize(
    "payload",
    [
        b"Exif\x00\x00" + b"\xff" * 30,  # not TIFF at all
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff",  # IFD runs past the end
        # orientation 9: out of range
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01"
        b"\x00\x09\x00\x00",
    ],
)
def test_malformed_exif_keeps_pixels(payload: bytes) -> None:
    data = encode(Image.fromarray(np.full((6, 9, 3), 200, np.uint8)), "JPEG")
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    out = load_image(data[:2] + segment + data[2:])
    assert out.size == (9, 6)
    assert abs(np.asarray(out).astype(int) - 200).max() < 5


# --- colour modes ---------------------------------------------------------------------------


def test_rgba_composited_on_white() -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red everywhere
    arr[0, 0, 3] = 0  # fully transparent -> white
    arr[0, 1, 3] = 255  # opaque -> red
    arr[0, 2, 3] = 128  # half -> pink
    arr[1:, :, 3] = 255
    out = np.asarray(load_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[0, 2, 0] == 255 and abs(out[0, 2, 1] - 127) <= 2 and abs(out[0, 2, 2] - 127) <= 2


def test_la_composited_on_white() -> None:
    arr = np.zeros((2, 3, 2), np.uint8)  # black grey level
    arr[0, 0, 1] = 0  # transparent -> white
    arr[0, 1, 1] = 255  # opaque black
    arr[0, 2, 1] = 64  # quarter -> light grey
    arr[1, :, 1] = 255
    out = np.asarray(load_image(encode(Image.fromarray(arr, "LA"), "PNG"))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert all(abs(v - 191) <= 2 for v in out[0, 2])


def test_palette_with_transparency() -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 255] + [0, 255, 0] * 255)  # index 0 blue, 1.. green
    image.putpixel((1, 0), 1)
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = np.asarray(load_image(data))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent index -> white, not blue
    assert out[0, 1].tolist() == [0, 255, 0]


def test_palette_gif_with_transparency() -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 255, 255, 0, 0] + [0, 0, 0] * 254)
    image.putpixel((2, 1), 1)
    out = np.asarray(load_image(encode(image, "GIF", transparency=0)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 2].tolist() == [255, 0, 0]


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = np.asarray(load_image(data)).astype(int)
    assert out.shape == (16, 16, 3)
    assert out[8, 8, 0] > 200 and out[8, 8, 1] < 60 and out[8, 8, 2] < 60


def test_greyscale_l() -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = np.asarray(load_image(encode(Image.fromarray(arr, "L"), "PNG")))
    assert out.shape == (16, 16, 3)
    assert (out[..., 0] == arr).all() and (out[..., 1] == arr).all() and (out[..., 2] == arr).all()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_scaled_to_8_bit(fmt: str) -> None:
    arr = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(load_image(data)).astype(int)
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_dark_16_bit_grey_not_treated_as_8_bit() -> None:
    """A 16-bit image whose values all lie below 256 is nearly black, not mid-grey."""
    arr = np.full((4, 4), 200, dtype=np.uint16)
    out = np.asarray(load_image(encode(Image.fromarray(arr), "PNG")))
    assert out.max() <= 1


def test_one_bit() -> None:
    image = Image.new("1", (8, 8), 0)
    image.putpixel((3, 4), 1)
    out = np.asarray(load_image(encode(image, "PNG")))
    assert out[4, 3].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_webp_and_bmp_decode() -> None:
    arr = noise(12, 9)
    for fmt in ("BMP", "WEBP"):
        out = load_image(
            encode(Image.fromarray(arr), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        )
        assert out.size == (9, 12)
        assert (np.asarray(out) == arr).all()


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (12, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    out = np.asarray(load_image(buf.getvalue()))
    assert out.shape == (8, 12, 3)
    assert out[4, 6].tolist() == [255, 0, 0]


def test_tiny_one_pixel() -> None:
    out = load_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (1, 2, 3)


def test_extremely_wide_aspect_ratio() -> None:
    data = encode(Image.new("RGB", (20000, 1), (9, 9, 9)), "PNG")
    out = load_image(data)  # reduced to the working size, its original size remembered
    assert out.size == (2048, 1) and original_size(out) == (20000, 1)
    assert load_image(data, DecodeLimits(max_side=None)).size == (20000, 1)


def test_path_and_bytes_give_the_same_pixels(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise(7, 5)), "PNG")
    path = write(tmp_path, "a.png", data)
    assert (np.asarray(load_image(path)) == np.asarray(load_image(data))).all()
    assert (np.asarray(load_image(str(path))) == np.asarray(load_image(data))).all()


# --- broken and hostile files ---------------------------------------------------------------


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise(64, 64)), "JPEG")
    path = write(tmp_path, "cut.jpg", data[: len(data) // 2])
    assert_decode_error(path, "truncated")


def test_truncated_png(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise(64, 64)), "PNG")
    path = write(tmp_path, "cut.png", data[: len(data) // 2])
    assert_decode_error(path, "truncated")


def test_png_cut_inside_header(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise(8, 8)), "PNG")
    assert_decode_error(write(tmp_path, "head.png", data[:20]))


def test_empty_file(tmp_path: Path) -> None:
    assert_decode_error(write(tmp_path, "empty.jpg", b""), "empty")


def test_zero_byte_bytes_input() -> None:
    assert_decode_error(b"", "empty")


def test_text_file_renamed_jpg(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.jpg", b"shopping list:\n- milk\n- eggs\n" * 10)
    assert_decode_error(path, "not an image")


def test_html_posing_as_png(tmp_path: Path) -> None:
    path = write(tmp_path, "page.png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    assert_decode_error(path, "not an image")


def test_random_garbage_bytes() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_decode_error(data)


def test_decompression_bomb_header_rejected_fast(tmp_path: Path) -> None:
    """A 100000x100000 PNG header: rejected from the header without allocating pixels."""
    path = write(tmp_path, "bomb.png", png_claiming(100_000, 100_000))
    assert path.stat().st_size < 200
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        reason = assert_decode_error(path, "pixels")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 20 * 1024 * 1024
    assert "bomb" in reason


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    reason = assert_decode_error(data, "10000", "limit", limits=DecodeLimits(max_pixels=5_000))
    assert "100x100" in reason
    assert load_image(data, DecodeLimits(max_pixels=10_000)).size == (100, 100)


def test_pixel_limit_checked_before_decoding() -> None:
    """A header claiming 12000x12000 with a tiny limit fails on the header alone."""
    limits = DecodeLimits(max_pixels=1_000_000)
    tracemalloc.start()
    try:
        assert_decode_error(png_claiming(12_000, 12_000), "pixels", limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_limit_above_pil_default_is_honoured() -> None:
    """Our max_pixels decides, not PIL's global warning threshold (about 89M pixels)."""
    limits = DecodeLimits(max_pixels=100_000_000)
    with pytest.raises(ImageDecodeError) as info:
        load_image(png_claiming(10_000, 9_500), limits)  # 95M: allowed, then fails as truncated
    assert "pixels" not in info.value.reason


def test_header_over_pil_ceiling_names_our_limit() -> None:
    """PIL refuses before we see the size; the message still gives the limit that applies."""
    ceiling = pil_pixel_ceiling()
    assert ceiling is not None
    reason = assert_decode_error(png_claiming(20_000, 10_000), "bomb")
    assert f"over {ceiling} pixels" in reason and f"limit is {DecodeLimits().max_pixels}" in reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pixels": 0},
        {"max_bytes": -1},
        {"min_side": 0},
        {"max_pixels": 1.5},
        {"max_bytes": True},
    ],
)
def test_decode_limits_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DecodeLimits(**kwargs)


def test_decode_limits_cannot_exceed_pil_ceiling() -> None:
    ceiling = pil_pixel_ceiling()
    assert ceiling is not None
    assert DecodeLimits(max_pixels=ceiling).max_pixels == ceiling
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        DecodeLimits(max_pixels=ceiling + 1)


def test_file_over_byte_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "big.png", encode(Image.fromarray(noise(64, 64)), "PNG"))
    reason = assert_decode_error(path, "bytes", "limit", limits=DecodeLimits(max_bytes=1000))
    assert str(path.stat().st_size) in reason
    assert_decode_error(path.read_bytes(), "bytes", limits=DecodeLimits(max_bytes=1000))
    with pytest.raises(ImageDecodeError):
        read_bytes(path, DecodeLimits(max_bytes=1000))


@pytest.mark.parametrize(
    ("fmt", "name"), [("ICO", "icon.ico"), ("PPM", "x.ppm"), ("TGA", "x.tga"), ("PCX", "x.pcx")]
)
def test_unsupported_format(tmp_path: Path, fmt: str, name: str) -> None:
    path = write(tmp_path, name, encode(Image.new("RGB", (16, 16), (5, 5, 5)), fmt))
    assert_decode_error(path, "unsupported format", fmt.lower())


def test_pdf_is_not_an_image(tmp_path: Path) -> None:
    path = write(tmp_path, "catalog.pdf", encode(Image.new("RGB", (16, 16)), "PDF"))
    assert_decode_error(path, "not an image")


def test_missing_file(tmp_path: Path) -> None:
    assert_decode_error(tmp_path / "nope.jpg", "not found")


def test_directory_path(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    assert_decode_error(tmp_path / "folder.jpg", "not a regular file")


def test_name_with_a_nul_byte(tmp_path: Path) -> None:
    """A path read from a CSV can hold a NUL byte, which the operating system refuses."""
    assert_decode_error(tmp_path / "a.jpg\x00.png", "nul byte")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    path = write(tmp_path, "secret.png", encode(Image.new("RGB", (2, 2)), "PNG"))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the read fail as it would for a user

        def refuse(self: Path) -> bytes:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

        monkeypatch.setattr(Path, "read_bytes", refuse)
    reason = assert_decode_error(path, "cannot read")
    assert os.strerror(errno.EACCES).lower() in reason.lower()


def test_sniff_format() -> None:
    assert sniff_format(encode(Image.new("RGB", (2, 2)), "PNG")) == "PNG"
    assert sniff_format(encode(Image.new("RGB", (2, 2)), "JPEG")) == "JPEG"
    assert sniff_format(b"<html></html>") is None
