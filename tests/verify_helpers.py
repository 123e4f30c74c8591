"""Generated printed packages and their photographs, for spatial verification tests."""

from __future__ import annotations

import random

import cv2
import numpy as np
from PIL import Image, ImageDraw


def package(seed: int, size: tuple[int, int] = (300, 400)) -> Image.Image:
    """A printed carton: random shapes and text on a coloured ground, distinct per seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(120, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(80):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        w, h = rng.randrange(8, 60), rng.randrange(8, 60)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            draw.ellipse((x, y, x + w, y + h), outline=colour, width=3)
    for _ in range(30):
        word = "".join(rng.choice("ABCDEFGHKMNPRSTWXZ") for _ in range(6))
        draw.text((rng.randrange(size[0] - 40), rng.randrange(size[1] - 10)), word, fill=(0, 0, 0))
    return image


def photographed(image: Image.Image) -> Image.Image:
    """``image`` seen at an angle, smaller, on a grey shelf."""
    w, h = image.size
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[60, 40], [w + 10, 70], [w - 10, h + 40], [40, h + 60]]) * 0.7
    warp = cv2.getPerspectiveTransform(src, dst)
    pixels = cv2.warpPerspective(
        np.asarray(image), warp, (int(w * 0.9), int(h * 0.9)), borderValue=(90, 90, 90)
    )
    return Image.fromarray(pixels)
