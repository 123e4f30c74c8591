"""Blob files: the content-addressed image copies under ``DIR/blobs``, the caches derived from
them (thumbnails), and their garbage collection. The one module that names these files: blob
paths (:func:`write_blob`, :func:`blob_file`) and derived caches (:data:`DERIVED_CACHES`);
temp files are ``snapshop.config``'s (``make_temp``, ``atomic_file``), where the index
backends below the catalog make theirs too.
Garbage collection also takes the temp files interrupted writes left beside the catalog's
card, its index files (``DIR/index``) and its derived caches.

Ingest writes ``blobs/ab/<sha256><suffix>`` (:func:`write_blob`: temp file + rename)
*before* the transaction that commits the rows naming it, outside the catalog write lock. So
a blob no row references is either garbage (its rows were deleted, or the ingest died before
committing) or belongs to an ingest in another process that has not committed yet. Garbage
collection tells them apart by age: a file younger than the grace period is never removed.
Each removal happens under the catalog write lock (every commit takes it) right after
re-reading the file's references and age, so a row committed after the scan keeps its file.
An ingest that finds the blob already on disk refreshes its mtime (:func:`write_blob`), so it
is young again for the grace period. Deleting the last row of a blob frees the file at once,
also while an ingest in another process has just written or reused those same bytes: that
ingest checks its files under the write lock right before committing and stores any that
went missing again (from memory, or by re-reading the source; a source that changed meanwhile
fails that one image), so no committed row names a missing file.

Several rows may share one blob (the same bytes under two products), so a blob is referenced
while any image row has its sha256.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snapshop.catalog.fields import is_sha256
from snapshop.catalog.store import CatalogStore
from snapshop.config import atomic_file, is_ascii_digits, is_temp_name
from snapshop.errors import ConfigError, NotFoundError
from snapshop.images import sniff_format

log = logging.getLogger(__name__)

BLOB_DIR = "blobs"
INDEX_DIR = "index"  # the index files and their cards, product vectors
DEFAULT_GRACE_SECONDS = 3600.0
SHARD_NAME = re.compile(r"[0-9a-f]{2}")
BLOB_NAME = re.compile(r"(?P<sha256>[0-9a-f]{64})\.[a-z0-9]{1,8}")
FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
                 "BMP": ".bmp", "TIFF": ".tif"}  # fmt: skip


@dataclass(frozen=True)
class DerivedCache:
    """Files rendered from blobs on demand (thumbnails, local features), kept under
    ``DIR/<folder>/<variant>/<sha256[:2]>/<sha256>[-<tag>]<suffix>``; ``variant`` is a number
    (a size), ``tag`` digits and underscores (a crop box). Garbage collection removes the
    files of bytes no image row holds any more, with no grace period: a file taken too early
    is rendered again, which costs only time."""

    folder: str
    suffix: str

    def file(self, catalog_dir: Path, variant: int, sha256: str, tag: str | None = None) -> Path:
        if tag is not None and not re.fullmatch(r"[0-9_]{1,64}", tag):
            raise ValueError(f"cache tag {tag!r}: digits and underscores only")
        if not is_sha256(sha256):  # a row written by other code: "../../x" left the catalog
            raise NotFoundError(f"no cached file for {sha256!r:.80}: not a sha256")
        name = f"{sha256}-{tag}{self.suffix}" if tag is not None else f"{sha256}{self.suffix}"
        return catalog_dir / self.folder / str(int(variant)) / sha256[:2] / name

    def sha256_of(self, name: str) -> str | None:
        """The sha256 a file name of this cache stands for (None: not one of its files)."""
        pattern = rf"(?P<sha256>[0-9a-f]{{64}})(-[0-9_]{{1,64}})?{re.escape(self.suffix)}"
        match = re.fullmatch(pattern, name)
        return match["sha256"] if match else None


# The caches garbage collection sweeps: a cache of files derived from blobs is declared here,
# so the catalog knows its layout without knowing who renders it (service.thumbs does).
THUMBNAILS = DerivedCache("thumbs", ".jpg")  # one variant per thumbnail size
CROP_THUMBNAILS = DerivedCache("thumbs/crops", ".jpg")  # tagged with the crop's pixel box
# spatial verification's local features (snapshop.verify): variant the long side, tag the count
LOCAL_FEATURES = DerivedCache("verify", ".npz")
DERIVED_CACHES: tuple[DerivedCache, ...] = (THUMBNAILS, CROP_THUMBNAILS, LOCAL_FEATURES)
THUMB_DIR = THUMBNAILS.folder


@dataclass(frozen=True)
class GcReport:
    """What one garbage collection over a catalog's blob directory (and the temp files beside
    its card, index files and derived caches) found and did."""

    dry_run: bool
    grace_seconds: float
    files_scanned: int  # blob and temp files looked at (other files are never touched)
    orphans_found: int  # unreferenced blobs older than the grace period
    orphans_removed: int
    temp_files_found: int  # of interrupted writes (blobs, indexes, cards), past the grace period
    temp_files_removed: int
    young_files_kept: int  # unreferenced or temp, but within the grace period: maybe in flight
    reclaimable_bytes: int  # size of what was found (orphans + temp files)
    bytes_freed: int
    missing_blobs: int  # blob files image rows name that do not exist (damage GC cannot repair)
    stale_thumbnails: int = 0  # cached thumbnails (thumbs/SIZE/ab/<sha256>.jpg) of no image
    thumbnails_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Candidate:
    path: Path
    sha256: str | None  # None: a temp file
    size: int


def file_age_stamp(st: os.stat_result) -> float:
    """When the file was last written or put in place (ctime: a rename or copy refreshes it)."""
    return max(st.st_mtime, st.st_ctime)


def _now() -> float:
    return time.time()


def blob_relative(sha256: str, suffix: str) -> str:
    """A blob's path relative to the catalog directory (what image rows store)."""
    return str(Path(BLOB_DIR) / sha256[:2] / f"{sha256}{suffix}")


def write_blob(blob_dir: Path, sha256: str, data: bytes) -> str:
    """Store ``data`` content-addressed under ``blob_dir`` (the catalog's ``blobs``); returns
    the path relative to the catalog. A stored file of another size (truncated, say) is
    written again: its name says what it must hold."""
    relative = blob_relative(sha256, FORMAT_SUFFIX.get(sniff_format(data) or "", ".bin"))
    target = blob_dir.parent / relative
    try:
        if target.stat().st_size == len(data):
            # Reusing a stored file: make it young again, so garbage collection (which spares
            # files younger than its grace period) cannot take it before this ingest commits.
            os.utime(target)
            return relative
        log.warning("stored %s holds the wrong number of bytes: writing it again", relative)
    except FileNotFoundError:
        pass  # not stored yet (or collected a moment ago): write it
    except OSError as exc:  # stored, but not ours to touch (e.g. another user's file): use it
        log.debug("could not refresh %s (%s)", target, exc)
        return relative
    with atomic_file(target) as fh:
        fh.write(data)
    return relative


def blob_file(catalog_dir: Path, relative: str, sha256: str) -> Path | None:
    """The file a row's ``blob`` column names, if it has the layout ingest writes
    (``blobs/<sha256[:2]>/<sha256>.<suffix>``); anything else is not ours to touch."""
    parts = Path(relative).parts
    if len(parts) != 3 or parts[0] != BLOB_DIR:
        return None
    match = BLOB_NAME.fullmatch(parts[2])
    if match is None or match["sha256"] != sha256 or parts[1] != sha256[:2]:
        return None
    return catalog_dir / relative


def _regular_file(path: Path) -> os.stat_result | None:
    """lstat ``path``: its result for a regular file, None for a symlink, a missing file or
    anything else (a symlink is never followed, never removed)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def free_unreferenced_blobs(
    catalog_dir: Path, store: CatalogStore, files: Iterable[tuple[str, str | None]]
) -> tuple[int, int]:
    """Remove the files of deleted rows, given as (sha256, blob) pairs, that no row references
    any more. Call under the catalog write lock, after the deleting transaction committed.

    Returns (files removed, bytes freed). A file that cannot be removed is left for
    :func:`collect_garbage`; so is every file after a crash between the commit and here.
    """
    removed = freed = 0
    for sha256, relative in sorted({(s, b) for s, b in files if b is not None}):
        path = blob_file(catalog_dir, relative, sha256)
        if path is None:
            log.warning("image blob %r does not look like a catalog blob; not removed", relative)
            continue
        if store.references_sha256(sha256):
            continue
        st = _regular_file(path)
        if st is None:
            continue
        try:
            path.unlink()
        except OSError as exc:
            log.warning("could not remove unreferenced blob %s (%s); gc will retry", path, exc)
            continue
        removed += 1
        freed += st.st_size
    if removed:
        log.info("removed %d unreferenced blobs (%d bytes)", removed, freed)
    return removed, freed


def collect_garbage(
    catalog_dir: Path,
    store: CatalogStore,
    write_lock: Callable[[], AbstractContextManager[None]],
    *,
    dry_run: bool = False,
    min_age_seconds: float = DEFAULT_GRACE_SECONDS,
) -> GcReport:
    """Remove blob files no image row references, and temp files of interrupted writes (of
    blobs, index files, cards, derived caches), that are older than ``min_age_seconds``. See
    the module docstring for why it is safe against concurrent ingests. Files that do not
    look like blobs or temp files, and symlinks, are ignored."""
    if not min_age_seconds >= 0:  # also rejects NaN
        raise ConfigError(f"grace period must be >= 0 seconds, got {min_age_seconds}")
    cutoff = _now() - min_age_seconds
    counts = dict.fromkeys(
        ("files_scanned", "orphans_found", "orphans_removed", "temp_files_found",
         "temp_files_removed", "young_files_kept", "reclaimable_bytes", "bytes_freed",
         "missing_blobs"), 0,
    )  # fmt: skip
    for prefix in (f"{i:02x}" for i in range(256)):  # every shard, so missing ones count too
        _collect_shard(catalog_dir, prefix, store, write_lock, cutoff, dry_run, counts)
    for folder in _temp_folders(catalog_dir):
        _collect_temp_files(folder, write_lock, cutoff, dry_run, counts)
    counts.update(_collect_thumbnails(catalog_dir, store, dry_run))
    report = GcReport(dry_run=dry_run, grace_seconds=float(min_age_seconds), **counts)
    if report.missing_blobs:
        log.warning("%s: %d blob files that image rows name are missing",
                    catalog_dir, report.missing_blobs)  # fmt: skip
    return report


def _collect_thumbnails(catalog_dir: Path, store: CatalogStore, dry_run: bool) -> dict[str, int]:
    """Remove the files of every derived cache (thumbnails) whose image is gone."""
    found = removed = 0
    for cache in DERIVED_CACHES:
        root = catalog_dir / cache.folder
        if not root.is_dir() or root.is_symlink():
            continue
        for variant in sorted(root.iterdir()):
            if not is_ascii_digits(variant.name) or variant.is_symlink() or not variant.is_dir():
                continue
            for shard in sorted(variant.iterdir()):
                if shard.is_symlink() or not shard.is_dir():
                    continue
                for entry in sorted(shard.iterdir()):
                    sha256 = cache.sha256_of(entry.name)
                    if sha256 is None or not sha256.startswith(shard.name):
                        continue
                    if entry.is_symlink() or store.references_sha256(sha256):
                        continue
                    found += 1
                    if not dry_run:
                        entry.unlink(missing_ok=True)
                        removed += 1
    return {"stale_thumbnails": found, "thumbnails_removed": removed}


def _temp_folders(catalog_dir: Path) -> Iterator[Path]:
    """The folders besides blob shards where atomic writes make their temp files: the
    catalog's own (its card), its index files', and each derived cache's shards. Symlinked
    folders are never followed."""

    def real_dir(path: Path) -> bool:
        return path.is_dir() and not path.is_symlink()

    yield catalog_dir
    if real_dir(catalog_dir / INDEX_DIR):
        yield catalog_dir / INDEX_DIR
    for cache in DERIVED_CACHES:
        root = catalog_dir / cache.folder
        if not real_dir(root):
            continue
        for variant in sorted(root.iterdir()):
            if is_ascii_digits(variant.name) and real_dir(variant):
                yield from (shard for shard in sorted(variant.iterdir()) if real_dir(shard))


def _collect_temp_files(
    folder: Path,
    write_lock: Callable[[], AbstractContextManager[None]],
    cutoff: float,
    dry_run: bool,
    counts: dict[str, int],
) -> None:
    """Remove the temp files in ``folder`` older than ``cutoff``; younger ones may be writes
    in flight (an index save of a large catalog takes minutes)."""
    old: list[_Candidate] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not is_temp_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            counts["files_scanned"] += 1
            st = entry.stat(follow_symlinks=False)
            if file_age_stamp(st) > cutoff:
                counts["young_files_kept"] += 1
                continue
            old.append(_Candidate(Path(entry.path), None, st.st_size))
            counts["temp_files_found"] += 1
            counts["reclaimable_bytes"] += st.st_size
    if dry_run or not old:
        return
    with write_lock():  # index files are saved under it: none is half-written while we look
        for c in old:
            freed = _unlink_unchanged(c, cutoff)
            if freed is not None:
                counts["temp_files_removed"] += 1
                counts["bytes_freed"] += freed


def _unlink_unchanged(c: _Candidate, cutoff: float) -> int | None:
    """Remove ``c`` if it is still the old regular file the scan saw; its bytes, or None."""
    current = _regular_file(c.path)
    if current is None or file_age_stamp(current) > cutoff:
        return None  # gone, replaced by something else, or rewritten since the scan
    try:
        c.path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("could not remove %s (%s)", c.path, exc)
        return None
    return current.st_size


def _collect_shard(
    catalog_dir: Path,
    prefix: str,
    store: CatalogStore,
    write_lock: Callable[[], AbstractContextManager[None]],
    cutoff: float,
    dry_run: bool,
    counts: dict[str, int],
) -> None:
    listed: set[str] = set()
    old: list[_Candidate] = []
    young: list[str | None] = []  # sha256 of young blobs, None for young temp files
    shard = catalog_dir / BLOB_DIR / prefix
    # A symlinked shard is skipped, never followed (the blob root itself may be a symlink).
    if shard.is_dir() and not shard.is_symlink():
        with os.scandir(shard) as entries:
            for entry in entries:
                blob = BLOB_NAME.fullmatch(entry.name)
                is_temp = is_temp_name(entry.name)
                if blob is None and not is_temp or not entry.is_file(follow_symlinks=False):
                    continue
                if blob is not None and not blob["sha256"].startswith(prefix):
                    continue
                counts["files_scanned"] += 1
                listed.add(entry.name)
                sha256 = blob["sha256"] if blob is not None else None
                st = entry.stat(follow_symlinks=False)
                if file_age_stamp(st) <= cutoff:
                    old.append(_Candidate(Path(entry.path), sha256, st.st_size))
                else:
                    young.append(sha256)

    rows = store.blob_refs_with_prefix(prefix)
    referenced = {sha256 for sha256, _ in rows}
    for _, relative in rows:
        if relative is None or Path(relative).name in listed:
            continue
        if not (catalog_dir / relative).is_file():  # look again: it may be newer than the listing
            counts["missing_blobs"] += 1
    counts["young_files_kept"] += sum(1 for s in young if s is None or s not in referenced)
    garbage = [c for c in old if c.sha256 is None or c.sha256 not in referenced]
    for c in garbage:
        counts["temp_files_found" if c.sha256 is None else "orphans_found"] += 1
        counts["reclaimable_bytes"] += c.size
    if dry_run or not garbage:
        return
    with write_lock():  # no row can commit between the re-check and the unlink
        for c in garbage:
            if c.sha256 is not None and store.references_sha256(c.sha256):
                continue  # committed since the scan
            freed = _unlink_unchanged(c, cutoff)
            if freed is not None:
                counts["temp_files_removed" if c.sha256 is None else "orphans_removed"] += 1
                counts["bytes_freed"] += freed
