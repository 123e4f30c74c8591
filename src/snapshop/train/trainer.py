"""NormSoftmax training loop: frozen trunk (optionally cached), trainable top, export to ONNX.

The loop (:class:`NormSoftmaxTrainer`) runs the steps of :class:`snapshop.train.loop.EpochLoop`;
the network's split and the frozen-feature cache are :mod:`snapshop.train.frozen`.

The backbone splits at ``boundary = n_blocks - train_blocks``: blocks before it are frozen,
the last ``train_blocks`` blocks, the head conv (when ``train_blocks > 0``), the embedding head
and the class proxies are trained. ``train_blocks=0`` freezes the whole backbone (pooled 1280-d
features in, the head learns); ``train_blocks=-1`` fine-tunes everything (a GPU job).

With ``cache=True`` the frozen part runs once per image and view (``views`` views: the
eval-time centre crop plus augmented ones) and its outputs are kept (fp16, also on disk under
``out_dir/cache``), so an epoch only runs the trainable top: the fast path on CPU.

BatchNorm statistics stay frozen (eval mode) throughout; affine parameters train.
Schedule: epoch 0 warms up the new parameters (head + proxies) only, then SGD (momentum 0.9)
on everything trainable, lr x ``lr_decay`` every ``lr_step`` epochs.

With ``anchor_weight > 0`` a second term trains the search the shop runs: each step embeds one
view of every training product's *anchor* rows (``anchor_where``, e.g. its catalog image), and
each other row of the batch must find its own product's anchor among all of them (the same
cosine / temperature cross-entropy, the anchors' embeddings standing in for the proxies).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from snapshop.allocator import keep_freed_memory
from snapshop.data.manifest import (
    ManifestRow,
    RowSelection,
    check_matches,
    check_no_self_matches,
    matches,
    parse_where,
    select_rows,
)
from snapshop.errors import ConfigError, ModelError
from snapshop.models.export import MAX_INPUT_SIZE, MIN_INPUT_SIZE
from snapshop.models.heads import POOLINGS, create_embedding_net
from snapshop.train.augment import AugmentConfig
from snapshop.train.frozen import (
    AugmentedRows,
    TrainableTop,
    compute_frozen,
    freeze_bn,
    new_and_trunk_params,
    readable_rows,
)
from snapshop.train.loop import EpochLoop, make_optimizer, resolve_device, seed_everything
from snapshop.train.losses import DEFAULT_TEMPERATURE, NormSoftmaxLoss, normsoftmax_logits
from snapshop.train.samplers import PKSampler

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "efficientnet_lite2"
    dim: int = 512
    temperature: float = DEFAULT_TEMPERATURE
    epochs: int = 8  # including the warm-up epoch
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 4  # lr x lr_decay every lr_step epochs after the warm-up
    lr_decay: float = 0.1
    warmup_epochs: int = 1
    classes_per_batch: int = 16  # P
    samples_per_class: int = 4  # K
    train_blocks: int = 0  # last MBConv blocks to train; 0 = backbone frozen; -1 = all
    cache: bool | None = None  # cache frozen features; None: unless the whole backbone trains
    views: int = 4  # cached views per image: centre crop + (views - 1) augmented
    device: str = "cpu"
    threads: int = 2
    workers: int = 0  # image-decoding processes when not caching (0: in the training process)
    # Backbone lr = lr x this. Default: 0.1 when the whole backbone trains (at lr 0.01 with
    # frozen BatchNorm statistics the stem and early blocks blow up: the loss jumped to
    # ln(classes) right after the warm-up on grocery-dev), 1 otherwise.
    backbone_lr_scale: float | None = None
    seed: int = 0
    pretrained: bool = True
    input_size: int | None = None  # default: the backbone's
    # the size the exported model embeds at (models.export.resize_model); None: as trained
    embed_size: int | None = None
    onnx_frozen: bool = True  # on the CPU, run the frozen part with ONNX Runtime
    pooling: str = "avg"  # global pool of the last feature map: avg or gem (models.heads)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # rows matching all these COLUMN=VALUE filters are their product's anchor (catalog image)
    anchor_where: tuple[str, ...] = ()
    anchor_weight: float = 0.0  # weight of the photo -> anchor term; 0: NormSoftmax alone

    def __post_init__(self) -> None:
        if self.cache is None:  # nothing is frozen when every block trains
            object.__setattr__(self, "cache", self.train_blocks != -1)
        checks = [
            (self.dim >= 2, f"dim must be >= 2, got {self.dim}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in 0..epochs"),
            (
                0 < self.lr < math.inf and self.lr_step >= 1,
                "lr must be finite and > 0, lr_step >= 1",
            ),
            (self.classes_per_batch >= 2 and self.samples_per_class >= 1, "need P >= 2, K >= 1"),
            (self.train_blocks >= -1, f"train_blocks must be >= -1, got {self.train_blocks}"),
            (self.views >= 1, f"views must be >= 1, got {self.views}"),
            (self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (0 <= self.seed < 2**32, f"seed must be in 0..2**32-1, got {self.seed}"),
            *(
                (
                    size is None or MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE,
                    f"{what} must be in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}, got {size}",
                )
                for what, size in (("input_size", self.input_size), ("embed_size", self.embed_size))
            ),
            (
                self.backbone_lr_scale is None or self.backbone_lr_scale > 0,
                f"backbone_lr_scale must be > 0, got {self.backbone_lr_scale}",
            ),
            (
                not (self.cache and self.train_blocks == -1),
                "cannot cache features when the whole backbone trains (train_blocks=-1)",
            ),
            (self.anchor_weight >= 0, f"anchor_weight must be >= 0, got {self.anchor_weight}"),
            (
                bool(self.anchor_where) == (self.anchor_weight > 0),
                "anchor_where and anchor_weight > 0 go together (which rows, and how much)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parse_where(list(self.anchor_where))  # a malformed filter fails here, not mid-setup

    @property
    def backbone_lr(self) -> float:
        scale = self.backbone_lr_scale
        if scale is None:
            scale = 0.1 if self.train_blocks == -1 else 1.0
        return self.lr * scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model_dir: Path
    classes: list[str]
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    seconds: float


def score_retrieval(
    query_vecs: NDArray[np.float32],
    query_products: Sequence[str],
    gallery_vecs: NDArray[np.float32],
    gallery_products: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[dict[int, float], float]:
    """Product-level Recall@K and mAP@R (no timing): the per-epoch held-out score."""
    from snapshop.evaluate.retrieval import map_at_r, product_scores, recall_at_k

    products = sorted(set(gallery_products))
    pid = {p: i for i, p in enumerate(products)}
    keep = [i for i, p in enumerate(query_products) if p in pid]
    q_labels = np.array([pid[query_products[i]] for i in keep], dtype=np.int64)
    g_labels = np.array([pid[p] for p in gallery_products], dtype=np.int64)
    sims = query_vecs[keep] @ gallery_vecs.T
    recall = recall_at_k(product_scores(sims, g_labels, len(products)), q_labels, ks)
    return recall, map_at_r(sims, q_labels, g_labels)


def held_out_scores(
    vecs: NDArray[np.float32],
    rows: Sequence[ManifestRow],
    gallery_where: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The held-out score of training: ``photo_to_all`` (and ``photo_to_COLUMN=VALUE`` for
    ``gallery_where``), Recall@1/5/10 and mAP@R of the query rows against the gallery rows;
    ``vecs[i]`` embeds ``rows[i]``."""
    metrics: dict[str, Any] = {}
    where = gallery_where
    protocols: dict[str, dict[str, str]] = {"all": {}} | ({"where": where} if where else {})
    for name, gallery_filter in protocols.items():
        g = [i for i, r in enumerate(rows) if r.role == "gallery" and matches(r, gallery_filter)]
        shown = {rows[i].sku for i in g}
        q = [i for i, r in enumerate(rows) if r.role == "query" and r.sku in shown]
        if not q:  # no query's product is in this gallery: nothing to score
            continue
        recall, map_r = score_retrieval(
            vecs[q], [rows[i].sku for i in q], vecs[g], [rows[i].sku for i in g], ks=(1, 5, 10)
        )
        key = (
            "photo_to_all"
            if name == "all"
            else "photo_to_" + ",".join(f"{k}={v}" for k, v in gallery_filter.items())
        )
        metrics[key] = {f"R@{k}": round(v, 4) for k, v in recall.items()}
        metrics[key]["mAP@R"] = round(map_r, 4)
    return metrics


def _lr_at(config: TrainConfig, epoch: int) -> float:
    if epoch < config.warmup_epochs:
        return config.lr
    return config.lr * config.lr_decay ** ((epoch - config.warmup_epochs) // config.lr_step)


def _embed_eval(
    top: TrainableTop, feats: torch.Tensor, device: torch.device, batch: int = 128
) -> NDArray[np.float32]:
    top.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(feats), batch):
            x = feats[start : start + batch, 0].to(device, torch.float32)
            out.append(top(x).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


class NormSoftmaxTrainer(EpochLoop):
    """The NormSoftmax loop in the steps of :class:`snapshop.train.loop.EpochLoop`: setup
    (network, frozen features, optimiser), resume, epochs (P x K batches; epoch 0 warms up the
    new parameters only), evaluate (held-out Recall@K, mAP@R), then :meth:`export`."""

    def __init__(
        self,
        train_rows: Sequence[ManifestRow],
        out_dir: Path,
        config: TrainConfig,
        eval_rows: Sequence[ManifestRow] | None = None,
        gallery_where: dict[str, str] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.train_rows, self.config, self.epochs = train_rows, config, config.epochs
        self.eval_rows, self.gallery_where, self.progress = eval_rows, gallery_where, progress
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.out_dir / "cache"
        self.checkpoint_path = self.out_dir / CHECKPOINT
        self.classes = sorted({r.sku for r in train_rows})

    # -- setup -----------------------------------------------------------------------------
    def check_data(self) -> None:
        if len(self.classes) < 2:
            raise ConfigError(f"training needs at least 2 products, got {len(self.classes)}")
        eval_gallery = [r for r in self.eval_rows or () if r.role == "gallery"]
        check_matches(
            eval_gallery, self.gallery_where or {}, "gallery_where", "evaluation gallery rows"
        )
        if self.eval_rows:
            check_no_self_matches(self.eval_rows, "the evaluation rows")
            overlap = set(self.classes) & {r.sku for r in self.eval_rows}
            if overlap:
                raise ConfigError(
                    f"{len(overlap)} evaluation products are also training products"
                    f" (e.g. {sorted(overlap)[:3]}); evaluate on held-out products only"
                )

    def setup(self) -> None:
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.check_data()
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        if config.device == "cpu" and config.threads:
            torch.set_num_threads(config.threads)
        self.build_network()
        self.prepare_data()
        params = [
            {"params": self.new_params, "lr": config.lr},
            {"params": list(self.loss_fn.parameters()), "lr": config.lr},
        ]
        if self.trunk_params:
            params.append({"params": self.trunk_params, "lr": config.backbone_lr, "backbone": True})
        self.optimizer = make_optimizer(
            "sgd", params, momentum=config.momentum, weight_decay=config.weight_decay
        )

    def build_network(self) -> None:
        """The embedding net split into its frozen part and :class:`TrainableTop`, the loss."""
        config = self.config
        self.net = create_embedding_net(
            config.backbone, dim=config.dim, pretrained=config.pretrained, pooling=config.pooling
        )
        n_blocks = len(self.net.backbone.blocks)
        if config.train_blocks > n_blocks:
            raise ConfigError(f"{config.backbone} has {n_blocks} blocks; train_blocks is too large")
        boundary = n_blocks - config.train_blocks if config.train_blocks >= 0 else 0
        self.size = config.input_size or self.net.backbone.spec.input_size
        top = TrainableTop(self.net, boundary, config.train_blocks).to(self.device)
        # torch's stubs omit Module.to(memory_format=...), which exists at runtime
        self.top = top.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.new_params, self.trunk_params = new_and_trunk_params(
            self.net, boundary, config.train_blocks
        )
        self.loss_fn = NormSoftmaxLoss(config.dim, len(self.classes), config.temperature).to(
            self.device
        )

    def prepare_data(self) -> None:
        """Frozen features (cached) or readable rows for training; frozen features for eval."""
        config = self.config
        self.n_views = config.views if config.cache else 1
        self.train_feats: torch.Tensor | None = None
        if config.cache:
            self.train_feats, kept = compute_frozen(
                self.top,
                self.train_rows,
                self.size,
                self.n_views,
                config,
                config.seed,
                self.cache_dir,
                "train",
            )
            self.rows_kept = [self.train_rows[i] for i in kept]
        else:
            self.rows_kept = readable_rows(self.train_rows)
        label_of = {c: i for i, c in enumerate(self.classes)}
        self.labels = np.array([label_of[r.sku] for r in self.rows_kept], dtype=np.int64)
        readable = len(np.unique(self.labels))
        if readable < 2:
            raise ConfigError(f"{readable} training product(s) have a readable image; need 2")
        self.eval_feats: torch.Tensor | None = None
        self.eval_kept: list[ManifestRow] = []
        if self.eval_rows:
            self.eval_feats, ekept = compute_frozen(
                self.top, self.eval_rows, self.size, 1, config, config.seed, self.cache_dir, "eval"
            )
            self.eval_kept = [self.eval_rows[i] for i in ekept]
        self.batch = config.classes_per_batch * config.samples_per_class
        self.steps = max(1, math.ceil(len(self.rows_kept) / self.batch))
        self.augmented = AugmentedRows(self.rows_kept, self.size, config.augment)
        self.anchors = self.find_anchors()

    def find_anchors(self) -> list[NDArray[np.int64]]:
        """Per product with anchor rows (in label order), the positions of those rows; empty
        without ``anchor_weight``."""
        if not self.config.anchor_weight:
            return []
        where = parse_where(list(self.config.anchor_where))
        is_anchor = np.array([matches(r, where) for r in self.rows_kept], dtype=bool)
        anchors = [
            np.flatnonzero(is_anchor & (self.labels == label)) for label in range(len(self.classes))
        ]
        anchors = [a for a in anchors if len(a)]
        if len(anchors) < 2:
            raise ConfigError(
                f"--anchor-where {' '.join(self.config.anchor_where)}: {len(anchors)} training"
                " product(s) have an anchor row; the anchor term needs at least 2"
            )
        self.is_anchor = is_anchor
        self.anchor_label = np.full(len(self.classes), -1, dtype=np.int64)
        for n, positions in enumerate(anchors):
            self.anchor_label[self.labels[positions[0]]] = n
        log.info("anchor term: %d products, %d anchor rows", len(anchors), int(is_anchor.sum()))
        return anchors

    # -- resume ----------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "classes": self.classes,
            "config": self.config.to_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        # a setting missing from an older checkpoint had its default then
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        later = ("epochs", "embed_size")  # settings of what comes after the checkpoint
        saved = {k: v for k, v in {**defaults, **state["config"]}.items() if k not in later}
        wanted = {k: v for k, v in self.config.to_dict().items() if k not in later}
        if state["classes"] != self.classes or saved != wanted:
            raise ConfigError(
                f"{self.checkpoint_path}: saved with other classes or settings; not resuming"
            )
        self.net.load_state_dict(state["net"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- epoch -----------------------------------------------------------------------------
    def batches(self, sampler: PKSampler, epoch: int) -> Iterator[tuple[torch.Tensor, Any]]:
        """(frozen-part output, row positions) per batch: cached views, or images augmented
        now (decoded in DataLoader workers when ``workers > 0``)."""
        config = self.config
        if self.train_feats is not None:
            view_rng = np.random.default_rng(config.seed * 1000 + epoch + 7)
            for idx in sampler:
                v = view_rng.integers(0, self.n_views, size=len(idx))
                yield self.train_feats[torch.from_numpy(idx), torch.from_numpy(v)], idx
            return
        index_batches = list(sampler)
        base = (config.seed * 1000 + epoch) * 10_000_019
        keyed = [
            [(int(i), base + step * self.batch + j) for j, i in enumerate(idx)]
            for step, idx in enumerate(index_batches)
        ]
        loader = torch.utils.data.DataLoader(
            self.augmented,
            batch_sampler=keyed,
            num_workers=config.workers,
            pin_memory=self.device.type == "cuda",
        )
        for idx, images in zip(index_batches, loader, strict=True):
            with torch.no_grad():
                yield self.top.frozen(images.to(self.device, non_blocking=True)), idx

    def anchor_inputs(self, rng: np.random.Generator, epoch: int, step: int) -> torch.Tensor:
        """One frozen-part output per anchored product (a random anchor row, a random view)."""
        picks = np.array([rng.choice(positions) for positions in self.anchors])
        if self.train_feats is not None:
            views = rng.integers(0, self.n_views, size=len(picks))
            return self.train_feats[torch.from_numpy(picks), torch.from_numpy(views)]
        base = ((self.config.seed * 1000 + epoch) * 10_000_019 + step) * 7 + 3
        images = np.stack([self.augmented[(int(i), base + j)] for j, i in enumerate(picks)])
        with torch.no_grad():
            return self.top.frozen(torch.from_numpy(images).to(self.device))

    def anchor_loss(
        self, embeddings: torch.Tensor, anchor_embeddings: torch.Tensor, idx: NDArray[np.int64]
    ) -> torch.Tensor:
        """Cross-entropy of each non-anchor row against every anchor, its own product's the
        target (zero when the batch has no such row)."""
        targets = self.anchor_label[self.labels[idx]]
        keep = torch.from_numpy((targets >= 0) & ~self.is_anchor[idx]).to(self.device)
        if not bool(keep.any()):
            return embeddings.sum() * 0
        y = torch.from_numpy(targets).to(self.device)[keep]
        logits = normsoftmax_logits(embeddings[keep], anchor_embeddings, self.config.temperature)
        return F.cross_entropy(logits, y)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        config = self.config
        warm = epoch < config.warmup_epochs
        for p in self.trunk_params:
            p.requires_grad_(not warm)
        lr = _lr_at(config, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * (config.backbone_lr / config.lr if group.get("backbone") else 1)
        freeze_bn(self.top)
        sampler = PKSampler(
            self.labels,
            config.classes_per_batch,
            config.samples_per_class,
            self.steps,
            seed=config.seed * 1000 + epoch,
        )
        # the anchors draw from their own generator: without them a run repeats exactly
        anchor_rng = np.random.default_rng(config.seed * 1000 + epoch + 13)
        t_epoch = time.perf_counter()
        losses, anchor_losses = [], []
        for step, (x, idx) in enumerate(self.batches(sampler, epoch)):
            n_batch = len(idx)
            if self.anchors:
                x = torch.cat([x, self.anchor_inputs(anchor_rng, epoch, step).to(x.device)])
            x = x.to(self.device, torch.float32)
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(self.labels[idx]).to(self.device)
            with torch.set_grad_enabled(True):
                embeddings = self.top(x)
                loss = self.loss_fn(embeddings[:n_batch], y)
                if self.anchors:
                    term = self.anchor_loss(embeddings[:n_batch], embeddings[n_batch:], idx)
                    anchor_losses.append(float(term.detach()))
                    loss = loss + config.anchor_weight * term
            value = float(loss.detach())
            if not math.isfinite(value):  # stop before a NaN step spoils the weights
                raise ModelError(
                    f"the training diverged at epoch {epoch} step {step} (loss {value}); nothing"
                    " was exported: try a lower --lr"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(value)
        record: dict[str, Any] = {"warmup": warm, "lr": lr, "loss": float(np.mean(losses))}
        if anchor_losses:
            record["anchor_loss"] = float(np.mean(anchor_losses))
        return {**record, "seconds": round(time.perf_counter() - t_epoch, 1)}

    # -- evaluate --------------------------------------------------------------------------
    def evaluate(self, epoch: int) -> dict[str, Any]:
        """``photo_to_all`` (and ``photo_to_COLUMN=VALUE`` for ``gallery_where``): Recall@1/5/10
        and mAP@R of the held-out rows."""
        if self.eval_feats is None:
            return {}
        vecs = _embed_eval(self.top, self.eval_feats, self.device)
        return held_out_scores(vecs, self.eval_kept, self.gallery_where)

    def describe(self, record: dict[str, Any]) -> str:
        return json.dumps(record)

    def end_epoch(self, record: dict[str, Any]) -> None:
        super().end_epoch(record)
        (self.out_dir / HISTORY).write_text(json.dumps(self.history, indent=2) + "\n")

    def on_epoch(self, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(record)

    # -- export ----------------------------------------------------------------------------
    def held_out_metrics(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {k: v for k, v in last.items() if k.startswith("photo_to")}

    def export(self, data_name: str, seconds: float) -> None:
        """model.onnx + model.json (card with the training settings and held-out scores)."""
        from snapshop.models.card import sha256_file
        from snapshop.models.efficientnet_lite import weights_path
        from snapshop.models.export import resize_model, save_model

        config, history = self.config, self.history
        # torch's stubs omit Module.to(memory_format=...), which exists at runtime
        net = self.net.to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
        eval_products = len({r.sku for r in self.eval_kept})
        save_model(
            net,
            self.out_dir,
            name=f"normsoftmax-{config.backbone}-d{config.dim}",
            source_weights_sha256=sha256_file(weights_path(config.backbone)),
            kind="normsoftmax",
            training={
                "data": data_name,
                "classes": self.classes,
                "n_classes": len(self.classes),
                "n_images": len(self.rows_kept),
                "dim": config.dim,
                "temperature": config.temperature,
                "epochs": config.epochs,
                "train_blocks": config.train_blocks,
                "backbone_lr": config.backbone_lr,
                "config": config.to_dict(),
                "final_loss": history[-1]["loss"] if history else None,
                "seconds": round(seconds, 1),
            },
            metrics={"held_out": self.held_out_metrics(), "eval_products": eval_products},
            input_size=self.size,
        )
        if config.embed_size is not None:  # the held-out metrics above are at the training size
            resize_model(self.out_dir, config.embed_size, self.out_dir)


def train(
    train_rows: Sequence[ManifestRow],
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    eval_rows: Sequence[ManifestRow] | None = None,
    gallery_where: dict[str, str] | None = None,
    resume: bool = False,
    export: bool = True,
    data_name: str = "",
    progress: Callable[[dict[str, Any]], None] | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train a NormSoftmax embedder on ``train_rows`` (product_id = class), export it to
    ``out_dir`` (model.onnx + model.json). ``eval_rows`` (query/gallery, products disjoint from
    the training ones) are scored after every epoch; ``gallery_where`` adds a second protocol.
    Frozen features are cached in ``cache_dir`` (default ``out_dir/cache``), keyed by the
    images and the settings that change them, so runs that differ in head settings share them.
    From here on, the process keeps the memory it frees
    (:func:`snapshop.allocator.keep_freed_memory`).
    """
    keep_freed_memory()
    t_start = time.perf_counter()
    trainer = NormSoftmaxTrainer(
        train_rows, out_dir, config, eval_rows, gallery_where, progress, cache_dir
    )
    history = trainer.run(resume=resume)
    if export:
        trainer.export(data_name, time.perf_counter() - t_start)
    return TrainResult(
        trainer.out_dir,
        trainer.classes,
        history,
        trainer.held_out_metrics(),
        time.perf_counter() - t_start,
    )


def train_from_manifest(
    manifest: Path,
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    selection: RowSelection = RowSelection(),
    *,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """:func:`train` on the rows of a manifest CSV that ``selection`` picks (what ``snapshop
    train`` runs)."""
    from snapshop.data.manifest import read_manifest

    rows = read_manifest(manifest)
    train_rows, eval_rows, gallery_where = select_rows(rows, selection)
    return train(
        train_rows,
        out_dir,
        config,
        eval_rows or None,
        gallery_where,
        resume=resume,
        data_name=str(manifest),
        progress=progress,
        cache_dir=cache_dir,
    )
