"""The embedding network split at the frozen boundary, and the frozen part's outputs.

:class:`TrainableTop` is what trains: the last ``train_blocks`` blocks (+ head conv) and the
embedding head. Everything before them is frozen, so its output per image and view can be
computed once (:func:`compute_frozen`, with ONNX Runtime on the CPU), cached on disk keyed by
the images and the settings that change them, and reused by every epoch and by runs that
differ only in head settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from snapshop.data.manifest import ManifestRow
from snapshop.errors import ConfigError, ImageDecodeError
from snapshop.images import load_image
from snapshop.models.export import export_module_onnx
from snapshop.models.heads import EmbeddingNet
from snapshop.models.runtime import TRAINING_PRECISION, cpu_session
from snapshop.train.augment import AugmentConfig, augment, views
from snapshop.train.loop import save_durably

if TYPE_CHECKING:
    from snapshop.train.trainer import TrainConfig

log = logging.getLogger(__name__)


class TrainableTop(nn.Module):
    """The part of the network that trains: last blocks (+ head conv) + embedding head."""

    def __init__(self, net: EmbeddingNet, boundary: int, train_blocks: int) -> None:
        super().__init__()
        self.net = net
        self.boundary = boundary
        self.train_blocks = train_blocks

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the frozen part's output (pooled features when the trunk is frozen)."""
        backbone = self.net.backbone
        if self.train_blocks == 0:
            return self.net.pool(backbone.forward_features(x))
        if self.train_blocks == -1:
            return x
        return backbone.forward_stem(x, self.boundary)

    def forward(self, frozen_out: torch.Tensor) -> torch.Tensor:
        if self.train_blocks == 0:
            return self.net.embed_pooled(frozen_out)
        if self.train_blocks == -1:
            return self.net(frozen_out)
        feats = self.net.backbone.forward_features(frozen_out, from_block=self.boundary)
        return self.net.embed_pooled(self.net.pool(feats))


def new_and_trunk_params(
    net: EmbeddingNet, boundary: int, train_blocks: int
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(new parameters = head, trainable backbone parameters); freezes the rest."""
    backbone = net.backbone
    for p in backbone.parameters():
        p.requires_grad_(False)
    trunk: list[nn.Parameter] = []
    if train_blocks == -1:
        trunk = list(backbone.parameters())
    elif train_blocks > 0:
        for module in [*backbone.blocks[boundary:], backbone._conv_head, backbone._bn1]:
            trunk += list(module.parameters())
    for p in trunk:
        p.requires_grad_(True)
    assert net.head is not None
    return list(net.head.parameters()), trunk


def freeze_bn(net: nn.Module) -> None:
    net.eval()  # BatchNorm uses its ImageNet running statistics; affine parameters still train


def _load(path: Path) -> Any:
    return load_image(path)


class AugmentedRows(torch.utils.data.Dataset):
    """(row position, augmentation seed) -> an augmented view, decoded where it is asked for
    (in DataLoader workers when ``workers > 0``). The seed travels with the index, so a view
    does not depend on which worker draws it."""

    def __init__(self, rows: Sequence[ManifestRow], size: int, config: AugmentConfig) -> None:
        self.rows, self.size, self.config = rows, size, config

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> NDArray[np.float32]:
        position, seed = key
        image = _load(self.rows[position].path)
        return augment(image, self.size, random.Random(seed), self.config)


def readable_rows(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """Rows whose image decodes (the others are logged and skipped), checked once up front so
    that a corrupt file cannot stop training in the middle of an epoch."""
    kept = []
    for row in rows:
        try:
            _load(row.path)
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", row.path, exc.reason)
            continue
        kept.append(row)
    if not kept:
        raise ConfigError("no readable training image")
    return kept


def _pooled_with(config: TrainConfig) -> tuple[str, ...]:
    """The pooling, where it is part of the frozen output (a frozen trunk) and not the average:
    what tells those cached outputs apart while older caches keep their names."""
    return (config.pooling,) if config.train_blocks == 0 and config.pooling != "avg" else ()


def _rows_key(rows: Sequence[ManifestRow], config: TrainConfig, n_views: int, tag: str) -> str:
    digest = hashlib.sha256()
    for r in rows:
        # size and mtime, not the content: an image rewritten in place changes the key, at the
        # cost of a stat per image instead of a read
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "-"  # unreadable: skipped by compute_frozen
        digest.update(f"{r.path}|{r.sku}|{stamp}\n".encode())
    settings = (
        config.backbone,
        config.train_blocks,
        n_views,
        config.seed,
        config.input_size,
        config.pretrained,
        json.dumps(config.augment.key_settings()),
        tag,
        *_pooled_with(config),
    )
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:16]


def compute_frozen(
    top: TrainableTop,
    rows: Sequence[ManifestRow],
    size: int,
    n_views: int,
    config: TrainConfig,
    seed: int,
    cache_dir: Path | None = None,
    tag: str = "train",
) -> tuple[torch.Tensor, list[int]]:
    """Run the frozen part over ``n_views`` views of each readable image.

    Returns ((M, V, ...) float16 outputs, kept row positions). Unreadable images are skipped.
    Results are stored in ``cache_dir`` keyed by the rows (path, sku, file size and mtime) and
    the settings, and reused; a cache file that cannot be read is computed again.
    """
    key = _rows_key(rows, config, n_views, tag)
    cache_file = cache_dir / f"{tag}-{key}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        cached = _read_cache(cache_file, n_views)
        if cached is not None:
            log.info("frozen features from %s", cache_file)
            return cached
    rng = random.Random(seed)
    run_frozen = _frozen_runner(top, config, size, cache_dir)
    outs: list[torch.Tensor] = []
    kept: list[int] = []
    batch_arrays: list[np.ndarray] = []
    t0 = time.perf_counter()

    def flush() -> None:
        if not batch_arrays:
            return
        outs.append(run_frozen(np.ascontiguousarray(np.stack(batch_arrays))))
        batch_arrays.clear()

    per_batch = max(1, 32 // n_views)
    for i, row in enumerate(rows):
        try:
            image = _load(row.path)
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", row.path, exc.reason)
            continue
        kept.append(i)
        batch_arrays += views(image, size, n_views, rng, config.augment)
        if len(batch_arrays) >= per_batch * n_views:
            flush()
        if (len(kept)) % 200 == 0:
            log.info(
                "frozen features: %d/%d images, %.0f s",
                len(kept),
                len(rows),
                time.perf_counter() - t0,
            )
    flush()
    if not outs:
        raise ConfigError("no readable training image")
    feats = torch.cat(outs)
    feats = feats.reshape(len(kept), n_views, *feats.shape[1:])
    if cache_file is not None:
        save_durably({"features": feats, "kept": kept}, cache_file)
    log.info(
        "frozen features for %d images x %d views in %.0f s",
        len(kept),
        n_views,
        time.perf_counter() - t0,
    )
    return feats, kept


def _read_cache(path: Path, n_views: int) -> tuple[torch.Tensor, list[int]] | None:
    """The cached (features, kept rows), or None (logged) when the file cannot be used: it is
    only a cache, so it is computed again and written over."""
    try:
        data = torch.load(path, weights_only=True)
        feats, kept = data["features"], [int(i) for i in data["kept"]]
        if not isinstance(feats, torch.Tensor) or feats.shape[:2] != (len(kept), n_views):
            raise ValueError("features of another shape")
    except Exception as exc:  # a torn or foreign file can fail in many ways; all mean "redo"
        log.warning("ignoring the unreadable frozen-feature cache %s (%s)", path, exc)
        return None
    return feats, kept


class _Frozen(nn.Module):
    def __init__(self, top: TrainableTop) -> None:
        super().__init__()
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top.frozen(x)


def _frozen_runner(
    top: TrainableTop, config: TrainConfig, size: int, cache_dir: Path | None
) -> Callable[[np.ndarray], torch.Tensor]:
    """(N, 3, S, S) float32 -> the frozen part's float16 output, on the CPU.

    On the CPU the frozen part is exported to ONNX and run with ONNX Runtime (about twice as
    fast as torch eager here); on a GPU it runs in torch.
    """
    device = torch.device(config.device)
    if device.type != "cpu" or not config.onnx_frozen or cache_dir is None:

        def run_torch(batch: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return top.frozen(torch.from_numpy(batch).to(device)).to("cpu", torch.float16)

        return run_torch

    cache_dir.mkdir(parents=True, exist_ok=True)
    # everything the exported graph bakes in: its input size and its weights
    weights = "pretrained" if config.pretrained else f"random{config.seed}"
    name = "-".join(
        ["frozen", config.backbone, str(top.boundary), str(top.train_blocks), str(size), weights]
    )
    onnx_path = cache_dir / f"{'-'.join([name, *_pooled_with(config)])}.onnx"
    if not onnx_path.exists():
        export_module_onnx(
            _Frozen(top),
            (torch.zeros(1, 3, size, size),),
            onnx_path,
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        )
    session = cpu_session(onnx_path, config.threads, TRAINING_PRECISION)

    def run_onnx(batch: np.ndarray) -> torch.Tensor:
        out = session.run(None, {"images": batch.astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out).to(torch.float16)

    return run_onnx
