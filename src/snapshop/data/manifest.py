"""Evaluation manifests: CSV with ``path, product_id, role`` (role = query | gallery).

Extra columns are kept per row so protocols can select subsets (e.g. ``domain=iconic``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from snapshop.errors import ManifestError

ROLES = ("query", "gallery")


@dataclass(frozen=True)
class ManifestRow:
    path: Path
    product_id: str
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


def read_manifest(path: Path, root: Path | None = None) -> list[ManifestRow]:
    """Read and validate an evaluation manifest; relative paths resolve against ``root``
    (default: the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    root = Path(root) if root else path.parent
    rows: list[ManifestRow] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in ("path", "product_id", "role") if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}")
        for row in reader:
            role = (row["role"] or "").strip()
            if role not in ROLES:
                raise ManifestError(f"{path}:{reader.line_num}: role {role!r} is not query|gallery")
            if not (row["path"] or "").strip() or not (row["product_id"] or "").strip():
                raise ManifestError(f"{path}:{reader.line_num}: empty path or product_id")
            p = Path(row["path"].strip())
            extra = {
                k: (v or "") for k, v in row.items() if k not in ("path", "product_id", "role")
            }
            rows.append(ManifestRow(p if p.is_absolute() else root / p, row["product_id"].strip(),
                                    role, extra))  # fmt: skip
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def write_manifest(path: Path, rows: list[ManifestRow], root: Path | None = None) -> None:
    """Write rows (paths relative to ``root`` when possible), extra columns included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_cols = sorted({k for r in rows for k in r.extra})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "product_id", "role", *extra_cols])
        for r in rows:
            p = r.path
            if root is not None:
                try:
                    p = r.path.relative_to(root)
                except ValueError:
                    p = r.path.resolve()
            writer.writerow(
                [str(p), r.product_id, r.role, *(r.extra.get(c, "") for c in extra_cols)]
            )
