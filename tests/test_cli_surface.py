"""The CLI as a shell script meets it: catalog text and paths printed as text, lines a pipe
reads whole, `--json` that parses whatever the environment says about colour, and an
unwritable stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from catalog_helpers import make_images, write_csv
from typer.testing import CliRunner

from snapshop.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

# Rich markup and emoji codes, as a shop may well write them in a title or a sku.
MARKUP_TITLE = "[b]Big[/b] tee :x: [/] 10:30"
MARKUP_SKU = "s[i]1[/i]"


def invoke(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def cells(stdout: str) -> str:
    """A table's text with its borders and line breaks as single spaces."""
    return " ".join(stdout.translate({ord(c): " " for c in "│┃┆"}).split())


def snapshop(*args: object, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """The CLI in a real process (consoles read FORCE_COLOR and friends when imported)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-c", "from snapshop.cli import app; app()", *map(str, args)],
        env=env,
        text=True,
        timeout=300,
        **kwargs,
    )


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, lite0_model_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("surface")
    images = make_images(root / "shop", n_products=3, per_product=1, size=64)
    rows = [
        [MARKUP_SKU if n == 0 else sku, paths[0], MARKUP_TITLE if n == 0 else sku, "", 10.0, ""]
        for n, (sku, paths) in enumerate(images.items())
    ]
    csv_path = write_csv(root / "shop.csv", rows)
    catalog = root / "cat [bold]x[/bold]"
    result = invoke("index", csv_path, "--catalog", catalog, "--model", lite0_model_dir,
                    "--detector", "none", "--workers", 0)  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "csv": csv_path, "catalog": catalog,
            "query": next(iter(images.values()))[0]}  # fmt: skip


def test_catalog_text_and_paths_print_as_text(shop: dict[str, Any], tmp_path: Path) -> None:
    """`[...]` and `:name:` in titles, skus and paths are shown as written: neither rich
    markup (dropped, or a MarkupError after the work was done) nor emoji."""
    cat = shop["catalog"]
    info = invoke("catalog", "info", "--catalog", cat)
    assert info.exit_code == 0, info.output
    assert str(cat) in cells(info.stdout)
    for result in (
        invoke("search", shop["query"], "--catalog", cat, "--detector", "none", "-k", 3),
        invoke("similar", "demo-001", "--catalog", cat, "-k", 3),
    ):
        assert result.exit_code == 0, result.output
        text = cells(result.stdout)
        for word in ("[b]Big[/b]", ":x:", "[/]", MARKUP_SKU):
            assert word in text, (word, result.stdout)
        assert "\N{CROSS MARK}" not in result.stdout
    (tmp_path / "a[").mkdir()
    target = tmp_path / "a[" / "]out.csv"  # a path holding "[/]"
    result = invoke("recommend", "--catalog", cat, "-o", target, "-k", 1)
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert str(target) in result.stdout and target.is_file()


def test_summary_lines_are_not_wrapped_when_piped(shop: dict[str, Any]) -> None:
    result = invoke("index", shop["csv"], "--catalog", shop["catalog"], "--workers", 0)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1, result.stdout
    assert result.stdout.startswith("added 0 images") and "img/s)" in result.stdout


def test_json_is_plain_even_when_colour_is_forced(shop: dict[str, Any]) -> None:
    """CI runners set FORCE_COLOR: `--json` stays JSON, with no ANSI escapes in it."""
    cat = shop["catalog"]
    for args in (("catalog", "info", "--catalog", cat), ("similar", MARKUP_SKU, "--catalog", cat)):
        proc = snapshop(*args, "--json", capture_output=True, env={"FORCE_COLOR": "1"})
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout
        json.loads(proc.stdout)


def test_columns_zero_still_prints(shop: dict[str, Any], tmp_path: Path) -> None:
    """Emacs shells and some containers say COLUMNS=0: rich would print nothing at all, not
    even the JSON or the error, and exit 0 on success."""
    zero = {"COLUMNS": "0"}
    proc = snapshop("catalog", "info", "--catalog", shop["catalog"], "--json",
                    capture_output=True, env=zero)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["products"] == 3
    proc = snapshop("catalog", "info", "--catalog", tmp_path / "none", capture_output=True,
                    env=zero)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "no catalog here" in proc.stderr
    proc = snapshop("catalog", "info", "--bogus", capture_output=True, env=zero)  # Typer's own
    assert proc.returncode == 2 and "No such option: --bogus" in proc.stderr
    assert "[OPTIONS] COMMAND" in snapshop("--help", capture_output=True, env=zero).stdout


def test_unwritable_stdout_is_a_one_line_error(shop: dict[str, Any]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        proc = snapshop("catalog", "info", "--catalog", shop["catalog"], "--json",
                        stdout=full, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "No space left on device" in proc.stderr


def test_remove_with_nothing_named_is_bad_usage(shop: dict[str, Any]) -> None:
    """Exit 2, as the README's scheme says for bad usage (it was 1, a failed run)."""
    result = invoke("catalog", "remove", "--catalog", shop["catalog"])
    assert result.exit_code == 2 and "name at least one product" in result.output


def test_sigterm_during_index_ends_it_as_ctrl_c_does(tmp_path: Path) -> None:
    """``kill`` (a container stopping) used to end an ingest without a word (status -15);
    now it unwinds as Ctrl-C does: one line, exit 143, no worker left, the catalog whole."""
    import signal
    import time

    from snapshop.demo import generate_demo_catalog

    manifest, _ = generate_demo_catalog(tmp_path / "src", n_products=96, images_per_product=8)
    catalog = tmp_path / "cat"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-c",
        "from snapshop.cli import app; app()",
        "index",
        manifest,
        "--catalog",
        catalog,
        "--model",
        "efficientnet_lite0",
        "--detector",
        "none",
    ]
    proc = subprocess.Popen(
        list(map(str, command)), env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while _stored_images(catalog) == 0 and proc.poll() is None:  # a batch is in: mid-ingest
        assert time.monotonic() < deadline, "the index committed nothing in 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, out, err)
    assert err.strip().splitlines()[-1] == "terminated"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    assert workers.stdout == ""
    info = invoke("catalog", "info", "--catalog", catalog, "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["images"] < 96 * 8


def _stored_images(catalog: Path) -> int:
    import sqlite3

    if not (catalog / "catalog.json").exists():
        return 0
    db = sqlite3.connect(f"{(catalog / 'catalog.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM images").fetchone()[0])
    except sqlite3.Error:  # the schema is being written
        return 0
    finally:
        db.close()


def test_a_stdout_that_is_not_utf8_gets_escapes_not_a_traceback(
    shop: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    catalog = tmp_path / "café ☕"
    shutil.copytree(shop["catalog"], catalog)
    ascii_out = {"PYTHONIOENCODING": "ascii"}
    proc = snapshop("catalog", "info", "--catalog", catalog, "--json", capture_output=True,
                    env=ascii_out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["directory"] == str(catalog)  # \u escapes: still JSON
    proc = snapshop("catalog", "info", "--catalog", catalog, capture_output=True, env=ascii_out)
    assert proc.returncode == 0, proc.stderr  # was a UnicodeEncodeError traceback
    proc = snapshop("catalog", "info", "--catalog", catalog / "none", capture_output=True,
                    env=ascii_out)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")
