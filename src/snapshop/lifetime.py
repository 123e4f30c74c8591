"""Processes snapshop starts end when their parent dies, even by ``kill -9``: on Linux the
kernel sends them SIGKILL when the thread that started them exits (``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _prctl() -> Callable[..., Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as exc:
        log.debug("no parent-death signal (%s)", exc)
        return None


def arm_parent_death_signal() -> bool:
    """In the calling process: SIGKILL when its parent dies. False where that is not
    available (then only a watchdog of the caller's can notice)."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    return True


def parent_death_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess``: the child gets SIGKILL when this process dies
    (None where that is not available). libc is loaded here, in the parent, so the child
    only makes the call between fork and exec. subprocess applies ``user`` before
    ``preexec_fn``, which matters: a change of user clears the signal."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm
