"""End-to-end fine-tuning: the stem and MBConv blocks ``0..N-1`` train with the head.

Same loss as the head alone, on photos held in memory and augmented on the fly
(:mod:`snapshop.train.segmenter.photos`), with a torch DataLoader (``workers``) on
``device`` cuda|cpu (bf16 autocast on cuda). BatchNorm keeps its ImageNet statistics (eval
mode; its affine weights train). Besides the head it writes ``garment_seg_trunk.npz``, the
fine-tuned trunk tensors that :mod:`snapshop.detect.segmenter` lays over the ImageNet weights
at load time. Blocks 11..15 hold 2.2 M parameters, so ``N <= 11`` (0.7 M, 2.8 MB) keeps the
shipped weights small.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.config import atomic_file
from snapshop.data.ccp import CCP_AUX, label_count, list_images
from snapshop.detect.segmenter import (
    CARD_FILE,
    CLASSES,
    DEFAULT_TRUNK,
    DRESS_CLS,
    HEAD_FILE,
    TRUNK_FILE,
    TRUNK_OVERLAY_KEY,
    TrunkSpec,
    build_head,
    export_head,
    feature_maps,
    trunk_spec,
)
from snapshop.errors import ConfigError
from snapshop.train.loop import EpochLoop, make_optimizer, resolve_device, seed_everything
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
    FinetuneConfig,
    num_train_classes,
    segmenter_label_table,
)
from snapshop.train.segmenter.photos import (
    AugmentedImages,
    TrainImage,
    load_training_images,
    negative_training_images,
    seed_worker,
)
from snapshop.train.segmenter.pseudo import IDENTITY_TABLE, pseudo_label_note, pseudo_label_pairs

log = logging.getLogger(__name__)


def build_finetune_net(config: FinetuneConfig) -> Any:
    """The trunk (``config.trunk``, ImageNet) + :func:`build_head`; only the stem, blocks
    ``0..N-1`` and the head train, and the trunk stays in eval mode (ImageNet BatchNorm
    statistics)."""
    import torch
    from torch import nn

    from snapshop.models.efficientnet_lite import create_backbone

    class FinetuneNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = create_backbone(spec.backbone, pretrained=True)
            self.head = build_head(
                config.width,
                num_classes=num_train_classes(config.aux_labels),
                dropout=config.dropout,
                channels=spec.channels,
            )
            tuned = [self.trunk._conv_stem, self.trunk._bn0]
            tuned += list(self.trunk.blocks[: config.finetune_blocks])
            self.trunk.requires_grad_(False)
            for module in tuned:
                module.requires_grad_(True)

        def train(self, mode: bool = True) -> FinetuneNet:
            super().train(mode)
            self.trunk.eval()  # frozen statistics: batches of 16 similar photos are a poor estimate
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(*feature_maps(self.trunk, x, spec.blocks))

    spec = trunk_spec(config.trunk)
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


class FinetuneTrainer(EpochLoop):
    """:func:`build_finetune_net` on augmented photos, in the steps of :class:`EpochLoop`;
    stops early once an epoch ends past ``max_train_seconds``."""

    def __init__(self, images: list[TrainImage], config: FinetuneConfig) -> None:
        super().__init__()
        self.images, self.config, self.epochs = images, config, config.epochs

    def setup(self) -> None:
        import torch

        config = self.config
        self.device = resolve_device(config.device)
        device = self.device.type
        seed_everything(config.seed)
        torch.backends.cudnn.benchmark = True  # fixed input size
        self.net = build_finetune_net(config).to(device)
        self.weight = torch.ones(num_train_classes(config.aux_labels), device=device)
        self.weight[DRESS_CLS] = config.dress_weight
        trunk = [p for p in self.net.trunk.parameters() if p.requires_grad]
        groups = [
            {"params": list(self.net.head.parameters()), "lr": config.lr},
            {"params": trunk, "lr": config.trunk_lr},
        ]
        self.optimizer = make_optimizer(
            config.optimizer, groups, weight_decay=config.weight_decay, nesterov=True
        )
        # AugmentedImages is map-style without subclassing Dataset (photos.py imports no torch)
        self.loader: torch.utils.data.DataLoader[tuple[Any, Any]] = torch.utils.data.DataLoader(
            AugmentedImages(self.images, config),  # type: ignore[arg-type]
            batch_size=min(config.batch_size, len(self.images)),
            shuffle=True,
            drop_last=True,  # one fixed batch shape
            num_workers=config.workers,
            worker_init_fn=seed_worker if config.workers else None,
            persistent_workers=config.workers > 0,
            pin_memory=device == "cuda",
            generator=torch.Generator().manual_seed(config.seed),
        )
        total_steps = config.epochs * len(self.loader)
        self.started: list[float] = []  # set when the first epoch starts (the budget's origin)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(config, total_steps, self.started)
        )
        self.use_bf16 = config.bf16 and device == "cuda"
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        log.info(
            "fine-tuning stem + blocks 0..%d on %s: %d images, %d steps/epoch, bf16 %s",
            config.finetune_blocks - 1,
            self.device_name,
            len(self.images),
            len(self.loader),
            self.use_bf16,
        )

    def autocast(self) -> Any:
        import torch

        if self.use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        if not self.started:
            self.started.append(time.perf_counter())
        self.net.train()
        total = torch.zeros((), device=self.device)
        count = 0
        for x, target in self.loader:
            x = x.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            with self.autocast():
                # Loss at stride 4 as for the head alone: logits upsampled x2.
                logits = F.interpolate(self.net(x), scale_factor=2.0, mode="bilinear")
            loss = F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=IGNORE)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.detach() * len(x)
            count += len(x)
        return {
            "loss": float(total) / max(count, 1),
            "head_lr": self.scheduler.get_last_lr()[0],
            "seconds": round(self.elapsed(), 1),
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started[0]

    def stop_after(self, epoch: int) -> bool:
        budget = self.config.max_train_seconds
        return budget is not None and self.elapsed() > budget  # the schedule has decayed with it


def train_finetune(
    images: list[TrainImage], config: FinetuneConfig
) -> tuple[Any, list[float], dict[str, Any]]:
    """Fit :func:`build_finetune_net`; returns the net (eval, on the CPU), per-epoch loss and
    facts for the card (device, epochs run, seconds)."""
    import cv2

    trainer = FinetuneTrainer(images, config)
    # A worker forked while OpenCV's thread pool exists deadlocks on the pool's locks: run
    # OpenCV single-threaded (no pool) while the workers live; they are the parallelism.
    threads = cv2.getNumThreads()
    if config.workers:
        cv2.setNumThreads(1)
    try:
        history = trainer.run()
    finally:
        cv2.setNumThreads(threads)
    info = {
        "device": trainer.device_name,
        "epochs_run": len(history),
        "train_seconds": trainer.elapsed(),
    }
    return trainer.net.cpu().float().eval(), [r["loss"] for r in history], info


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
    net: Any,
    out: Path,
    prefix: str = "",
    dtype: str = "float32",
    spec: TrunkSpec = DEFAULT_TRUNK,
) -> dict[str, Any]:
    """Write the head (ONNX; auxiliary classes folded into *other*) and the trunk overlay
    (npz, ``dtype``); returns the card's overlay entry."""
    out.mkdir(parents=True, exist_ok=True)
    n_out = net.head.fuse[-1].out_channels
    head = net.head if n_out == len(CLASSES) else fold_aux_head(net.head)
    export_head(head, out / f"{prefix}{HEAD_FILE}", channels=spec.channels)
    tensors = {name: t.astype(dtype) for name, t in trunk_overlay(net).items()}
    path = out / f"{prefix}{TRUNK_FILE}"
    with atomic_file(path) as fh:
        # numpy's stub reads **tensors as possibly holding allow_pickle: bool
        np.savez(fh, **tensors)  # type: ignore[arg-type]
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


def fit_finetune(run: DetectorTraining) -> dict[str, Any]:
    """Fine-tune on ``run.dataset`` (CCP layout); write ``PREFIX`` + ``garment_seg.onnx``,
    ``garment_seg_trunk.npz`` and ``garment_seg.json`` into ``run.out``; returns the card."""
    config, out, prefix, parity = run.model, run.out, run.prefix, run.parity
    assert isinstance(config, FinetuneConfig)
    pairs = list_images(run.dataset, parity, run.limit)
    # read (and checked) before any slow step: a bad folder fails at once
    pseudo_pairs, pseudo_card = (
        pseudo_label_pairs(run.pseudo_labels) if run.pseudo_labels else ([], {})
    )
    if not pairs:
        raise ConfigError(f"{run.dataset}: no photos with masks for parity {parity!r}")
    t0 = time.perf_counter()
    table = segmenter_label_table(run.dataset / "mask_labels.csv", config.aux_labels)
    labels = label_count(run.dataset / "mask_labels.csv")
    images = load_training_images(pairs, table, config.copy_paste > 0, labels)
    images += negative_training_images(config.negatives, config.long_side, config.seed)
    images += load_training_images(pseudo_pairs, IDENTITY_TABLE)
    t_load = time.perf_counter() - t0
    log.info(
        "%d photos + %d negatives + %d pseudo-labelled photos in memory (%.1f s)",
        len(pairs), config.negatives, len(pseudo_pairs), t_load,
    )  # fmt: skip
    net, losses, info = train_finetune(images, config)
    check_trained(net, run)
    spec = trunk_spec(config.trunk)
    overlay = write_finetuned(net, out, prefix, config.overlay_dtype, spec)
    n = config.finetune_blocks
    card = {
        "model": f"{HEAD_FILE}: head of the `segmenter` detector (1x1 laterals + 2 3x3 convs,"
        f" width {config.width}) on {spec.backbone} blocks {list(spec.blocks)}; stem and blocks"
        f" 0..{n - 1} fine-tuned with it ({TRUNK_FILE}), blocks {n}.. ImageNet",
        **trunk_entries(spec, f" with {TRUNK_FILE} laid over it"),
        TRUNK_OVERLAY_KEY: overlay,
        "output": OUTPUT,
        "training_data": f"{CCP_SOURCE}, {parity} image ids ({len(pairs)}"
        " photos, augmented: scale, crop, flip, colour"
        + (f", another person pasted in ({config.copy_paste:g})" if config.copy_paste else "")
        + "), CCP pixel labels"
        + (f"; {config.negatives} synthetic person-free images" if config.negatives else "")
        + pseudo_label_note(len(pseudo_pairs), pseudo_card),
        **(
            {
                "auxiliary_classes": {name: list(labels) for name, labels in CCP_AUX.items()},
                "auxiliary_note": "trained as classes of their own; the exported head folds"
                " them into *other* (log-sum-exp of the logits)",
            }
            if config.aux_labels
            else {}
        ),
        "training_command": run.command_line(),
        "training": {
            **asdict(config),
            "final_loss": round(losses[-1], 4),
            "losses": [round(v, 4) for v in losses],
            "device": info["device"],
            "epochs_run": info["epochs_run"],
            "load_seconds": round(t_load, 1),
            "train_seconds": round(info["train_seconds"], 1),
        },
        **card_tail(config.long_side),
    }
    write_card(out / f"{prefix}{CARD_FILE}", card)
    log.info(
        "wrote %s, %s (%d bytes), %s",
        out / f"{prefix}{HEAD_FILE}",
        f"{prefix}{TRUNK_FILE}",
        overlay["bytes"],
        f"{prefix}{CARD_FILE}",
    )
    return card
