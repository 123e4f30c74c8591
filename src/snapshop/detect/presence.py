"""Garment presence gate of the ``segmenter`` detector: which garment groups a photo shows.

A small multi-label head (logistic regression, or an MLP: ReLU between layers) reads one
vector per photo built from what the segmenter computes anyway: the averages of its stride-16
and stride-32 trunk maps over the photo and over its upper, lower and dress regions, and the
mean probability of each segmenter class (:func:`presence_features`). It gives one
probability per garment group (:data:`GROUPS`, as CCP's tags name them); a position is
present with probability ``1 - prod(1 - p)`` over its groups. It is fitted on image-level
tags (ccp-tags) plus the groups of ccp-dev's boxes (:mod:`snapshop.train.segmenter.presence`),
three times the photos the pixel labels cover, and a segmenter whose model folder holds one
drops a box whose position the head puts under the card's threshold (issue #21). No gate
ships: cross-validated on ccp-tags it did not beat the ungated detector
(docs/benchmarks/detection.md, "A presence gate trained on image-level tags").

Files: ``garment_presence.npz`` (arrays ``mean``, ``scale``, ``w0``, ``b0``, [``w1``,
``b1``...]) and ``garment_presence.json`` (its card: groups, thresholds, the sha256 of the
npz and of the segmenter head whose features it was fitted on, and what it was trained on).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.detect.base import LOWER, UPPER
from snapshop.errors import ModelError

GROUPS: tuple[str, ...] = ("top", "outwear", "dress", "trousers", "shorts", "skirt")
POSITION_GROUPS: dict[str, tuple[str, ...]] = {
    UPPER: ("top", "outwear", "dress"),
    LOWER: ("trousers", "shorts", "skirt"),
}
# pooled stride-16 and stride-32 maps (whole input, upper, lower, dress), mean class probabilities
FEATURE_DIM = 4 * (112 + 320) + 4
GATE_FILE = "garment_presence.npz"
GATE_CARD_FILE = "garment_presence.json"


def presence_features(
    s16: NDArray[np.float32], s32: NDArray[np.float32], probs: NDArray[np.float32]
) -> NDArray[np.float32]:
    """One photo's gate input from its (1, 112, h16, w16) and (1, 320, h32, w32) trunk maps and
    its (H, W, 4) class probabilities (the valid part of the padded input, top left) ->
    (:data:`FEATURE_DIM`,) float32: the maps' channel means over the whole input, then over
    the upper, lower and dress regions (cells weighted by that class's probability: what the
    segmenter's lower region looks like, not only the photo), then the mean class probabilities.
    """
    import cv2

    parts = [s16[0].mean(axis=(1, 2)), s32[0].mean(axis=(1, 2))]
    for classes in ((1,), (2,), (3,)):  # upper, lower, dress
        for fmap in (s16[0], s32[0]):
            c, gh, gw = fmap.shape
            stride = 16 if c == 112 else 32
            padded = np.zeros((gh * stride, gw * stride), np.float32)
            h, w = min(probs.shape[0], gh * stride), min(probs.shape[1], gw * stride)
            padded[:h, :w] = probs[:h, :w, list(classes)].sum(axis=2)
            weight = cv2.resize(padded, (gw, gh), interpolation=cv2.INTER_AREA)
            parts.append((fmap * weight).sum(axis=(1, 2)) / (weight.sum() + 1e-3))
    parts.append(probs.mean(axis=(0, 1)))
    return np.concatenate(parts).astype(np.float32)


def group_probabilities(
    features: NDArray[np.float32], layers: list[tuple[NDArray[np.float32], NDArray[np.float32]]]
) -> NDArray[np.float32]:
    """(N, D) standardised features -> (N, len(GROUPS)) probabilities through ``layers``
    [(W (D_in, D_out), b (D_out,)), ...]: ReLU between layers, sigmoid at the end."""
    h = features.astype(np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return (1.0 / (1.0 + np.exp(-np.clip(h, -30.0, 30.0)))).astype(np.float32)


def position_probabilities(groups: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
    """(N, len(GROUPS)) group probabilities -> {position: (N,) P(any of its groups)}."""
    out = {}
    for position, names in POSITION_GROUPS.items():
        cols = [GROUPS.index(g) for g in names]
        out[position] = (1.0 - np.prod(1.0 - groups[:, cols], axis=1)).astype(np.float32)
    return out


@dataclass(frozen=True)
class PresenceGate:
    """The fitted head and its thresholds: a position's box is kept when P(position) >= its
    threshold (a position without a threshold is never dropped)."""

    mean: NDArray[np.float32]  # (D,)
    scale: NDArray[np.float32]  # (D,) standard deviations (> 0)
    layers: tuple[tuple[NDArray[np.float32], NDArray[np.float32]], ...]
    thresholds: dict[str, float]

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    def probabilities(self, features: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """(N, D) or (D,) features -> {position: (N,) probability}."""
        x = np.atleast_2d(np.asarray(features, np.float32))
        if x.shape[1] != self.feature_dim:
            raise ModelError(
                f"presence gate: features have {x.shape[1]} dims, not {self.feature_dim}"
            )
        return position_probabilities(
            group_probabilities((x - self.mean) / self.scale, list(self.layers))
        )

    def absent(self, features: NDArray[np.float32]) -> set[str]:
        """The positions one photo's ``(D,)`` features put under their threshold."""
        probs = self.probabilities(features)
        return {pos for pos, t in self.thresholds.items() if float(probs[pos][0]) < t}

    def arrays(self) -> dict[str, NDArray[np.float32]]:
        out = {"mean": self.mean, "scale": self.scale}
        for i, (w, b) in enumerate(self.layers):
            out[f"w{i}"], out[f"b{i}"] = w, b
        return out

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **self.arrays())  # type: ignore[arg-type]
        return buffer.getvalue()


def read_gate(data: bytes, card: dict[str, Any]) -> PresenceGate:
    """``garment_presence.npz`` bytes + its card -> a checked :class:`PresenceGate`."""
    if hashlib.sha256(data).hexdigest() != card.get("sha256"):
        raise ModelError("presence gate: the npz's sha256 differs from its card's")
    groups = card.get("groups")
    if not isinstance(groups, list) or tuple(groups) != GROUPS:
        raise ModelError(f"presence gate: the card's groups are {groups!r}, not {list(GROUPS)}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name], np.float32) for name in npz.files}
    except Exception as exc:  # zipfile / numpy raise several types for a damaged file
        raise ModelError(f"presence gate: unreadable ({exc})") from None
    try:
        mean, scale = arrays["mean"], arrays["scale"]
        layers: list[tuple[NDArray[np.float32], NDArray[np.float32]]] = []
        while f"w{len(layers)}" in arrays:
            i = len(layers)
            layers.append((arrays[f"w{i}"], arrays[f"b{i}"]))
    except KeyError as exc:
        raise ModelError(f"presence gate: missing array {exc}") from None
    shapes = {name: a.shape for name, a in arrays.items()}
    # the ranks first: the chain of layer sizes below reads the second axis of each matrix
    if not layers or mean.ndim != 1 or any(w.ndim != 2 for w, _ in layers):
        raise ModelError(f"presence gate: inconsistent shapes {shapes}")
    dims = [mean.shape[0]] + [w.shape[1] for w, _ in layers]
    if (
        scale.shape != mean.shape
        or any(
            w.shape[0] != d or b.shape != (w.shape[1],)
            for (w, b), d in zip(layers, dims[:-1], strict=True)
        )
        or dims[-1] != len(GROUPS)
    ):
        raise ModelError(f"presence gate: inconsistent shapes {shapes}")
    broken = sorted(name for name, a in arrays.items() if not np.all(np.isfinite(a)))
    if broken or not np.all(scale > 0):
        raise ModelError(
            f"presence gate: arrays {broken} hold NaN or infinite values"
            if broken
            else "presence gate: the scale must be > 0 everywhere"
        )
    dim = card.get("feature_dim")
    whole = isinstance(dim, int) and not isinstance(dim, bool)
    if not whole or dim != mean.shape[0]:
        raise ModelError(
            f"presence gate: the card says {dim!r} features, the npz {mean.shape[0]}"
            + ("" if whole else " (feature_dim must be a whole number)")
        )
    thresholds = card.get("thresholds", {})
    if not isinstance(thresholds, dict) or not all(
        pos in POSITION_GROUPS
        and isinstance(t, (int, float))
        and not isinstance(t, bool)
        and 0.0 <= t <= 1.0
        for pos, t in thresholds.items()
    ):
        raise ModelError(f"presence gate: bad thresholds {thresholds!r}")
    return PresenceGate(mean, scale, tuple(layers), {p: float(t) for p, t in thresholds.items()})


def load_gate(npz_source: Any, card_source: Any, head_model: bytes) -> PresenceGate:
    """The gate from its two files (paths or importlib resources), checked against the
    segmenter head (``head_model``: its ONNX bytes) whose features it was fitted on."""
    try:
        card = json.loads(card_source.read_text())
        data = npz_source.read_bytes()
    except (OSError, ValueError) as exc:
        raise ModelError(f"presence gate {card_source}: unreadable ({exc})") from None
    if not isinstance(card, dict):
        raise ModelError(f"presence gate {card_source}: the card is not a JSON object")
    if card.get("segmenter_head_sha256") != hashlib.sha256(head_model).hexdigest():
        raise ModelError(
            f"presence gate {card_source}: fitted on another segmenter head (sha256 differs)"
        )
    gate = read_gate(data, card)
    if gate.feature_dim != FEATURE_DIM:
        raise ModelError(
            f"presence gate {card_source}: {gate.feature_dim} features,"
            f" the segmenter gives {FEATURE_DIM}"
        )
    return gate
