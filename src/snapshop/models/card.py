"""The JSON model card that sits next to every exported model."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from numpy.typing import NDArray

from snapshop.config import read_json, write_json
from snapshop.errors import ConfigError, ModelError

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
NORMALISATION = {"mean": 127.0, "std": 128.0}  # what the EfficientNet-Lite weights expect
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 1024  # the input sizes a model may have (resize_model)


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

    def __post_init__(self) -> None:
        """A card whose values no model can have is refused here, not met later as an odd
        failure in the middle of an ingest (or as vectors that are all alike: std 0)."""
        for name in ("name", "backbone", "onnx_sha256", "resize", "kind"):
            if not isinstance(getattr(self, name), str):
                raise ModelError(f"model card: {name} must be a string")
        if not _is_int(self.input_size) or not (
            MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE
        ):
            raise ModelError(
                f"model card: input_size must be an integer in {MIN_INPUT_SIZE}.."
                f"{MAX_INPUT_SIZE}, got {self.input_size!r}"
            )
        if not _is_int(self.output_dim) or self.output_dim < 1:
            raise ModelError(
                f"model card: output_dim must be a positive integer, got {self.output_dim!r}"
            )
        norm = self.normalisation
        mean, std = (norm.get("mean"), norm.get("std")) if isinstance(norm, dict) else (None, None)
        if not (_is_finite_number(mean) and _is_finite_number(std) and std > 0):
            raise ModelError(
                "model card: normalisation must hold a finite mean and a positive std,"
                f" got {norm!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_id(self) -> str:
        """Identifies the embedding space: vectors from different ids are not comparable."""
        return f"{self.name}@{self.onnx_sha256[:12]}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_card(model_dir: Path, card: ModelCard) -> None:
    write_json(Path(model_dir) / CARD_FILE, card.to_dict())


def check_out_dir(
    out_dir: str | os.PathLike[str], overwrite: bool, *, source: Path | None = None
) -> None:
    """Refuse to write a model into ``out_dir`` where another model already is, unless
    ``overwrite``: a mistyped ``--out`` must not replace a trained model. ``source``: the
    model being rewritten, which may be ``out_dir`` itself on purpose (an in-place resize)."""
    out = Path(out_dir)
    if overwrite or not ((out / CARD_FILE).exists() or (out / MODEL_FILE).exists()):
        return
    if source is not None and out.resolve() == Path(source).resolve():
        return
    raise ModelError(
        f"{out} already holds a model: write to another directory, or replace it with"
        " --overwrite (overwrite=True)"
    )


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
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
