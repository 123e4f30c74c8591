"""Detector registry: build a detector from a spec string such as ``none``.

Backends register a constructor taking the text after ``name:`` (may be empty); they parse it
with ``snapshop.detect.spec``, which imports no backend (so no backend imports this module).
"""

from __future__ import annotations

from collections.abc import Callable

from snapshop.detect.base import Detector
from snapshop.errors import ConfigError

DetectorFactory = Callable[[str], Detector]
_REGISTRY: dict[str, DetectorFactory] = {}


def register_detector(name: str, factory: DetectorFactory) -> None:
    _REGISTRY[name] = factory


def list_detectors() -> list[str]:
    return ["none", *sorted(_REGISTRY)]


def create_detector(spec: str | None) -> Detector | None:
    """``None``/``"none"`` -> no detector; ``"name"`` or ``"name:ARGS"`` -> a registered backend."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    name, _, args = spec.partition(":")
    factory = _REGISTRY.get(name.strip().lower())
    if factory is None:
        raise ConfigError(f"unknown detector {spec!r}; choose from {list_detectors()}")
    return factory(args.strip())


# Built-in backends import their heavy dependencies (mediapipe, onnxruntime, OpenCV) lazily.
def _pose(args: str) -> Detector:
    from snapshop.detect.pose import PoseDetector

    return PoseDetector.from_spec(args)


def _yolo(args: str) -> Detector:
    from snapshop.detect.yolo import YoloOnnxDetector

    return YoloOnnxDetector.from_spec(args)


def _darknet(args: str) -> Detector:
    from snapshop.detect.yolo import DarknetDetector

    return DarknetDetector.from_spec(args)


def _segmenter(args: str) -> Detector:
    from snapshop.detect.segmenter import SegmenterDetector

    return SegmenterDetector.from_spec(args)


register_detector("pose", _pose)
register_detector("yolo", _yolo)
register_detector("darknet", _darknet)
register_detector("segmenter", _segmenter)
