"""The skeleton every training loop shares: device, seed, optimiser, checkpoint/resume, epoch log.

A loop is a subclass of :class:`EpochLoop` that fills in the steps, read in this order::

    setup()                      model, data, optimiser (seeded: the same seed, the same run)
    resume() -> first epoch      from the checkpoint, when there is one and it is wanted
    for each epoch:
        train_epoch(epoch)       one pass over the data -> {"loss": ..., ...}
        evaluate(epoch)          held-out scores -> {...} (none by default)
        end_epoch(record)        log the record, save the checkpoint
        stop_after(epoch)        e.g. a time budget
    (the caller exports the result)

as pytorch-metric-learning's trainers do; the NormSoftmax embedder
(:mod:`snapshop.train.trainer`) and the garment segmenter (:mod:`snapshop.train.segmenter`)
are the two loops.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from snapshop.config import atomic_file
from snapshop.errors import ConfigError

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cuda[:N]`` without a GPU is a
    :class:`ConfigError` (asked for, not silently replaced)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch's generators (weight initialisation, dropout, ``randperm``). Loops draw their
    data order from their own seeded generators, so this is all a run needs to repeat."""
    torch.manual_seed(seed)


def save_durably(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a synced temp file renamed over ``path``: a crash mid-write
    leaves the previous file (or none), never a torn one."""
    with atomic_file(path, sync=True) as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint :meth:`EpochLoop.end_epoch` wrote; anything else (torn by a crash, another
    file) is a :class:`ConfigError` that names it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling a damaged file can raise almost any type
        raise _not_resumable(path, f"unreadable, {type(exc).__name__}") from exc
    if not isinstance(state, dict) or not {"epoch", "history"} <= state.keys():
        raise _not_resumable(path, "no epoch and history in it")
    return state


def _not_resumable(path: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"{path}: cannot resume from this checkpoint ({reason}); "
        "delete it, or train without --resume"
    )


def make_optimizer(
    kind: str,
    groups: list[dict[str, Any]],
    *,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``adam`` or ``adamw`` over parameter groups that each carry
    their ``lr``."""
    lr = groups[0]["lr"]
    if kind == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


class EpochLoop(ABC):
    """Runs the steps of the module docstring. ``checkpoint_path`` None: no checkpoint is
    written and ``resume`` starts at epoch 0."""

    epochs: int
    checkpoint_path: Path | None = None

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    # -- the steps a subclass writes -------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Build the model, data and optimiser."""

    @abstractmethod
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data; returns at least ``{"loss": mean loss}``."""

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Held-out scores after ``epoch`` (merged into its record)."""
        return {}

    def stop_after(self, epoch: int) -> bool:
        """Whether to stop after ``epoch`` although epochs are left."""
        return False

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the epoch and the history (state dicts...)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Load :meth:`checkpoint_state`'s output back; raise ConfigError if it does not fit."""
        raise ConfigError(f"{type(self).__name__} keeps no checkpoint to resume from")

    def describe(self, record: dict[str, Any]) -> str:
        """The epoch's log line, after ``epoch N/M:``."""
        return ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in record.items()
            if k != "epoch"
        )

    def on_epoch(self, record: dict[str, Any]) -> None:
        """Called with every epoch's record once it is logged and saved (progress display)."""
        return None

    # -- the skeleton ----------------------------------------------------------------------
    def resume(self, wanted: bool) -> int:
        """The first epoch to run: after the checkpoint's when ``wanted`` and one exists."""
        path = self.checkpoint_path
        if not wanted or path is None or not path.exists():
            return 0
        state = load_checkpoint(path)
        try:
            self.restore(state)
            history, epoch = list(state["history"]), int(state["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a foreign dict
            raise _not_resumable(path, f"{type(exc).__name__}: {exc}") from exc
        self.history = history
        log.info("resumed from %s at epoch %d", path, epoch + 1)
        return epoch + 1

    def end_epoch(self, record: dict[str, Any]) -> None:
        log.info("epoch %d/%d: %s", record["epoch"] + 1, self.epochs, self.describe(record))
        if self.checkpoint_path is not None:
            state = {"epoch": record["epoch"], "history": self.history}
            save_durably({**self.checkpoint_state(), **state}, self.checkpoint_path)
        self.on_epoch(record)

    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """setup, resume, then train / evaluate / log every epoch; returns the history."""
        self.setup()
        for epoch in range(self.resume(resume), self.epochs):
            record = {"epoch": epoch, **self.train_epoch(epoch)}
            record.update(self.evaluate(epoch))
            self.history.append(record)
            self.end_epoch(record)
            if epoch + 1 < self.epochs and self.stop_after(epoch):
                log.warning("stopping after epoch %d of %d", epoch + 1, self.epochs)
                break
        return self.history
