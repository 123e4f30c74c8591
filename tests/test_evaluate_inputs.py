"""`snapshop evaluate` and the rows `snapshop train` scores: bad output paths fail before any
embedding, queries that cannot be scored are reported, and filters that select nothing fail."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import MeanColourEmbedder, make_images
from PIL import Image

from snapshop.data.manifest import ManifestRow, RowSelection, select_rows, write_manifest
from snapshop.errors import ConfigError
from snapshop.evaluate import retrieval
from snapshop.evaluate.retrieval import compare_models, evaluate_embeddings


@pytest.fixture
def fake_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "snapshop.models.embedder.load_embedder", lambda model: MeanColourEmbedder()
    )


def _manifest(tmp_path: Path, gallery_of: int | None = None) -> Path:
    """3 products, one query and two gallery images each; with ``gallery_of`` only that
    product has gallery images."""
    images = make_images(tmp_path / "shop", n_products=3, per_product=3, size=32)
    rows = [
        ManifestRow(p, sku, "gallery" if j else "query")
        for n, (sku, paths) in enumerate(images.items())
        for j, p in enumerate(paths)
        if j == 0 or gallery_of is None or n == gallery_of
    ]
    write_manifest(tmp_path / "m.csv", rows, tmp_path)
    return tmp_path / "m.csv"


# --- --plot / --grid ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("plot", "recall.txt", "ending in .png"),
        ("grid", "grid.svg", "ending in .png"),
        ("plot", "folder", "is a folder"),
        ("grid", "afile.png/grid.png", "is not a folder"),
    ],
)
def test_plot_paths_are_checked_before_any_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, name: str, message: str
) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile.png").write_text("not a folder")
    before = sorted(tmp_path.iterdir())

    def no_embedding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("embedded before checking the output paths")

    monkeypatch.setattr(retrieval, "evaluate_manifest", no_embedding)
    with pytest.raises(ConfigError, match=message):
        compare_models(tmp_path / "m.csv", **{option: tmp_path / name})  # type: ignore[arg-type]
    assert sorted(tmp_path.iterdir()) == before  # nothing written (no folder.png either)


def test_the_plots_are_written_where_asked(tmp_path: Path, fake_embedder: None) -> None:
    manifest = _manifest(tmp_path)
    plot, grid = tmp_path / "out" / "r.png", tmp_path / "out" / "g.png"
    compare_models(manifest, plot=plot, grid=grid)
    assert Image.open(plot).format == Image.open(grid).format == "PNG"
    with pytest.raises(ConfigError, match="two files"):
        compare_models(manifest, plot=plot, grid=plot)


# --- queries whose product has no gallery image ----------------------------------------------
def test_queries_without_a_gallery_image_are_counted_skipped_and_logged(
    tmp_path: Path, fake_embedder: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="snapshop.evaluate.retrieval"):
        report = retrieval.evaluate_manifest(_manifest(tmp_path, gallery_of=0), ks=(1,))
    assert report.n_queries == 1 and report.queries_without_gallery == 2
    assert report.to_dict()["queries_without_gallery"] == 2
    left_out = [reason for _, reason in report.skipped if "no gallery image" in reason]
    assert len(left_out) == 2
    assert "2 of 3 queries have no gallery image" in caplog.text


def test_a_full_gallery_reports_nothing_left_out(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(6, 4)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    products = ["a", "b", "c"]
    with caplog.at_level(logging.WARNING, logger="snapshop.evaluate.retrieval"):
        report = evaluate_embeddings("x", vecs[:3], products, vecs[3:], products, ks=(1,))
    assert report.n_queries == 3 and report.queries_without_gallery == 0
    assert caplog.text == ""


# --- row selection of `snapshop train` --------------------------------------------------------
def _rows() -> list[ManifestRow]:
    return [
        ManifestRow(
            Path(f"{p}-{i}.jpg"),
            p,
            "gallery" if i else "query",
            {"split": split, "domain": "iconic" if i == 2 else "natural"},
        )
        for p, split in (("a", "train"), ("b", "train"), ("c", "test"), ("d", "test"))
        for i in range(3)
    ]


@pytest.mark.parametrize(
    "selection",
    [
        RowSelection(repeat_where=("nosuchcol=x",), repeat=3),
        RowSelection(repeat_where=("domain=iconc",), repeat=3),
        RowSelection(eval_gallery_where=("domain=iconc",)),
        RowSelection(eval_gallery_where=("nosuchcol=x",)),
        RowSelection(eval_where=("split=nowhere",), eval_gallery_where=("domain=iconic",)),
    ],
)
def test_repeat_and_second_gallery_filters_must_match_a_row(selection: RowSelection) -> None:
    with pytest.raises(ConfigError, match="matches none"):
        select_rows(_rows(), selection)


def test_matching_filters_still_select() -> None:
    selection = RowSelection(
        repeat_where=("domain=iconic",), repeat=2, eval_gallery_where=("domain=iconic",)
    )
    train_rows, eval_rows, gallery = select_rows(_rows(), selection)
    assert len(train_rows) == 8 and len(eval_rows) == 6 and gallery == {"domain": "iconic"}


def test_the_trainer_refuses_a_second_gallery_with_no_rows(tmp_path: Path) -> None:
    from snapshop.train.trainer import NormSoftmaxTrainer, TrainConfig

    rows = _rows()
    trainer = NormSoftmaxTrainer(
        rows[:6], tmp_path, TrainConfig(), rows[6:], gallery_where={"domain": "iconc"}
    )
    with pytest.raises(ConfigError, match="matches none"):
        trainer.check_data()
