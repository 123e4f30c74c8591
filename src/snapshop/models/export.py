"""Export an embedding network to ONNX, with its model card, and cache pretrained exports."""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from snapshop.errors import ModelError
from snapshop.models.card import (
    CARD_FILE,
    MODEL_FILE,
    ModelCard,
    read_card,
    sha256_file,
    write_card,
)
from snapshop.models.efficientnet_lite import BACKBONES, weights_path
from snapshop.models.heads import EmbeddingNet, create_embedding_net

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite2"
ONNX_OPSET = 17


def snapshop_home() -> Path:
    """Cache root for exported models: ``$SNAPSHOP_HOME`` or ``~/.cache/snapshop``."""
    return Path(os.environ.get("SNAPSHOP_HOME", Path.home() / ".cache" / "snapshop"))


def export_module_onnx(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Trace ``module`` to ONNX at ``path``, atomically (temp file + rename, world-readable)."""
    module = module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        # The tracer's warnings (constant SAME padding, Slice folding) are expected: SAME
        # padding is traced for the sizes the callers feed.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                tmp_name,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.chmod(tmp_name, 0o644)
        Path(tmp_name).replace(path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def export_onnx(net: EmbeddingNet, path: Path, input_size: int) -> None:
    """Trace ``net`` to ONNX with a dynamic batch axis; written atomically."""
    export_module_onnx(
        net,
        (torch.zeros(1, 3, input_size, input_size),),
        path,
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
    )


def save_model(
    net: EmbeddingNet,
    model_dir: Path,
    *,
    name: str,
    source_weights_sha256: str,
    kind: str,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelCard:
    """Export ``net`` into ``model_dir`` (model.onnx + model.json) and return the card."""
    model_dir = Path(model_dir)
    spec = net.backbone.spec
    export_onnx(net, model_dir / MODEL_FILE, spec.input_size)
    card = ModelCard(
        name=name,
        backbone=spec.name,
        input_size=spec.input_size,
        output_dim=net.dim,
        source_weights_sha256=source_weights_sha256,
        onnx_sha256=sha256_file(model_dir / MODEL_FILE),
        kind=kind,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        training=training or {},
        metrics=metrics or {},
    )
    write_card(model_dir, card)
    return card


def export_pretrained(backbone: str, model_dir: Path) -> ModelCard:
    """Export the ImageNet backbone (pooled 1280-d features, L2-normalised)."""
    net = create_embedding_net(backbone, dim=None, pretrained=True)
    log.info("exporting ImageNet %s to %s", backbone, model_dir)
    return save_model(
        net,
        model_dir,
        name=backbone,
        source_weights_sha256=sha256_file(weights_path(backbone)),
        kind="imagenet",
    )


def resolve_model_dir(model: str | os.PathLike[str] | None = None) -> Path:
    """A model directory for ``model``: an existing directory, or a backbone name to export.

    Backbone names (``efficientnet_lite0/1/2``) are exported once into the cache and reused.
    """
    model = model or DEFAULT_MODEL
    path = Path(model)
    if (path / CARD_FILE).exists():
        return path
    name = str(model)
    if name in BACKBONES:
        cached = snapshop_home() / "models" / name
        if (cached / CARD_FILE).exists() and (cached / MODEL_FILE).exists():
            try:
                card = read_card(cached)
                fresh = card.source_weights_sha256 == sha256_file(weights_path(name))
                if fresh and card.onnx_sha256 == sha256_file(cached / MODEL_FILE):
                    return cached
                log.warning("%s: cached export is stale or damaged, exporting again", cached)
            except ModelError as exc:
                log.warning("%s: %s; exporting again", cached, exc)
        export_pretrained(name, cached)
        return cached
    raise ModelError(
        f"{model}: not a model directory (no {CARD_FILE}) nor a known backbone {sorted(BACKBONES)}"
    )
