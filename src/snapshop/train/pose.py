"""Fit the pose detector's garment segmenter on CCP-format pixel labels (``masks/<id>.png``).

``python -m snapshop.train.pose ../shared/datasets/ccp-dev --parity even`` fits on the
even image ids (the shipped weights, ``detect/weights/pose_seg.onnx``, ~40 KB) and leaves the
odd ones for a held-out score. The input is the grid of cell features of
:func:`snapshop.detect.pose.pixel_features`; each cell is labelled other / upper (top,
outwear, dress) / lower (trousers, shorts, skirt) from CCP's label at the cell centre.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.data.ccp import CCP_LOWER, CCP_ONE_PIECE, CCP_UPPER, label_table, manifest_rows
from snapshop.detect.base import LOWER, UPPER
from snapshop.detect.pose import CLASSES as POSE_CLASSES
from snapshop.detect.pose import (
    N_INPUTS,
    PoseConfig,
    PoseObservation,
    body_frame,
    pixel_features,
)
from snapshop.train.loop import make_optimizer, seed_everything

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "detect" / "weights"


def pose_label_table(mask_labels_csv: Path) -> NDArray[np.int64]:
    """(256,) CCP label index -> class index in :data:`snapshop.detect.pose.CLASSES`: a dress
    or romper is the *upper* garment here (the groups of boxes.csv: top/outwear/dress,
    trousers/shorts/skirt), unlike the learned segmenter's dress class."""
    upper, lower = (POSE_CLASSES.index(p) for p in (UPPER, LOWER))
    groups = {upper: CCP_UPPER + CCP_ONE_PIECE, lower: CCP_LOWER}
    return label_table(mask_labels_csv, groups).astype(np.int64)


def cell_labels(
    mask: NDArray[np.uint8], shape: tuple[int, int], table: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Class of each grid cell: the CCP label at the cell centre."""
    gh, gw = shape
    h, w = mask.shape
    ys = ((np.arange(gh) + 0.5) * h / gh).astype(int)
    xs = ((np.arange(gw) + 0.5) * w / gw).astype(int)
    return table[mask[ys][:, xs]]


def training_grids(
    root: Path,
    items: Iterable[tuple[str, PoseObservation]],
    config: PoseConfig = PoseConfig(),
    seed: int = 0,
) -> list[tuple[NDArray[np.float32], NDArray[np.int64]]]:
    """(features (h, w, N_INPUTS), labels (h, w), -1 = ignored) of every image with a person."""
    table = pose_label_table(root / "mask_labels.csv")
    rng = np.random.default_rng(seed)
    out = []
    for path, obs in items:
        if obs.keypoints is None or obs.mask is None:
            continue
        frame = body_frame(obs.keypoints, config.min_visibility)
        if frame is None:
            continue
        rgb = np.asarray(Image.open(root / path).convert("RGB"))
        mask = np.asarray(Image.open(root / "masks" / (Path(path).stem + ".png")))
        grid = pixel_features(frame, rgb, obs.mask, config.mask_threshold)
        labels = cell_labels(mask, grid.person.shape, table)
        # train on the person, every garment cell and 5% of the background
        keep = grid.person | (labels > 0) | (rng.random(labels.shape) < 0.05)
        out.append((grid.features[..., :N_INPUTS], np.where(keep, labels, -1)))
    return out


def segmenter_net(hidden: int = 32) -> Any:
    """A per-cell MLP written as 1x1 convolutions: N_INPUTS -> hidden -> hidden -> 3 logits.

    (A dilated 3x3 CNN with a 31-cell receptive field fitted the even ids better but scored
    worse on the held-out odd ids - lower recall .20 - so context comes from the features.)
    """
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(N_INPUTS, hidden, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(hidden, hidden, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(hidden, 3, 1),
    )


def fit_segmenter(
    grids: list[tuple[NDArray[np.float32], NDArray[np.int64]]],
    epochs: int = 60,
    batch: int = 16,
    size: tuple[int, int] = (112, 80),
    seed: int = 0,
) -> Any:
    """Adam on per-cell cross-entropy (label -1 ignored), padded batches, flips on odd epochs.

    Returns a torch module mapping *raw* features to probabilities (normalisation and softmax
    inside), ready for :func:`export_segmenter`.
    """
    import torch

    seed_everything(seed)
    hh, ww = size
    x = np.zeros((len(grids), N_INPUTS, hh, ww), np.float32)
    y = np.full((len(grids), hh, ww), -1, np.int64)
    for i, (f, lab) in enumerate(grids):
        h, w = min(f.shape[0], hh), min(f.shape[1], ww)
        x[i, :, :h, :w] = f[:h, :w].transpose(2, 0, 1)
        y[i, :h, :w] = lab[:h, :w]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    valid = (yt >= 0).unsqueeze(1).float()
    mean = (xt * valid).sum((0, 2, 3), keepdim=True) / valid.sum()
    std = (((xt - mean) ** 2 * valid).sum((0, 2, 3), keepdim=True) / valid.sum()).sqrt() + 1e-6
    net = segmenter_net()
    params = [{"params": list(net.parameters()), "lr": 3e-3}]
    opt = make_optimizer("adam", params, weight_decay=1e-4)
    u_channel = 6  # horizontal offset from the body axis changes sign under a flip
    for epoch in range(epochs):
        perm = torch.randperm(len(xt))
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            xb, yb = xt[idx].clone(), yt[idx]
            if epoch % 2:
                xb, yb = xb.flip(-1), yb.flip(-1)
                xb[:, u_channel] = -xb[:, u_channel]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net((xb - mean) / std), yb, ignore_index=-1)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log.info("epoch %d loss %.4f", epoch, total / len(xt))

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, features: Any) -> Any:
            return torch.softmax(self.net((features - self.mean) / self.std), dim=1)

    return Wrapped().eval()


def export_segmenter(module: Any, path: Path) -> Path:
    """Write ``module`` as ONNX with free height and width."""
    import torch

    dummy = torch.zeros(1, N_INPUTS, 104, 69)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,
        (dummy,),
        str(path),
        input_names=["features"],
        output_names=["probabilities"],
        opset_version=17,
        dynamo=False,
        dynamic_axes={"features": {2: "h", 3: "w"}, "probabilities": {2: "h", 3: "w"}},
    )
    return path


def main() -> None:  # pragma: no cover - a training command
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="CCP-format folder (manifest.csv, masks/)")
    parser.add_argument("--parity", choices=("even", "odd", "all"), default="even")
    parser.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS / "pose_seg.onnx")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from snapshop.detect.pose import PoseDetector

    detector = PoseDetector(model=_NoModel())  # type: ignore[arg-type]  # observe() only
    rows = list(manifest_rows(args.root, args.parity))

    def items() -> Iterable[tuple[str, PoseObservation]]:
        for r in rows:
            rgb = np.asarray(Image.open(args.root / r["path"]).convert("RGB"))
            yield r["path"], detector.observe(rgb)

    grids = training_grids(args.root, items())
    export_segmenter(fit_segmenter(grids, epochs=args.epochs), args.out)
    log.info("fitted on %d of %d images -> %s", len(grids), len(rows), args.out)


class _NoModel:
    """Stands in for the segmenter while only keypoints and masks are needed."""


if __name__ == "__main__":  # pragma: no cover
    main()
