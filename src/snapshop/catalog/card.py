"""The catalog card (``DIR/catalog.json``): what embedding space a catalog holds and how its
indexes and crops are made, as one frozen, typed value.

The card names its format as ``"snapshop-catalog/<version>"``. Opening refuses another format
or a newer version (a card written by a later snapshop may mean things this one would
misread); older versions are read with defaults for the fields they lack.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshop.config import read_json, write_json
from snapshop.errors import CatalogError, ConfigError

CARD_FORMAT = "snapshop-catalog"
CARD_VERSION = 1
_FORMAT = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)/(?P<version>[0-9]{1,6})")
_KNOWN = frozenset({"format", "model_id", "model_ref", "dim", "index_kind", "index_params",
                    "crop_mode", "detector", "created_at", "catalog_views"})  # fmt: skip


@dataclass(frozen=True)
class CatalogCard:
    """``dim``: vector size; ``index_kind``: ``auto`` / ``flat`` / ``hnsw`` / ``pgvector`` /
    ``milvus``; ``crop_mode``: how crops are framed for the embedder (a card without it
    predates crop framing: ``center``); ``detector``: the spec the crops came from (None or
    ``"none"``: no detector); ``catalog_views``: how many augmented views are averaged into
    a packshot's vector at indexing time (0, and a card without the key: none; issue #20,
    ``Catalog.record_catalog_views``). ``extra`` keeps keys this version does not know, so
    rewriting a card (recording a detector, say) never drops them."""

    model_id: str
    model_ref: str
    dim: int
    index_kind: str = "flat"
    index_params: Mapping[str, Any] = field(default_factory=dict)
    crop_mode: str = "center"
    detector: str | None = None
    created_at: str | None = None
    catalog_views: int = 0
    version: int = CARD_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        *,
        model_id: str,
        model_ref: str,
        dim: int,
        index_kind: str,
        index_params: Mapping[str, Any] | None,
        crop_mode: str,
    ) -> CatalogCard:
        return cls(
            model_id=model_id, model_ref=model_ref, dim=int(dim), index_kind=index_kind,
            index_params=dict(index_params or {}), crop_mode=crop_mode,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: object, where: Path | str = CARD_FORMAT) -> CatalogCard:
        """Parse a card as read from JSON; ``where`` (the file) names it in errors."""
        if not isinstance(data, dict):
            raise CatalogError(f"{where}: a catalog card is a JSON object")
        version = _card_version(data.get("format"), where)
        for key in ("model_id", "model_ref", "dim"):
            if key not in data:
                raise CatalogError(f"{where}: missing {key!r}")
        dim = data["dim"]
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise CatalogError(f"{where}: dim must be a positive integer")
        params = data.get("index_params") or {}
        if not isinstance(params, dict):
            raise CatalogError(f"{where}: index_params must be a JSON object")
        detector = data.get("detector")
        views = data.get("catalog_views", 0)
        if not isinstance(views, int) or isinstance(views, bool) or views < 0:
            raise CatalogError(f"{where}: catalog_views must be a non-negative integer")
        return cls(
            model_id=str(data["model_id"]), model_ref=str(data["model_ref"]), dim=dim,
            index_kind=str(data.get("index_kind", "flat")), index_params=params,
            crop_mode=str(data.get("crop_mode", "center")),
            detector=None if detector is None else str(detector),
            created_at=None if data.get("created_at") is None else str(data["created_at"]),
            catalog_views=views, version=version,
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The card as written today (always the current format version)."""
        out: dict[str, Any] = {
            "format": f"{CARD_FORMAT}/{CARD_VERSION}",
            "model_id": self.model_id,
            "model_ref": self.model_ref,
            "dim": self.dim,
            "index_kind": self.index_kind,
            "index_params": dict(self.index_params),
            "crop_mode": self.crop_mode,
        }
        if self.detector is not None:
            out["detector"] = self.detector
        if self.created_at is not None:
            out["created_at"] = self.created_at
        if self.catalog_views:  # absent when off: a card older snapshops read the same way
            out["catalog_views"] = self.catalog_views
        return {**self.extra, **out}

    def to_json_text(self) -> str:
        """:meth:`to_json` as one JSON text (a server catalog keeps its card in a row)."""
        return json.dumps(self.to_json(), sort_keys=True)

    def replace(self, **changes: Any) -> CatalogCard:
        return dataclasses.replace(self, **changes)


def _card_version(value: object, where: Path | str) -> int:
    """The version of a card's ``format``; a card from before the field existed is 1."""
    if value is None:
        return 1
    match = _FORMAT.fullmatch(value) if isinstance(value, str) else None
    if match is None or match["name"] != CARD_FORMAT:
        raise CatalogError(
            f"{where}: unknown card format {value!r}; this snapshop reads"
            f" {CARD_FORMAT}/1 to {CARD_FORMAT}/{CARD_VERSION}"
        )
    version = int(match["version"])
    if version > CARD_VERSION or version < 1:
        raise CatalogError(
            f"{where}: card format {value!r} is version {version}, and this snapshop reads"
            f" versions 1 to {CARD_VERSION}: open it with the snapshop that wrote it, or upgrade"
        )
    return version


def read_card(path: Path) -> CatalogCard:
    """The card in ``path``; an unreadable or invalid one raises CatalogError naming it."""
    try:
        data = read_json(path)
    except ConfigError as exc:
        raise CatalogError(f"unreadable catalog card: {exc}") from None
    return CatalogCard.from_json(data, path)


def write_card(path: Path, card: CatalogCard) -> None:
    """Write ``card`` atomically (temp file + rename)."""
    write_json(path, card.to_json())
