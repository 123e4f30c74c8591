"""Fit the pose detector's bin model (and skin table) on CCP-format pixel labels and boxes.

``python -m snapshop.detect.pose_fit ../shared/datasets/ccp-dev --parity even`` fits on the
even image ids (the shipped weights) and leaves the odd ones for a held-out score.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.detect.base import LOWER, UPPER, position_of
from snapshop.detect.pose import (
    BinModel,
    PoseObservation,
    PoseConfig,
    bin_features,
    body_frame,
    context_features,
)

log = logging.getLogger(__name__)

SKIN_LABEL, HAIR_LABEL = 41, 19


def ground_truth_spans(boxes_csv: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """image path -> position -> (y1, y2) of the union of that position's garment boxes."""
    spans: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    with open(boxes_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            pos = position_of(row["group"])
            if pos is None:
                continue
            y1, y2 = float(row["y1"]), float(row["y2"])
            old = spans[row["path"]].get(pos)
            spans[row["path"]][pos] = (y1, y2) if old is None else (min(old[0], y1), max(old[1], y2))
    return spans


def bin_labels(spans: list[tuple[int, int]], gt: dict[str, tuple[float, float]]) -> NDArray[np.float32]:
    """(n_bins, 2): whether each bin's centre row lies inside the upper / lower garment."""
    out = np.zeros((len(spans), 2), np.float32)
    for i, (y0, y1) in enumerate(spans):
        c = (y0 + y1) / 2
        for col, pos in enumerate((UPPER, LOWER)):
            if pos in gt and gt[pos][0] <= c <= gt[pos][1]:
                out[i, col] = 1.0
    return out


def training_rows(
    root: Path, items: Iterable[tuple[str, PoseObservation]], config: PoseConfig = PoseConfig()
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Context features and labels of every bin of every image with a person."""
    gt = ground_truth_spans(root / "boxes.csv")
    xs, ys = [], []
    for path, obs in items:
        if obs.keypoints is None or obs.mask is None:
            continue
        frame = body_frame(obs.keypoints, config.min_visibility)
        if frame is None:
            continue
        rgb = np.asarray(Image.open(root / path).convert("RGB"))
        feats, spans = bin_features(frame, rgb, obs.mask > config.mask_threshold)
        xs.append(context_features(feats))
        ys.append(bin_labels(spans, gt.get(path, {})))
    return np.concatenate(xs), np.concatenate(ys)


def fit_bin_model(
    x: NDArray[np.float32], y: NDArray[np.float32], hidden: int = 32, epochs: int = 600,
    weight_decay: float = 1e-3, seed: int = 0,
) -> BinModel:  # fmt: skip
    """Full-batch Adam on binary cross-entropy; returns numpy weights."""
    import torch

    torch.manual_seed(seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    xt = torch.from_numpy(np.ascontiguousarray((x - mean) / std, np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, np.float32))
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, y.shape[1]))  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        opt.zero_grad()
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
        if epoch % 200 == 0:
            log.info("epoch %d loss %.4f", epoch, float(loss))
    l1, l2 = net[0], net[2]
    return BinModel(mean.astype(np.float32), std.astype(np.float32),
                    l1.weight.detach().numpy().T.copy(), l1.bias.detach().numpy().copy(),
                    l2.weight.detach().numpy().T.copy(), l2.bias.detach().numpy().copy())  # fmt: skip


def main() -> None:  # pragma: no cover - a training command
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="CCP-format folder (manifest.csv, boxes.csv)")
    parser.add_argument("--parity", choices=("even", "odd", "all"), default="even")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights" / "pose_bins.npz")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from snapshop.detect.pose import PoseDetector

    detector = PoseDetector(model=BinModel(*(np.zeros(1, np.float32) for _ in range(6))))
    with open(args.root / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh)
                if args.parity == "all" or int(r["image_id"]) % 2 == (args.parity == "odd")]  # fmt: skip

    def items() -> Iterable[tuple[str, PoseObservation]]:
        for r in rows:
            rgb = np.asarray(Image.open(args.root / r["path"]).convert("RGB"))
            yield r["path"], detector.observe(rgb)

    x, y = training_rows(args.root, items())
    model = fit_bin_model(x, y)
    model.save(args.out)
    log.info("fitted on %d bins of %d images -> %s", len(x), len(rows), args.out)


if __name__ == "__main__":  # pragma: no cover
    main()
