"""Safe image decoding: the only module that opens image files.

Every entry point (ingest, search, service, training) goes through :func:`load_image`, so the
rules live in one place: EXIF orientation applied, every mode converted to RGB (alpha
composited on white), a decompression-bomb limit, and one typed error for every failure.

Memory: an image larger than ``DecodeLimits.max_side`` is decoded at reduced size (JPEG
draft, then a thumbnail) and remembers its original size (:func:`original_size`), so boxes
can be reported in the original image's pixels. At most :func:`decode_slots` decodes run at
once in a process, so the decoders' peak memory is bounded by slots x (compressed bytes +
one full-size bitmap) whatever the number of concurrent requests.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from snapshop.allocator import return_large_blocks
from snapshop.errors import ConfigError, ImageDecodeError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Every consumer works at or below this: detectors at 320-640 px (the segmenter's zoomed re-run
# on a small person included), the embedder at 224-260 px on crops down to 1/8 of the image.
DEFAULT_MAX_SIDE = 2048
DECODE_SLOTS_ENV = "SNAPSHOP_DECODE_SLOTS"
ORIGINAL_SIZE = "snapshop.original_size"  # image.info key: (width, height) before reduction
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
# File suffixes of those formats (.jfif and .jpe are JPEG): what folder readers pick up.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)

# We never accept truncated files silently; the default is already False, pin it.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = str | os.PathLike[str] | bytes
_BOMB = "too many pixels, possible decompression bomb"
_ORIENTATION = 0x0112  # the EXIF tag


def pil_pixel_ceiling() -> int | None:
    """Pixel count at which PIL itself refuses to open an image (None: PIL's check is off).

    PIL raises ``DecompressionBombError`` above twice ``Image.MAX_IMAGE_PIXELS`` before we see
    the size, so no limit of ours can allow more.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied before any pixel is decoded. ``max_side``: longer images are decoded
    at reduced size, their longer side ``max_side`` px (None: always at full size)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    min_side: int = 1
    max_side: int | None = DEFAULT_MAX_SIDE

    def __post_init__(self) -> None:
        names = ("max_pixels", "max_bytes", "min_side", "max_side")
        for name in names if self.max_side is not None else names[:3]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be a positive integer, got {value!r}")
        ceiling = pil_pixel_ceiling()
        if ceiling is not None and self.max_pixels > ceiling:
            raise ValueError(
                f"DecodeLimits.max_pixels is {self.max_pixels}, above PIL's own limit of "
                f"{ceiling} pixels (raise PIL.Image.MAX_IMAGE_PIXELS to allow more)"
            )


def stored_file_limits() -> DecodeLimits:
    """Limits for reading back a file the catalog stored: it passed ingest's limits already,
    so only PIL's own ceiling applies."""
    return DecodeLimits(max_pixels=pil_pixel_ceiling() or 200_000_000, max_bytes=1 << 30)


def _default_decode_slots() -> int:
    raw = os.environ.get(DECODE_SLOTS_ENV, "").strip()
    if raw:
        try:
            slots = int(raw)
        except ValueError:
            slots = 0
        if slots >= 1:
            return slots
        log.warning("%s=%r is not a positive integer: ignored", DECODE_SLOTS_ENV, raw)
    return min(4, os.cpu_count() or 1)  # decoding is CPU-bound: more slots buy memory, not speed


# glibc raises its mmap threshold (up to 32 MiB) once a large block is freed, so the next
# bitmaps (PIL allocates them in blocks of up to 16 MiB) would come from per-thread heaps that
# keep the memory after the image is gone: eight threads decoding in turn, two at a time, ended
# up holding eight bitmaps (docs/benchmarks/reliability.md). A fixed threshold turns that off;
# buffers under it are unaffected. Training turns memory maps off again (snapshop.allocator).
MMAP_THRESHOLD = 1 << 20
return_large_blocks(MMAP_THRESHOLD)
_decode_slots = _default_decode_slots()
_decode_gate = threading.BoundedSemaphore(_decode_slots)


def decode_slots() -> int:
    """How many images this process decodes at once (``SNAPSHOP_DECODE_SLOTS``, default the
    CPU count, at most 4); further decodes wait for a slot."""
    return _decode_slots


def set_decode_slots(slots: int) -> None:
    """Change the number of concurrent decodes (for decodes that start after this call)."""
    global _decode_slots, _decode_gate
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"decode slots must be a positive integer, got {slots!r}")
    _decode_slots, _decode_gate = slots, threading.BoundedSemaphore(slots)


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the file ``image`` was decoded from, after EXIF orientation: larger
    than ``image.size`` when :func:`load_image` decoded it at reduced size."""
    size = image.info.get(ORIGINAL_SIZE)
    return (int(size[0]), int(size[1])) if size else image.size


def scale_to_original(image: Image.Image) -> tuple[float, float]:
    """Factors (x, y) that map ``image``'s pixel coordinates to the original file's."""
    (ow, oh), (w, h) = original_size(image), image.size
    return ow / w, oh / h


def _source_name(source: ImageSource) -> str:
    return "<bytes>" if isinstance(source, bytes) else str(source)


def read_bytes(source: ImageSource, limits: DecodeLimits = DecodeLimits()) -> bytes:
    """Return the raw bytes of ``source``, enforcing the byte limit."""
    name = _source_name(source)
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError(name, "file not found") from None
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot read file ({exc.strerror})") from None
        except ValueError:  # os.stat refuses names with a NUL byte
            raise ImageDecodeError(name, "invalid file name (contains a NUL byte)") from None
        if not path.is_file():
            raise ImageDecodeError(name, "not a regular file")
        if size > limits.max_bytes:
            raise ImageDecodeError(name, f"file is {size} bytes, limit is {limits.max_bytes}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot read file ({exc.strerror})") from None
    if len(data) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(name, f"data is {len(data)} bytes, limit is {limits.max_bytes}")
    return data


def sniff_format(data: bytes) -> str | None:
    """Return the PIL format name of ``data`` from its magic bytes, or None if not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            arr = arr / hi * 255.0
        gray = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        # PIL's CMYK->RGB ignores Adobe's inverted CMYK JPEGs; both render acceptably here.
        return image.convert("RGB")
    return image.convert("RGB")


def _upright(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; malformed EXIF leaves the pixels as stored (not an error).
    In place: an image without an orientation is not copied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL: "Corrupt EXIF data"
            ImageOps.exif_transpose(image, in_place=True)
            return image
    except Exception as exc:  # a broken EXIF block must not reject good pixels
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
        return image


def load_image(
    source: ImageSource | bytearray | memoryview | Image.Image,
    limits: DecodeLimits = DecodeLimits(),
    *,
    upright: bool = True,
) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into an RGB ``PIL.Image``; an image
    already opened with PIL follows the same rules (limits, EXIF orientation, RGB), on a copy.
    ``upright`` False keeps the pixels as stored, unturned: what a training mask labels.

    Raises :class:`ImageDecodeError` naming the file and the reason for: missing, empty,
    oversized or truncated files, non-images, unsupported formats and images over
    ``limits.max_pixels`` (checked from the header, before decoding); a ConfigError for a
    ``source`` of another type.
    """
    if isinstance(source, Image.Image):
        with _decode_gate:
            return _normalise(source, "<PIL image>", limits, upright)
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    if not isinstance(source, str | bytes | os.PathLike):
        raise ConfigError(
            "an image is given as a path, the file's bytes or a PIL image, not"
            f" {type(source).__name__}"
        )
    name = _source_name(source)
    data = read_bytes(source, limits)
    with _decode_gate:
        return _decode(data, name, limits, upright)


def _check_size(width: int, height: int, name: str, limits: DecodeLimits) -> None:
    if width < limits.min_side or height < limits.min_side:
        raise ImageDecodeError(name, f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            name,
            f"image is {width}x{height} = {width * height} pixels, limit is {limits.max_pixels}"
            " (possible decompression bomb)",
        )


@contextlib.contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """Every failure while pixels are decoded or converted, as an ImageDecodeError."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"{_BOMB} ({exc})") from None
    except MemoryError:
        raise ImageDecodeError(name, "out of memory while decoding") from None
    except Exception as exc:  # malformed data surfaces as many exception types
        raise ImageDecodeError(name, f"corrupt or truncated image data ({exc})") from None


def _normalise(
    image: Image.Image, name: str, limits: DecodeLimits, upright: bool = True
) -> Image.Image:
    """A caller's PIL image as :func:`_decode` leaves a file's: the caller's object is not
    changed (orientation and reduction work in place, so on a copy, made only when needed:
    the service passes images it decoded already)."""
    _check_size(*image.size, name, limits)
    with _decode_errors(name):
        image.load()
        small = limits.max_side is None or max(image.size) <= limits.max_side
        turned = upright and image.getexif().get(_ORIENTATION, 1) != 1
        if image.mode == "RGB" and small and not turned:
            return image
        return _upright_rgb(image.copy(), name, limits, image.size, upright)


def _decode(data: bytes, name: str, limits: DecodeLimits, upright: bool = True) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit (below) applies; PIL's global warning threshold must not override it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": pixels are fine
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image file (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(
            name,
            f"image is over {pil_pixel_ceiling()} pixels, limit is {limits.max_pixels}"
            " (possible decompression bomb)",
        ) from None
    except Exception as exc:  # plugins raise OSError, SyntaxError, struct.error, IndexError...
        raise ImageDecodeError(name, f"cannot open image ({exc})") from None

    if image.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(name, f"unsupported format {image.format}")
    width, height = image.size
    _check_size(width, height, name, limits)
    with _decode_errors(name):
        if limits.max_side is not None and max(width, height) > limits.max_side:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale directly: the full-size bitmap never exists.
            scale = limits.max_side / max(width, height)
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        # Multi-frame files (GIF, APNG, MPO, TIFF) open on their first frame: that one is used.
        image.load()
        return _upright_rgb(image, name, limits, (width, height), upright)


def _upright_rgb(
    image: Image.Image,
    name: str,
    limits: DecodeLimits,
    size: tuple[int, int],
    upright: bool = True,
) -> Image.Image:
    """Loaded ``image`` (of a file ``size`` (width, height) big) turned upright (unless not
    ``upright``), in RGB and reduced to ``limits.max_side``; it remembers ``size`` when
    reduced."""
    width, height = size
    stored_size = image.size
    turned = _upright(image, name) if upright else image
    if turned.size != stored_size:  # a quarter turn: the axes swap
        width, height = height, width
    if turned.mode in _RESIZABLE_MODES:  # reduce before the RGB copy is made
        turned = _reduce(turned, limits.max_side)
    rgb = _reduce(_to_rgb(turned), limits.max_side)
    rgb.load()
    if rgb.size != (width, height):
        rgb.info[ORIGINAL_SIZE] = (width, height)
    return rgb


# Modes PIL resamples with a proper filter (palette and 16-bit modes are converted first).
_RESIZABLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "CMYK", "YCbCr"})


def _reduce(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` with its longer side at most ``max_side`` (aspect kept): a box-filter
    reduction by a whole factor, then an antialiased resize over the last factor < 2."""
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return image


def image_size(source: ImageSource, limits: DecodeLimits = DecodeLimits()) -> tuple[int, int]:
    """Width and height after EXIF orientation, without keeping the pixels."""
    return original_size(load_image(source, limits))
