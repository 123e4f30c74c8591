"""benchmarks/replicas.py: its bulk loaders write catalogs that snapshop reads back exactly
(issue #14: the replica memory benchmark must measure real catalogs, not malformed rows)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from script_helpers import load_script

from snapshop.catalog.catalog import open_catalog
from snapshop.product_vectors import ProductVectors

N, DIM, PER_PRODUCT = 40, 16, 4
MODEL = ("bench-model@0", "bench-model")


def check_catalog(target: str, script) -> None:
    owners, vectors = script.synthetic(N, DIM, PER_PRODUCT)
    with open_catalog(target) as catalog:
        assert catalog.store.counts()["products"] == N // PER_PRODUCT
        got_ids, got = [], []
        for ids, vecs in catalog.store.iter_vectors("images", DIM):
            got_ids.append(ids)
            got.append(vecs)
        ids = np.concatenate(got_ids)
        order = np.argsort(ids)
        np.testing.assert_array_equal(np.concatenate(got)[order], vectors)
        product_of = catalog.store.image_product_map(ids[order].tolist())
        sizes = np.unique(list(product_of.values()), return_counts=True)[1]
        assert (sizes == PER_PRODUCT).all()
        # the vector index finds each image by its own vector
        hits = catalog.index(None).search(vectors[:5], 1)
        np.testing.assert_array_equal(hits.ids[:, 0], ids[order][:5])
        pv = ProductVectors(catalog, save=False)
        assert len(pv.vectors(None)[0]) == N // PER_PRODUCT
        assert int(owners[-1]) + 1 == N // PER_PRODUCT


def test_embedded_bulk_load_reads_back(tmp_path: Path) -> None:
    script = load_script("benchmarks/replicas.py")
    script.load_embedded(tmp_path / "cat", N, DIM, PER_PRODUCT, model=MODEL)
    check_catalog(str(tmp_path / "cat"), script)


@pytest.mark.server
def test_server_bulk_load_reads_back(pg_dsn: str) -> None:
    script = load_script("benchmarks/replicas.py")
    dbname = f"replicas_{uuid.uuid4().hex[:8]}"
    info = script.load_server(pg_dsn, N, DIM, PER_PRODUCT, dbname, model=MODEL)
    check_catalog(str(info["target"]), script)
