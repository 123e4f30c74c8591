"""Runtime embedder: preprocessing + ONNX Runtime, batched, L2-normalised float32 output."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.config import check_int
from snapshop.errors import ConfigError, ModelError
from snapshop.models.card import (
    MODEL_FILE,
    NORMALISATION,
    ModelCard,
    normalise_pixels,
    read_card,
    sha256_file,
)
from snapshop.models.runtime import (
    SessionPool,
    check_precision,
    cpu_session,
    default_precision,
    usable_cores,
)

log = logging.getLogger(__name__)

# preprocess resizes the whole image when that is at most this many output squares (every
# ordinary photo: the exact pixels as always); beyond, it resamples the centre square only.
MAX_RESIZED_SQUARES = 16
PARALLEL_ENV = "SNAPSHOP_EMBED_PARALLEL"  # Embedder(parallel=None) reads it when set


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process
_VERIFIED_LOCK = threading.Lock()


def _file_sha256(path: Path) -> str:
    """``sha256_file``, once per process for a file that has not changed since."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _VERIFIED_LOCK:
        known = _VERIFIED.get(key)
    if known is None:
        known = sha256_file(path)
        with _VERIFIED_LOCK:
            _VERIFIED[key] = known
    return known


def preprocess(
    image: Image.Image, size: int, normalisation: Mapping[str, float] = NORMALISATION
) -> NDArray[np.float32]:
    """RGB image -> (3, size, size) float32: shorter side resized to ``size``, centre crop,
    then normalised as the model card says ((x - 127) / 128 for EfficientNet-Lite)."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if nw * nh <= MAX_RESIZED_SQUARES * size * size:
        resized = image.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        crop = resized.crop((left, top, left + size, top + size))
    else:
        # A very long, thin image (3 x 50,000 px) would be resized to size x millions of
        # pixels (gigabytes) only to keep its centre: resample just the centre's source region.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        crop = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    arr = normalise_pixels(np.asarray(crop), normalisation)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class Embedder:
    """Embeds PIL images with an exported model directory (model.onnx + model.json).

    ``parallel`` (issue #16): images run one per ONNX Runtime call, this many calls at a time
    on a small thread pool, each call on one thread (``threads`` per call when given). On
    these CPUs a call costs the least CPU time per image at batch 1 (Lite2: 28 ms at batch 1,
    36 at 3, 43-47 at 8-32; docs/benchmarks/service.md, "Speed per core"): the activations
    of one image stay in cache. None: ``$SNAPSHOP_EMBED_PARALLEL`` when set, else one call
    per core (``cores // threads``); 0: each ``batch_size`` chunk in one call on ``threads``
    threads (ONNX Runtime's default when None), the behaviour before issue #16.

    ``precision``: ``bf16`` or ``fp32`` (:mod:`snapshop.models.runtime`; None:
    ``$SNAPSHOP_PRECISION``, else ``bf16``). A statically quantised model runs in its int8
    on ONNX Runtime's CPU provider whatever is asked. ``.precision`` says what runs.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        batch_size: int = 32,
        threads: int | None = None,
        verify: bool = True,
        parallel: int | None = None,
        precision: str | None = None,
    ) -> None:
        # an odd option must be named as such, not met as ONNX Runtime's failure to load the
        # model (threads=-1) or as an error in the middle of embedding (batch_size=0)
        batch_size = check_int("batch_size", batch_size, 1)
        threads = None if threads is None else check_int("threads", threads, 0)
        parallel = None if parallel is None else check_int("parallel", parallel, 0)
        self.model_dir = Path(model_dir)
        self.card: ModelCard = read_card(self.model_dir)
        onnx_path = self.model_dir / MODEL_FILE
        if not onnx_path.exists():
            raise ModelError(f"{self.model_dir}: {MODEL_FILE} is missing")
        if verify and _file_sha256(onnx_path) != self.card.onnx_sha256:
            raise ModelError(
                f"{onnx_path}: sha256 differs from the model card (the file was replaced or"
                " damaged: export the model again, or restore the file the card describes)"
            )
        if parallel is None and os.environ.get(PARALLEL_ENV, "").strip():
            try:
                parallel = int(os.environ[PARALLEL_ENV])
            except ValueError:
                raise ConfigError(f"{PARALLEL_ENV} must be an integer") from None
            if parallel < 0:
                raise ConfigError(f"{PARALLEL_ENV} must be >= 0, got {parallel}")
        if parallel is None:
            parallel = max(1, usable_cores() // (threads or 1))
        self.parallel = parallel
        precision = check_precision(precision) if precision else default_precision()
        if "int8" in self.card.kind:
            precision = "fp32"  # a quantised graph runs on ONNX Runtime's own int8 kernels
        make = functools.partial(
            cpu_session, onnx_path, (threads or 1) if parallel else threads, precision
        )
        try:
            self.sessions = SessionPool(make, size=parallel)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{onnx_path}: cannot load ONNX model ({exc})") from None
        self.session = self.sessions.first
        self.precision = self.sessions.precision
        self.input_name = self.session.get_inputs()[0].name
        self._check_shapes(onnx_path)
        self.batch_size = batch_size
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _check_shapes(self, onnx_path: Path) -> None:
        """The graph's fixed input and output sizes must be the card's: a card that says
        another dim would put vectors of the wrong length into a catalog."""
        size, dim = self.card.input_size, self.card.output_dim
        wanted_in, wanted_out = [None, 3, size, size], [None, dim]
        got_in = list(self.session.get_inputs()[0].shape)
        got_out = list(self.session.get_outputs()[0].shape)
        for got, wanted, what in ((got_in, wanted_in, "input"), (got_out, wanted_out, "output")):
            fixed = [(g, w) for g, w in zip(got, wanted, strict=False) if isinstance(g, int)]
            if len(got) != len(wanted) or any(w is not None and g != w for g, w in fixed):
                raise ModelError(
                    f"{onnx_path}: the graph's {what} shape {got} does not match the model"
                    f" card (input_size {size}, output_dim {dim})"
                )

    @property
    def dim(self) -> int:
        return self.card.output_dim

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def model_id(self) -> str:
        return self.card.model_id

    def embed_arrays(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """(N, 3, S, S) preprocessed -> (N, D) float32, L2-normalised."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.parallel:
            rows = [np.ascontiguousarray(batch[i : i + 1], np.float32) for i in range(len(batch))]
            if self.parallel == 1 or len(rows) == 1:
                outs = [self._run(row) for row in rows]
            else:
                outs = list(self._workers().map(self._run, rows))
        else:
            outs = [
                self._run(np.ascontiguousarray(batch[start : start + self.batch_size], np.float32))
                for start in range(0, len(batch), self.batch_size)
            ]
        return _normalised(outs)

    def _run(self, chunk: NDArray[np.float32]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = self.sessions.run({self.input_name: chunk})[0]
        return out

    def open_sessions(self) -> None:
        """Every session calls at once may borrow, made now (:meth:`SessionPool.open_all`)."""
        self.sessions.open_all()

    def _workers(self) -> ThreadPoolExecutor:
        """The threads that run calls side by side (made on first use; ONNX Runtime sessions
        may run concurrently). Shared by every caller, so concurrent requests queue here
        instead of oversubscribing the cores."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="snapshop-embed")
            return self._pool

    def embed_images(self, images: Sequence[Image.Image]) -> NDArray[np.float32]:
        """PIL RGB images -> (N, D) float32, L2-normalised."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        if self.parallel > 1 and len(images) > 1:
            # each image resized on the pool too: a street photo and two crops take ≈ 7 ms of
            # resizing, which then runs beside the other calls instead of before them
            return _normalised(list(self._workers().map(self._embed_one, images)))
        batch = np.stack(
            [preprocess(im, self.input_size, self.card.normalisation) for im in images]
        )
        return self.embed_arrays(batch)

    def submit(self, image: Image.Image) -> Future[NDArray[np.float32]]:
        """Start embedding one image on the pool and return at once: ``.result()`` is its
        (1, D) L2-normalised vector. A query starts its photo this way before detecting, since
        only the crops need the boxes (issue #16). With ``parallel=0`` it runs here and now."""
        if not self.parallel:
            done: Future[NDArray[np.float32]] = Future()
            try:
                done.set_result(self.embed_images([image]))
            except Exception as exc:  # handed to the caller by .result(), as the pool would
                done.set_exception(exc)
            return done
        return self._workers().submit(lambda: _normalised([self._embed_one(image)]))

    def _embed_one(self, image: Image.Image) -> NDArray[np.float32]:
        return self._run(preprocess(image, self.input_size, self.card.normalisation)[None])


def _normalised(outs: list[NDArray[np.float32]]) -> NDArray[np.float32]:
    """Concatenated session outputs, L2-normalised row by row."""
    emb = np.concatenate(outs).astype(np.float32, copy=False)
    # The graph normalises already; renormalising guards against fp drift in quantised models.
    return unit_rows(emb)


def unit_rows(x: NDArray[Any]) -> NDArray[Any]:
    """Rows of ``x`` scaled to length 1; a zero row (opposite images of one product can cancel
    out: such a mean has no direction to keep) stays zero. The one L2 normalisation of
    vectors: the embedder's outputs, product vectors, averaged views."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def load_embedder(model: str | os.PathLike[str] | None = None, **kwargs: object) -> Embedder:
    """Embedder for a model directory or a backbone name (exported to the cache on first use)."""
    from snapshop.models.export import resolve_model_dir

    return Embedder(resolve_model_dir(model), **kwargs)  # type: ignore[arg-type]
