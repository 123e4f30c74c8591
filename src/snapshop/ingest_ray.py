"""Indexing on Ray Data (issue #14): the ingest's mapper runs in an actor pool, its writer here.

The records of a source become a Ray dataset of plain rows (product, path, category; the bytes
only for in-memory records). Actors read each image where they run, decode, detect and embed
it with ONNX sessions loaded once per actor, through the same functions as the in-process
ingest (:func:`snapshop.ingest.decode`, :func:`snapshop.ingest.embed_batch`): same vectors.
Results stream back to this process (the driver), which stores the blobs and commits them
through :meth:`Ingestor.commit` in transactional batches, idempotent by (product, sha256).

Images of products the catalog already holds are hashed here and the known ones never sent
out; so a rerun after the driver or a worker was killed sends only what no committed batch
holds. An image that kills its worker (a crash in native code, the OOM killer) is found by
bisecting its batch on replacement actors (:class:`KillerSearch`), named as failed and not
retried. The one module that imports ``ray``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from snapshop.catalog.blobs import write_blob
from snapshop.catalog.catalog import Catalog
from snapshop.catalog.fields import is_sha256
from snapshop.config import check_int, check_number
from snapshop.data.sources import CatalogRecord
from snapshop.detect.base import Detector
from snapshop.detect.factory import create_detector
from snapshop.errors import CatalogError, ConfigError, IngestError, ModelError
from snapshop.ingest import (
    Decoded,
    Embedded,
    Ingestor,
    IngestReport,
    PrepareJob,
    decode,
    embed_batch,
    read_record,
)
from snapshop.models.embedder import Embedder
from snapshop.models.runtime import usable_cores

log = logging.getLogger(__name__)

LOCAL = "local"  # start a Ray instance in this process, shut down when the ingest ends
AUTO = "auto"  # $RAY_ADDRESS, or the cluster this machine is part of
INSTALL_HINT = "pip install 'snapshop[ray]'"
KILLED_WORKER = "killed the Ray worker that indexed it"  # the start of a killer's reason
LOAD_DEATHS = 3  # workers that died loading model and detector, in a row: the next will too
KILLERS_NOTE = "ray_killers"  # catalog note: {sha256: source} of images that killed workers
MAX_REMEMBERED = 10_000  # killers remembered, the oldest forgotten first
REMEMBERED = "in an earlier run (remembered by its sha256; --ray-retry-killers tries it again)"
CONNECT_SECONDS = 10.0  # a Ray head's HOST:PORT that does not answer in this time is an error


@dataclass(frozen=True)
class RayConfig:
    """Where and how the mapper runs.

    ``address``: ``local``, ``auto`` or ``ray://HEAD:10001``. ``cpus`` and
    ``object_store_mb`` size a ``local`` instance (None: the usable cores). ``actors``:
    actors in the pool (None: the cluster's CPUs / ``cpus_per_actor``). Each actor runs
    ``cpus_per_actor`` one-image ONNX Runtime calls side by side on one thread each (the
    cheapest per image on CPU, issue #16); with ``gpus_per_actor`` > 0 its embedder runs
    on ONNX Runtime's CUDA provider (onnxruntime-gpu on the workers) in batches.

    ``max_worker_deaths``: how many workers may die of something else than an image that
    kills them (:class:`KillerSearch`: deaths of batches that later indexed, and deaths in
    a row of batches holding images new to dying); past it the ingest fails, keeping what
    it committed. Deaths that find a killer are not capped (each costs an actor restart; one
    such image in a batch of 32 costs 7). A killer is remembered by its sha256 in the
    catalog (:func:`remembered_killers`) and reported as failed by later runs without being
    sent out again, unless ``retry_killers``.
    """

    address: str = LOCAL
    cpus: int | None = None
    object_store_mb: int = 256
    actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    max_worker_deaths: int = 24
    retry_killers: bool = False

    def __post_init__(self) -> None:
        # frozen: the checked values replace the given ones (a numpy int becomes an int)
        object.__setattr__(
            self, "cpus_per_actor", check_int("cpus_per_actor", self.cpus_per_actor, 1)
        )
        object.__setattr__(
            self, "gpus_per_actor", check_number("gpus_per_actor", self.gpus_per_actor, 0.0)
        )
        if self.actors is not None:
            object.__setattr__(self, "actors", check_int("actors", self.actors, 1))
        object.__setattr__(
            self, "max_worker_deaths", check_int("max_worker_deaths", self.max_worker_deaths, 0)
        )
        if not isinstance(self.retry_killers, bool):
            raise ConfigError(f"retry_killers must be True or False, not {self.retry_killers!r}")


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(f"indexing on Ray needs the ray package: {INSTALL_HINT}") from None
    # Ray Data logs a few INFO lines per dataset, and a warning that we turned its progress
    # bars off (the ingest reports its own progress): neither is news to the user.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return ray


def actor_options(config: RayConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """The actor pool on a cluster with ``cluster`` resources (``ray.cluster_resources()``):
    its size (``actors``) and each actor's ``num_cpus`` / ``num_gpus`` (``map_batches``).

    Raises ConfigError when one actor asks for more than the whole cluster has: Ray Data
    would wait for ever for a node that fits (GPUs asked of a machine without any)."""
    asked = {"CPU": float(config.cpus_per_actor), "GPU": config.gpus_per_actor}
    short = [f"{n:g} {name}" for name, n in asked.items() if n > cluster.get(name, 0.0)]
    if short:
        has = ", ".join(f"{cluster.get(name, 0.0):g} {name}" for name in asked)
        raise ConfigError(
            f"each Ray actor asks for {' and '.join(short)}, more than the Ray cluster has"
            f" ({has}); ask for less (--ray-gpus 0 embeds on CPUs)"
        )
    actors = config.actors
    if actors is None:
        actors = int(cluster.get("CPU", 1) // config.cpus_per_actor)
        if config.gpus_per_actor:
            actors = min(actors, int(cluster.get("GPU", 0) // config.gpus_per_actor))
        actors = max(1, actors)
    options: dict[str, Any] = {"actors": actors, "num_cpus": config.cpus_per_actor}
    if config.gpus_per_actor:
        options["num_gpus"] = config.gpus_per_actor
    return options


@dataclass(frozen=True)
class KilledWorker:
    """The outcome of each row of a batch whose earlier try killed its worker: the batch is
    not tried again as it is (Ray Data would retry it on a replacement actor for ever)."""

    batch: tuple[int, ...]  # the row ids of that batch


class BatchLedger:
    """One small actor per ingest: the batches an :class:`IndexActor` began and did not end.

    Ray Data hands the batch of an actor that died to its replacement; that actor finds the
    batch begun here and answers :class:`KilledWorker` for it instead of dying on it again."""

    def __init__(self) -> None:
        self.begun: set[tuple[int, tuple[int, ...]]] = set()
        self.loads_begun = self.loads_ended = 0
        self.loads_forgiven = 0  # unfinished when a load last ended: not deaths in a row

    def begin_load(self) -> int:
        """Count an actor that starts loading; returns how many began since a load last
        ended and have not ended (still loading, or died loading: Ray restarts such an actor
        without end)."""
        unfinished = max(0, self.loads_begun - self.loads_ended - self.loads_forgiven)
        self.loads_begun += 1
        return unfinished

    def end_load(self) -> None:
        """A load ended: loading works, so the deaths before it (a node short of memory for a
        while) say nothing of the next load, and no longer count towards LOAD_DEATHS."""
        self.loads_ended += 1
        self.loads_forgiven = self.loads_begun - self.loads_ended

    def begin(self, key: tuple[int, tuple[int, ...]]) -> bool:
        """Whether this is the first try of batch ``key`` (False: a try began and died)."""
        if key in self.begun:
            return False
        self.begun.add(key)
        return True

    def end(self, key: tuple[int, tuple[int, ...]]) -> None:
        self.begun.discard(key)


class IndexActor:
    """One actor of the pool: its embedder (and detector) load once, here; each call maps a
    batch of rows to (row id, pickled outcome): an :class:`Embedded` with the image bytes,
    (source, reason) for an image that cannot be indexed, or :class:`KilledWorker` when an
    earlier try of the batch killed its actor. ``bisection``: the ingest's round of retries
    (0: the first), which with the row ids names a batch in ``ledger``, a :class:`BatchLedger`.

    ``packed``: the arguments of :meth:`_load` (model, detector, the job), pickled, so that
    they are unpickled here, after the ledger counted the load: a worker that dies unpickling
    a detector, or loading a model, is restarted by Ray for ever, and the ingest waited with
    it. Past :data:`LOAD_DEATHS` such deaths since a load last succeeded (beyond the ``pool``
    actors that may be loading at once) the next actor refuses to start, which ends the ingest
    with that reason."""

    def __init__(self, packed: bytes, ledger: Any, bisection: int, pool: int) -> None:
        import ray

        self.ray = ray
        self.ledger = ledger
        self.bisection = bisection
        unfinished = ray.get(ledger.begin_load.remote())
        if unfinished - (pool - 1) >= LOAD_DEATHS:
            raise IngestError(
                f"at least {LOAD_DEATHS} Ray workers died while loading the model and detector"
                " (a crash in native code, or out of memory): check the model directory and"
                " the workers' memory"
            )
        self._load(**ray.cloudpickle.loads(packed))
        ray.get(ledger.end_load.remote())

    def _load(
        self,
        model_dir: str,
        model_id: str,
        detector: str | Detector | None,
        crop_mode: str,
        job: PrepareJob,
        cpus: int,
        gpus: float,
    ) -> None:
        on_gpu = bool(gpus) and _cuda_available()
        self.embedder = Embedder(model_dir, threads=1, parallel=0 if on_gpu else cpus)
        if self.embedder.model_id != model_id:
            raise ModelError(
                f"{model_dir} on this Ray worker holds model {self.embedder.model_id}, the"
                f" catalog's is {model_id}: every node needs the same model directory"
            )
        if on_gpu:  # batched calls (parallel=0) on ONNX Runtime's CUDA provider
            self.embedder.session = _cuda_session(self.embedder)
        self.detector = create_detector(detector) if isinstance(detector, str) else detector
        self.crop_mode = crop_mode
        self.job = job

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [int(i) for i in rows["id"]]
        key = (self.bisection, tuple(ids))
        if self.ray.get(self.ledger.begin.remote(key)):
            outcomes = self._map(ids, rows)
            self.ray.get(self.ledger.end.remote(key))
        else:
            outcomes = dict.fromkeys(ids, KilledWorker(tuple(ids)))
        return {
            "id": np.asarray(ids, np.int64),
            "outcome": np.asarray([pickle.dumps(outcomes[i]) for i in ids], dtype=object),
        }

    def _map(self, ids: list[int], rows: dict[str, np.ndarray]) -> dict[int, Any]:
        outcomes: dict[int, Any] = {}
        decoded: list[tuple[int, Decoded]] = []
        for n, i in enumerate(ids):
            record = _record_of(rows, n)
            data = read_record(self.job, record)
            if isinstance(data, tuple):
                outcomes[i] = data
                continue
            out = decode(self.job, record, data, _sha256(data))
            if isinstance(out, Decoded):
                decoded.append((i, out))
            else:
                outcomes[i] = out
        batch = [d for _, d in decoded]
        embedded = embed_batch(self.embedder, self.detector, self.crop_mode, batch)
        for (i, _), e in zip(decoded, embedded, strict=True):
            # the writer stores the bytes (a directory catalog) or only the thumbnail (a server)
            outcomes[i] = replace(e, data=None) if self.job.thumbnails else e
        return outcomes


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_of(rows: dict[str, np.ndarray], n: int) -> CatalogRecord:
    """The worker's view of one record: what decoding and detection look at."""
    category = rows["category"][n]
    data = rows["data"][n]
    return CatalogRecord(
        str(rows["sku"][n]), Path(str(rows["path"][n])),
        {"category": str(category)} if category else {},
        data=bytes(data) if data is not None and len(data) else None,
        packshot=bool(rows["packshot"][n]),
    )  # fmt: skip


def _cuda_available() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return True
    log.warning("this Ray worker's onnxruntime has no CUDA provider: embedding on its CPU")
    return False


def _cuda_session(embedder: Embedder) -> Any:
    import onnxruntime as ort

    from snapshop.models.card import MODEL_FILE

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(embedder.model_dir / MODEL_FILE), providers=providers)


def ray_rows(
    ingestor: Ingestor,
    records: Sequence[CatalogRecord],
    report: IngestReport,
    killers: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The rows to send out: every record but those whose image the catalog already holds
    (hashed here, only for products that have images; those are counted in ``report``) and
    those whose image is one of ``killers`` ({sha256: source}, hashed here only where a
    killer came from the same source; reported as failed)."""
    job = ingestor.prepare_job()
    rows: list[dict[str, Any]] = []
    known: list[CatalogRecord] = []
    shas_of: dict[str, set[str]] = {}
    killer_sources = set((killers or {}).values())
    for i, record in enumerate(records):
        if record.sku not in shas_of:
            product = ingestor.catalog.find_product(record.sku)
            images = ingestor.catalog.images_of(product.id) if product is not None else []
            shas_of[record.sku] = {im.sha256 for im in images}
        if shas_of[record.sku] or str(record.path) in killer_sources:
            data = read_record(job, record)  # a failure here is the worker's to report
            sha256 = _sha256(data) if isinstance(data, bytes) else None
            if sha256 is not None and sha256 in shas_of[record.sku]:
                known.append(record)
                continue
            if sha256 is not None and killers and sha256 in killers:
                report.failed.append((str(record.path), f"{KILLED_WORKER} {REMEMBERED}"))
                continue
        rows.append({
            "id": i, "sku": record.sku, "path": str(record.path),
            "category": record.metadata.get("category") or "", "packshot": record.packshot,
            "data": record.data if record.data is not None else b"",
        })  # fmt: skip
    ingestor.update_known(known, report)
    return rows


def ingest_on_ray(
    ingestor: Ingestor,
    records: Iterable[CatalogRecord],
    config: RayConfig,
    *,
    model_dir: str | None = None,
    detector: str | Detector | None = None,
    progress: Callable[[int], None] | None = None,
    sync: bool = False,
) -> IngestReport:
    """Ingest ``records`` into ``ingestor.catalog`` with the mapper on Ray.

    ``detector``: a spec (``"segmenter"``) each actor creates, or a picklable instance
    (None: none). ``model_dir``: where actors load the model (default: the ingestor's
    embedder's directory, which must exist on every node). A Ray already connected in this
    process is used as it is; otherwise ``config.address`` is connected to (or started) and
    shut down again at the end.
    """
    records = list(records)
    ray = import_ray()
    embedder = ingestor.embedder
    actor_args = {
        "model_dir": model_dir or str(embedder.model_dir), "model_id": embedder.model_id,
        "detector": detector, "crop_mode": ingestor.catalog.crop_mode,
        "job": ingestor.prepare_job(), "cpus": config.cpus_per_actor,
        "gpus": config.gpus_per_actor,
    }  # fmt: skip

    def runner(
        records: Iterable[CatalogRecord], report: IngestReport
    ) -> Iterator[tuple[list[Embedded], int]]:
        source = list(records)
        killers = {} if config.retry_killers else remembered_killers(ingestor.catalog)
        rows = ray_rows(ingestor, source, report, killers)
        if len(rows) < len(source):
            yield [], len(source) - len(rows)  # progress for the known ones
        if not rows:
            return  # nothing to send: no Ray started
        watchdog = connection.enter_context(ray_connection(config))
        options = actor_options(config, ray.cluster_resources())
        actors = options.pop("actors")
        # Batches no larger than every actor's share, so a small source still uses them all.
        batch_size = max(1, min(ingestor.batch_size, math.ceil(len(rows) / actors)))
        ledger = ray.remote(BatchLedger).options(num_cpus=0).remote()
        packed = ray.cloudpickle.dumps(actor_args)
        search = KillerSearch(config.max_worker_deaths)
        try:
            while rows:  # again, in batches half as large, the rows whose batch killed a worker
                mapped = _mapped(
                    ray, rows, batch_size, actors, options,
                    {"packed": packed, "ledger": ledger, "bisection": search.bisection},
                )  # fmt: skip
                writes = mapped.iter_batches(batch_size=ingestor.batch_size, batch_format="numpy")
                for batch in writes:
                    if watchdog is not None:
                        watchdog.watch_descendants()  # the actors, started by now
                    fresh, killed = _received(ingestor, source, batch, report)
                    yield fresh, len(batch["id"]) - len(killed)
                    named = search.observed(batch["id"].tolist(), killed, report.added)
                    for i in named:
                        report.failed.append((str(source[i].path), search.reason(i)))
                    remember_killers(ingestor, [source[i] for i in named])
                    if named:
                        yield [], len(named)
                rows = [row for row in rows if row["id"] in search.retry]
                batch_size = search.next_round(batch_size, report.added)
        except ray.exceptions.RayError as exc:
            raise IngestError(
                f"the Ray job failed ({_root_cause(exc)}); the {report.added} images added so"
                " far are kept: run the ingest again to continue"
            ) from exc
        finally:  # early, for a Ray that outlives the ingest; it would end with this driver
            with suppress(Exception):  # a lost connection must not hide the ingest's error
                ray.kill(ledger)

    with ExitStack() as connection:  # Ray ends with the ingest, however it ends
        return ingestor.ingest_batches(records, runner, progress, sync)


def _root_cause(exc: BaseException) -> str:
    """The last ``SomeError: message`` line of a Ray error's text (the worker's traceback
    comes inside it, coloured), else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    if errors:
        return re.sub(r"^(\w+\.)+", "", errors[-1])  # snapshop.errors.ModelError -> ModelError
    return lines[0] if lines else type(exc).__name__


def remembered_killers(catalog: Catalog) -> dict[str, str]:
    """{sha256: source} of the images that killed Ray workers in earlier ingests into
    ``catalog`` (a note in its store: every host's runs share it); a damaged note is
    forgotten, with a warning."""
    found = _killers_in(catalog.read_note(KILLERS_NOTE))
    if found is None:
        log.warning("%s: the note of images that killed Ray workers is damaged; forgotten",
                    catalog.location)  # fmt: skip
    return found or {}


def _killers_in(text: str | None) -> dict[str, str] | None:
    """The killers a note's text holds; None for a damaged one."""
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return None
    if not isinstance(found, dict):
        return None
    return {sha: str(source) for sha, source in found.items() if is_sha256(sha)}


def remember_killers(ingestor: Ingestor, records: Sequence[CatalogRecord]) -> None:
    """Add the images of ``records`` (named as killers now) to the catalog's note, the
    oldest dropped past :data:`MAX_REMEMBERED`. Best effort: a record that cannot be read
    again, or a note that cannot be written (another writer past ``write_wait_s``, a full
    disk), is left out with a warning, and its next run finds it by bisection again."""
    job = ingestor.prepare_job()
    found = {}
    for record in records:
        data = read_record(job, record)
        if isinstance(data, bytes):
            found[_sha256(data)] = str(record.path)
    if not found:
        return

    def update(text: str | None) -> str:
        # named again: moved to the end, so that the ones dropped first are the oldest named
        kept = {sha: source for sha, source in (_killers_in(text) or {}).items()
                if sha not in found}  # fmt: skip
        merged = {**kept, **found}
        return json.dumps(dict(list(merged.items())[-MAX_REMEMBERED:]))

    try:
        ingestor.catalog.update_note(KILLERS_NOTE, update)
    except (CatalogError, OSError) as exc:
        log.warning("the images that killed Ray workers are not remembered (%s)", exc)


def _mapped(
    ray: Any, rows: list[dict[str, Any]], batch_size: int, actors: int,
    options: dict[str, Any], actor_args: dict[str, Any],
) -> Any:  # fmt: skip
    """``rows`` mapped by a pool of :class:`IndexActor` (a lazy Ray dataset)."""
    blocks = math.ceil(len(rows) / batch_size)
    pool = min(actors, blocks)
    # Ray Data replaces an actor that died and hands its batch to the replacement, as often
    # as it dies: the ledger, not a Ray retry limit, keeps that from repeating.
    mapped = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        IndexActor, fn_constructor_kwargs={**actor_args, "pool": pool}, batch_size=batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool),
        **options,
    )  # fmt: skip
    # In source order, as in-process: of two rows with the same bytes the first one wins
    # (its category decides the crops), whatever actor finishes first. (Rows retried after
    # their batch killed a worker come after the others.)
    mapped.context.execution_options.preserve_order = True
    mapped.context.enable_progress_bars = False
    return mapped


class KillerSearch:
    """Finds the images that kill their Ray worker by bisection: the rows of a batch that
    killed its worker are mapped again, in batches half as large, on replacement actors, until
    an image that killed its worker alone twice is named (one death alone may be chance, a
    node lost; deaths beside a killer are not counted as its own) and not tried again.

    Deaths that led to a killer cost nothing: a run names as many killers as its source
    holds. ``max_deaths`` caps the others, which something else caused (a node short of
    memory, an operator's kill): dead batches whose rows all indexed later (chance deaths),
    and dead batches in a row, with no image indexed between them, each holding an image that
    had not died before (every worker dying, not a bisection narrowing on its suspects)."""

    def __init__(self, max_deaths: int) -> None:
        self.max_deaths = max_deaths
        self.bisection = 0  # the round of retries under way (0: the first mapping)
        self.dead_batches: set[tuple[int, tuple[int, ...]]] = set()
        self.alone_deaths: Counter[int] = Counter()  # row id -> deaths in a batch of its own
        self.named: set[int] = set()  # rows named as killers
        self.suspects: set[int] = set()  # rows that died at least once
        self.retry: set[int] = set()  # rows to map again in the next round
        self.deaths_in_a_row = 0  # dead batches since a row last came back alive
        self.chance_deaths = 0  # dead batches whose rows all came back alive later

    def observed(
        self, ids: Sequence[int], killed: list[tuple[int, KilledWorker]], added: int
    ) -> list[int]:
        """Count the outcomes of rows ``ids`` (in the order they came back), ``killed`` those
        whose batch killed its worker; returns the rows named as killers now.

        Raises IngestError past ``max_deaths`` dead batches in a row that held a row new to
        dying (``added``: images committed so far)."""
        dead = dict(killed)
        named = []
        for i in ids:
            outcome = dead.get(i)
            if outcome is None:
                self.deaths_in_a_row = 0
                continue
            batch = (self.bisection, outcome.batch)
            if batch not in self.dead_batches:
                self.dead_batches.add(batch)
                if not self.suspects.issuperset(outcome.batch):
                    self.deaths_in_a_row += 1
                self.suspects.update(outcome.batch)
                log.warning(
                    "a Ray worker died on a batch of %d images: mapping them again, in batches"
                    " of half its size, to find the one that kills it",
                    len(outcome.batch),
                )
            if len(outcome.batch) == 1:
                self.alone_deaths[i] += 1
            if self.alone_deaths[i] >= 2:
                self.named.add(i)
                named.append(i)
            else:
                self.retry.add(i)
        if self.deaths_in_a_row > self.max_deaths:
            self._stop(
                f"{self.deaths_in_a_row} times in a row",
                "every batch kills its worker: a node short of memory, or images that kill"
                " it in most batches (many corrupt files? raise --ray-max-worker-deaths; each"
                " named one is remembered)",
                added,
            )
        return named

    def reason(self, i: int) -> str:
        return (
            f"{KILLED_WORKER} ({self.alone_deaths[i]} times alone: a crash in native code, or"
            " out of memory)"
        )

    def next_round(self, batch_size: int, added: int) -> int:
        """End a round: count its dead batches that no named killer explains and whose rows
        are not tried again (chance deaths; raises IngestError past ``max_deaths``), then
        start the next round of retries; returns its batch size."""
        for batch in [b for b in self.dead_batches if not self.retry.intersection(b[1])]:
            self.dead_batches.discard(batch)  # settled: counted once
            if not self.named.intersection(batch[1]):
                self.chance_deaths += 1
        if self.chance_deaths > self.max_deaths:
            self._stop(
                f"{self.chance_deaths} times with no image that kills them",
                "something else than an image kills them (a node short of memory?)",
                added,
            )
        self.bisection += 1
        self.retry.clear()
        return max(1, (batch_size + 1) // 2)

    def _stop(self, deaths: str, why: str, added: int) -> NoReturn:
        raise IngestError(
            f"the Ray workers died {deaths}, more than max_worker_deaths={self.max_deaths}:"
            f" {why}; the {added} images added so far are kept: run the ingest again to"
            " continue"
        )


def _received(
    ingestor: Ingestor, source: Sequence[CatalogRecord], batch: dict[str, np.ndarray],
    report: IngestReport,
) -> tuple[list[Embedded], list[tuple[int, KilledWorker]]]:  # fmt: skip
    """The actors' outcomes of one batch: those ready to commit (blobs stored for a directory,
    thumbnails carried for a server, records the driver's own, with all their metadata), and
    the rows whose batch killed its worker."""
    fresh = []
    killed = []
    for i, payload in zip(batch["id"], batch["outcome"], strict=True):
        outcome = pickle.loads(payload)
        record = source[int(i)]
        if isinstance(outcome, KilledWorker):
            killed.append((int(i), outcome))
        elif isinstance(outcome, Embedded):
            blob = None  # a server catalog stores the thumbnail the actor made
            if not ingestor.catalog.is_server:
                assert outcome.data is not None  # actors send the bytes for the blob
                blob = write_blob(ingestor.catalog.blob_dir, outcome.sha256, outcome.data)
            fresh.append(replace(outcome, record=record, blob=blob))
        else:
            report.failed.append(outcome)
    return fresh, killed


# --- the Ray instance: connect, or start a local one that ends with this process -------------
@contextmanager
def ray_connection(config: RayConfig) -> Iterator[_Watchdog | None]:
    """Connected to Ray for the block: a Ray this process already holds is used as it is;
    ``local`` starts one (its processes end with this one, even after ``kill -9``)."""
    ray = import_ray()
    if ray.is_initialized():
        yield None
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    watchdog = None
    if config.address == LOCAL:
        watchdog = _Watchdog.start()
        with watchdog.watching() if watchdog is not None else nullcontext():
            ray.init(
                address="local", num_cpus=config.cpus or usable_cores(),
                include_dashboard=False, object_store_memory=config.object_store_mb << 20,
                **quiet,
            )  # fmt: skip
    else:
        address = os.environ.get("RAY_ADDRESS") if config.address == AUTO else config.address
        if address:
            _check_reachable(address)
        elif (found := _last_cluster_address()) is not None:
            _check_reachable(
                found,
                f" (the last cluster Ray started here, found by {AUTO!r};"
                " start Ray again, or name a cluster with --ray HOST:PORT)",
            )
        try:
            ray.init(address=address or AUTO, **quiet)
        except ConnectionError as exc:
            raise ConfigError(f"cannot connect to Ray at {address or AUTO}: {exc}") from None
    try:
        if watchdog is not None:
            watchdog.watch_descendants()
        yield watchdog
    finally:
        ray.shutdown()
        if watchdog is not None:
            watchdog.disarm()


def _check_reachable(address: str, what: str = "") -> None:
    """Raises ConfigError when ``address`` is a head's ``HOST:PORT`` that does not accept a
    TCP connection: ray.init retries such an address for ≈ 14 minutes (20 tries of ≈ 40 s).
    Other forms (``ray://``: Ray gives up after 30 s) are left to Ray."""
    match = re.fullmatch(r"\[?([^/\[\]]+?)\]?:(\d+)", address)
    if match is None:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise ConfigError(f"cannot connect to Ray at {address}{what}: {exc}") from None


def _last_cluster_address() -> str | None:
    """The address ``auto`` resolves to without $RAY_ADDRESS: the last cluster started on this
    machine, which Ray remembers in a file its shutdown may leave behind (a stale address then
    hangs ``ray.init``). None when Ray finds none, or its (private) lookup has moved."""
    try:
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment(AUTO, None)
    except Exception:  # a Ray version without this lookup: ray.init decides alone
        return None
    return found if isinstance(found, str) and found != AUTO else None


# A separate process that outlives this one: on EOF of its stdin without "done" (this
# process died, even by kill -9) it kills the processes it was told about. Ray ends its
# raylet and workers itself then, but not its agents (measured, Ray 2.60: they stayed).
_WATCHDOG = r"""
import os, signal, sys
targets = set()
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    pid, start = line.split()
    targets.add((int(pid), start))
for pid, start in targets:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        if stat[stat.rindex(")") + 2:].split()[19] == start:  # not a reused pid
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
"""


class _Watchdog:
    # While ray.init runs: how often the processes it has started so far are told about.
    POLL_SECONDS = 0.1

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.told: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def start(cls) -> _Watchdog | None:
        if not Path("/proc/self/stat").exists():
            log.debug("no /proc: a local Ray may outlive a killed ingest")
            return None
        proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE, text=True,
            start_new_session=True,  # a signal to this process group spares it
        )  # fmt: skip
        return cls(proc)

    def watch_descendants(self) -> None:
        """Tell the watchdog about every process below this one it has not heard of."""
        assert self.proc.stdin is not None
        with self._lock:
            for pid, start in _descendants(os.getpid()):
                if pid not in self.told and pid != self.proc.pid:
                    self.proc.stdin.write(f"{pid} {start}\n")
                    self.told.add(pid)
            self.proc.stdin.flush()

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Tell the watchdog about new processes every :attr:`POLL_SECONDS` in the block.

        ray.init takes seconds to start the raylet and its agents; told about them only once
        it returned, the watchdog missed every one when this process died during it (the
        agents stayed a minute, until they noticed the raylet gone)."""
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(self.POLL_SECONDS):
                try:
                    self.watch_descendants()
                except (OSError, ValueError):  # the watchdog is gone: nothing more to tell
                    return

        thread = threading.Thread(target=poll, daemon=True, name="snapshop-ray-watch")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def disarm(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live process below ``root``, from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses
        children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    out: list[tuple[int, str]] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out
