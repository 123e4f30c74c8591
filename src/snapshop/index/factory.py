"""Create, save and load indexes by kind; every saved index gets a JSON card beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapshop.config import read_json, write_json
from snapshop.errors import CatalogError
from snapshop.index.base import VectorIndex


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
            raise CatalogError(
                f"index backend {self.name} needs `pip install {package}` ({exc})"
            ) from None

    def __call__(self, dim: int, **params: Any) -> VectorIndex:
        return self._cls()(dim, **params)  # type: ignore[no-any-return]

    def load(self, path: Path) -> VectorIndex:
        return self._cls().load(path)  # type: ignore[no-any-return]


INDEX_KINDS: dict[str, Any] = {
    "flat": _Lazy("snapshop.index.flat", "FlatIndex", ""),
    "hnsw": _Lazy("snapshop.index.hnsw", "HNSWIndex", ""),
    "hnsw_sq": _Lazy("snapshop.index.reranked", "HNSWSQIndex", ""),
    "ivfpq": _Lazy("snapshop.index.reranked", "IVFPQIndex", ""),
    "pgvector": _Lazy("snapshop.index.pgvector", "PgVectorIndex", "pgvector"),
    "milvus": _Lazy("snapshop.index.milvus", "MilvusIndex", "milvus"),
}


def register_index(kind: str, cls: Any) -> None:
    INDEX_KINDS[kind] = cls


def create_index(kind: str, dim: int, **params: Any) -> VectorIndex:
    try:
        cls = INDEX_KINDS[kind]
    except KeyError:
        raise CatalogError(
            f"unknown index kind {kind!r}; choose from {sorted(INDEX_KINDS)}"
        ) from None
    try:
        return cls(dim, **params)
    except CatalogError:
        raise
    except (TypeError, ValueError) as exc:  # parameters the backend refuses, a missing uri
        raise CatalogError(f"cannot make a {kind} index: {exc}") from None
    except Exception as exc:  # database clients raise their own types when unreachable
        raise CatalogError(f"cannot make a {kind} index ({type(exc).__name__}: {exc})") from None


def card_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_index(index: VectorIndex, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Save ``index`` then its card (the card is written last: a card always names a full file)."""
    index.save(Path(path))
    write_json(card_path(path), {**index.info(), **(extra or {})})


def load_index(path: Path) -> tuple[VectorIndex, dict[str, Any]]:
    """Load the index at ``path`` and its card; raises CatalogError when either is unusable."""
    card = read_json(card_path(path))
    kind = card.get("kind", "flat")
    try:
        cls = INDEX_KINDS[kind]
        index = cls.load(Path(path))
    except KeyError:
        raise CatalogError(f"{path}: unknown index kind {kind!r}") from None
    except RuntimeError as exc:  # faiss raises RuntimeError on corrupt files
        raise CatalogError(f"{path}: cannot read index ({exc})") from None
    return index, card
