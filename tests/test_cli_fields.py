"""What the CLI prints of catalog text, and how it names products (issue #19)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_catalog import add_image, new_catalog
from test_cli import assert_user_error, invoke

from snapshop.catalog.catalog import open_catalog
from snapshop.cli import _hits_table, terminal_text
from snapshop.search import ProductHit


def rendered(table: object) -> str:
    """What a colour terminal receives for ``table``."""
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, color_system="truecolor", width=300).print(table)
    return buffer.getvalue()


def hit(sku: str, title: str) -> ProductHit:
    return ProductHit(
        product_id=4,
        sku=sku,
        title=title,
        url=None,
        price=9.5,
        currency="EUR",
        category=None,
        score=0.9,
        image_id=17,
    )


def test_search_tables_show_catalog_text_inertly() -> None:
    """Rows written before text fields were checked must not drive the terminal: escape
    sequences, bidi overrides and rich markup are shown as text."""
    out = rendered(_hits_table("hits", [hit("T1\u202e", "\x1b[2J\x1b]0;pwned\x07[red]sale[/red]")]))
    assert "\x1b[2J" not in out and "\x1b]0;" not in out and "\x07" not in out
    assert "\u202e" not in out
    assert "\\x1b[2J" in out and "\\x07" in out and "\\u202e" in out
    assert "[red]sale[/red]" in out  # markup shown, not applied
    header = rendered(_hits_table("hits", [])).splitlines()
    assert any("product id" in line and "sku" in line for line in header)


def test_terminal_text_keeps_ordinary_text() -> None:
    assert terminal_text("Caf\u00e9 \u2014 50% off") == "Caf\u00e9 \u2014 50% off"
    assert terminal_text("tab\there") == "tab\\there"


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    """Product id 1 has sku "2", product id 2 has sku "x"."""
    rng = np.random.default_rng(0)
    catalog = new_catalog(tmp_path / "cat")
    try:
        add_image(catalog, "2", rng)
        add_image(catalog, "x", rng)
        assert [(p.id, p.sku) for p in catalog.store.list_products()] == [(1, "2"), (2, "x")]
    finally:
        catalog.close()
    return tmp_path / "cat"


def skus(catalog_dir: Path) -> list[str]:
    catalog = open_catalog(catalog_dir)
    try:
        return [p.sku for p in catalog.store.list_products()]
    finally:
        catalog.close()


def test_catalog_remove_takes_skus_and_ids_never_one_for_the_other(toy: Path) -> None:
    result = invoke("catalog", "remove", "--id", 2, "--catalog", toy)
    assert result.exit_code == 0, result.output
    assert "removed product x (1 images)" in result.stdout
    assert skus(toy) == ["2"]
    # "1" is product 1's id, not a sku: refused with a hint, nothing removed
    assert_user_error(invoke("catalog", "remove", "1", "--catalog", toy), 1, "no product", "--id 1")
    assert_user_error(invoke("catalog", "remove", "--id", 9, "--catalog", toy), 1, "no product")
    assert skus(toy) == ["2"]
    result = invoke("catalog", "remove", "2", "--catalog", toy)  # the sku "2" (id 1)
    assert result.exit_code == 0 and "removed product 2 (1 images)" in result.stdout
    assert skus(toy) == []
    assert_user_error(invoke("catalog", "remove", "--catalog", toy), 2, "name at least one")
