"""The catalog card as a typed value: cards written by earlier versions open, unknown formats
and newer versions are refused with the file and the versions named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshop import api
from snapshop.catalog.card import CARD_VERSION, CatalogCard
from snapshop.catalog.catalog import CARD_FILE, DB_FILE, create_catalog, open_catalog
from snapshop.errors import CatalogError

# A card exactly as main wrote it before CatalogCard existed (format 1, detector recorded).
MAIN_CARD = {
    "format": "snapshop-catalog/1",
    "model_id": "toy@000000000000",
    "model_ref": "toy",
    "dim": 8,
    "index_kind": "auto",
    "index_params": {"hnsw": {"ef_search": 64}},
    "crop_mode": "pad",
    "created_at": "2026-11-30T09:12:44+00:00",
    "detector": "segmenter",
}
# An early card: no crop_mode (crops embedded as they were), no detector, no index_params.
EARLY_CARD = {
    "format": "snapshop-catalog/1",
    "model_id": "toy@000000000000",
    "model_ref": "toy",
    "dim": 8,
    "index_kind": "flat",
    "created_at": "2026-10-01T10:00:00+00:00",
}


def write_catalog(directory: Path, card: dict[str, object]) -> Path:
    """A catalog directory holding ``card`` as its card and an empty store."""
    create_catalog(directory, model_id="toy@000000000000", model_ref="toy", dim=8).close()
    (directory / CARD_FILE).write_text(json.dumps(card))
    return directory


def test_card_from_main_round_trips() -> None:
    card = CatalogCard.from_json(MAIN_CARD)
    assert card.model_id == "toy@000000000000" and card.dim == 8
    assert card.index_kind == "auto" and card.index_params == {"hnsw": {"ef_search": 64}}
    assert card.crop_mode == "pad" and card.detector == "segmenter"
    assert card.version == 1
    assert card.to_json() == MAIN_CARD


def test_early_card_gets_the_defaults_it_meant(tmp_path: Path) -> None:
    card = CatalogCard.from_json(EARLY_CARD)
    assert (card.crop_mode, card.detector, dict(card.index_params)) == ("center", None, {})
    catalog = open_catalog(write_catalog(tmp_path / "c", EARLY_CARD))
    try:
        assert catalog.crop_mode == "center" and catalog.detector is None
        assert catalog.index_kind == "flat" and catalog.card.version == 1
    finally:
        catalog.close()


def test_card_is_frozen() -> None:
    card = CatalogCard.from_json(MAIN_CARD)
    with pytest.raises(AttributeError):
        card.dim = 9  # type: ignore[misc]
    assert card.replace(dim=9).dim == 9 and card.dim == 8


@pytest.mark.parametrize("fmt", ["other-tool/1", "snapshop-model/1", "snapshop-catalog", 7])
def test_unknown_format_is_refused_naming_the_file(tmp_path: Path, fmt: object) -> None:
    directory = write_catalog(tmp_path / "c", {**MAIN_CARD, "format": fmt})
    with pytest.raises(CatalogError, match="unknown card format") as info:
        open_catalog(directory)
    assert str(directory / CARD_FILE) in str(info.value)


def test_newer_version_is_refused_naming_both_versions(tmp_path: Path) -> None:
    newer = CARD_VERSION + 1
    directory = write_catalog(tmp_path / "c", {**MAIN_CARD, "format": f"snapshop-catalog/{newer}"})
    before = (directory / CARD_FILE).read_bytes()
    with pytest.raises(CatalogError) as info:
        open_catalog(directory)
    message = str(info.value)
    assert str(directory / CARD_FILE) in message
    assert f"version {newer}" in message and f"versions 1 to {CARD_VERSION}" in message
    assert (directory / CARD_FILE).read_bytes() == before  # refused, not rewritten


def test_card_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    create_catalog(directory, model_id="m", model_ref="m", dim=8).close()
    (directory / CARD_FILE).write_text("[1, 2]")
    with pytest.raises(CatalogError, match="JSON object"):
        open_catalog(directory)
    assert (directory / DB_FILE).exists()


def test_rewriting_the_card_keeps_keys_it_does_not_know(tmp_path: Path) -> None:
    """A key a later minor release added survives this version recording a detector or an
    index kind (the rewrite goes through CatalogCard)."""
    directory = write_catalog(tmp_path / "c", {**EARLY_CARD, "shop_region": "eu"})
    catalog = open_catalog(directory)
    try:
        catalog.record_detector("halves")
    finally:
        catalog.close()
    api.set_index_kind(directory, "hnsw")
    written = json.loads((directory / CARD_FILE).read_text())
    assert written["shop_region"] == "eu" and written["detector"] == "halves"
    assert written["index_kind"] == "hnsw" and written["format"] == "snapshop-catalog/1"
    assert written["created_at"] == EARLY_CARD["created_at"]


class _RecordingClient:
    """Stands in for a server index (pgvector, Milvus): counts closes, may fail one."""

    def __init__(self, fail: bool = False) -> None:
        self.closed = 0
        self.fail = fail

    def close(self) -> None:
        self.closed += 1
        if self.fail:
            raise RuntimeError("connection already gone")


def test_close_closes_index_clients_and_the_store(tmp_path: Path) -> None:
    catalog = create_catalog(tmp_path / "c", model_id="m", model_ref="m", dim=8)
    failing, healthy = _RecordingClient(fail=True), _RecordingClient()
    catalog.indexes["crops-upper"] = failing  # type: ignore[assignment]
    catalog.indexes["crops-lower"] = healthy  # type: ignore[assignment]
    with catalog as entered:
        assert entered is catalog
    assert failing.closed == 1 and healthy.closed == 1  # one failing does not keep others open
    with pytest.raises(CatalogError, match="is closed"):
        catalog.counts()
    catalog.close()  # idempotent: clients are not closed twice
    assert healthy.closed == 1


def test_with_block_closes_on_error(tmp_path: Path) -> None:
    create_catalog(tmp_path / "c", model_id="m", model_ref="m", dim=8).close()
    client = _RecordingClient()
    with pytest.raises(KeyError), open_catalog(tmp_path / "c") as catalog:
        catalog.indexes["crops-upper"] = client  # type: ignore[assignment]
        raise KeyError("boom")
    assert client.closed == 1
    with pytest.raises(CatalogError, match="is closed"):
        catalog.counts()
