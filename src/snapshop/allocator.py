"""Where this process's freed memory goes: two policies for glibc's allocator.

Serving and indexing decode photos of any size on several threads. There, every block of
1 MiB or more gets a memory map of its own, so a freed bitmap goes back to the system at once
(:func:`return_large_blocks`, set when :mod:`snapshop.images` is imported;
docs/benchmarks/reliability.md).

Training is the opposite case: the same large tensors are allocated and freed at every step.
With a memory map per tensor, the kernel hands out and zeroes fresh pages for each one: 230,000
page faults a second and a third of the CPU time of a 2-core machine, which made an epoch take
1.9 times as long (docs/benchmarks/retrieval.md, "Training without page faults").
:func:`keep_freed_memory` turns memory maps off for the rest of the process, so freed blocks
are reused. The process then holds its peak memory, which a training run reaches in its
first steps anyway. ``SNAPSHOP_KEEP_FREED_MEMORY=0`` (or false, no) keeps the serving policy in
training too.

Both are no-ops where the C library is not glibc (or another allocator is preloaded: it
ignores glibc's settings).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# mallopt parameters, from <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest top of the heap left untrimmed
KEEP_FREED_MEMORY_ENV = "SNAPSHOP_KEEP_FREED_MEMORY"


def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return None


def return_large_blocks(threshold: int) -> bool:
    """Give every block of ``threshold`` bytes or more a memory map of its own, returned to the
    system when it is freed. glibc would otherwise raise its threshold (up to 32 MiB) once a
    large block is freed, and keep later ones in per-thread heaps. Returns whether it was set."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused: freed blocks may stay resident")
        return False
    return True


def keep_freed_memory() -> bool:
    """Serve every block from the heap and never give the heap back, so that freed blocks are
    reused instead of mapped and zeroed again (for training), unless
    ``SNAPSHOP_KEEP_FREED_MEMORY`` is 0 / false / no (1 / true / yes / unset: on; any other
    value is a ConfigError). Returns whether it was set."""
    from snapshop.data.sources import FALSE_WORDS, TRUE_WORDS
    from snapshop.errors import ConfigError

    word = os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip().lower()
    if word and word not in TRUE_WORDS and word not in FALSE_WORDS:
        raise ConfigError(
            f"${KEEP_FREED_MEMORY_ENV} must be one of 1, true, yes, 0, false, no; got {word!r}"
        )
    if word and word in FALSE_WORDS:  # unset or empty: on
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1:
        log.debug("mallopt refused: freed memory may still be returned and faulted in again")
        return False
    log.debug("freed memory is kept for reuse (no memory maps, no trimming)")
    return True
