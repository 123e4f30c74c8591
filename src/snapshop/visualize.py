"""Drawing helpers for people: query images with boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import ImageDraw

from snapshop.detect.base import Detection
from snapshop.images import ImageSource, load_image, scale_to_original

POSITION_COLOURS = {"upper": (230, 60, 60), "lower": (40, 110, 230)}


def draw_detections(source: ImageSource, detections: Sequence[Detection], path: Path) -> Path:
    """Save ``source`` with each detection's box and label drawn on it as a PNG."""
    image = load_image(source).copy()
    sx, sy = scale_to_original(image)  # boxes are in the file's pixels; a large one is reduced
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 200))
    for det in detections:
        colour = POSITION_COLOURS.get(det.position or "", (40, 170, 60))
        box = det.box.scaled(1 / sx, 1 / sy)
        draw.rectangle(box.as_tuple(), outline=colour, width=width)
        draw.text((box.x1 + 4, box.y1 + 2), f"{det.label} {det.score:.2f}", fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
