"""PNG reports: recall vs K per model, and a grid of queries with their top-5 results."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from snapshop.errors import ConfigError, ImageDecodeError
from snapshop.evaluate.retrieval import RetrievalReport
from snapshop.images import load_image

HIT, MISS = "#1a9641", "#d7191c"


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_png_path(path: Path, what: str = "plot") -> Path:
    """``path`` as given, if a PNG can be written there; checked before the work that draws it
    (matplotlib would pick another format from the suffix, or add ``.png`` to none)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the {what}'s file name (ending in .png)")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path}: the {what} is a PNG; give a file name ending in .png")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{path}: {parent} is not a folder")
    return path


def _save(fig: object, path: Path, colours: int = 0) -> Path:
    """Save a figure as PNG; with ``colours``, palette-quantised to keep photo grids small."""
    plt = _pyplot()
    path = check_png_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # type: ignore[attr-defined]
    plt.close(fig)
    if colours:
        compact_png(path, colours)
    return path


def compact_png(path: Path, colours: int = 128) -> None:
    """Re-save a PNG with an adaptive palette of ``colours`` colours (about 4x smaller)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def plot_recall(reports: Sequence[RetrievalReport], path: Path, title: str = "") -> Path:
    """Recall@K (log-scaled K) with one line per model."""
    if not reports:
        raise ConfigError("nothing to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for r in reports:
        ks = sorted(r.recall)
        ax.plot(ks, [r.recall[k] for k in ks], marker="o", label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("K (products)")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.01)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _thumb(path: str, size: int = 96) -> np.ndarray:
    try:
        image = load_image(path)
    except ImageDecodeError:
        return np.full((size, size, 3), 200, np.uint8)
    image.thumbnail((size, size))
    canvas = np.full((size, size, 3), 255, np.uint8)
    arr = np.asarray(image)
    y, x = (size - arr.shape[0]) // 2, (size - arr.shape[1]) // 2
    canvas[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
    return canvas


def plot_grid(
    reports: Sequence[RetrievalReport],
    path: Path,
    n_queries: int = 6,
    top: int = 5,
    seed: int = 0,
) -> Path:
    """Rows of query -> top ``top`` gallery images for each model (same queries for all);
    a green frame marks a result of the query's product, red one of another product."""
    usable = [r for r in reports if r.vectors is not None]
    if not usable:
        raise ConfigError("the reports carry no embeddings to draw a grid from")
    first = usable[0].vectors
    assert first is not None
    n = len(first["query_paths"])
    picks = sorted(random.Random(seed).sample(range(n), min(n_queries, n)))
    plt = _pyplot()
    rows = len(picks) * len(usable)
    fig, axes = plt.subplots(
        rows, top + 1, figsize=(1.3 * (top + 1), 1.45 * rows), dpi=90, squeeze=False
    )
    row = 0
    for qi in picks:
        for report in usable:
            v = report.vectors
            assert v is not None
            sims = v["gallery_vecs"] @ v["query_vecs"][qi]
            order = np.argsort(-sims, kind="stable")[:top]
            ax = axes[row, 0]
            ax.imshow(_thumb(v["query_paths"][qi]))
            ax.set_title(f"{report.name[:18]}\nquery", fontsize=6)
            for j, g in enumerate(order, start=1):
                hit = v["gallery_products"][g] == v["query_products"][qi]
                ax = axes[row, j]
                ax.imshow(_thumb(v["gallery_paths"][g]))
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color(HIT if hit else MISS)
                    spine.set_linewidth(3)
                ax.set_title(f"{j}: {sims[g]:.2f}", fontsize=6, color=HIT if hit else MISS)
            row += 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path, colours=128)
