"""Defects the fourth round left open, each fixed with a test that fails on the code before:
CSV exports whose cells a spreadsheet runs as formulas, a flat index file whose vector bytes
are damaged, a product whose image vectors cancel in the similar-products export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from shop_helpers import DIM, add_image, new_catalog

from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.duplicates import find_duplicates, write_csv
from snapshop.errors import ConfigError, VectorIndexError
from snapshop.index import create_index, load_index, save_index
from snapshop.recommend import COLUMNS, export_similar


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def axis(n: int, sign: float = 1.0) -> np.ndarray:
    vector = np.zeros(DIM, np.float32)
    vector[n] = sign
    return vector


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- CSV exports: a cell a spreadsheet would run as a formula -----------------------------
# OWASP's list: a cell starting with one of these is a formula to Excel, LibreOffice or
# Google Sheets (a tab or carriage return too; the store strips those from skus, so they are
# tested on the shared writer directly)
FORMULA_SKUS = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)"]
PLAIN_SKUS = ["plain", "x=1", "'quoted", "\u00e9t\u00e9"]


def _shop_of_skus(directory: Path, skus: list[str]) -> None:
    catalog = new_catalog(directory)
    try:
        for sku, vector in zip(skus, unit_vectors(len(skus)), strict=True):
            add_image(catalog, sku, vector)
    finally:
        catalog.close()


def test_a_sku_that_starts_a_formula_is_written_as_text_in_the_similar_products_csv(
    tmp_path: Path,
) -> None:
    # The export wrote skus as given: `=HYPERLINK(...)` ran as a formula in a spreadsheet.
    skus = FORMULA_SKUS + PLAIN_SKUS
    _shop_of_skus(tmp_path / "cat", skus)
    out = tmp_path / "similar.csv"
    with open_catalog(tmp_path / "cat") as catalog:
        export_similar(catalog, out, 3)
    rows = csv_rows(out)
    written = {row["sku"] for row in rows} | {row["similar_sku"] for row in rows}
    # a quote in front of a formula, and of a cell already starting with one (so that
    # dropping one leading quote gives back every sku)
    assert written == {"'" + sku for sku in FORMULA_SKUS + ["'quoted"]} | {
        "plain", "x=1", "\u00e9t\u00e9"}  # fmt: skip
    assert all(not row["score"].startswith("'") for row in rows)  # numbers stay numbers


def test_a_raw_csv_export_of_similar_products_keeps_every_sku_exactly(tmp_path: Path) -> None:
    skus = FORMULA_SKUS + PLAIN_SKUS
    _shop_of_skus(tmp_path / "cat", skus)
    out = tmp_path / "similar.csv"
    with open_catalog(tmp_path / "cat") as catalog:
        export_similar(catalog, out, 3, spreadsheet_safe=False)
    rows = csv_rows(out)
    assert {row["sku"] for row in rows} == set(skus)
    assert {row["similar_sku"] for row in rows} == set(skus)


def test_an_export_is_not_resumed_with_the_other_kind_of_cells(tmp_path: Path) -> None:
    # Rows escaped before the interruption and raw after it would be one file of both.
    _shop_of_skus(tmp_path / "cat", FORMULA_SKUS + PLAIN_SKUS)
    out = tmp_path / "similar.csv"

    class Interrupted(Exception):
        pass

    def interrupt(n: int) -> None:
        if n == 2:  # the first batch, of two products, is on disk
            raise Interrupted

    with open_catalog(tmp_path / "cat") as catalog:
        with pytest.raises(Interrupted):
            export_similar(catalog, out, 3, batch_size=2, progress=interrupt)
        with pytest.raises(ConfigError, match="spreadsheet_safe"):
            export_similar(catalog, out, 3, batch_size=2, spreadsheet_safe=False)
        export_similar(catalog, out, 3, batch_size=2)
    assert {row["sku"] for row in csv_rows(out)} >= {"'" + sku for sku in FORMULA_SKUS}


def test_a_json_lines_export_of_similar_products_keeps_every_sku_and_resumes(
    tmp_path: Path,
) -> None:
    # For programs (the CLI takes the format from --out, and parquet needs pyarrow): every
    # sku exactly, the rows of a raw CSV, also across an interruption.
    _shop_of_skus(tmp_path / "cat", FORMULA_SKUS + PLAIN_SKUS)
    out = tmp_path / "similar.jsonl"

    class Interrupted(Exception):
        pass

    def interrupt(n: int) -> None:
        if n == 2:
            raise Interrupted

    with open_catalog(tmp_path / "cat") as catalog:
        with pytest.raises(Interrupted):
            export_similar(catalog, out, 3, batch_size=2, progress=interrupt)
        report = export_similar(catalog, out, 3, batch_size=2)
        export_similar(catalog, tmp_path / "raw.csv", 3, spreadsheet_safe=False)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert report.format == "jsonl" and report.resumed_after is not None
    assert all(tuple(line) == COLUMNS for line in lines)
    raw = csv_rows(tmp_path / "raw.csv")
    assert [(x["sku"], x["rank"], x["similar_sku"]) for x in lines] == [
        (r["sku"], int(r["rank"]), r["similar_sku"]) for r in raw
    ]


def test_a_sku_or_source_that_starts_a_formula_is_written_as_text_in_the_duplicates_csv(
    tmp_path: Path,
) -> None:
    # The duplicates CSV wrote skus and source paths as given.
    catalog = new_catalog(tmp_path / "cat")
    vector = unit_vectors(1)[0]
    try:
        for sku in ("=cmd|' /C calc'!A0", "@reused", "plain"):
            add_image(catalog, sku, vector)  # its source is f"{sku}.jpg"
        report = find_duplicates(catalog, 0.9, pixel_threshold=None)
    finally:
        catalog.close()
    assert len(report.pairs) == 3
    write_csv(report.pairs, tmp_path / "safe.csv")
    write_csv(report.pairs, tmp_path / "raw.csv", spreadsheet_safe=False)
    columns = ("sku", "source", "other_sku", "other_source")
    safe = {row[c] for row in csv_rows(tmp_path / "safe.csv") for c in columns}
    raw = {row[c] for row in csv_rows(tmp_path / "raw.csv") for c in columns}
    assert safe == {"'=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0.jpg", "'@reused",
                    "'@reused.jpg", "plain", "plain.jpg"}  # fmt: skip
    assert raw == {"=cmd|' /C calc'!A0", "=cmd|' /C calc'!A0.jpg", "@reused", "@reused.jpg",
                   "plain", "plain.jpg"}  # fmt: skip


def test_text_cells_starting_with_a_tab_or_carriage_return_are_written_as_text() -> None:
    # Other text than skus (a source path, a title) keeps its leading tab or carriage return.
    from snapshop.data.spreadsheet import csv_text

    rows = [["\t=1+1", "\rcmd", "ok", -0.5, 3]]
    assert csv_text(rows) == "'\t=1+1,\"'\rcmd\",ok,-0.5,3\r\n"
    assert csv_text(rows, spreadsheet_safe=False) == '\t=1+1,"\rcmd",ok,-0.5,3\r\n'
    with pytest.raises(ConfigError, match="spreadsheet_safe"):
        csv_text(rows, spreadsheet_safe="no")  # type: ignore[arg-type]


# --- a flat index file whose vector bytes are damaged -------------------------------------
def _saved_flat(directory: Path, vectors: np.ndarray) -> Path:
    index = create_index("flat", DIM)
    index.add(np.arange(len(vectors)), vectors)
    path = directory / "images.faiss"
    save_index(index, path)
    return path


def _catalog_of(directory: Path, vectors: np.ndarray) -> list[int]:
    """A catalog of one product a vector, its indexes saved; the image ids."""
    catalog = new_catalog(directory)
    try:
        return [add_image(catalog, f"p{n}", v)[0] for n, v in enumerate(vectors)]
    finally:
        catalog.close()


def _overwrite(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_a_flat_index_file_whose_vector_bytes_are_damaged_is_refused(tmp_path: Path) -> None:
    # faiss files carry no checksum: a vector overwritten in the file loaded and was searched.
    vectors = unit_vectors(50)
    path = _saved_flat(tmp_path, vectors)
    _overwrite(path, vectors[7].tobytes(), (-vectors[7]).tobytes())
    with pytest.raises(VectorIndexError, match="checksum"):
        load_index(path)


def test_a_catalog_rebuilds_a_flat_index_whose_vector_bytes_are_damaged(tmp_path: Path) -> None:
    # Through the catalog, whose save rewrites the card once the index is measured: the
    # damaged vector was served (its own image scored -1 against it).
    directory = tmp_path / "cat"
    vectors = unit_vectors(6)
    image_ids = _catalog_of(directory, vectors)
    _overwrite(directory / "index" / "images.faiss", vectors[2].tobytes(),
               (-vectors[2]).tobytes())  # fmt: skip
    with open_catalog(directory) as catalog, catalog.reading():
        hits = catalog.index(None).search(vectors[2][None, :], 1)
    assert hits.ids[0, 0] == image_ids[2]
    assert hits.scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_an_index_file_newer_than_the_card_read_is_not_taken_for_damaged(tmp_path: Path) -> None:
    # Another process saving replaces the file, then the card: a reader between the two read
    # the old card and the new file, and rebuilt a sound index from the store.
    import threading
    import time

    old = _saved_flat(tmp_path / "old", unit_vectors(20, seed=1))
    new = _saved_flat(tmp_path / "new", unit_vectors(30, seed=2))
    card_file = old.with_suffix(".json")
    new_card = new.with_suffix(".json").read_text()
    new.replace(old)  # the file is replaced; the card a moment later
    late = threading.Timer(0.05, lambda: card_file.write_text(new_card))
    late.start()
    start = time.monotonic()
    index, card = load_index(old)
    late.join()
    assert len(index) == 30 and card == json.loads(new_card)
    assert time.monotonic() - start < 2


def test_an_index_file_saved_twice_while_it_was_read_is_read_again(tmp_path: Path) -> None:
    # A writer saving several times a second replaced the file and the card again within the
    # reader's wait: the card read then named a third save, and the sound file was rebuilt
    # from the store (55 of 506 opens behind continuous saves). Seventh round.
    import threading

    first = _saved_flat(tmp_path / "first", unit_vectors(20, seed=1))
    second = _saved_flat(tmp_path / "second", unit_vectors(30, seed=2))
    third = _saved_flat(tmp_path / "third", unit_vectors(40, seed=3))
    third_card = third.with_suffix(".json").read_text()
    second.replace(first)  # the second save's file; its card never comes

    def third_save() -> None:
        third.replace(first)
        first.with_suffix(".json").write_text(third_card)

    late = threading.Timer(0.05, third_save)
    late.start()
    index, card = load_index(first)
    late.join()
    assert len(index) == 40 and card == json.loads(third_card)


def test_an_index_folder_the_process_may_not_read_is_rebuilt_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Path.exists() raises PermissionError (not False) for a file in a folder the process
    # may not search; it was called outside the guard that rebuilds an unreadable index.
    directory = tmp_path / "cat"
    vectors = unit_vectors(4)
    ids = _catalog_of(directory, vectors)
    exists = Path.exists

    def denied(self: Path, *args: object, **kwargs: object) -> bool:
        if self.suffix == ".faiss":
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "exists", denied)
    with open_catalog(directory) as catalog, catalog.reading():
        hits = catalog.index(None).search(vectors[1][None, :], 1)
    assert hits.ids[0, 0] == ids[1]


def test_a_flat_index_card_written_before_checksums_still_opens(tmp_path: Path) -> None:
    vectors = unit_vectors(20)
    path = _saved_flat(tmp_path, vectors)
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card_file.write_text(json.dumps({k: v for k, v in card.items() if "checksum" not in k}))
    index, _ = load_index(path)
    assert sorted(index.ids().tolist()) == list(range(20))


# --- recommend: a product whose image vectors cancel --------------------------------------
def _compass(catalog: Catalog) -> None:
    """east and west opposite, north across, and "cancels": two images, v and -v."""
    add_image(catalog, "east", axis(0))
    add_image(catalog, "west", axis(0, -1.0))
    add_image(catalog, "cancels", axis(1))
    add_image(catalog, "cancels", axis(1, -1.0))
    add_image(catalog, "north", axis(2))


def test_a_product_whose_image_vectors_cancel_is_no_neighbour_and_has_none(
    tmp_path: Path,
) -> None:
    # Images v and -v make a zero product vector, which scores 0 against everything: it was
    # listed above every product of negative similarity, and got a list of its own.
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        _compass(catalog)
        out = tmp_path / "similar.csv"
        report = export_similar(catalog, out, 3)
    finally:
        catalog.close()
    rows = csv_rows(out)
    assert "cancels" not in {row["sku"] for row in rows}
    assert "cancels" not in {row["similar_sku"] for row in rows}
    east = [(row["similar_sku"], float(row["score"])) for row in rows if row["sku"] == "east"]
    assert east == [("north", 0.0), ("west", -1.0)]
    assert report.rows == len(rows) == 6


def test_photo_search_leaves_out_a_product_whose_image_vectors_cancel(tmp_path: Path) -> None:
    # The product index held zero product vectors: photo search (by product vector, the
    # default) listed such a product at score 0, above every product of negative similarity.
    # A refresh keeps it so: a product that comes to cancel leaves, one that stops comes back.
    from types import SimpleNamespace

    from snapshop.search import Searcher

    catalog = new_catalog(tmp_path / "cat")
    try:
        _compass(catalog)
        embedder = SimpleNamespace(model_id=catalog.model_id, dim=DIM)
        searcher = Searcher(catalog, embedder, ranking="product")  # type: ignore[arg-type]

        def ranked() -> list[tuple[str, float]]:
            searcher.refresh()
            return [(hit.sku, round(hit.score, 4)) for hit in searcher.rank_products(axis(0), 10)]

        assert ranked() == [("east", 1.0), ("north", 0.0), ("west", -1.0)]
        add_image(catalog, "north", axis(2, -1.0))  # north now cancels too
        assert ranked() == [("east", 1.0), ("west", -1.0)]
        add_image(catalog, "cancels", axis(0))  # v, -v and east's: east's direction
        assert sorted(ranked()) == [("cancels", 1.0), ("east", 1.0), ("west", -1.0)]
    finally:
        catalog.close()


def test_the_cli_writes_spreadsheet_safe_csvs_unless_raw_csv(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from snapshop.cli import app

    _shop_of_skus(tmp_path / "cat", FORMULA_SKUS + PLAIN_SKUS)
    runner = CliRunner()
    for name, extra in (("safe", []), ("raw", ["--raw-csv"])):
        for command in (["recommend", "-k", "3"], ["catalog", "duplicates", "--threshold", "-1",
                                                  "--no-pixel-check"]):  # fmt: skip
            out = tmp_path / f"{name}-{command[0]}.csv"
            result = runner.invoke(app, [*command, "-c", str(tmp_path / "cat"), "--out", str(out),
                                         *extra])  # fmt: skip
            assert result.exit_code == 0, result.output
    for command, columns in (("recommend", ("sku", "similar_sku")),
                             ("catalog", ("sku", "other_sku"))):  # fmt: skip
        safe = {row[c] for row in csv_rows(tmp_path / f"safe-{command}.csv") for c in columns}
        raw = {row[c] for row in csv_rows(tmp_path / f"raw-{command}.csv") for c in columns}
        assert raw == set(FORMULA_SKUS + PLAIN_SKUS)
        assert safe == {"'" + sku if sku[0] in "=+-@'" else sku for sku in raw}


def test_the_checksum_benchmark_prints_each_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from script_helpers import load_script

    benchmark = load_script("benchmarks/index_checksum.py")
    assert benchmark.main(["--n", "1000", "--dir", str(tmp_path), "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for step in ("faiss write", "fsync", "CRC-32 pass", "faiss read", "FlatIndex.load"):
        assert f"| {step}" in out
    assert not list(tmp_path.iterdir())  # the index file is removed
