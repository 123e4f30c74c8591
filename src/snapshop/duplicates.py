"""Near-duplicate images across different products: reused photos, duplicate listings.

Every stored image vector queries the catalog's image index; pairs of images of *different*
products whose vector similarity is at least ``threshold`` are candidates. Image vectors say
"looks like the same kind of thing": two distinct red skirts on white score as high as a photo
and its watermarked copy. So each candidate is confirmed on the stored files: a normalised
cross-correlation of small colour thumbnails (whole image against whole image or a central crop
of the other, so cropped copies match) must reach ``pixel_threshold``. A pair whose files are
not stored is reported on its vector alone, with no pixel score. Two photos of one product
are never reported. Both defaults come from ``benchmarks/duplicate_threshold.py``
(docs/benchmarks/shop.md): re-encoded, resized, cropped and watermarked copies of generated
images and of real photos against distinct products.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.catalog.blobs import blob_file
from snapshop.catalog.catalog import Catalog
from snapshop.catalog.store import ImageRow
from snapshop.config import check_int, check_number
from snapshop.data.spreadsheet import csv_text
from snapshop.errors import CatalogError, ImageDecodeError
from snapshop.images import load_image, stored_file_limits

log = logging.getLogger(__name__)

# Chosen in docs/benchmarks/shop.md (ImageNet Lite2 vectors): every re-encoded, resized and
# cropped copy is a candidate at 0.8, and the pixel check at 0.9 brings precision to 1.0 on
# generated garments (vectors alone at 0.8: 0.09) and on real photos.
DEFAULT_THRESHOLD = 0.8
DEFAULT_PIXEL_THRESHOLD = 0.9
CSV_COLUMNS = ("score", "pixel_score", "image_id", "product_id", "sku", "source",
               "other_image_id", "other_product_id", "other_sku", "other_source")  # fmt: skip


@dataclass(frozen=True)
class DuplicatePair:
    """Two near-identical images of different products; ``image_id`` < ``other_image_id``.
    ``score``: vector similarity; ``pixel_score``: the file check (None: a file not stored)."""

    score: float
    pixel_score: float | None
    image_id: int
    product_id: int
    sku: str
    source: str
    other_image_id: int
    other_product_id: int
    other_sku: str
    other_source: str


@dataclass
class DuplicateReport:
    threshold: float
    pixel_threshold: float | None
    images: int  # images compared
    pairs: list[DuplicatePair] = field(default_factory=list)  # best score first
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "pixel_threshold": self.pixel_threshold,
                "images": self.images, "seconds": self.seconds,
                "pairs": [asdict(p) for p in self.pairs]}  # fmt: skip


def candidate_pairs(
    catalog: Catalog,
    threshold: float,
    *,
    neighbours: int = 16,
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> dict[tuple[int, int], float]:
    """{(image id, other image id): score} for images of different products scoring at least
    ``threshold``. Each image fetches ``neighbours`` (widened while the last one still
    scores above the threshold, so an image copied many times loses no pair)."""
    with catalog.reading():
        index = catalog.index(None)
        if index is None or len(index) < 2:
            return {}
    found: dict[tuple[int, int], float] = {}
    for ids, vectors in catalog.store.iter_vectors("images", catalog.dim, batch=batch_size):
        # Held per batch, not over the whole scan: writes and refreshes go on between batches,
        # and the index is looked up again each time (a refresh or reindex may replace it).
        with catalog.reading():
            index = catalog.index(None)
            if index is None or len(index) < 2:
                break
            fetch = min(len(index), neighbours + 1)
            hits = index.search(vectors, fetch)
            rows = [(hits.ids[r], hits.scores[r]) for r in range(len(ids))]
            for r, (image_id, vector) in enumerate(zip(ids.tolist(), vectors, strict=True)):
                other_ids, scores = rows[r]
                wider = fetch
                while scores[-1] >= threshold and wider < len(index):
                    wider = min(len(index), wider * 4)
                    more = index.search(vector[None, :], wider)
                    other_ids, scores = more.ids[0], more.scores[0]
                keep = (scores >= threshold) & (other_ids >= 0) & (other_ids != image_id)
                pairs = zip(other_ids[keep].tolist(), scores[keep].tolist(), strict=True)
                for other, score in pairs:
                    key = (min(image_id, other), max(image_id, other))
                    found[key] = max(found.get(key, -1.0), float(score))
        if progress:
            progress(len(ids))
    owners = catalog.owners(None, sorted({i for pair in found for i in pair}))
    return {pair: score for pair, score in found.items()
            if pair[0] in owners and pair[1] in owners
            and owners[pair[0]] != owners[pair[1]]}  # fmt: skip


def find_duplicates(
    catalog: Catalog,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    pixel_threshold: float | None = DEFAULT_PIXEL_THRESHOLD,
    neighbours: int = 16,
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> DuplicateReport:
    """Near-duplicate image pairs across different products, best vector score first.
    ``pixel_threshold`` None: no pixel check (vector similarity alone)."""
    threshold = check_number("threshold", threshold, -1.0, 1.0)
    if pixel_threshold is not None:
        pixel_threshold = check_number("pixel_threshold", pixel_threshold, -1.0, 1.0)
    neighbours = check_int("neighbours", neighbours, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    t0 = time.perf_counter()
    catalog.refresh()
    found = candidate_pairs(catalog, threshold, neighbours=neighbours, batch_size=batch_size,
                            progress=progress)  # fmt: skip
    store = catalog.store
    image_ids = sorted({i for pair in found for i in pair})
    images = {i: store.get_image(i) for i in image_ids}
    products = store.products_by_ids(sorted({im.product_id for im in images.values()}))
    signatures: dict[int, NDArray[np.float32] | None] = {}

    def signature(image: ImageRow) -> NDArray[np.float32] | None:
        if image.id not in signatures:
            pixels = stored_image(catalog, image)
            signatures[image.id] = None if pixels is None else pixel_signatures(pixels)
        return signatures[image.id]

    pairs = []
    for (a, b), score in sorted(found.items(), key=lambda kv: (-kv[1], kv[0])):
        first, second = images[a], images[b]
        if first.product_id not in products or second.product_id not in products:
            continue  # deleted meanwhile
        pixel_score = None
        if pixel_threshold is not None and first.sha256 == second.sha256:
            pixel_score = 1.0  # the same file's bytes
        elif pixel_threshold is not None:
            sig_a, sig_b = signature(first), signature(second)
            if sig_a is not None and sig_b is not None:
                pixel_score = round(pixel_similarity(sig_a, sig_b), 6)
                if pixel_score < pixel_threshold:
                    continue
        pairs.append(DuplicatePair(
            round(score, 6), pixel_score,
            a, first.product_id, products[first.product_id].sku, first.source,
            b, second.product_id, products[second.product_id].sku, second.source,
        ))  # fmt: skip
    report = DuplicateReport(threshold, pixel_threshold, store.counts()["images"], pairs,
                             time.perf_counter() - t0)  # fmt: skip
    log.info("%d near-duplicate pairs of %d candidates", len(pairs), len(found))
    return report


def stored_image(catalog: Catalog, image: ImageRow) -> Image.Image | None:
    """The image's stored file, decoded; None when the catalog keeps no readable copy."""
    path = blob_file(catalog.directory, image.blob, image.sha256) if image.blob else None
    if path is None or not path.is_file():
        return None
    try:
        return load_image(path, stored_file_limits())
    except ImageDecodeError as exc:
        log.warning("image %d: stored file unreadable (%s)", image.id, exc.reason)
        return None


SIGNATURE_SIDE = 32
CENTRE_CROPS = (1.0, 0.9, 0.8)  # central fractions compared, so a cropped copy still matches
# A shrunk crop whose values vary by less than this (grey levels, standard deviation) is one
# flat colour (a placeholder tile, JPEG noise on one): centred, it has no pattern to correlate.
FLAT_STD = 2.0


def pixel_signatures(image: Image.Image) -> NDArray[np.float32]:
    """(len(CENTRE_CROPS), 3·3·SIGNATURE_SIDE²): the image and its central crops, each shrunk
    to SIGNATURE_SIDE² RGB pixels, centred and L2-normalised, then zeros. Colour is kept: two
    products that differ in colour only (a black and a navy shirt) look alike in grey.

    A flat grey crop (white, black: a placeholder), which centring left all zeros (the same
    placeholder under two products scored 0), is zeros, then its pixels and their
    complements (255 - v), L2-normalised: it matches flat crops of its shade (white against
    black scores 0, against mid grey 0.71) and nothing with a pattern."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    out = []
    for fraction in CENTRE_CROPS:
        dx, dy = w * (1 - fraction) / 2, h * (1 - fraction) / 2
        part = rgb.crop((round(dx), round(dy), round(w - dx), round(h - dy)))
        side = (SIGNATURE_SIDE, SIGNATURE_SIDE)
        pixels = np.asarray(part.resize(side, Image.Resampling.BOX), np.float32).ravel()
        none = np.zeros_like(pixels)
        if float(pixels.std()) >= FLAT_STD:
            signature = np.concatenate([pixels - pixels.mean(), none, none])
        else:
            signature = np.concatenate([none, pixels, 255.0 - pixels])
        out.append(signature / max(float(np.linalg.norm(signature)), 1e-6))
    return np.stack(out)


def pixel_similarity(first: NDArray[np.float32], second: NDArray[np.float32]) -> float:
    """Normalised cross-correlation of two :func:`pixel_signatures`: the whole of one image
    against the whole or a central crop of the other (a copy may be cropped either way)."""
    scores = np.concatenate([first[0] @ second.T, second[0] @ first.T])
    return float(scores.max())


def write_csv(pairs: Sequence[DuplicatePair], path: Path, *, spreadsheet_safe: bool = True) -> None:
    """The pairs as CSV (UTF-8), one a row; skus and sources a spreadsheet would run as
    formulas are written as text (a quote in front) unless not ``spreadsheet_safe``."""
    rows = [CSV_COLUMNS, *([getattr(p, c) for c in CSV_COLUMNS] for p in pairs)]
    text = csv_text(rows, spreadsheet_safe=spreadsheet_safe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write(text)


def _thumbnail_uri(catalog: Catalog, image: ImageRow, size: int) -> str | None:
    """A JPEG data URI of the image's stored file, or None when there is none to show."""
    pixels = stored_image(catalog, image)
    if pixels is None:
        return None
    pixels.thumbnail((size, size))
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Near-duplicate images</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
.pair {{ display: flex; gap: 1rem; align-items: flex-start; padding: .75rem 0;
        border-bottom: 1px solid #ddd; }}
figure {{ margin: 0; width: {size}px; }}
figure img, .missing {{ width: {size}px; height: {size}px; object-fit: contain;
                       background: #f3f3f3; display: block; }}
.missing {{ display: flex; align-items: center; justify-content: center; color: #888; }}
figcaption {{ font-size: .8rem; overflow-wrap: anywhere; }}
.score {{ font-weight: 600; min-width: 4rem; }}
</style></head><body>
<h1>Near-duplicate images</h1>
<p>{summary}</p>
{rows}
</body></html>
"""


def _figure(image_id: int, sku: str, source: str, uri: str | None, size: int) -> str:
    picture = (f'<img src="{uri}" alt="image {image_id}" width="{size}" height="{size}">'
               if uri else '<div class="missing">no stored file</div>')  # fmt: skip
    return (f"<figure>{picture}<figcaption>product <b>{html.escape(sku)}</b>, image"
            f" {image_id}<br>{html.escape(source)}</figcaption></figure>")  # fmt: skip


def write_html(
    catalog: Catalog,
    report: DuplicateReport,
    path: Path,
    *,
    size: int = 160,
    max_pairs: int = 1000,
) -> None:
    """A static page (thumbnails inlined, no other files) with each pair side by side."""
    store = catalog.store
    shown = report.pairs[:max_pairs]
    rows = []
    for p in shown:
        figures = []
        for image_id, sku, source in ((p.image_id, p.sku, p.source),
                                      (p.other_image_id, p.other_sku, p.other_source)):  # fmt: skip
            try:
                uri = _thumbnail_uri(catalog, store.get_image(image_id), size)
            except (CatalogError, OSError) as exc:  # deleted meanwhile, unreadable: "missing"
                log.warning("image %d: no thumbnail (%s)", image_id, exc)
                uri = None
            figures.append(_figure(image_id, sku, source, uri, size))
        pixel = "not checked" if p.pixel_score is None else f"{p.pixel_score:.3f}"
        rows.append(f'<div class="pair"><div class="score">{p.score:.4f}<br><small>pixels'
                    f" {pixel}</small></div>{''.join(figures)}</div>")  # fmt: skip
    checked = ("" if report.pixel_threshold is None
               else f" and pixel similarity &ge; {report.pixel_threshold:g}")  # fmt: skip
    summary = (f"{len(report.pairs)} pairs of images of different products with vector"
               f" similarity &ge; {report.threshold:g}{checked}"
               f" among {report.images} images")  # fmt: skip
    if len(shown) < len(report.pairs):
        summary += f"; the {len(shown)} most similar are shown (all of them: the CSV)"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.format(size=size, summary=summary, rows="\n".join(rows)))
