"""Garment detection: the Detector protocol, DeepFashion2 position map and backends."""

from snapshop.detect.base import (
    DF2_CLASSES,
    LOWER,
    POSITIONS,
    UPPER,
    Box,
    Detection,
    Detector,
    keep_best_per_position,
    position_of,
)

__all__ = [
    "DF2_CLASSES",
    "LOWER",
    "POSITIONS",
    "UPPER",
    "Box",
    "Detection",
    "Detector",
    "keep_best_per_position",
    "position_of",
]
