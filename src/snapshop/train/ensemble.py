"""Train several embedders on one manifest and merge them into one model (issue #20).

Each member trains as ``snapshop train`` would, into ``OUT/members/<n>-<backbone>`` (its own
checkpoint, cache and card, so an interrupted run resumes member by member); then
:func:`snapshop.models.ensemble.merge_models` writes the merged model into ``OUT`` and its
held-out score is measured at the size it embeds at. Two backbones trained this way (Lite2 and
Lite1, embedding at 384 px) are the CPU recipe for photo -> catalog search
(docs/benchmarks/retrieval.md, "Two backbones as one model").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshop.data.manifest import RowSelection, select_rows
from snapshop.errors import ConfigError
from snapshop.models.card import ModelCard, write_card
from snapshop.models.efficientnet_lite import BACKBONES
from snapshop.train.trainer import TrainConfig, TrainResult, held_out_scores, train

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"


@dataclass
class EnsembleResult:
    model_dir: Path
    card: ModelCard
    members: list[TrainResult]
    metrics: dict[str, Any]  # the merged model's held-out score, at the size it embeds at
    seconds: float


def embed_size_of(config: TrainConfig) -> int:
    """The input size the model trained with ``config`` embeds at."""
    if config.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {config.backbone!r}; known: {sorted(BACKBONES)}")
    return config.embed_size or config.input_size or BACKBONES[config.backbone].input_size


def member_configs(base: TrainConfig, backbones: Sequence[str]) -> list[TrainConfig]:
    """One config per backbone of ``backbones``, otherwise ``base``'s; a backbone named again
    trains with the next seed (``--backbone efficientnet_lite2`` twice: two seeds)."""
    seen: dict[str, int] = {}
    configs = []
    for name in backbones:
        configs.append(dataclasses.replace(base, backbone=name, seed=base.seed + seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    return configs


def member_dirs(out_dir: Path, configs: Sequence[TrainConfig]) -> list[Path]:
    return [
        Path(out_dir) / MEMBERS_DIR / f"{n}-{c.backbone}" for n, c in enumerate(configs, start=1)
    ]


def train_ensemble_from_manifest(
    manifest: Path,
    out_dir: Path,
    configs: Sequence[TrainConfig],
    selection: RowSelection = RowSelection(),
    *,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    cache_dir: Path | None = None,
    on_member: Callable[[int, TrainConfig], None] | None = None,
) -> EnsembleResult:
    """Train one member per config of ``configs`` (two or more; every member must embed at
    the same size: set ``embed_size``) on the rows ``selection`` picks, then merge them into
    ``out_dir``. ``cache_dir``: one frozen-feature cache for every member (its entries are
    named by backbone and settings); default, each member's own. ``on_member(n, config)`` is
    called before member ``n`` (1-based) trains."""
    from snapshop.data.manifest import read_manifest
    from snapshop.evaluate.retrieval import embed_paths
    from snapshop.models.embedder import load_embedder
    from snapshop.models.ensemble import merge_models

    if len(configs) < 2:
        raise ConfigError(f"an ensemble needs at least two members, got {len(configs)}")
    sizes = {embed_size_of(c) for c in configs}
    if len(sizes) > 1:
        raise ConfigError(
            f"the members would embed at {sorted(sizes)} px; one size is needed to merge them"
            " (set embed_size, e.g. 384)"
        )
    t_start = time.perf_counter()
    rows = read_manifest(manifest)
    train_rows, eval_rows, gallery_where = select_rows(rows, selection)
    results = []
    for n, (config, member_dir) in enumerate(
        zip(configs, member_dirs(out_dir, configs), strict=True), start=1
    ):
        if on_member is not None:
            on_member(n, config)
        results.append(train(
            train_rows, member_dir, config, eval_rows or None, gallery_where, resume=resume,
            data_name=str(manifest), progress=progress, cache_dir=cache_dir,
        ))  # fmt: skip
    # the training's own output folder: a resumed or repeated run writes its merge again
    card = merge_models([r.model_dir for r in results], out_dir, overwrite=True)
    metrics: dict[str, Any] = {}
    if eval_rows:
        paths = [str(r.path) for r in eval_rows]
        vecs, kept, skipped, _ = embed_paths(load_embedder(out_dir), paths)
        if skipped:  # the members' own scores skipped them too
            log.warning("%d held-out images unreadable, left out: %s", len(skipped), skipped[0])
        metrics = held_out_scores(vecs, [eval_rows[i] for i in kept], gallery_where)
    seconds = time.perf_counter() - t_start
    card = dataclasses.replace(
        card,
        metrics={"held_out": metrics, "eval_products": len({r.sku for r in eval_rows})},
        training={**card.training, "data": str(manifest), "seconds": round(seconds, 1)},
    )
    write_card(out_dir, card)
    return EnsembleResult(Path(out_dir), card, results, metrics, seconds)
