"""Issue #19: an ingest's outcome is never silent. Files a folder holds that are not indexed
are reported with a reason; nothing indexed leaves no catalog; any failure exits non-zero."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from catalog_helpers import check_catalog_dir, make_images, write_csv
from typer.testing import CliRunner

from snapshop import api
from snapshop.cli import app
from snapshop.data.sources import read_source
from snapshop.errors import ManifestError

runner = CliRunner()


def index(*args: object) -> object:
    return runner.invoke(app, ["index", *(str(a) for a in args)])


def lock_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``folder`` cannot be listed, as for a user without permission (root lists anything:
    the refusal is simulated in this process)."""
    folder.chmod(0)
    if os.geteuid() == 0:
        scandir = os.scandir

        def refuse(path: object = ".") -> object:
            if Path(os.fsdecode(path)) == folder:  # type: ignore[arg-type]
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return scandir(path)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "scandir", refuse)


def test_folder_reports_every_file_it_does_not_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = tmp_path / "shop"
    images = make_images(shop, n_products=2, per_product=1, size=48)
    sku = next(iter(images))
    folder = shop / sku
    jpeg = images[sku][0].read_bytes()
    (folder / "photo.jfif").write_bytes(jpeg)  # JPEG under its other name: indexed
    (folder / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (folder / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "IMG_0001").write_bytes(jpeg)
    (folder / ".DS_Store").write_bytes(b"\x00")  # hidden non-image: not worth a line
    (shop / "notes.txt").write_text("not a product")
    (folder / "more").mkdir()
    (folder / "more" / "side.png").write_bytes(b"")
    lock_folder(folder / "more", monkeypatch)
    try:
        skipped: list[tuple[str, str]] = []
        records = read_source(shop, skipped)
    finally:
        (folder / "more").chmod(0o755)
    assert sorted(r.path.name for r in records) == ["0.jpg", "0.jpg", "photo.jfif"]
    reasons = {Path(path).name: reason for path, reason in skipped}
    assert set(reasons) == {"logo.svg", "phone.HEIC", "IMG_0001", "notes.txt", "more"}
    assert reasons["logo.svg"].startswith("unsupported file type .svg (supported: .bmp, .gif,")
    assert reasons["phone.HEIC"].startswith("unsupported file type .heic")
    assert reasons["IMG_0001"].startswith("no file extension (supported:")
    assert ".jfif" in reasons["IMG_0001"] and ".png" in reasons["IMG_0001"]
    assert reasons["more"] == "cannot read folder (Permission denied)"
    assert "not in a product folder" in reasons["notes.txt"]


def test_cli_lists_unsupported_files(
    tmp_path: Path, lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = make_images(tmp_path / "shop", n_products=1, per_product=2, size=48)
    folder = next(iter(images.values()))[0].parent
    (folder / "logo.svg").write_text("<svg/>")
    result = index(tmp_path / "shop", "--catalog", tmp_path / "cat", "--model", lite0_model_dir)
    assert result.exit_code == 0, result.output  # everything it could index is indexed
    stdout, stderr = " ".join(result.stdout.split()), " ".join(result.stderr.split())
    assert "added 2 images" in stdout and "0 failed, 1 not supported" in stdout
    assert "not supported" in stderr and "logo.svg: unsupported file type .svg" in stderr
    again = index(tmp_path / "shop", "--catalog", tmp_path / "cat", "--json")
    assert again.exit_code == 0, again.output
    ignored = json.loads(again.stdout)["ignored"]
    assert [Path(i["source"]).name for i in ignored] == ["logo.svg"]


def test_source_without_images_creates_nothing(tmp_path: Path, lite0_model_dir: Path) -> None:
    (tmp_path / "shop" / "p1").mkdir(parents=True)
    (tmp_path / "shop" / "p1" / "logo.svg").write_text("<svg/>")
    with pytest.raises(ManifestError, match="no image to index.*logo.svg: unsupported"):
        api.index_source(tmp_path / "shop", tmp_path / "cat", model=str(lite0_model_dir))
    result = index(tmp_path / "shop", "--catalog", tmp_path / "cat", "--model", lite0_model_dir)
    assert result.exit_code == 2, result.output  # bad input
    assert "no image to index" in result.stderr
    assert not (tmp_path / "cat").exists()


def all_broken_csv(tmp_path: Path) -> Path:
    (tmp_path / "a.jpg").write_text("<html>")
    (tmp_path / "b.png").write_bytes(b"")
    return write_csv(
        tmp_path / "shop.csv",
        [["p1", "a.jpg"], ["p2", "b.png"]],
        header=["product_id", "image_path"],
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_all_failed_leaves_no_catalog(tmp_path: Path, lite0_model_dir: Path, workers: int) -> None:
    csv_path = all_broken_csv(tmp_path)
    result = index(
        csv_path, "--catalog", tmp_path / "cat", "--model", lite0_model_dir, "--workers", workers
    )
    assert result.exit_code == 1, result.output
    assert "2 failed" in result.stdout and "nothing was indexed" in result.stderr
    assert "empty" in result.stderr and "not an image" in result.stderr
    assert not (tmp_path / "cat").exists()
    # A folder the operator made for it stays, empty as it was.
    (tmp_path / "mine").mkdir()
    report = api.index_source(csv_path, tmp_path / "mine", model=str(lite0_model_dir))
    assert (report.added, len(report.failed)) == (0, 2)
    assert list((tmp_path / "mine").iterdir()) == []


def test_all_failed_keeps_an_existing_catalog(tmp_path: Path, lite0_model_dir: Path) -> None:
    make_images(tmp_path / "shop", n_products=2, per_product=2, size=48)
    api.index_source(tmp_path / "shop", tmp_path / "cat", model=str(lite0_model_dir))
    result = index(all_broken_csv(tmp_path), "--catalog", tmp_path / "cat")
    assert result.exit_code == 1, result.output
    assert check_catalog_dir(tmp_path / "cat")["images"] == 4


def test_some_failed_exits_1_and_keeps_the_rest(tmp_path: Path, lite0_model_dir: Path) -> None:
    images = make_images(tmp_path / "shop", n_products=2, per_product=2, size=48)
    (next(iter(images.values()))[0].parent / "broken.jpg").write_text("<html>")
    result = index(tmp_path / "shop", "--catalog", tmp_path / "cat", "--model", lite0_model_dir)
    assert result.exit_code == 1, result.output
    assert "added 4 images" in result.stdout and "1 failed" in result.stdout
    assert check_catalog_dir(tmp_path / "cat")["images"] == 4
