"""Uploaded images: bounded reads, type by content sniffing (never the client's content-type),
and decoding through :mod:`snapshop.images` with the service's limits."""

from __future__ import annotations

from typing import BinaryIO

from PIL import Image

from snapshop.errors import ImageDecodeError
from snapshop.images import SUPPORTED_FORMATS, DecodeLimits, load_image, sniff_format
from snapshop.service.errors import ApiError

ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"


def read_bounded(stream: BinaryIO, max_bytes: int, name: str = "upload") -> bytes:
    """Read at most ``max_bytes`` (413 beyond it, 400 when empty)."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, f"{name} is larger than the {max_bytes} byte limit")
    if not data:
        raise ApiError(400, f"{name} is empty (0 bytes)", "empty_upload")
    return data


def decode_upload(data: bytes, limits: DecodeLimits, name: str = "upload") -> Image.Image:
    """Decoded RGB image, or an ApiError: 413 too many pixels, 415 not an image type we
    accept (judged from the bytes), 400 corrupt or truncated."""
    fmt = sniff_format(data)
    try:
        image = load_image(data, limits)
    except ImageDecodeError as exc:
        if "pixels" in exc.reason and "no pixels" not in exc.reason:
            raise ApiError(413, f"{name}: {exc.reason}", "too_many_pixels") from None
        if fmt is None or fmt not in SUPPORTED_FORMATS:
            raise ApiError(
                415, f"{name} is not a supported image (send {ACCEPTED}; the type is judged from"
                " the file's content, not its name or content-type)",
            ) from None  # fmt: skip
        raise ApiError(
            400, f"{name}: cannot decode {fmt} data ({exc.reason})", "bad_image"
        ) from None
    return image
