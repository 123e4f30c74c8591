"""Drawing helpers for people: query images with boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import ImageDraw

from snapshop.detect.base import Detection
from snapshop.images import ImageSource, load_image

POSITION_COLOURS = {"upper": (230, 60, 60), "lower": (40, 110, 230)}


def draw_detections(source: ImageSource, detections: Sequence[Detection], path: Path) -> Path:
    """Save ``source`` with each detection's box and label drawn on it as a PNG."""
    image = load_image(source).copy()
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 200))
    for det in detections:
        colour = POSITION_COLOURS.get(det.position or "", (40, 170, 60))
        draw.rectangle(det.box.as_tuple(), outline=colour, width=width)
        draw.text((det.box.x1 + 4, det.box.y1 + 2), f"{det.label} {det.score:.2f}", fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
