"""A write refuses what would make its catalog unopenable: vectors of another length than the
catalog's, or not finite. Nothing of the refused write is stored; the catalog stays usable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.catalog.store import NewCrop
from snapshop.errors import CatalogError

DIM = 8


def _unit(n: int) -> np.ndarray:
    v = np.ones(n, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize(
    ("vector", "crop_vector", "message"),
    [
        (_unit(16), _unit(DIM), r"shape \(16,\)"),
        (_unit(DIM), _unit(4), r"shape \(4,\)"),
        (_unit(DIM).reshape(1, DIM), _unit(DIM), r"shape \(1, 8\)"),
        (np.full(DIM, np.nan, dtype=np.float32), _unit(DIM), "NaN"),
    ],
)
def test_a_wrong_vector_is_refused_and_nothing_is_written(
    tmp_path: Path, vector: np.ndarray, crop_vector: np.ndarray, message: str
) -> None:
    catalog = create_catalog(tmp_path / "c", model_id="m@1", model_ref="m", dim=DIM)
    with catalog.writing() as write:
        good = write.upsert_product("good")
        write.insert_image(good, source="good.jpg", blob=None, sha256="a" * 64, width=4,
                           height=4, vector=_unit(DIM))  # fmt: skip
    with pytest.raises(CatalogError, match=message), catalog.writing() as write:
        product_id = write.upsert_product("bad")
        crops = [NewCrop("upper", "top", 0.9, (0.0, 0.0, 2.0, 2.0), crop_vector)]
        write.insert_image(product_id, source="bad.jpg", blob=None, sha256="b" * 64, width=4,
                           height=4, vector=vector, crops=crops)  # fmt: skip
    catalog.save_indexes()
    catalog.close()
    with open_catalog(tmp_path / "c") as reopened:  # still opens, holds only the good write
        assert [p.sku for p in reopened.list_products(limit=10)] == ["good"]
        assert len(reopened.index()) == 1
