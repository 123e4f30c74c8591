"""Search with spatial verification: image-based results re-ranked by local-feature inliers
against each candidate's shown image, the catalog's features cached beside its thumbnails."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from catalog_helpers import write_csv
from typer.testing import CliRunner
from verify_helpers import package, photographed

from snapshop import api, verify
from snapshop.catalog.blobs import LOCAL_FEATURES
from snapshop.catalog.catalog import open_catalog
from snapshop.cli import app
from snapshop.detect.base import Box
from snapshop.errors import ConfigError
from snapshop.models.embedder import Embedder
from snapshop.search import Searcher
from snapshop.verify import VerifyConfig

SEEDS = (11, 12, 13, 14, 15, 16)
STRONG = VerifyConfig(top_k=len(SEEDS), min_inliers=20, weight=1.0)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory, lite0_model_dir: Path) -> dict[str, Any]:
    """One catalog image per product (a generated carton), and a photo of each."""
    root = tmp_path_factory.mktemp("verify")
    rows: list[list[object]] = []
    queries = []
    for seed in SEEDS:
        path = root / "images" / f"p{seed}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        package(seed).save(path, quality=92)
        rows.append([f"p{seed}", path, f"carton {seed}", "", 1.0, "dairy"])
        query = root / f"photo-{seed}.jpg"
        photographed(package(seed)).save(query, quality=92)
        queries.append(query)
    api.index_source(write_csv(root / "shop.csv", rows), root / "cat", model=str(lite0_model_dir))
    return {"catalog": root / "cat", "queries": queries, "root": root}


def test_verified_search_puts_the_photographed_package_first(
    packages: dict[str, Any], lite0_embedder: Embedder
) -> None:
    with open_catalog(packages["catalog"]) as catalog:
        plain = Searcher(catalog, lite0_embedder)
        checked = Searcher(catalog, lite0_embedder, verify=STRONG)
        for seed, query in zip(SEEDS, packages["queries"], strict=True):
            before = plain.search(query, k=len(SEEDS), detect=False)
            after = checked.search(query, k=len(SEEDS), detect=False)
            assert after.image_results[0].sku == f"p{seed}"
            assert "verify" in after.timings_ms and "verify" not in before.timings_ms
            # each product's fused score is its cosine plus the bonus of its inliers
            cosine = {h.sku: h.score for h in before.image_results}
            assert {h.sku for h in after.image_results} == set(cosine)
            gains = [h.score - cosine[h.sku] for h in after.image_results]
            assert gains[0] == pytest.approx(STRONG.weight, abs=1e-5)  # >= twice the floor
            assert all(g >= -1e-6 for g in gains)
            assert sum(g > 1e-6 for g in gains) == 1  # other cartons stay under the floor
            scores = [h.score for h in after.image_results]
            assert scores == sorted(scores, reverse=True)


def test_only_the_top_k_candidates_are_verified(
    packages: dict[str, Any], lite0_embedder: Embedder
) -> None:
    with open_catalog(packages["catalog"]) as catalog:
        plain = Searcher(catalog, lite0_embedder).search(packages["queries"][0], k=6, detect=False)
        config = VerifyConfig(top_k=2, min_inliers=20, weight=1.0)
        checked = Searcher(catalog, lite0_embedder, verify=config)
        result = checked.search(packages["queries"][0], k=6, detect=False)
        head = {h.sku for h in plain.image_results[:2]}
        assert {h.sku for h in result.image_results[:2]} == head
        # beyond top_k: the embedding's own order and scores
        assert [(h.sku, h.score) for h in result.image_results[2:]] == [
            (h.sku, h.score) for h in plain.image_results[2:]
        ]
        assert len(checked.search(packages["queries"][0], k=1, detect=False).image_results) == 1


def test_catalog_features_are_extracted_once_and_kept_beside_the_thumbnails(
    packages: dict[str, Any], lite0_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = verify.extract

    def counting(image: Any, config: VerifyConfig = VerifyConfig()) -> verify.LocalFeatures:
        calls.append(image.size)
        return real(image, config)

    monkeypatch.setattr(verify, "extract", counting)
    config = VerifyConfig(top_k=len(SEEDS), max_features=300)
    with open_catalog(packages["catalog"]) as catalog:
        Searcher(catalog, lite0_embedder, verify=config).search(packages["queries"][0], k=3)
        catalog_calls = len(calls)
        assert catalog_calls == len(SEEDS)  # each candidate's image (the query's is not counted)
        files = sorted((packages["catalog"] / LOCAL_FEATURES.folder).rglob("*-300.npz"))
        assert len(files) == len(SEEDS)
        assert all(f.parent.parent.name == "400" for f in files)
        # a new searcher (a restarted service) reads the files instead of extracting again
        Searcher(catalog, lite0_embedder, verify=config).search(packages["queries"][1], k=3)
        assert len(calls) == catalog_calls


def test_an_unreadable_cache_file_is_extracted_again_and_a_missing_image_verifies_nothing(
    packages: dict[str, Any], lite0_embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    config = VerifyConfig(top_k=len(SEEDS), max_features=200, min_inliers=20, weight=1.0)
    with open_catalog(packages["catalog"]) as catalog:
        query = packages["queries"][2]
        first = Searcher(catalog, lite0_embedder, verify=config).search(query, k=6, detect=False)
        for f in (packages["catalog"] / LOCAL_FEATURES.folder).rglob("*-200.npz"):
            f.write_bytes(b"not an npz")
        with caplog.at_level(logging.WARNING, logger="snapshop.verify"):
            again = Searcher(catalog, lite0_embedder, verify=config).search(query, k=6)
        assert "unreadable local features" in caplog.text
        assert [h.sku for h in again.image_results] == [h.sku for h in first.image_results]
        assert again.image_results[0].sku == f"p{SEEDS[2]}"

        # the right product's stored file gone (and no cached features): no bonus, no error
        top = catalog.store.get_image(first.image_results[0].image_id)
        for f in (packages["catalog"] / LOCAL_FEATURES.folder).rglob(f"{top.sha256}*"):
            f.unlink()
        blob = packages["catalog"] / top.blob
        saved = blob.read_bytes()
        blob.unlink()
        try:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="snapshop.verify"):
                result = Searcher(catalog, lite0_embedder, verify=config).search(query, k=6)
            assert "no local features" in caplog.text
            gain = {h.sku: h.score for h in result.image_results}[f"p{SEEDS[2]}"]
            plain = Searcher(catalog, lite0_embedder).search(query, k=6, detect=False)
            assert gain == pytest.approx(
                {h.sku: h.score for h in plain.image_results}[f"p{SEEDS[2]}"]
            )
        finally:
            blob.write_bytes(saved)


def test_a_drawn_box_is_not_verified(packages: dict[str, Any], lite0_embedder: Embedder) -> None:
    with open_catalog(packages["catalog"]) as catalog:
        result = Searcher(catalog, lite0_embedder, verify=STRONG).search(
            packages["queries"][0], k=3, box=Box(10, 10, 150, 150)
        )
        assert result.image_results == [] and "verify" not in result.timings_ms


def test_verify_must_be_a_config(packages: dict[str, Any], lite0_embedder: Embedder) -> None:
    with open_catalog(packages["catalog"]) as catalog, pytest.raises(ConfigError, match="Verify"):
        Searcher(catalog, lite0_embedder, verify=True)  # type: ignore[arg-type]


def test_cli_and_api_search_with_verify(packages: dict[str, Any], lite0_model_dir: Path) -> None:
    query = packages["queries"][3]
    result = api.search_image(query, packages["catalog"], k=3, verify=True)
    assert "verify" in result.timings_ms
    out = CliRunner().invoke(
        app,
        [
            "search",
            str(query),
            "--catalog",
            str(packages["catalog"]),
            "--verify",
            "-k",
            "3",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert "verify" in payload["timings_ms"]
    assert [h["sku"] for h in payload["image_results"]] == [h.sku for h in result.image_results]


def test_the_service_setting_and_its_environment_variable_reach_the_searcher(
    packages: dict[str, Any], lite0_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshop.service.settings import VERIFY_ENV, ServiceSettings
    from snapshop.service.state import ServiceState

    with open_catalog(packages["catalog"]) as catalog:
        searcher = Searcher(catalog, lite0_embedder)
        assert searcher.verify is None  # off by default
        ServiceState(ServiceSettings(packages["catalog"], verify=True), searcher)
        assert searcher.verify == VerifyConfig()
        ServiceState(ServiceSettings(packages["catalog"], verify=False), searcher)
        assert searcher.verify is None
    with pytest.raises(ConfigError, match="verify"):
        ServiceSettings(packages["catalog"], verify="no")  # type: ignore[arg-type]
    monkeypatch.setenv(VERIFY_ENV, "yes")
    assert ServiceSettings(packages["catalog"]).verify is True
    monkeypatch.setenv(VERIFY_ENV, "maybe")
    with pytest.raises(ConfigError, match=VERIFY_ENV):
        ServiceSettings(packages["catalog"])


def test_a_catalog_disk_that_refuses_the_features_file_still_verifies(
    packages: dict[str, Any],
    lite0_embedder: Embedder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read-only or full disk: the features stay in memory, the search answers as usual."""

    def refuse(target: Path) -> Any:
        raise OSError(30, "Read-only file system", str(target))

    monkeypatch.setattr(verify, "atomic_file", refuse)
    config = VerifyConfig(top_k=len(SEEDS), max_features=150, min_inliers=20, weight=1.0)
    with (
        open_catalog(packages["catalog"]) as catalog,
        caplog.at_level(logging.WARNING, logger="snapshop.verify"),
    ):
        result = Searcher(catalog, lite0_embedder, verify=config).search(
            packages["queries"][4], k=3, detect=False
        )
    assert result.image_results[0].sku == f"p{SEEDS[4]}"
    assert "local features not saved" in caplog.text
    assert not list((packages["catalog"] / LOCAL_FEATURES.folder).rglob("*-150.npz"))
