"""An image that kills its Ray worker (a native crash, the OOM killer): the ingest bisects the
batch on replacement actors, names the image as failed and indexes every other one; past
``RayConfig.max_worker_deaths`` deaths that no killer explains it stops with one clear error,
keeping what it committed."""

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
def test_killers_are_not_capped_but_workers_dying_in_a_row_stop_the_ingest(
    tmp_path: Path, lite0_model_dir: Path
) -> None:
    """Deaths that find a killer cost nothing against ``max_worker_deaths``: with a cap of 1,
    two killers apart (six deaths) are both named. Batches new to dying that die in a row (a
    product of four killers, one image a batch) stop the ingest past the cap, what it
    committed kept; the rerun names them all."""
    make_images(tmp_path / "apart", n_products=3, per_product=4, size=48)
    folders = sorted((tmp_path / "apart").iterdir())
    poisons = {str(poison_in(folders[0])), str(poison_in(folders[2]))}
    report = ingest_within(
        240, tmp_path / "apart", tmp_path / "cat1", lite0_model_dir, batch_size=2,
        ray=RayConfig(max_worker_deaths=1),
    )  # fmt: skip
    assert isinstance(report, IngestReport), report
    assert {source for source, _ in report.failed} == poisons
    assert all("(2 times alone:" in reason for _, reason in report.failed)
    assert check_catalog_dir(tmp_path / "cat1") == {"products": 3, "images": 12, "crops": 0}
    # A rerun knows them: reported as failed at once, nothing sent out, no worker dies; with
    # retry_killers they are sent, and bisected, again.
    again = ingest_within(240, tmp_path / "apart", tmp_path / "cat1", lite0_model_dir,
                          batch_size=2, ray=RayConfig(max_worker_deaths=0))  # fmt: skip
    assert isinstance(again, IngestReport), again
    assert {source for source, _ in again.failed} == poisons
    assert all(
        reason.startswith(f"{KILLED_WORKER} in an earlier run") for _, reason in again.failed
    )
    assert again.added == 0 and again.skipped == 12
    retried = ingest_within(240, tmp_path / "apart", tmp_path / "cat1", lite0_model_dir,
                            batch_size=2, ray=RayConfig(retry_killers=True))  # fmt: skip
    assert isinstance(retried, IngestReport), retried
    assert {source for source, _ in retried.failed} == poisons
    assert all("(2 times alone:" in reason for _, reason in retried.failed)

    shop, cat = tmp_path / "row", tmp_path / "cat2"
    make_images(shop, n_products=3, per_product=4, size=48)
    killers = sorted(shop.iterdir())[1]
    poisons = set()
    for j in range(4):
        path = killers / f"poison{j}.png"
        Image.new("RGB", (64, 64), POISON).save(path)
        poisons.add(str(path))
    error = ingest_within(
        240, shop, cat, lite0_model_dir, batch_size=1, ray=RayConfig(max_worker_deaths=1)
    )
    assert isinstance(error, IngestError), error
    assert "Ray workers died 2 times in a row, more than max_worker_deaths=1" in str(error)
    kept = check_catalog_dir(cat)["images"]
    assert 0 < kept < 12 and f"the {kept} images added so far are kept" in str(error)

    report = ingest_within(240, shop, cat, lite0_model_dir, batch_size=1, ray=RayConfig())
    assert isinstance(report, IngestReport), report
    assert {source for source, _ in report.failed} == poisons
    assert report.added == 12 - kept and report.skipped == kept
    assert check_catalog_dir(cat) == {"products": 3, "images": 12, "crops": 0}


def bisect(search: KillerSearch, n: int, dies: Any, batch_size: int) -> list[int]:
    """Rows ``0..n-1`` through ``search`` as the Ray runner maps them, in rounds of batches
    half as large; ``dies(round, batch)`` says whether a batch kills its worker. Returns the
    rows named as killers."""
    rows, named = list(range(n)), []
    while rows:
        for start in range(0, len(rows), batch_size):
            batch = tuple(rows[start : start + batch_size])
            killed = [(i, KilledWorker(batch)) for i in batch if dies(search.bisection, batch)]
            named += search.observed(list(batch), killed, added=5)
        rows = [i for i in rows if i in search.retry]
        batch_size = search.next_round(batch_size, added=5)
    return named


def test_an_image_is_named_after_two_deaths_alone_not_deaths_beside_a_killer() -> None:
    """An image that died beside a killer, then once alone by chance (a node lost), was named
    as a killer: its deaths beside the killer counted as its own."""
    search = KillerSearch(max_deaths=3)
    pair = KilledWorker((0, 1))
    assert search.observed([0, 1], [(0, pair), (1, pair)], added=5) == []
    assert search.retry == {0, 1}
    assert search.next_round(2, added=5) == 1 and search.retry == set()
    assert search.observed([0, 1], [(1, KilledWorker((1,)))], added=5) == []  # alone, once
    assert search.retry == {1} and search.next_round(1, added=5) == 1
    assert search.observed([1], [(1, KilledWorker((1,)))], added=5) == [1]  # alone, twice
    assert search.reason(1) == (
        f"{KILLED_WORKER} (2 times alone: a crash in native code, or out of memory)"
    )


@pytest.mark.parametrize("batch_size", [4, 32])
def test_a_source_of_many_killers_is_bisected_in_one_run(batch_size: int) -> None:
    """``max_worker_deaths`` counted every death, those that named killers too, and nothing
    remembers killers across runs: a source holding more killers than one run could bisect
    (8 in 1,000 images at 24) never finished, each rerun ending with the same error."""
    killers = {3, 4, 5, 97, 300, 301, 555, 700, 701, 702, 703, 998}

    def dies(_round: int, batch: tuple[int, ...]) -> bool:
        return bool(killers.intersection(batch))

    search = KillerSearch(max_deaths=2)
    assert sorted(bisect(search, 1000, dies, batch_size)) == sorted(killers)
    assert search.chance_deaths == 0


def test_chance_deaths_and_every_worker_dying_are_capped() -> None:
    """Deaths no killer explains still end the ingest past the cap, with the reason."""
    once: set[tuple[int, tuple[int, ...]]] = set()

    def dies_by_chance(round_: int, batch: tuple[int, ...]) -> bool:
        if round_ == 0 and batch[0] % 40 == 0 and (round_, batch) not in once:
            once.add((round_, batch))
            return True  # every fifth batch of 8, on its first try: a node lost
        return False

    with pytest.raises(
        IngestError, match=r"died 3 times with no image that kills them, more than .*=2"
    ):
        bisect(KillerSearch(max_deaths=2), 120, dies_by_chance, 8)
    search = KillerSearch(max_deaths=3)
    with pytest.raises(IngestError, match=r"died 4 times in a row, more than .*=3.* 5 images"):
        bisect(search, 1000, lambda _round, _batch: True, 32)  # a node out of memory
    assert search.bisection == 0 and not search.named
    once.clear()
    assert bisect(KillerSearch(max_deaths=3), 120, dies_by_chance, 8) == []


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


def test_a_damaged_killers_note_is_forgotten_and_concurrent_updates_all_land(
    tmp_path: Path,
) -> None:
    import json

    from snapshop.catalog.catalog import create_catalog
    from snapshop.ingest_ray import KILLERS_NOTE, remembered_killers

    catalog = create_catalog(tmp_path / "cat", model_id="toy@1", model_ref="toy", dim=4)
    try:
        catalog.update_note(KILLERS_NOTE, lambda _text: "{not json")
        assert remembered_killers(catalog) == {}
        catalog.update_note(KILLERS_NOTE, lambda _text: "{}")

        def add(n: int) -> None:
            def update(text: str | None) -> str:
                return json.dumps({**json.loads(text or "{}"), f"{n:064x}": f"/shop/{n}.jpg"})

            catalog.update_note(KILLERS_NOTE, update)

        threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert remembered_killers(catalog) == {f"{n:064x}": f"/shop/{n}.jpg" for n in range(8)}
        assert catalog.generation == 0  # a note is not content: no refresh follows it
    finally:
        catalog.close()


def test_killers_in_most_batches_stop_at_the_cap_with_the_advice_that_names_them() -> None:
    # One image in 20 a killer: every first batch of 32 dies, as on a node out of memory; the
    # error blamed a node only. Eighth round: it says how to go on, and the raised cap works.
    killers = set(range(7, 2000, 20))

    def dies(_round: int, batch: tuple[int, ...]) -> bool:
        return bool(killers.intersection(batch))

    with pytest.raises(IngestError, match=r"in a row.*raise --ray-max-worker-deaths"):
        bisect(KillerSearch(max_deaths=24), 2000, dies, 32)
    assert sorted(bisect(KillerSearch(max_deaths=100), 2000, dies, 32)) == sorted(killers)
