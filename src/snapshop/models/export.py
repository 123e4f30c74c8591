"""Export an embedding network to ONNX, with its model card, and cache pretrained exports."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from snapshop.config import check_int, make_temp
from snapshop.errors import ConfigError, ModelError
from snapshop.models.card import (
    CARD_FILE,
    MAX_INPUT_SIZE,
    MIN_INPUT_SIZE,
    MODEL_FILE,
    ModelCard,
    check_out_dir,
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
    """Trace ``module`` to ONNX at ``path``, atomically (temp file + rename)."""
    module = module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path.parent, ".onnx")
    os.close(fd)
    tmp_name = str(tmp)
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
    input_size: int | None = None,
) -> ModelCard:
    """Export ``net`` into ``model_dir`` (model.onnx + model.json) and return the card; the
    model embeds at ``input_size`` px (default: the backbone's)."""
    model_dir = Path(model_dir)
    spec = net.backbone.spec
    size = input_size or spec.input_size
    export_onnx(net, model_dir / MODEL_FILE, size)
    card = ModelCard(
        name=name,
        backbone=spec.name,
        input_size=size,
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


def resize_model(
    model: str | os.PathLike[str],
    size: int,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
) -> ModelCard:
    """A copy of ``model`` in ``out_dir`` (the same directory: in place) that embeds every image
    at ``size`` px with the same weights: the graph's input becomes (batch, 3, size, size) and
    the card says ``size``. A model trained on random crops sees items larger than a
    centre-cropped photo shows them; embedding at a higher resolution than it was trained at
    undoes that (FixRes, Touvron et al. 2019; docs/benchmarks/retrieval.md, "Embedding at a
    higher resolution"). The global pool takes any size; the SAME padding stays as traced."""
    import onnx
    import onnxruntime as ort

    # checked before anything is written: a size the card then refused (a numpy integer, a
    # float) would leave an in-place resize with a new graph under the old card
    try:
        size = check_int("size", size, MIN_INPUT_SIZE, MAX_INPUT_SIZE)
    except ConfigError:
        raise ModelError(
            f"size must be in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} px, got {size!r}"
        ) from None
    source = resolve_model_dir(model)
    card = read_card(source)
    try:
        graph = onnx.load(str(source / MODEL_FILE))
    except Exception as exc:  # onnx raises DecodeError and OSError subclasses of its own
        raise ModelError(f"{source / MODEL_FILE}: cannot read the ONNX model ({exc})") from None
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ModelError(f"{source}: the model's input is not (batch, 3, height, width)")
    dims[2].Clear()
    dims[3].Clear()
    dims[2].dim_value = dims[3].dim_value = size
    del graph.graph.value_info[:]  # the shapes inferred at the old size would contradict it

    def check(path: str) -> None:
        try:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            session.run(None, {session.get_inputs()[0].name: _zeros_image(size)})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{source}: the model does not run at {size} px ({exc})") from None

    out = Path(out_dir)
    check_out_dir(out, overwrite, source=source)
    save_onnx_checked(graph, out, check)
    traced = card.training.get("traced_at_size", card.input_size)
    resized = dataclasses.replace(
        card,
        input_size=size,
        onnx_sha256=sha256_file(out / MODEL_FILE),
        training={**card.training, "traced_at_size": traced},
    )
    write_card(out, resized)
    return resized


def save_onnx_checked(graph: Any, out_dir: Path, check: Callable[[str], None]) -> None:
    """Write the ONNX ``graph`` as ``out_dir``/model.onnx once ``check(path)`` passed on a temp
    copy: a model that does not run replaces nothing (atomic rename)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(out_dir, ".onnx")
    os.close(fd)
    tmp_name = str(tmp)
    try:
        onnx.save(graph, tmp_name)
        check(tmp_name)
        Path(tmp_name).replace(out_dir / MODEL_FILE)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _zeros_image(size: int) -> Any:
    import numpy as np

    return np.zeros((1, 3, size, size), np.float32)


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
