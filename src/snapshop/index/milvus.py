"""Milvus backend (``pymilvus``): one collection per index, inner-product metric.

``uri`` is a Milvus server or cluster (``http://milvus:19530``, Zilliz Cloud) or a local file
path, which runs embedded Milvus Lite in-process (tests; it searches by brute force and
allows one process per file). The token is read from ``SNAPSHOP_MILVUS_TOKEN`` and never
written to disk. ``save(path)`` writes a JSON pointer (uri, collection, parameters);
``load(path)`` reconnects.

On a server, ``index_type="HNSW"`` (with ``m``/``ef_construction``) builds an HNSW index;
``efSearch`` is raised to at least ``k`` so large fetches keep their recall.

Filters run inside Milvus as a boolean expression over the primary key (``id in [...]``),
which Milvus applies during the vector search. An expression holds at most ``MAX_EXPR_IDS``
ids; a larger allowed set is first answered by one deeper unfiltered search kept to the
allowed ids (the first k allowed of the unfiltered ranking are the filtered top-k), and the
queries that finds too few for are searched chunk by chunk of the allowed ids and merged.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.config import read_json, write_json
from snapshop.index.base import SearchHits, check_ids, check_query, check_vectors, id_array
from snapshop.index.filtering import IdFilter

FORMAT = "snapshop-milvus/1"
TOKEN_ENV = "SNAPSHOP_MILVUS_TOKEN"
URI_ENV = "SNAPSHOP_MILVUS_URI"
MAX_TOPK = 16384  # Milvus' limit on one search
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
_CHUNK = 1000
MAX_EXPR_IDS = 5000  # ids in one filter expression (~40 kB of text)


def _is_local(uri: str) -> bool:
    return "://" not in uri


class MilvusIndex:
    """Vectors in a Milvus collection ``(id INT64 primary key, vector FLOAT_VECTOR(dim))``."""

    kind = "milvus"
    filters_inside = True

    def __init__(
        self,
        dim: int,
        uri: str | None = None,
        collection: str | None = None,
        index_type: str = "AUTOINDEX",
        m: int = 16,
        ef_construction: int = 200,
        ef_search: int = 128,
    ) -> None:
        from pymilvus import DataType, MilvusClient

        uri = uri or os.environ.get(URI_ENV)
        if not uri:
            raise ValueError(f"milvus index needs a uri (or ${URI_ENV})")
        self.uri = str(Path(uri).resolve()) if _is_local(uri) else uri
        self.dim = dim
        self.collection = collection or f"snapshop_{uuid.uuid4().hex[:12]}"
        if not _NAME.match(self.collection):
            raise ValueError(f"collection name {self.collection!r} must match {_NAME.pattern}")
        self.index_type, self.m, self.ef_construction = index_type, m, ef_construction
        self.ef_search = ef_search
        if _is_local(self.uri):
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        self._client = MilvusClient(self.uri, token=os.environ.get(TOKEN_ENV, ""))
        if self._client.has_collection(self.collection):
            desc = self._client.describe_collection(self.collection)
            found = [f for f in desc["fields"] if f["name"] == "vector"]
            have = found[0]["params"].get("dim") if found else None
            if have is None or int(have) != dim:
                raise ValueError(f"collection {self.collection} holds dim {have}, not {dim}")
            self._client.load_collection(self.collection)
            return
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        params = self._client.prepare_index_params()
        extra = {"M": m, "efConstruction": ef_construction} if index_type == "HNSW" else {}
        params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=extra)
        self._client.create_collection(
            self.collection, schema=schema, index_params=params, consistency_level="Strong"
        )

    def __len__(self) -> int:
        rows = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        for s in range(0, len(ids), _CHUNK):
            rows = [
                {"id": i, "vector": v}
                for i, v in zip(
                    ids[s : s + _CHUNK].tolist(), vectors[s : s + _CHUNK].tolist(), strict=True
                )
            ]
            self._client.upsert(self.collection, rows)

    def _existing(self, ids: list[int]) -> list[int]:
        found: list[int] = []
        for s in range(0, len(ids), _CHUNK):
            chunk = ids[s : s + _CHUNK]
            rows = self._client.query(
                self.collection, filter=f"id in {chunk}", output_fields=["id"]
            )
            found += [int(r["id"]) for r in rows]
        return found

    def remove(self, ids: NDArray[np.int64]) -> int:
        wanted = np.unique(id_array(ids)).tolist()
        present = self._existing(wanted) if wanted else []
        for s in range(0, len(present), _CHUNK):
            self._client.delete(self.collection, ids=present[s : s + _CHUNK])
        return len(present)

    def search(
        self, queries: NDArray[np.float32], k: int, allowed: IdFilter | None = None
    ) -> SearchHits:
        """Top-``k``; ``allowed`` limits the result to those ids, as a Milvus expression."""
        queries = check_query(queries, k, self.dim)
        limit = min(k, MAX_TOPK)
        if len(queries) == 0 or (allowed is not None and len(allowed) == 0):
            return SearchHits(*_empty(len(queries), k))
        if allowed is None:
            return SearchHits(*_pad(*self._search(queries, limit), k))
        if len(allowed) <= MAX_EXPR_IDS:
            return SearchHits(*_pad(*self._search(queries, limit, _id_in(allowed.ids)), k))
        scores, ids = _empty(len(queries), limit)
        fraction = len(allowed) / max(len(self), 1)
        deep = int(min(MAX_TOPK, max(4 * limit, np.ceil(2 * limit / fraction))))
        wide_scores, wide_ids = self._search(queries, deep)
        keep = np.isin(wide_ids, allowed.ids) & (wide_ids >= 0)
        short = np.zeros(len(queries), bool)
        for row in range(len(queries)):
            got = np.flatnonzero(keep[row])[:limit]
            scores[row, : len(got)], ids[row, : len(got)] = (
                wide_scores[row, got],
                wide_ids[row, got],
            )
            # fewer than k allowed among the deep results, and the index held more than those
            short[row] = len(got) < limit and (wide_ids[row] >= 0).all()
        if short.any():
            scores[short], ids[short] = self._search_chunks(queries[short], limit, allowed)
        return SearchHits(*_pad(scores, ids, k))

    def _search_chunks(
        self, queries: NDArray[np.float32], limit: int, allowed: IdFilter
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Top-``limit`` over the allowed ids, one expression of MAX_EXPR_IDS ids at a time."""
        parts = [
            self._search(queries, limit, _id_in(allowed.ids[s : s + MAX_EXPR_IDS]))
            for s in range(0, len(allowed), MAX_EXPR_IDS)
        ]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :limit]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _search(
        self, queries: NDArray[np.float32], limit: int, expression: str = ""
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """(Q, limit) scores and ids, padded with (-inf, -1)."""
        scores, ids = _empty(len(queries), limit)
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.index_type == "HNSW":
            params["params"] = {"ef": max(self.ef_search, limit)}
        results = self._client.search(
            self.collection,
            data=queries.tolist(),
            limit=limit,
            filter=expression,
            output_fields=["id"],
            search_params=params,
        )
        for qi, hits in enumerate(results):
            n = len(hits)
            if n:
                ids[qi, :n] = [int(h["id"]) for h in hits]
                scores[qi, :n] = [float(h["distance"]) for h in hits]
        return scores, ids

    def ids(self) -> NDArray[np.int64]:
        out: list[int] = []
        it = self._client.query_iterator(
            self.collection, batch_size=_CHUNK, filter="", output_fields=["id"]
        )
        try:
            while batch := it.next():
                out += [int(r["id"]) for r in batch]
        finally:
            it.close()
        return np.array(out, dtype=np.int64)

    def save(self, path: Path) -> None:
        write_json(
            Path(path),
            {
                "format": FORMAT,
                "uri": self.uri,
                "collection": self.collection,
                "dim": self.dim,
                "index_type": self.index_type,
                "m": self.m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
            },
        )

    @classmethod
    def load(cls, path: Path) -> MilvusIndex:
        data = read_json(Path(path))
        if data.get("format") != FORMAT:
            raise RuntimeError(f"{path}: not a {FORMAT} pointer")
        return cls(
            int(data["dim"]),
            data["uri"],
            data["collection"],
            data["index_type"],
            int(data["m"]),
            int(data["ef_construction"]),
            int(data["ef_search"]),
        )

    def drop(self) -> None:
        """Delete the collection (tests, benchmarks, rebuilds) and close the client."""
        self._client.drop_collection(self.collection)
        self.close()

    def close(self) -> None:
        self._client.close()

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "metric": "inner_product",
            "uri": self.uri if _is_local(self.uri) else self.uri.split("@")[-1],
            "collection": self.collection,
            "index_type": self.index_type,
        }


def _id_in(ids: NDArray[np.int64]) -> str:
    return f"id in {ids.tolist()}"


def _empty(q: int, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)


def _pad(
    scores: NDArray[np.float32], ids: NDArray[np.int64], k: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Widen (Q, limit) results to (Q, k) (k above Milvus' top-k limit gets padding)."""
    if scores.shape[1] == k:
        return scores, ids
    out_scores, out_ids = _empty(len(scores), k)
    out_scores[:, : scores.shape[1]], out_ids[:, : ids.shape[1]] = scores, ids
    return out_scores, out_ids
