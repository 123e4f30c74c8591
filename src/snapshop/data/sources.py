"""Catalog sources for ingest: a folder with one sub-folder per product, or a CSV manifest.

A CSV manifest has a header with at least ``product_id`` and ``image_path``, optionally
``title, url, price, currency, category`` and ``packshot`` (1 / true / yes: the photo shows
the product alone, no model; 0 / false / no or empty: not known to); any other column becomes
a product attribute. A product's rows may leave its fields empty but must not disagree on them.
Relative image paths are resolved against the CSV's folder. The whole file is validated
before anything is written, so a bad row stops the ingest with its line number and loses
nothing.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshop.catalog.fields import check_product_fields, is_blank, normalise_sku
from snapshop.data.manifest import check_unique_columns, nonblank_rows
from snapshop.errors import CatalogError, ManifestError
from snapshop.images import IMAGE_SUFFIXES, DecodeLimits, read_bytes

SUPPORTED_SUFFIXES = ", ".join(sorted(IMAGE_SUFFIXES))
REQUIRED_COLUMNS = ("product_id", "image_path")
PRODUCT_COLUMNS = ("title", "url", "price", "currency", "category")
IMAGE_COLUMNS = ("packshot",)
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "y"), ("0", "false", "no", "n", "")
MAX_CSV_FIELD = 1 << 20
UNNAMED = "\0unnamed column "  # a header name no CSV column can have
CATALOG_CARD = "catalog.json"  # catalog.catalog.CARD_FILE (not imported: data sits upstream)


@dataclass(frozen=True)
class CatalogRecord:
    """One image of one product, with whatever product metadata the source carries."""

    sku: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    data: bytes | None = None  # the file's bytes when they did not come from ``path`` (uploads)
    packshot: bool = False  # the photo shows the product alone (no model wearing it)

    def __post_init__(self) -> None:  # every entry point builds records: one check for all
        object.__setattr__(self, "sku", normalise_sku(self.sku))
        object.__setattr__(self, "metadata", check_product_fields(self.metadata))

    def read(self, limits: DecodeLimits = DecodeLimits()) -> bytes:
        return read_bytes(self.data if self.data is not None else self.path, limits)


def read_folder(
    root: Path, skipped: list[tuple[str, str]] | None = None
) -> Iterator[CatalogRecord]:
    """``root/<product_id>/<image files>``; sub-folder names are the product ids.

    Files that cannot be indexed (another format, no extension, not a regular file, outside
    a product folder) and folders that cannot be read are appended to ``skipped`` as
    (path, reason). Hidden files that are not images (``.DS_Store``) are ignored.
    """
    root = Path(os.path.abspath(root))  # sources stored absolute: `index --sync` compares them
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory")
    report = skipped if skipped is not None else []
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise ManifestError(f"{root}: cannot read folder ({exc.strerror})") from None
    product_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not product_dirs:
        raise ManifestError(f"{root}: no product sub-folders (expected ROOT/<product_id>/<images>)")
    for path in entries:
        if not path.is_dir() and _reportable(path):
            report.append((str(path), "not in a product folder (expected ROOT/<product_id>/)"))
    for product_dir in product_dirs:
        if (product_dir / CATALOG_CARD).is_file():  # a catalog kept beside its photos
            report.append((str(product_dir), "a snapshop catalog, not a product folder"))
            continue
        try:
            normalise_sku(product_dir.name)
        except CatalogError as exc:  # before anything is written, as a bad CSV row
            raise ManifestError(
                f"{str(product_dir)!r}: the folder name is not a product id: {exc}"
            ) from None
        for path in _walk_files(product_dir, report):
            reason = _why_not_an_image(path)
            if reason is None:
                # No title: a new product is titled by its sku (the folder name), and a
                # re-index of the folder never overwrites a title set by a CSV since.
                yield CatalogRecord(product_dir.name, path)
            elif _reportable(path):
                report.append((str(path), reason))


def _walk_files(folder: Path, skipped: list[tuple[str, str]]) -> Iterator[Path]:
    """Every file under ``folder`` in name order (symlinked folders not followed); folders
    that cannot be read are reported in ``skipped``."""

    def unreadable(exc: OSError) -> None:
        skipped.append((str(exc.filename), f"cannot read folder ({exc.strerror})"))

    for top, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for name in dirs:
            if (Path(top) / name).is_symlink():
                skipped.append((str(Path(top) / name), "link to a folder (not followed)"))
        yield from (Path(top) / name for name in sorted(files))


def _why_not_an_image(path: Path) -> str | None:
    """None for a file to index, else why it is skipped."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        kind = f"unsupported file type {suffix}" if suffix else "no file extension"
        return f"{kind} (supported: {SUPPORTED_SUFFIXES})"
    if not path.is_file():  # a broken link, a socket...
        return "not a regular file"
    return None


def _reportable(path: Path) -> bool:
    return not path.name.startswith(".") or path.suffix.lower() in IMAGE_SUFFIXES


def _parse_price(raw: str, line: int, path: Path) -> float | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ManifestError(f"{path}:{line}: price {raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ManifestError(f"{path}:{line}: price {raw!r} must be a non-negative number")
    return value


def parse_flag(raw: str | None, what: str) -> bool:
    """1 / true / yes -> True; 0 / false / no / empty / None -> False; else ManifestError."""
    word = (raw or "").strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ManifestError(f"{what}: {raw!r} is not one of 1, true, yes, 0, false, no")


def _check_header(header: list[str], path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        other_separator = len(header) == 1 and any(sep in header[0] for sep in ";\t|")
        hint = " (columns must be separated by commas)" if other_separator else ""
        raise ManifestError(
            f"{path}: missing column(s) {missing}; header is {header or 'empty'}{hint}"
        )
    check_unique_columns(header, path)


def _check_same_product(
    known: dict[str, dict[tuple[str, str], tuple[Any, int]]],
    sku: str,
    meta: dict[str, Any],
    line: int,
    path: Path,
) -> None:
    """Rows of one product may leave its fields and attributes empty but not disagree on
    them: neither row could be said to win, and a silent choice would lose the other's
    value. Their attributes together must fit the limits one row's must."""
    fields = known.setdefault(sku, {})
    given = {("field", col): meta[col] for col in PRODUCT_COLUMNS if col in meta}
    given |= {("attribute", k): v for k, v in meta.get("attributes", {}).items()}
    for (kind, name), new_value in given.items():
        value, first_line = fields.setdefault((kind, name), (new_value, line))
        if value != new_value:
            what = name if kind == "field" else f"attribute {name!r}"
            raise ManifestError(
                f"{path}:{line}: product {sku!r} has {what} {new_value!r}, but line"
                f" {first_line} gives {value!r}"
            )
    merged = {name: v for (kind, name), (v, _) in fields.items() if kind == "attribute"}
    if len(merged) > len(meta.get("attributes", {})):  # more than this row's alone
        try:
            check_product_fields({"attributes": merged})
        except CatalogError as exc:
            raise ManifestError(
                f"{path}:{line}: product {sku!r}, its rows' attributes together: {exc}"
            ) from None


def read_csv_manifest(path: Path) -> list[CatalogRecord]:
    """Parse and validate a whole CSV manifest (raises ManifestError naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    csv.field_size_limit(MAX_CSV_FIELD)
    records: list[CatalogRecord] = []
    products: dict[str, dict[tuple[str, str], tuple[Any, int]]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            # strict: a quote left open would otherwise swallow every following row silently
            reader = csv.DictReader(fh, strict=True)
            header = [h.strip() for h in (reader.fieldnames or [])]
            _check_header(header, path)
            # columns with no name (a trailing comma) are kept apart, and must stay empty
            unnamed = {f"{UNNAMED}{i + 1}": i + 1 for i, h in enumerate(header) if not h}
            reader.fieldnames = [h or f"{UNNAMED}{i + 1}" for i, h in enumerate(header)]
            for line, values in nonblank_rows(reader, path):
                for key, column in unnamed.items():
                    if values.get(key):
                        raise ManifestError(
                            f"{path}:{line}: {values[key]!r} in column {column}, which has no"
                            " name in the header"
                        )
                sku, image = values["product_id"], values["image_path"]
                if not sku:
                    raise ManifestError(f"{path}:{line}: empty product_id")
                try:
                    sku = normalise_sku(sku)
                except CatalogError as exc:
                    raise ManifestError(f"{path}:{line}: {exc}") from None
                if not image:
                    raise ManifestError(f"{path}:{line}: empty image_path")
                if "\0" in image:
                    raise ManifestError(f"{path}:{line}: image_path contains a NUL byte")
                # relative to the CSV's folder; stored absolute (`index --sync` compares them)
                image_path = Path(os.path.abspath(path.parent / image))
                meta: dict[str, Any] = {}
                for col in PRODUCT_COLUMNS:  # a blank cell, as an empty one, changes nothing
                    if values.get(col) and not is_blank(values[col]):
                        meta[col] = values[col]
                if "price" in meta:
                    meta["price"] = _parse_price(meta["price"], line, path)
                extra = {
                    k: v
                    for k, v in values.items()
                    if k not in REQUIRED_COLUMNS + PRODUCT_COLUMNS + IMAGE_COLUMNS
                    and k not in unnamed
                    and v
                }
                if extra:
                    meta["attributes"] = extra
                try:
                    meta = check_product_fields(meta)
                except CatalogError as exc:
                    raise ManifestError(f"{path}:{line}: {exc}") from None
                _check_same_product(products, sku, meta, line, path)
                packshot = parse_flag(values.get("packshot"), f"{path}:{line}: packshot")
                records.append(CatalogRecord(sku, image_path, meta, packshot=packshot))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: malformed CSV ({exc})") from None
    if not records:
        raise ManifestError(f"{path}: no rows")
    return records


def read_source(source: Path, skipped: list[tuple[str, str]] | None = None) -> list[CatalogRecord]:
    """Records from a folder or a ``.csv`` manifest; files a folder holds that cannot be
    indexed are appended to ``skipped`` as (path, reason)."""
    source = Path(source)
    if source.is_dir():
        return list(read_folder(source, skipped))
    if source.suffix.lower() == ".csv":
        return read_csv_manifest(source)
    if not source.exists():
        raise ManifestError(f"{source}: not found")
    raise ManifestError(f"{source}: expected a folder of product folders or a .csv manifest")
