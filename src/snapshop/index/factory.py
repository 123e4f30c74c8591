"""Create, save and load indexes by kind; every saved index gets a JSON card beside it."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from snapshop.config import read_json, write_json
from snapshop.errors import ConfigError, VectorIndexError
from snapshop.index.base import FILE_CHECKSUM, VectorIndex

log = logging.getLogger(__name__)
SAVE_RACE_S = 0.2  # how long a save may take between replacing an index file and its card
LOAD_TRIES = 10  # loads of a file another process keeps replacing (see load_index)
_UNCHECKED: set[Path] = set()  # files whose card predates checksums, logged once each


class _Lazy:
    """A backend class imported on first use: faiss loads only when an index is made (a quick
    CLI start-up, and training runs where faiss is absent); server clients are optional extras.
    """

    def __init__(self, module: str, name: str, extra: str) -> None:
        self.module, self.name, self.extra = module, name, extra

    def _cls(self) -> Any:
        import importlib

        try:
            return getattr(importlib.import_module(self.module), self.name)
        except ImportError as exc:
            package = f"'snapshop[{self.extra}]'" if self.extra else "faiss-cpu"
            raise VectorIndexError(
                f"index backend {self.name} needs `pip install {package}` ({exc})"
            ) from None

    def __call__(self, dim: int, **params: Any) -> VectorIndex:
        return self._cls()(dim, **params)

    def load(self, path: Path) -> VectorIndex:
        return self._cls().load(path)


INDEX_KINDS: dict[str, Any] = {
    "flat": _Lazy("snapshop.index.flat", "FlatIndex", ""),
    "hnsw": _Lazy("snapshop.index.hnsw", "HNSWIndex", ""),
    "hnsw_sq": _Lazy("snapshop.index.reranked", "HNSWSQIndex", ""),
    "ivfpq": _Lazy("snapshop.index.reranked", "IVFPQIndex", ""),
    "pgvector": _Lazy("snapshop.index.pgvector", "PgVectorIndex", "pgvector"),
    "milvus": _Lazy("snapshop.index.milvus", "MilvusIndex", "milvus"),
}


def create_index(kind: str, dim: int, **params: Any) -> VectorIndex:
    try:
        cls = INDEX_KINDS[kind]
    except KeyError:
        raise VectorIndexError(
            f"unknown index kind {kind!r}; choose from {sorted(INDEX_KINDS)}"
        ) from None
    try:
        return cls(dim, **params)
    except VectorIndexError:
        raise
    except (TypeError, ValueError) as exc:  # parameters the backend refuses, a missing uri
        raise VectorIndexError(f"cannot make a {kind} index: {exc}") from None
    except Exception as exc:  # database clients raise their own types when unreachable
        raise VectorIndexError(
            f"cannot make a {kind} index ({type(exc).__name__}: {exc})"
        ) from None


def card_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_index(index: VectorIndex, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Save ``index`` then its card (the card is written last: a card always names a full file)."""
    index.save(Path(path))
    write_json(card_path(path), {**index.info(), **(extra or {})})


def load_index(path: Path) -> tuple[VectorIndex, dict[str, Any]]:
    """Load the index at ``path`` and its card; raises VectorIndexError when either is unusable,
    or when the file holds an index of another kind or dimension than its card says.

    A file whose checksum is not its card's is loaded again while another process is seen
    saving (the card or the file replaced since they were read), at most ``LOAD_TRIES``
    times: a writer saving several times a second replaced both again within the wait."""
    for attempt in range(1, LOAD_TRIES + 1):
        card, index, stamp = _load_once(Path(path))
        try:
            return index, _check_file_checksum(index, card, Path(path), stamp)
        except _SavedMeanwhile:
            _close(index)
            if attempt == LOAD_TRIES:
                raise VectorIndexError(
                    f"{path}: replaced by another process's saves {LOAD_TRIES} times while"
                    " it was read"
                ) from None
    raise AssertionError("unreachable")


class _SavedMeanwhile(Exception):
    """The file or its card was replaced while they were read: read them again."""


def _stamp(path: Path) -> tuple[int, int, int] | None:
    with contextlib.suppress(OSError):
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns
    return None


def _load_once(path: Path) -> tuple[dict[str, Any], VectorIndex, tuple[int, int, int] | None]:
    where = card_path(path)
    try:
        card = read_json(where)
    except (ConfigError, ValueError) as exc:  # missing, not JSON, not UTF-8
        raise VectorIndexError(f"{path}: unreadable index card ({exc})") from None
    if not isinstance(card, dict):
        raise VectorIndexError(f"{where}: an index card is a JSON object, not {card!r:.40}")
    kind = card.get("kind", "flat")
    if not isinstance(kind, str) or kind not in INDEX_KINDS:
        raise VectorIndexError(f"{path}: unknown index kind {kind!r}")
    stamp = _stamp(path)
    try:
        index = INDEX_KINDS[kind].load(path)
    except VectorIndexError:
        raise
    except Exception as exc:  # faiss' RuntimeError, a torn zip, a server client's own types
        raise VectorIndexError(f"{path}: cannot read index ({type(exc).__name__}: {exc})") from None
    dim = card.get("dim", index.dim)
    if index.kind != kind or index.dim != dim:
        _close(index)
        raise VectorIndexError(
            f"{path}: holds a {index.kind} index of dim {index.dim}, but its card says"
            f" {kind} of dim {dim}"
        )
    return card, index, stamp


def _check_file_checksum(
    index: VectorIndex, card: dict[str, Any], path: Path, stamp: tuple[int, int, int] | None
) -> dict[str, Any]:
    """The card of a file whose format has no checksum of its own (``file_crc32`` on the
    index: a flat index's faiss file), once the file has the checksum the card holds; a card
    written before cards held one is believed, as before (the next save writes one).

    Another process saving meanwhile replaces the file first and its card a moment later:
    a file newer than the card read is compared with the card once more before it counts as
    damaged (a damaged file would be rebuilt from the store, a long wait at a million), and
    read again (:class:`_SavedMeanwhile`) when the card or the file changed meanwhile.
    ``stamp``: the file's (inode, size, mtime) before it was read."""
    actual = getattr(index, "file_crc32", None)
    if actual is None:
        return card
    expected = card.get(FILE_CHECKSUM)
    if expected is not None and expected != actual:
        time.sleep(SAVE_RACE_S)
        with contextlib.suppress(ConfigError, ValueError):
            again = read_json(card_path(path))
            if isinstance(again, dict) and again.get(FILE_CHECKSUM) == actual:
                card, expected = again, actual
            elif again != card or _stamp(path) != stamp:
                raise _SavedMeanwhile
    if expected is None:
        if path not in _UNCHECKED:
            _UNCHECKED.add(path)
            log.info("%s: its card holds no checksum (saved before they were written);"
                     " loaded unchecked until the next save", path)  # fmt: skip
        return card
    if expected != actual:
        _close(index)
        raise VectorIndexError(
            f"{path}: damaged: the file's CRC-32 is {actual}, its card's checksum {expected!r}"
        )
    return card


def _close(index: VectorIndex) -> None:
    close = getattr(index, "close", None)
    if close is not None:
        close()
