"""The JSON model card that sits next to every exported model."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.config import read_json, write_json
from snapshop.errors import ConfigError, ModelError

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
NORMALISATION = {"mean": 127.0, "std": 128.0}  # what the EfficientNet-Lite weights expect


def normalise_pixels(
    pixels: NDArray[Any], normalisation: Mapping[str, float] = NORMALISATION
) -> NDArray[np.float32]:
    """0-255 pixel values -> the network's input scale, (x - mean) / std as a model card says
    (the one place this is written; the segmenter's Lite0 trunk uses the default)."""
    mean, std = float(normalisation["mean"]), float(normalisation["std"])
    return (np.asarray(pixels, dtype=np.float32) - mean) / std


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    backbone: str
    input_size: int
    output_dim: int
    source_weights_sha256: str
    onnx_sha256: str
    normalisation: dict[str, float] = dataclasses.field(default_factory=lambda: dict(NORMALISATION))
    resize: str = "shorter_side_then_center_crop"
    l2_normalised: bool = True
    kind: str = "imagenet"
    created_at: str = ""
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_id(self) -> str:
        """Identifies the embedding space: vectors from different ids are not comparable."""
        return f"{self.name}@{self.onnx_sha256[:12]}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_card(model_dir: Path, card: ModelCard) -> None:
    write_json(Path(model_dir) / CARD_FILE, card.to_dict())


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    if not path.exists():
        raise ModelError(f"{model_dir}: no {CARD_FILE}; not a snapshop model directory")
    try:
        data = read_json(path)
    except ConfigError as exc:
        raise ModelError(f"unreadable model card: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: model card is not a JSON object")
    names = {f.name for f in dataclasses.fields(ModelCard)}
    try:
        return ModelCard(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ModelError(f"{path}: incomplete model card ({exc})") from None
