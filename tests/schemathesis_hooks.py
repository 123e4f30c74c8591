"""Schemathesis hooks for the contract test: image parts get real (small) images.

The API declares its image parts with ``encoding.contentType`` image/jpeg, image/png...;
these strategies make the fuzzer's *valid* cases real images of those types, so they reach
detection and search instead of stopping at the 415 a random byte string earns."""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _encode(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _images(fmt: str) -> st.SearchStrategy[bytes]:
    sizes = st.tuples(st.integers(16, 96), st.integers(16, 96))
    colours = st.tuples(*[st.integers(0, 255)] * 3)
    return st.builds(_encode, sizes, colours, st.just(fmt))


schemathesis.openapi.media_type("image/jpeg", _images("JPEG"))
schemathesis.openapi.media_type("image/png", _images("PNG"))
