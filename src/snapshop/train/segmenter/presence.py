"""Fitting the segmenter's presence gate (:mod:`snapshop.detect.presence`) on image-level tags.

Labels: ccp-tags' ``groups`` column and, for ccp-dev, the groups of its ``boxes.csv``.
Features: the shipped segmenter's own (:meth:`SegmenterDetector.look`), computed once per photo
and cached in an ``.npz`` (with the segmenter's ungated boxes, for scoring the gate). The head
is a multi-label logistic regression (or a one-hidden-layer MLP) fitted with Adam in numpy;
the lower threshold maximises the F1 of "the gated detector boxes a lower garment" on
out-of-fold probabilities of the training photos, so no photo chooses its own threshold.

    python -m snapshop.train.segmenter.presence ../shared/datasets/ccp-tags/tags.csv \\
        ../shared/datasets/ccp-dev --out src/snapshop/detect/weights --cache /tmp/presence.npz
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.detect.base import LOWER, POSITIONS, keep_best_per_position
from snapshop.detect.presence import (
    GATE_CARD_FILE,
    GATE_FILE,
    GROUPS,
    POSITION_GROUPS,
    PresenceGate,
    group_probabilities,
    position_probabilities,
)
from snapshop.errors import ConfigError, ManifestError

log = logging.getLogger(__name__)
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # weight decay of the head, chosen out-of-fold


@dataclass(frozen=True)
class GateFit:
    hidden: int = 0  # 0: logistic regression; N: one hidden ReLU layer of N units
    l2: float = 1e-3
    steps: int = 400
    lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 0 or self.l2 < 0 or self.steps < 1 or self.lr <= 0:
            raise ConfigError("need hidden >= 0, l2 >= 0, steps >= 1, lr > 0")


def tag_groups(tags_csv: Path) -> dict[str, set[str]]:
    """ccp-tags ``tags.csv`` -> {path: garment groups}."""
    with tags_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "groups" not in rows[0]:
        raise ManifestError(f"{tags_csv}: expected a ccp-tags CSV with a groups column")
    return {r["path"]: {g for g in r["groups"].split(";") if g in GROUPS} for r in rows}


def box_groups(boxes_csv: Path, manifest_csv: Path) -> dict[str, set[str]]:
    """ccp-dev ``boxes.csv`` + ``manifest.csv`` -> {path: garment groups} (every photo)."""
    with manifest_csv.open(newline="") as f:
        out: dict[str, set[str]] = {r["path"]: set() for r in csv.DictReader(f)}
    with boxes_csv.open(newline="") as f:
        for r in csv.DictReader(f):
            if r["group"] in GROUPS and r["path"] in out:
                out[r["path"]].add(r["group"])
    return out


def label_matrix(groups: list[set[str]]) -> NDArray[np.float32]:
    """[{group, ...}, ...] -> (N, len(GROUPS)) 0/1."""
    return np.array([[g in gs for g in GROUPS] for gs in groups], np.float32)


def has_position(labels: NDArray[np.float32], position: str) -> NDArray[np.bool_]:
    cols = [GROUPS.index(g) for g in POSITION_GROUPS[position]]
    return np.asarray(labels[:, cols].any(axis=1), bool)


def fit_gate(
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    fit: GateFit = GateFit(),
    thresholds: dict[str, float] | None = None,
) -> PresenceGate:
    """Fit the head on (N, D) features and (N, len(GROUPS)) 0/1 labels (full-batch Adam on the
    mean binary cross-entropy + ``l2`` on the weights)."""
    rng = np.random.default_rng(fit.seed)
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    x = ((features - mean) / scale).astype(np.float32)
    dims = [x.shape[1]] + ([fit.hidden] if fit.hidden else []) + [len(GROUPS)]
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        params += [rng.normal(0, 1 / np.sqrt(d_in), (d_in, d_out)).astype(np.float32),
                   np.zeros(d_out, np.float32)]  # fmt: skip
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    n = len(x)
    for step in range(1, fit.steps + 1):
        # forward, keeping each layer's input
        acts, h = [x], x
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                h = np.maximum(h, 0.0)
                acts.append(h)
        prob = 1.0 / (1.0 + np.exp(-np.clip(h, -30, 30)))
        delta = (prob - labels) / (n * labels.shape[1])
        grads: list[NDArray[np.float32]] = [np.empty(0, np.float32)] * len(params)
        for i in range(len(params) - 2, -1, -2):
            a = acts[i // 2]
            grads[i] = a.T @ delta + fit.l2 * params[i]
            grads[i + 1] = delta.sum(axis=0)
            if i:
                delta = (delta @ params[i].T) * (a > 0)
        for j, g in enumerate(grads):
            m[j] = 0.9 * m[j] + 0.1 * g
            v[j] = 0.999 * v[j] + 0.001 * g * g
            params[j] -= (
                fit.lr * (m[j] / (1 - 0.9**step)) / (np.sqrt(v[j] / (1 - 0.999**step)) + 1e-8)
            )
    layers = tuple((params[i], params[i + 1]) for i in range(0, len(params), 2))
    return PresenceGate(mean.astype(np.float32), scale.astype(np.float32), layers, thresholds or {})


def predict(gate: PresenceGate, features: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
    x = (features - gate.mean) / gate.scale
    return position_probabilities(group_probabilities(x, list(gate.layers)))


def out_of_fold(
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    fit: GateFit,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, NDArray[np.float32]]:
    """{position: (N,) probabilities}, each photo's from a head fitted without it."""
    order = np.random.default_rng(seed).permutation(len(features))
    out = {pos: np.zeros(len(features), np.float32) for pos in POSITIONS}
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        probs = predict(fit_gate(features[train], labels[train], fit), features[test])
        for pos in POSITIONS:
            out[pos][test] = probs[pos]
    return out


def choose_l2(
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    fit: GateFit = GateFit(),
    grid: tuple[float, ...] = L2_GRID,
) -> GateFit:
    """``fit`` with the ``l2`` of ``grid`` whose out-of-fold lower-presence log-loss on these
    photos is lowest."""
    truth = has_position(labels, LOWER)
    losses = []
    for l2 in grid:
        p = np.clip(out_of_fold(features, labels, replace(fit, l2=l2))[LOWER], 1e-6, 1 - 1e-6)
        losses.append(-float(np.mean(np.where(truth, np.log(p), np.log(1 - p)))))
    return replace(fit, l2=grid[int(np.argmin(losses))])


def presence_f1(found: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    tp = float((found & truth).sum())
    return 2 * tp / max(float(found.sum() + truth.sum()), 1.0)


def choose_threshold(
    prob: NDArray[np.float32], found: NDArray[np.bool_], truth: NDArray[np.bool_]
) -> float:
    """The threshold t maximising the F1 of ``found & (prob >= t)`` against ``truth`` (0 keeps
    every box; ties go to the lowest t, which drops the fewest)."""
    candidates = np.concatenate([[0.0], np.unique(prob[found])])
    scores = [presence_f1(found & (prob >= t), truth) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def cache_photos(
    detector: Any, photos: list[tuple[str, Path]], cache: Path | None = None
) -> dict[str, NDArray[Any]]:
    """Run the (ungated) segmenter once per photo: {"paths", "features" (N, D), "boxes"
    (N, 2, 5): x1, y1, x2, y2, score per position (upper, lower), NaN where none}; read from /
    written to ``cache`` (an .npz) when given."""
    from snapshop.images import DecodeLimits, load_image

    keys = np.array([key for key, _ in photos])
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as npz:
            data = {name: npz[name] for name in npz.files}
        if list(data["paths"]) == list(keys):
            return data
        log.info("%s holds other photos: recomputing", cache)
    features, boxes = [], np.full((len(photos), len(POSITIONS), 5), np.nan, np.float32)
    for i, (_, path) in enumerate(photos):
        rgb = np.asarray(load_image(path, DecodeLimits(max_side=None)).convert("RGB"))
        found, feats = detector.detect_ungated(rgb)
        features.append(feats)
        for pos, det in keep_best_per_position(found).items():
            boxes[i, POSITIONS.index(pos)] = (*det.box.as_tuple(), det.score)
        if i % 100 == 0:
            log.info("presence features: %d / %d photos", i, len(photos))
    data = {"paths": keys, "features": np.stack(features), "boxes": boxes}
    if cache is not None:
        np.savez(cache, **data)
    return data


def training_photos(
    tags_csv: Path | None, ccp_dev: Path | None
) -> tuple[list[tuple[str, Path]], NDArray[np.float32], NDArray[np.str_]]:
    """(key, image path) of every photo, its (N, len(GROUPS)) labels and source name."""
    photos, groups, source = [], [], []
    if tags_csv is not None:
        for path, gs in tag_groups(tags_csv).items():
            photos.append((f"ccp-tags/{path}", tags_csv.parent / path))
            groups.append(gs)
            source.append("ccp-tags")
    if ccp_dev is not None:
        for path, gs in box_groups(ccp_dev / "boxes.csv", ccp_dev / "manifest.csv").items():
            photos.append((f"ccp-dev/{path}", ccp_dev / path))
            groups.append(gs)
            source.append("ccp-dev")
    if not photos:
        raise ConfigError("no training photos: give ccp-tags' tags.csv and/or ccp-dev")
    return photos, label_matrix(groups), np.array(source)


def train_presence_gate(
    tags_csv: Path | None,
    ccp_dev: Path | None,
    out: Path,
    fit: GateFit | None = None,
    cache: Path | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Fit the gate on every photo given and write ``garment_presence.npz`` + its card into
    ``out`` (beside the segmenter model ``model``; None: the shipped one). ``fit`` None: a
    logistic regression, its ``l2`` chosen out-of-fold (:func:`choose_l2`). Returns the card."""
    from snapshop.detect.segmenter import SegmenterDetector

    detector = SegmenterDetector(model, gate=False)
    photos, labels, source = training_photos(tags_csv, ccp_dev)
    data = cache_photos(detector, photos, cache)
    features = data["features"]
    found_lower = ~np.isnan(data["boxes"][:, POSITIONS.index(LOWER), 0])
    truth_lower = has_position(labels, LOWER)
    if fit is None:
        fit = choose_l2(features, labels)
    oof = out_of_fold(features, labels, fit)
    threshold = choose_threshold(oof[LOWER], found_lower, truth_lower)
    gate = fit_gate(features, labels, fit, {LOWER: threshold})
    before = presence_f1(found_lower, truth_lower)
    after = presence_f1(found_lower & (oof[LOWER] >= threshold), truth_lower)
    data_bytes = gate.to_bytes()
    card = {
        "model": f"{GATE_FILE}: presence head of the segmenter ("
        + ("logistic regression" if not fit.hidden else f"MLP, {fit.hidden} hidden ReLU units")
        + f") on its {features.shape[1]} pooled features; P(position) = 1 - prod(1 - P(group))",
        "groups": list(GROUPS),
        "feature_dim": int(features.shape[1]),
        "thresholds": {LOWER: threshold},
        "sha256": hashlib.sha256(data_bytes).hexdigest(),
        "segmenter_head_sha256": hashlib.sha256(detector.head_model).hexdigest(),
        "training_data": {s: int((source == s).sum()) for s in np.unique(source)},
        "fit": {"hidden": fit.hidden, "l2": fit.l2, "steps": fit.steps, "lr": fit.lr},
        "l2_rule": f"lowest out-of-fold lower log-loss of {list(L2_GRID)} (unless given)",
        "threshold_rule": "max F1 of gated lower presence, out-of-fold (5) on the training photos",
        "out_of_fold_lower_presence_f1": {"ungated": round(before, 4), "gated": round(after, 4)},
        "training_command": "python -m snapshop.train.segmenter.presence "
        "../shared/datasets/ccp-tags/tags.csv ../shared/datasets/ccp-dev "
        "--out src/snapshop/detect/weights",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / GATE_FILE).write_bytes(data_bytes)
    (out / GATE_CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log.info(
        "presence gate: lower threshold %.3f, out-of-fold F1 %.3f -> %.3f", threshold, before, after
    )
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tags", type=Path, help="ccp-tags/tags.csv")
    parser.add_argument("ccp_dev", type=Path, help="ccp-dev folder (boxes.csv, manifest.csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="segmenter model (default: the shipped one)")
    parser.add_argument("--cache", type=Path, help="feature cache (.npz, outside the repo)")
    parser.add_argument("--hidden", type=int, default=0)
    parser.add_argument("--l2", type=float, help="weight decay (default: chosen out-of-fold)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    card = train_presence_gate(
        args.tags,
        args.ccp_dev,
        args.out,
        None if args.l2 is None else GateFit(hidden=args.hidden, l2=args.l2),
        args.cache,
        args.model,
    )
    log.info(json.dumps({k: card[k] for k in ("thresholds", "out_of_fold_lower_presence_f1")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
