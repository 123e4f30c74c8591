"""Shared fixtures. Tests generate their own images; real datasets are marked ``dataset``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def snapshop_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported models are cached per test session, never in the user's cache."""
    home = tmp_path_factory.mktemp("snapshop-home")
    os.environ["SNAPSHOP_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def lite0_model_dir(snapshop_home: Path) -> Path:
    """ImageNet EfficientNet-Lite0 exported to ONNX once per session (the fastest real model)."""
    from snapshop.models.export import resolve_model_dir

    return resolve_model_dir("efficientnet_lite0")


@pytest.fixture(scope="session")
def lite0_embedder(lite0_model_dir: Path):
    from snapshop.models.embedder import Embedder

    return Embedder(lite0_model_dir)


def dataset_path(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"needs ../shared/datasets/{name} (real evaluation data, not in the repo)")
    return path
