"""benchmarks/replica_refresh.py: its bulk-loaded catalog is one snapshop reads back as meant,
and both refresh paths it times run (the log one without a full id scan)."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_helpers import load_script

from snapshop.catalog.catalog import open_catalog
from snapshop.catalog.store import CatalogStore

N, DIM, PER_PRODUCT = 30, 8, 3


def test_sqlite_catalog_and_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script("benchmarks/replica_refresh.py")
    directory = tmp_path / "catalog"
    script.load_sqlite(directory, N, DIM, PER_PRODUCT)
    with open_catalog(directory) as catalog:
        assert catalog.counts() == {"products": N // PER_PRODUCT, "images": N, "crops": N // 2}
        assert len(catalog.index(None)) == N and len(catalog.index("upper")) == N // 2
    scans: list[int] = []
    image_ids = CatalogStore.image_ids

    def counted(self: CatalogStore) -> object:
        scans.append(1)
        return image_ids(self)

    monkeypatch.setattr(CatalogStore, "image_ids", counted)
    times = script.measure(str(directory), rounds=2)
    assert set(times) == {"log", "full ids"}
    assert all(len(runs) == 2 and min(min(run) for run in runs) >= 0 for runs in times.values())
    # two catalogs opened (a full reconcile each), then one full scan per "full ids" round only
    assert len(scans) == 2 + 2
