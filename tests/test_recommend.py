"""Similar-products export against brute force over product vectors; resuming after a crash."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shop_helpers import fill_shop, mean_vectors, new_catalog, stored
from typer.testing import CliRunner

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.cli import app
from snapshop.errors import ConfigError
from snapshop.recommend import COLUMNS, export_similar, parquet_available

needs_pyarrow = pytest.mark.skipif(not parquet_available(), reason="pyarrow not installed")


class Crash(Exception):
    pass


def crash_after(batches: int):
    """A progress callback that raises after ``batches`` batches are on disk (its first call
    reports the starting point, then one call per batch)."""
    calls: list[int] = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == batches + 1:
            raise Crash

    return progress


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("recommend") / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 40, seed=11)
    finally:
        catalog.close()
    return directory


def reference(catalog_dir: Path, k: int, position: str | None = None) -> list[tuple]:
    """Rows (product, rank, other, score) by brute force over mean vectors from SQLite."""
    entries = stored(catalog_dir, "images" if position is None else "crops", position)
    vectors = mean_vectors(entries)
    ids = sorted(vectors)
    matrix = np.stack([vectors[i] for i in ids])
    rows = []
    for n, product in enumerate(ids):
        scores = matrix @ matrix[n]
        ranked = sorted((j for j in range(len(ids)) if j != n), key=lambda j: -scores[j])[:k]
        rows += [(product, r, ids[j], float(scores[j])) for r, j in enumerate(ranked, 1)]
    return rows


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_any(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return read_csv(path)
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def assert_rows(got: list[dict], want: list[tuple], skus: dict[int, str]) -> None:
    assert [(int(r["product_id"]), int(r["rank"]), int(r["similar_product_id"])) for r in got] == [
        w[:3] for w in want
    ]
    assert np.allclose([float(r["score"]) for r in got], [w[3] for w in want], atol=1e-5)
    assert all(r["sku"] == skus[int(r["product_id"])] for r in got)
    assert all(r["similar_sku"] == skus[int(r["similar_product_id"])] for r in got)


def skus_of(directory: Path) -> dict[int, str]:
    from catalog_helpers import db_rows

    return dict(db_rows(directory, "SELECT id, sku FROM products"))


@pytest.mark.parametrize("suffix", [".csv", pytest.param(".parquet", marks=needs_pyarrow)])
@pytest.mark.parametrize(("k", "batch_size"), [(1, 7), (5, 1024), (60, 16)])
def test_export_matches_brute_force(
    shop: Path, tmp_path: Path, suffix: str, k: int, batch_size: int
) -> None:
    out = tmp_path / f"similar{suffix}"
    catalog = open_catalog(shop)
    try:
        report = export_similar(catalog, out, k, batch_size=batch_size)
    finally:
        catalog.close()
    want = reference(shop, k)
    got = read_any(out)
    assert list(got[0].keys()) == list(COLUMNS)
    assert_rows(got, want, skus_of(shop))
    assert report.products == 40 and report.rows == len(want) == 40 * min(k, 39)
    assert report.resumed_after is None
    assert not out.with_name(out.name + ".progress.json").exists()
    assert not out.with_name(out.name + ".parts").exists()


def test_export_by_position(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "upper.csv"
    api.recommend(shop, out, k=3, position="upper")
    assert_rows(read_csv(out), reference(shop, 3, "upper"), skus_of(shop))
    with pytest.raises(ConfigError, match="no product has garment crops at position 'hat'"):
        api.recommend(shop, tmp_path / "x.csv", k=3, position="hat")


@pytest.mark.parametrize("suffix", [".csv", pytest.param(".parquet", marks=needs_pyarrow)])
def test_resume_after_a_crash_continues_after_the_last_complete_product(
    shop: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"similar{suffix}"
    with pytest.raises(Crash):
        api.recommend(shop, out, k=4, batch_size=6, progress=crash_after(2))
    state = json.loads(out.with_name(out.name + ".progress.json").read_text())
    assert state["done"] > 0
    if suffix == ".csv":  # a torn write after the resume point: a partial row
        with open(out, "ab") as fh:
            fh.write(b"999,p99,1,12" + b"9" * 100_000)  # longer than the rest of the file
    else:  # a part file that never got renamed
        (out.with_name(out.name + ".parts") / "part-000002.tmp").write_bytes(b"torn")

    resumed: list[int] = []
    report = api.recommend(shop, out, k=4, batch_size=6, progress=resumed.append)
    assert report.resumed_after == state["last_product_id"]
    assert resumed[0] == 12 and report.products == 40 - 12  # two batches of 6 were done
    assert_rows(read_any(out), reference(shop, 4), skus_of(shop))

    # a different k cannot continue someone else's run
    with pytest.raises(Crash):
        api.recommend(shop, out, k=4, batch_size=6, progress=crash_after(1))
    with pytest.raises(ConfigError, match="unfinished export"):
        api.recommend(shop, out, k=5)
    report = api.recommend(shop, out, k=5, restart=True)
    assert report.resumed_after is None
    assert_rows(read_any(out), reference(shop, 5), skus_of(shop))


def test_resume_point_without_its_output_is_refused(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "similar.csv"
    with pytest.raises(Crash):
        api.recommend(shop, out, k=2, batch_size=4, progress=crash_after(1))
    out.with_name(out.name + ".partial").write_bytes(b"")
    with pytest.raises(ConfigError, match="shorter than its resume point"):
        api.recommend(shop, out, k=2)


@pytest.mark.parametrize("name", ["similar.csv", "similar.jsonl"])
def test_the_last_complete_feed_stays_whole_until_the_next_is(
    shop: Path, tmp_path: Path, name: str
) -> None:
    # A fresh export emptied OUT at once and wrote into it: a reader during the run, or after
    # a failed one, read a partial feed. Seventh round.
    out = tmp_path / name
    api.recommend(shop, out, k=2, batch_size=4)
    complete = out.read_bytes()
    with pytest.raises(Crash):
        api.recommend(shop, out, k=3, batch_size=4, restart=True, progress=crash_after(2))
    assert out.read_bytes() == complete
    api.recommend(shop, out, k=3, batch_size=4)  # resumed beside it, then put in its place
    assert out.read_bytes() != complete and not out.with_name(name + ".partial").exists()
    fresh = tmp_path / ("fresh-" + name)
    api.recommend(shop, fresh, k=3, batch_size=4)
    assert out.read_bytes() == fresh.read_bytes()


def test_a_feed_behind_a_symbolic_link_is_replaced_and_the_link_kept(
    shop: Path, tmp_path: Path
) -> None:
    # The rename replaced the link with a plain file: the served file never changed again,
    # and the export said it had succeeded. Eighth round.
    served = tmp_path / "www" / "similar.csv"
    served.parent.mkdir()
    served.write_text("old feed\n")
    link = tmp_path / "feed.csv"
    link.symlink_to(served)
    api.recommend(shop, link, k=2, batch_size=4)
    fresh = tmp_path / "fresh.csv"
    api.recommend(shop, fresh, k=2, batch_size=4)
    assert link.is_symlink() and served.read_bytes() == fresh.read_bytes()
    assert not list(served.parent.glob("*.partial"))


def test_a_crash_as_the_export_ends_leaves_no_resume_point_without_its_file(
    shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rename came before the resume point was cleared: a crash in between left a resume
    # point whose file was gone, and the rerun failed ("pass restart"). Eighth round.
    import snapshop.recommend as recommend

    out = tmp_path / "similar.csv"
    clear = recommend._Progress.clear

    def crash(self: Any) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(recommend._Progress, "clear", crash)
        with pytest.raises(Crash):
            api.recommend(shop, out, k=2, batch_size=4)
    assert recommend._Progress.clear is clear
    api.recommend(shop, out, k=2, batch_size=4)
    fresh = tmp_path / "fresh.csv"
    api.recommend(shop, fresh, k=2, batch_size=4)
    assert out.read_bytes() == fresh.read_bytes()


def test_an_export_begun_in_place_by_an_older_version_resumes_in_place(
    shop: Path, tmp_path: Path
) -> None:
    out = tmp_path / "similar.csv"
    with pytest.raises(Crash):
        api.recommend(shop, out, k=2, batch_size=4, progress=crash_after(2))
    progress = out.with_name(out.name + ".progress.json")
    header = json.loads(progress.read_text())
    del header["beside"]
    progress.write_text(json.dumps(header))
    out.with_name(out.name + ".partial").replace(out)
    api.recommend(shop, out, k=2, batch_size=4)
    fresh = tmp_path / "fresh.csv"
    api.recommend(shop, fresh, k=2, batch_size=4)
    assert out.read_bytes() == fresh.read_bytes()


def test_a_parts_folder_holding_other_files_is_left_alone(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "similar.csv"
    mine = tmp_path / "similar.csv.parts"
    mine.mkdir()
    (mine / "notes.txt").write_text("not the export's")
    api.recommend(shop, out, k=2)
    assert (mine / "notes.txt").read_text() == "not the export's"


def test_bad_arguments(shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=".csv or .parquet"):
        api.recommend(shop, tmp_path / "out.json")
    with pytest.raises(ConfigError, match="k must be"):
        api.recommend(shop, tmp_path / "out.csv", k=0)
    import snapshop.recommend as recommend

    monkeypatch.setattr(recommend, "parquet_available", lambda: False)
    with pytest.raises(ConfigError, match="needs pyarrow"):
        api.recommend(shop, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_cli(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "similar.csv"
    runner = CliRunner()
    result = runner.invoke(app, ["recommend", "--catalog", str(shop), "-k", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "120 rows for 40 products" in result.stdout
    assert_rows(read_csv(out), reference(shop, 3), skus_of(shop))
    as_json = runner.invoke(
        app, ["recommend", "-c", str(shop), "-k", "3", "-o", str(out), "--json"]
    )
    assert json.loads(as_json.stdout)["rows"] == 120
    bad = runner.invoke(app, ["recommend", "-c", str(shop), "-o", str(tmp_path / "x.txt")])
    assert bad.exit_code == 2 and ".csv or .parquet" in bad.stderr


def test_a_second_export_into_the_same_file_meanwhile_is_refused(
    shop: Path, tmp_path: Path
) -> None:
    # Two runs at once (a cron overlap): the second resumed the first one's file while it was
    # written. Eighth round.
    import threading

    out = tmp_path / "similar.csv"
    started, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def paused(n: int) -> None:
        started.set()
        release.wait(30)

    def first() -> None:
        outcome.append(api.recommend(shop, out, k=2, batch_size=4, progress=paused))

    runner = threading.Thread(target=first)
    runner.start()
    assert started.wait(30)
    try:
        with pytest.raises(ConfigError, match="another export into this file is running"):
            api.recommend(shop, out, k=2, batch_size=4)
    finally:
        release.set()
        runner.join(60)
    assert outcome and not out.with_name(out.name + ".progress.json").exists()
    fresh = tmp_path / "fresh.csv"
    api.recommend(shop, fresh, k=2, batch_size=4)
    assert out.read_bytes() == fresh.read_bytes()
