"""Evaluation manifests: CSV with ``path, product_id, role`` (role = query | gallery).

Extra columns are kept per row so protocols can select subsets (e.g. ``domain=iconic``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshop.errors import ConfigError, ManifestError

ROLES = ("query", "gallery")


@dataclass(frozen=True)
class ManifestRow:
    """One image: ``sku`` is the product as the CSV names it (column ``product_id``, kept for the
    file format); the catalog store maps skus to integer product ids."""

    path: Path
    sku: str
    role: str
    extra: dict[str, str] = field(default_factory=dict)


def parse_where(clauses: list[str] | None) -> dict[str, str]:
    """``["domain=iconic"]`` -> ``{"domain": "iconic"}``."""
    out: dict[str, str] = {}
    for clause in clauses or []:
        key, sep, value = clause.partition("=")
        if not sep or not key.strip():
            raise ManifestError(f"filter {clause!r} is not COLUMN=VALUE")
        out[key.strip()] = value.strip()
    return out


def matches(row: ManifestRow, where: dict[str, str]) -> bool:
    return all(row.extra.get(k) == v for k, v in where.items())


def check_matches(
    rows: Sequence[ManifestRow], where: dict[str, str], option: str, rows_are: str
) -> None:
    """The filter ``option`` must select some of ``rows`` (described as ``rows_are``): one that
    selects none is a typo (a column or value misspelt) far more often than a wish, and would
    quietly do nothing."""
    if where and not any(matches(r, where) for r in rows):
        raise ConfigError(f"{option} {where} matches none of the {len(rows)} {rows_are}")


def repeat_matching(
    rows: list[ManifestRow], where: dict[str, str], times: int
) -> list[ManifestRow]:
    """Rows matching ``where`` listed ``times`` times, each copy right after the original.

    The class-balanced sampler draws K of a class's rows uniformly, so repeating a class's rare
    rows (e.g. its one catalog image, ``domain=iconic``) puts them in most of its batches.
    """
    if times < 1:
        raise ManifestError(f"repeat must be >= 1, got {times}")
    if not where or times == 1:
        return list(rows)
    return [copy for row in rows for copy in [row] * (times if matches(row, where) else 1)]


def check_no_self_matches(rows: Sequence[ManifestRow], what: str) -> None:
    """A query that is also a gallery image finds itself at the top: its hit measures nothing,
    and a manifest listing every image in both roles would score any model near 1."""
    gallery = {os.path.abspath(r.path) for r in rows if r.role == "gallery"}
    both = [r.path for r in rows if r.role == "query" and os.path.abspath(r.path) in gallery]
    if both:
        raise ManifestError(
            f"{what}: {len(both)} queries are also gallery images (e.g. {both[0]}); a query must"
            " not be in the gallery it is searched in"
        )


def check_unique_columns(header: list[str], path: str | os.PathLike[str]) -> None:
    """A column named twice would have its first values silently replaced by the second's."""
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise ManifestError(f"{path}: column(s) {repeated} appear more than once in the header")


def nonblank_rows(
    reader: csv.DictReader[str], path: str | os.PathLike[str]
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, stripped values) of each CSV row with any value; a row with more fields
    than the header, or that the reader cannot parse, is a :class:`ManifestError` naming the
    line it starts on."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ManifestError(f"{path}:{start}: malformed CSV ({exc})") from None
        start = reader.line_num - _line_count(row) + 1  # a quoted value may span lines
        if None in row:
            raise ManifestError(f"{path}:{start}: more fields than the header has")
        values = {k: (v or "").strip() for k, v in row.items()}
        if any(values.values()):
            yield start, values


def _line_count(row: dict[str | None, Any]) -> int:
    """How many lines of the file a parsed row spans: one, plus its values' line breaks."""
    values = [v for v in row.values() if isinstance(v, str)]
    values += [x for v in row.values() if isinstance(v, list) for x in v]
    return 1 + sum(v.count("\n") for v in values)


def read_manifest(
    path: Path, root: Path | None = None, default_role: str | None = None
) -> list[ManifestRow]:
    """Read and validate a manifest CSV: ``path`` (or ``image_path``), ``product_id``, ``role``.

    Relative paths resolve against ``root`` (default: the CSV's folder). With ``default_role``
    the ``role`` column is optional and empty roles take that value. Every problem raises
    :class:`ManifestError` naming the file (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    root = Path(root) if root else path.parent
    rows: list[ManifestRow] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            # strict: a quote left open would otherwise swallow every following row silently
            reader = csv.DictReader(fh, strict=True)
            header = [h.strip() for h in reader.fieldnames or []]
            check_unique_columns(header, path)
            reader.fieldnames = header
            path_col = next((c for c in ("path", "image_path") if c in header), None)
            needed = ["product_id"] + ([] if default_role else ["role"])
            missing = [c for c in needed if c not in header] + ([] if path_col else ["path"])
            if missing:
                raise ManifestError(f"{path}: missing column(s) {missing}; header is {header}")
            for line, values in nonblank_rows(reader, path):
                role = values.get("role") or default_role or ""
                if role not in ROLES:
                    raise ManifestError(f"{path}:{line}: role {role!r} is not query|gallery")
                image, sku = values[path_col], values["product_id"]  # type: ignore[index]
                if not image or not sku:
                    raise ManifestError(f"{path}:{line}: empty path or product_id")
                p = Path(image)
                own = (path_col, "product_id", "role")
                extra = {k: v for k, v in values.items() if k not in own}
                rows.append(ManifestRow(p if p.is_absolute() else root / p, sku, role, extra))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def write_manifest(path: Path, rows: list[ManifestRow], root: Path | None = None) -> None:
    """Write rows (paths relative to ``root`` when possible), extra columns included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_cols = sorted({k for r in rows for k in r.extra})
    with open(path, "w", newline="", encoding="utf-8") as fh:  # as read_manifest reads it
        writer = csv.writer(fh)
        writer.writerow(["path", "product_id", "role", *extra_cols])
        for r in rows:
            p = r.path
            if root is not None:
                try:
                    p = r.path.relative_to(root)
                except ValueError:
                    p = r.path.resolve()
            writer.writerow([str(p), r.sku, r.role, *(r.extra.get(c, "") for c in extra_cols)])


# --- which rows train and which are scored (snapshop train, the cross-validation's checks)


def split_rows(
    rows: Sequence[ManifestRow], train_where: dict[str, str], eval_where: dict[str, str] | None
) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """Select training rows and (optionally) evaluation rows from one manifest."""
    train_rows = [r for r in rows if matches(r, train_where)]
    eval_rows = [r for r in rows if eval_where is not None and matches(r, eval_where)]
    if not train_rows:
        raise ConfigError(f"no manifest row matches {train_where}")
    return train_rows, eval_rows


@dataclass(frozen=True)
class RowSelection:
    """Which manifest rows train and which are scored, as ``COLUMN=VALUE`` filters (all must
    hold). Empty filters: ``split=train`` / ``split=test`` when the manifest has a split column
    (``snapshop prepare`` writes one), else every row trains and none is scored."""

    train_where: tuple[str, ...] = ()
    eval_where: tuple[str, ...] = ()
    eval_gallery_where: tuple[str, ...] = ()  # a second, smaller gallery (e.g. domain=iconic)
    repeat_where: tuple[str, ...] = ()  # training rows listed ``repeat`` times
    repeat: int = 1


def select_rows(
    rows: Sequence[ManifestRow], selection: RowSelection
) -> tuple[list[ManifestRow], list[ManifestRow], dict[str, str] | None]:
    """(training rows, evaluation rows, gallery filter of the second protocol or None)."""
    has_split = any("split" in r.extra for r in rows)
    train_where = parse_where(list(selection.train_where)) or (
        {"split": "train"} if has_split else {}
    )
    eval_where = parse_where(list(selection.eval_where)) or (
        {"split": "test"} if has_split else None
    )
    gallery_where = parse_where(list(selection.eval_gallery_where)) or None
    train_rows, eval_rows = split_rows(rows, train_where, eval_where)
    repeat_where = parse_where(list(selection.repeat_where))
    check_matches(train_rows, repeat_where, "repeat_where", "training rows")
    eval_gallery = [r for r in eval_rows if r.role == "gallery"]
    check_matches(
        eval_gallery, gallery_where or {}, "eval_gallery_where", "evaluation gallery rows"
    )
    train_rows = repeat_matching(train_rows, repeat_where, selection.repeat)
    return train_rows, eval_rows, gallery_where
