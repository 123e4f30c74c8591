"""Frozen dataclass configs with a JSON round-trip."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import operator
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, SupportsIndex, TypeVar

import numpy as np

from snapshop.errors import ConfigError

T = TypeVar("T")

# Temp files of atomic writes are named TEMP_PREFIX + 8 random characters of tempfile's
# alphabet + an optional ".<kind>" + TEMP_SUFFIX, as tempfile.mkstemp named them in earlier
# versions, so garbage collection (catalog.blobs) recognises leftovers of old writes too.
TEMP_PREFIX, TEMP_SUFFIX = "tmp", ".tmp"
TEMP_NAME = re.compile(rf"{TEMP_PREFIX}[a-z0-9_]{{8}}(\.[a-z0-9]{{1,16}})?{re.escape(TEMP_SUFFIX)}")
_TEMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    return cls(**data)


def make_temp(folder: Path, kind: str = "") -> tuple[int, Path]:
    """A new temp file in ``folder`` (open descriptor, path) for a file renamed into place
    when written, named as :func:`is_temp_name` recognises (``kind``: "" or an extension
    such as ".faiss", for whoever finds it after a crash).

    Created with the mode a plain ``open()`` gives (0o666 less the umask, or the folder's
    default ACL), not mkstemp's 0o600: the temp file becomes the final file, which a service
    running as another user than the indexer must be able to read."""
    if kind and not re.fullmatch(r"\.[a-z0-9]{1,16}", kind):
        raise ValueError(f"temp file kind {kind!r}: a dot and 1-16 of [a-z0-9]")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL  # O_EXCL: never through a planted symlink
    for _ in range(100):
        random = "".join(secrets.choice(_TEMP_ALPHABET) for _ in range(8))
        path = Path(folder) / f"{TEMP_PREFIX}{random}{kind}{TEMP_SUFFIX}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temp file name")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one :func:`make_temp` makes."""
    return TEMP_NAME.fullmatch(name) is not None


@contextmanager
def atomic_file(target: Path, *, sync: bool = False) -> Iterator[IO[bytes]]:
    """Write ``target`` through a temp file beside it, renamed into place when the block
    ends: readers see the old file or the whole new one, never a torn one. ``sync``: the
    bytes reach the disk before the rename (a checkpoint that must survive a power cut)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a card."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path.parent, ".json")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None


def is_ascii_digits(text: str) -> bool:
    """Whether ``text`` is a non-negative integer int() reads: ASCII digits only ("²" and
    "١٢" are digits to str.isdigit, and int() fails on the first, reads the second as 12)."""
    return text.isascii() and text.isdigit()


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int if it is a whole number (a numpy integer too; not a bool, a float
    or a string) from ``low`` to ``high`` (None: no upper bound), else a ConfigError naming
    the option ``name``."""
    number = None
    if isinstance(value, SupportsIndex) and not isinstance(value, bool | np.bool_):
        number = operator.index(value)
    if number is None or number < low or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{name} must be a whole number {bounds}, not {value!r}")
    return number


def check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    """``value`` as a float if it is a finite real number (a numpy one too; not a bool or a
    string) from ``low`` to ``high``, else a ConfigError naming the option ``name``."""
    number = math.nan
    if not isinstance(value, bool) and isinstance(value, numbers.Real):
        with contextlib.suppress(OverflowError):  # an int beyond any float
            number = float(value)
    if not (math.isfinite(number) and low <= number <= high):
        bounds = f">= {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
        raise ConfigError(f"{name} must be a finite number {bounds}, not {value!r}")
    return number
