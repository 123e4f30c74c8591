"""Dataset readers: each turns one dataset layout into the same :class:`ManifestRow` list.

Every row carries ``source`` (the reader's name) in ``extra``; rows keep the dataset's own
query/gallery role where it has one (``gallery`` otherwise), so protocols can re-split them.

Supported layouts:

- DeepFashion In-shop: ``list_eval_partition.txt`` (a count line, a header line
  ``image_name item_id evaluation_status``, then one image per line), images under ``img/``
  (or ``Img/img/``, as the archive unpacks).
- Street2Shop: ``meta/json/retrieval_<cat>.json`` (shop photos ``{"photo", "product"}``) and
  ``meta/json/{train,test}_pairs_<cat>.json`` (street photos ``{"photo", "product", "bbox"}``);
  photos are files ``<images>/<photo id>.<ext>``.
- a manifest CSV (``path`` or ``image_path``, ``product_id``, optional ``role``, extra columns),
- a folder per product (``ROOT/<product_id>/<images>``),
- a snapshop catalog directory (products and images from its SQLite store).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapshop.config import is_ascii_digits
from snapshop.data.manifest import ManifestRow, read_manifest
from snapshop.data.sources import read_folder
from snapshop.errors import CatalogError, ManifestError
from snapshop.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

INSHOP_LIST = "list_eval_partition.txt"
INSHOP_STATUS_ROLE = {"query": "query", "gallery": "gallery", "train": "gallery"}


def read_inshop(root: Path) -> list[ManifestRow]:
    """DeepFashion In-shop: rows of ``list_eval_partition.txt`` (Eval/ or the root); image
    names (``img/...``) are paths inside ``root``, or inside ``root/Img`` as the archive lays
    them out. An absolute name, one with ``..``, or a name listed twice with another item or
    status is a :class:`ManifestError` naming the line; listed files not found are counted in
    a warning (an exact repeat of a row counts once)."""
    root = Path(root)
    listing = next(
        (p for p in (root / INSHOP_LIST, root / "Eval" / INSHOP_LIST) if p.is_file()), None
    )
    if listing is None:
        raise ManifestError(f"{root}: no {INSHOP_LIST} (DeepFashion In-shop layout)")
    lines = _read_text(listing).splitlines()
    if len(lines) < 2 or lines[1].split()[:3] != ["image_name", "item_id", "evaluation_status"]:
        raise ManifestError(
            f"{listing}: expected a count line and the header "
            "'image_name item_id evaluation_status'"
        )
    # the archive's own layout keeps the images in Img/img/; unpacked at the root, in img/
    images = (
        root / "Img" if not (root / "img").is_dir() and (root / "Img" / "img").is_dir() else root
    )
    rows: list[ManifestRow] = []
    listed: dict[str, tuple[str, str, int]] = {}  # name -> (item, status, line)
    for n, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[2] not in INSHOP_STATUS_ROLE:
            raise ManifestError(f"{listing}:{n}: expected 'image_name item_id train|query|gallery'")
        name, item, status = parts
        if name.startswith("/") or ".." in Path(name).parts or "\0" in name:
            raise ManifestError(
                f"{listing}:{n}: image name {name!r} must be a path inside the dataset folder"
                " (relative, no '..')"
            )
        first = listed.setdefault(name, (item, status, n))
        if first[2] != n:
            if first[:2] == (item, status):
                continue  # the same row again: one image
            # one image under two items could sit on both sides of a split, or be its own query
            raise ManifestError(
                f"{listing}:{n}: {name} is listed as {item} {status}, but line {first[2]} lists"
                f" it as {first[0]} {first[1]}"
            )
        rel = name if name.startswith("img/") else f"img/{name}"
        rows.append(
            ManifestRow(
                images / rel,
                item,
                INSHOP_STATUS_ROLE[status],
                {"source": "inshop", "eval_status": status},
            )
        )
    expected = lines[0].strip()
    if is_ascii_digits(expected) and int(expected) != len(listed):
        log.warning("%s: header says %s images, found %d", listing, expected, len(listed))
    if not rows:
        raise ManifestError(f"{listing}: no images listed")
    missing = sum(not r.path.is_file() for r in rows)
    if missing:
        log.warning(
            "%s: %d of %d listed images are not under %s", listing, missing, len(rows), images
        )
    return rows


def _read_text(path: Path) -> str:
    """The UTF-8 text of a dataset listing (a byte order mark dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _load_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from None
    except RecursionError:
        raise ManifestError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ManifestError(f"{path}: expected a JSON list of objects")
    return data


def _photo_index(images: Path) -> dict[str, Path]:
    if not images.is_dir():
        raise ManifestError(f"{images}: Street2Shop photo folder not found")
    index: dict[str, Path] = {}
    for photo in sorted(images.iterdir()):
        if photo.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if photo.stem in index:  # the JSON names a photo by its stem: which file is it?
            raise ManifestError(
                f"{images}: two photos named {photo.stem!r} ({index[photo.stem].name},"
                f" {photo.name}); Street2Shop names a photo by its id: keep one"
            )
        index[photo.stem] = photo
    return index


def _json_id(value: Any) -> str | None:
    """A Street2Shop id (an integer, or text) as text; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value).strip()
    return text or None


def _photo_and_product(entry: dict[str, Any], path: Path, n: int) -> tuple[str, str]:
    """The entry's photo and product ids: a missing or empty one would file the photo under a
    product named "None" (or "") that merges every such photo."""
    photo, product = _json_id(entry.get("photo")), _json_id(entry.get("product"))
    if photo is None or product is None:
        raise ManifestError(
            f"{path}: entry {n} needs 'photo' and 'product' ids (integers or text), got"
            f" photo {entry.get('photo')!r}, product {entry.get('product')!r}"
        )
    return photo, product


def read_street2shop(root: Path, images: Path | None = None) -> list[ManifestRow]:
    """Street2Shop: shop photos (gallery) and street photos with their bbox (query).

    Product ids are ``<category>/<product>``; street rows carry ``bbox`` as ``x1,y1,x2,y2``.
    Photos missing from ``images`` (default ``ROOT/images``) are skipped with a warning; an
    entry without a photo or product id, or with a bbox of no area or non-finite numbers, is
    a :class:`ManifestError` naming the file and the entry (1-based).
    """
    root = Path(root)
    meta = root / "meta" / "json"
    retrieval = sorted(meta.glob("retrieval_*.json"))
    if not retrieval:
        raise ManifestError(f"{meta}: no retrieval_*.json (Street2Shop layout)")
    photos = _photo_index(Path(images) if images else root / "images")
    rows: list[ManifestRow] = []
    missing = 0

    def add(photo: Any, product: Any, role: str, extra: dict[str, str]) -> None:
        nonlocal missing
        path = photos.get(photo)
        if path is None:
            missing += 1
            return
        rows.append(ManifestRow(path, f"{extra['category']}/{product}", role, extra))

    for path in retrieval:
        category = path.stem.removeprefix("retrieval_")
        for n, entry in enumerate(_load_json_list(path), start=1):
            photo, product = _photo_and_product(entry, path, n)
            add(
                photo,
                product,
                "gallery",
                {"source": "street2shop", "category": category, "domain": "shop"},
            )
    for path in sorted(meta.glob("*_pairs_*.json")):
        match = re.fullmatch(r"(train|test)_pairs_(.+)", path.stem)
        if not match:
            continue
        pair_split, category = match.groups()
        for n, entry in enumerate(_load_json_list(path), start=1):
            photo, product = _photo_and_product(entry, path, n)
            box = entry.get("bbox") or {}
            try:
                left, top = float(box["left"]), float(box["top"])
                width, height = float(box["width"]), float(box["height"])
            except (KeyError, TypeError, ValueError):
                raise ManifestError(f"{path}: entry {n} ({entry}) has no valid bbox") from None
            if not all(map(math.isfinite, (left, top, width, height))) or min(width, height) <= 0:
                raise ManifestError(
                    f"{path}: entry {n}: bbox {box} needs finite numbers and a width and height"
                    " above 0"
                )
            x1, y1, x2, y2 = left, top, left + width, top + height
            add(
                photo,
                product,
                "query",
                {
                    "source": "street2shop",
                    "category": category,
                    "domain": "street",
                    "pair_split": pair_split,
                    "bbox": f"{x1:g},{y1:g},{x2:g},{y2:g}",
                },
            )
    if missing:
        log.warning("street2shop: %d listed photos are not in the photo folder", missing)
    if not rows:
        raise ManifestError(f"{root}: no Street2Shop photo found on disk")
    return rows


def read_manifest_csv(path: Path) -> list[ManifestRow]:
    """A CSV with ``path`` (or ``image_path``) and ``product_id``; ``role`` defaults to gallery."""
    return [
        ManifestRow(r.path, r.sku, r.role, {"source": "csv", **r.extra})
        for r in read_manifest(path, default_role="gallery")
    ]


def read_folder_tree(root: Path) -> list[ManifestRow]:
    """``ROOT/<product_id>/<images>`` (nested folders allowed); every image is a gallery row."""
    try:  # folder names are skus: checked like every other sku
        records = list(read_folder(root))
    except CatalogError as exc:
        raise ManifestError(f"{root}: {exc}") from None
    rows = [ManifestRow(r.path, r.sku, "gallery", {"source": "folder"}) for r in records]
    if not rows:
        raise ManifestError(f"{root}: no images in product sub-folders")
    return rows


def read_catalog(directory: Path) -> list[ManifestRow]:
    """Every image of every product of a snapshop catalog (the stored copy when there is one)."""
    from snapshop.catalog import open_catalog

    catalog = open_catalog(directory)
    rows: list[ManifestRow] = []
    try:
        after = 0
        while products := catalog.store.list_products(after_id=after, limit=500):
            for product in products:
                for image in catalog.store.images_of(product.id):
                    path = catalog.directory / image.blob if image.blob else Path(image.source)
                    extra = {"source": "catalog", "category": product.category or ""}
                    rows.append(ManifestRow(path, product.sku, "gallery", extra))
            after = products[-1].id
    finally:
        catalog.close()
    if not rows:
        raise ManifestError(f"{directory}: the catalog has no images")
    return rows


READERS: dict[str, Callable[[Path], list[ManifestRow]]] = {
    "inshop": read_inshop,
    "street2shop": read_street2shop,
    "csv": read_manifest_csv,
    "folder": read_folder_tree,
    "catalog": read_catalog,
}


def detect_format(path: Path) -> str:
    """Guess a source's format from its layout."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        if path.name == INSHOP_LIST:
            return "inshop"
        raise ManifestError(f"{path}: unknown dataset file (expected a .csv)")
    if not path.is_dir():
        raise ManifestError(f"{path}: not found")
    if (path / INSHOP_LIST).is_file() or (path / "Eval" / INSHOP_LIST).is_file():
        return "inshop"
    if (path / "meta" / "json").is_dir():
        return "street2shop"
    if (path / "catalog.json").is_file() and (path / "catalog.sqlite").exists():
        return "catalog"
    return "folder"


def read_dataset(spec: str | Path) -> list[ManifestRow]:
    """Rows of a source given as ``PATH`` (format guessed) or ``FORMAT:PATH``."""
    text = str(spec)
    fmt, sep, rest = text.partition(":")
    if sep and fmt in READERS:
        path = Path(rest)
    else:
        fmt, path = "", Path(text)
    fmt = fmt or detect_format(path)
    if fmt == "inshop" and path.is_file():
        path = path.parent.parent if path.parent.name == "Eval" else path.parent
    return READERS[fmt](path)
