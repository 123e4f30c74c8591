"""An image that kills its Ray worker (a native crash, the OOM killer): the ingest bisects the
batch on replacement actors, names the image as failed and indexes every other one; past
``RayConfig.max_worker_deaths`` it stops with one clear error, keeping what it committed."""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from catalog_helpers import check_catalog_dir, make_images
from PIL import Image
from test_ingest_ray import ray_local  # noqa: F401  (the session's local Ray)

from snapshop import api
from snapshop.errors import IngestError
from snapshop.ingest import IngestReport
from snapshop.ingest_ray import KILLED_WORKER, KilledWorker, KillerSearch, RayConfig

POISON = (255, 0, 255)


class PoisonDetector:
    """Kills its worker process on a magenta image, as a native crash or the OOM killer would."""

    name = "poison"

    def detect(self, image: Any) -> list[Any]:
        import os

        w, h = image.size
        pixel = image.convert("RGB").getpixel((w // 2, h // 2))
        if all(abs(a - b) < 20 for a, b in zip(pixel, POISON, strict=True)):
            os._exit(1)
        return []


class DiesWhileLoading:
    """Kills every worker that unpickles it: a worker that dies while it loads (a detector's
    native library, a model too large for the worker's memory), each time Ray restarts it."""

    name = "dies-while-loading"

    def __init__(self) -> None:
        self.loaded = False  # a state, so that unpickling calls __setstate__

    def __setstate__(self, state: dict[str, Any]) -> None:
        import os

        os._exit(1)

    def detect(self, image: Any) -> list[Any]:
        return []


def poison_in(folder: Path) -> Path:
    path = folder / "poison.png"
    Image.new("RGB", (64, 64), POISON).save(path)
    return path


def ingest_within(
    seconds: float, shop: Path, catalog: Path, model: Path, detector: Any = None, **kwargs: Any
) -> Any:
    """``index_source`` with ``detector`` (default: the poison detector) on the session's Ray:
    its report, or the exception it raised; fails the test when it has not ended within
    ``seconds``."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # PoisonDetector
    outcome: dict[str, Any] = {}

    def ingest() -> None:
        try:
            outcome["done"] = api.index_source(
                shop, catalog, model=str(model), detector=detector or PoisonDetector(), **kwargs
            )
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            outcome["done"] = exc

    thread = threading.Thread(target=ingest, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"the ingest did not end within {seconds} s"
    return outcome["done"]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_an_image_that_kills_its_worker_is_named_and_every_other_image_indexed(
    tmp_path: Path, lite0_model_dir: Path
) -> None:
    """The ingest failed after the batch's actor died 4 times, the image that killed them not
    named; and the retry limit went through an argument Ray deprecates (``ray_remote_args``)."""
    make_images(tmp_path / "shop", n_products=3, per_product=3, size=48)
    poison = poison_in(next((tmp_path / "shop").iterdir()))
    with warnings.catch_warnings(record=True) as caught:  # the ingest thread's too
        warnings.simplefilter("always")
        report = ingest_within(
            240, tmp_path / "shop", tmp_path / "cat", lite0_model_dir, batch_size=4,
            ray=RayConfig(),
        )  # fmt: skip
    deprecated = [w for w in caught if type(w.message).__name__ == "RayDeprecationWarning"]
    assert not deprecated, [str(w.message) for w in deprecated]
    assert isinstance(report, IngestReport), report
    assert [source for source, _ in report.failed] == [str(poison)]
    assert report.failed[0][1].startswith("killed the Ray worker that indexed it")
    assert report.added == 9 and report.skipped == 0
    assert check_catalog_dir(tmp_path / "cat") == {"products": 3, "images": 9, "crops": 0}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_more_worker_deaths_than_allowed_stop_the_ingest_and_the_rerun_completes(
    tmp_path: Path, lite0_model_dir: Path
) -> None:
    """Past the cap the ingest stops with an error that says so, what it committed kept; a
    rerun with a cap that suffices names both killers and indexes the rest."""
    make_images(tmp_path / "shop", n_products=3, per_product=4, size=48)
    folders = sorted((tmp_path / "shop").iterdir())
    poisons = {str(poison_in(folders[0])), str(poison_in(folders[2]))}
    shop, cat = tmp_path / "shop", tmp_path / "cat"
    error = ingest_within(
        240, shop, cat, lite0_model_dir, batch_size=2, ray=RayConfig(max_worker_deaths=2)
    )
    assert isinstance(error, IngestError), error
    assert "Ray workers died 3 times, more than max_worker_deaths=2" in str(error)
    kept = check_catalog_dir(cat)["images"]
    assert 0 < kept < 12 and f"the {kept} images added so far are kept" in str(error)

    report = ingest_within(240, shop, cat, lite0_model_dir, batch_size=2, ray=RayConfig())
    assert isinstance(report, IngestReport), report
    assert {source for source, _ in report.failed} == poisons
    assert report.added == 12 - kept and report.skipped == kept
    assert check_catalog_dir(cat) == {"products": 3, "images": 12, "crops": 0}


def test_a_lone_image_is_named_after_its_second_death_and_deaths_are_capped() -> None:
    """One death alone may be chance (a node lost, an operator's kill): the image is tried once
    more before it is named. Deaths are counted per batch, not per row."""
    search = KillerSearch(max_deaths=3)
    assert search.died([(0, KilledWorker((0, 1))), (1, KilledWorker((0, 1)))], added=5) == []
    assert search.retry == {0, 1}
    assert search.next_round(2) == 1 and search.retry == set()
    assert search.died([(1, KilledWorker((1,)))], added=5) == [1]  # its second death
    assert (
        search.reason(1) == f"{KILLED_WORKER} (2 times: a crash in native code, or out of memory)"
    )
    assert search.died([(7, KilledWorker((7,)))], added=5) == []  # its first: tried again
    assert search.retry == {7} and search.next_round(1) == 1
    with pytest.raises(
        IngestError, match=r"died 4 times, more than max_worker_deaths=3.* 5 images"
    ):
        search.died([(7, KilledWorker((7,)))], added=5)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_workers_that_die_while_loading_end_the_ingest_with_a_reason(
    tmp_path: Path, lite0_model_dir: Path
) -> None:
    """Ray restarts an actor that died in its constructor without end: the ingest waited for
    ever (reproduced: still running after 150 s). Now the third death while loading ends it."""
    make_images(tmp_path / "shop", n_products=2, per_product=2, size=48)
    outcome = ingest_within(
        120, tmp_path / "shop", tmp_path / "cat", lite0_model_dir, DiesWhileLoading(),
        ray=RayConfig(),
    )  # fmt: skip
    assert isinstance(outcome, IngestError), outcome
    assert "at least 3 Ray workers died while loading the model and detector" in str(outcome)
