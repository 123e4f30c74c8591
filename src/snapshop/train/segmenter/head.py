"""Frozen-trunk training: only the head learns, on cached trunk features (the CPU path).

Per-pixel cross-entropy against CCP's labels mapped to other / upper / lower / dress, at
stride 4 (logits upsampled bilinearly x2, labels at the 4x4 cell centres, padding ignored);
AdamW with a one-cycle schedule; batches hold samples of one shape.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from snapshop.data.ccp import label_count, list_images
from snapshop.detect.pose import BODY_CHANNELS, BlazePose
from snapshop.detect.segmenter import (
    BODY_KEY,
    CARD_FILE,
    CLASSES,
    DRESS_CLS,
    HEAD_FILE,
    build_head,
    export_head,
    trunk_spec,
)
from snapshop.errors import ConfigError
from snapshop.train.loop import EpochLoop, make_optimizer, seed_everything
from snapshop.train.segmenter.card import (
    CCP_SOURCE,
    OUTPUT,
    card_tail,
    check_trained,
    trunk_entries,
    write_card,
)
from snapshop.train.segmenter.config import (
    IGNORE,
    DetectorTraining,
    HeadConfig,
    segmenter_label_table,
)
from snapshop.train.segmenter.photos import TrainImage, load_training_images, paste_person
from snapshop.train.segmenter.pseudo import IDENTITY_TABLE, pseudo_label_note, pseudo_label_pairs
from snapshop.train.segmenter.samples import Sample, load_or_build_samples, trunk_sample

log = logging.getLogger(__name__)


class HeadTrainer(EpochLoop):
    """:func:`build_head` on cached features, in the steps of :class:`EpochLoop`."""

    def __init__(self, samples: list[Sample], config: HeadConfig) -> None:
        super().__init__()
        self.samples, self.config, self.epochs = samples, config, config.epochs

    def setup(self) -> None:
        import torch

        config = self.config
        seed_everything(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.head = build_head(
            config.width,
            dropout=config.dropout,
            body=body_size(config),
            channels=trunk_spec(config.trunk).channels,
        )
        self.weight = torch.ones(len(CLASSES))
        self.weight[DRESS_CLS] = config.dress_weight
        params = [{"params": list(self.head.parameters()), "lr": config.lr}]
        self.optimizer = make_optimizer("adamw", params, weight_decay=1e-4)
        self.by_shape: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.samples):
            self.by_shape.setdefault(s.target.shape, []).append(i)
        steps_per_epoch = sum(-(-len(v) // config.batch_size) for v in self.by_shape.values())
        total = max(1, config.epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=config.lr,
            total_steps=total,
            # a warm-up of exactly one step (0.1 x 10) makes OneCycleLR divide by zero
            pct_start=0.1 if total != 10 else 0.2,
        )

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        self.head.train()
        batch_size, samples = self.config.batch_size, self.samples
        batches = []
        for idx in self.by_shape.values():
            order = self.rng.permutation(idx)
            batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.rng.shuffle(batches)
        total, count = 0.0, 0
        for batch in batches:
            feats = [
                torch.from_numpy(np.stack([samples[i].feats[k] for i in batch]).astype(np.float32))
                for k in range(3)
            ]
            if self.config.body_channels:
                body = [samples[i].body for i in batch]
                feats.append(torch.from_numpy(np.stack(body).astype(np.float32)))
            # Loss at stride 4: logits upsampled x2, targets sampled at the 4x4 cell centres.
            target = np.stack([samples[i].target[2::4, 2::4] for i in batch]).astype(np.int64)
            logits = F.interpolate(self.head(*feats), scale_factor=2.0, mode="bilinear")
            loss = F.cross_entropy(
                logits, torch.from_numpy(target), weight=self.weight, ignore_index=IGNORE
            )
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        return {"loss": total / max(count, 1)}


def body_size(config: HeadConfig) -> int:
    """The number of body channels the head reads (0 without the pose prior)."""
    return len(BODY_CHANNELS) if config.body_channels else 0


def train_head(samples: list[Sample], config: HeadConfig) -> tuple[Any, list[float]]:
    """Fit :func:`build_head` with AdamW + one-cycle decay; returns the head (eval mode) and
    the per-epoch loss."""
    trainer = HeadTrainer(samples, config)
    history = trainer.run()
    return trainer.head.eval(), [record["loss"] for record in history]


def pasted_samples(images: list[TrainImage], config: HeadConfig) -> list[Sample]:
    """``config.copy_paste`` composites per image (:func:`paste_person`: another of the images'
    people pasted in, drawn with ``config.seed``), as trunk features and targets."""
    from snapshop.detect.segmenter import Trunk
    from snapshop.models.runtime import TRAINING_PRECISION

    if len(images) < 2:
        return []
    rng = np.random.default_rng(config.seed)
    trunk = Trunk(precision=TRAINING_PRECISION, spec=trunk_spec(config.trunk))
    pose = BlazePose() if config.body_channels else None
    samples = []
    for i, image in enumerate(images):
        for _ in range(config.copy_paste):
            source = images[(i + 1 + int(rng.integers(len(images) - 1))) % len(images)]
            pasted = paste_person(image, source, rng)
            samples.append(trunk_sample(pasted.rgb, pasted.labels, config.long_side, trunk, pose))
    log.info("%d copy-paste composites", len(samples))
    return samples


def fit_head(run: DetectorTraining) -> dict[str, Any]:
    """Train the head on ``run.dataset`` (CCP layout) and write ``garment_seg.onnx`` +
    ``garment_seg.json`` (``run.prefix`` before both names) into ``run.out``; returns the card."""
    config = run.model
    assert isinstance(config, HeadConfig)
    pairs = list_images(run.dataset, run.parity, run.limit)
    # read (and checked) before any slow step: a bad folder fails at once
    pseudo_pairs, pseudo_card = (
        pseudo_label_pairs(run.pseudo_labels) if run.pseudo_labels else ([], {})
    )
    if not pairs:
        raise ConfigError(f"{run.dataset}: no photos with masks for parity {run.parity!r}")
    table = segmenter_label_table(run.dataset / "mask_labels.csv")
    labels = label_count(run.dataset / "mask_labels.csv")
    t0 = time.perf_counter()
    body, spec = config.body_channels, trunk_spec(config.trunk)
    samples = load_or_build_samples(
        pairs, table, config.long_side, run.cache, config.negatives, config.seed, body, spec, labels
    )
    if config.copy_paste:
        images = load_training_images(pairs, table, silhouettes=True, labels=labels)
        samples += pasted_samples(images, config)
    if pseudo_pairs:
        samples += load_or_build_samples(
            pseudo_pairs, IDENTITY_TABLE, config.long_side, body=body, spec=spec
        )
    t_feats = time.perf_counter() - t0
    head, losses = train_head(samples, config)
    t_train = time.perf_counter() - t0 - t_feats
    check_trained(head, run)
    run.out.mkdir(parents=True, exist_ok=True)
    head_path = run.out / f"{run.prefix}{HEAD_FILE}"
    export_head(head, head_path, body=body_size(config), channels=spec.channels)
    card = {
        "model": f"{HEAD_FILE}: head of the `segmenter` detector (1x1 laterals + 2 3x3 convs,"
        f" width {config.width}) on frozen ImageNet {spec.backbone} blocks {list(spec.blocks)}"
        + (" and BlazePose body channels (pose prior, issue #21)" if body else ""),
        **trunk_entries(spec),
        "output": OUTPUT,
        "training_data": f"{CCP_SOURCE}, {run.parity} image ids ({len(pairs)}"
        " photos + mirrored copies), CCP pixel labels"
        + (f"; {config.negatives} synthetic person-free images" if config.negatives else "")
        + (f"; {config.copy_paste} copy-paste composites per photo" if config.copy_paste else "")
        + pseudo_label_note(len(pseudo_pairs), pseudo_card),
        "training_command": run.command_line(),
        "training": {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "width": config.width,
            "dropout": config.dropout,
            "dress_weight": config.dress_weight,
            "long_side": config.long_side,
            "synthetic_negatives": config.negatives,
            "seed": config.seed,
            "copy_paste": config.copy_paste,
            "body_channels": config.body_channels,
            "trunk": config.trunk,
            "final_loss": round(losses[-1], 4) if losses else None,
            "feature_seconds": round(t_feats, 1),
            "train_seconds": round(t_train, 1),
        },
        **card_tail(config.long_side),
        **({BODY_KEY: list(BODY_CHANNELS)} if body else {}),
    }
    write_card(run.out / f"{run.prefix}{CARD_FILE}", card)
    log.info("wrote %s (%.1f s features, %.1f s training)", head_path, t_feats, t_train)
    return card
