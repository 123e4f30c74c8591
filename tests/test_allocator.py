"""The process's allocator policies (snapshop.allocator), measured in a fresh interpreter:
page faults per freed-and-reallocated 3 MiB block."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the policies set glibc's allocator",
)

PROBE = """
import resource
import numpy as np
import snapshop.images  # the serving policy: blocks of 1 MiB or more are mapped and returned
from snapshop.allocator import keep_freed_memory

def faults(rounds=20):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = np.ones(3 << 20, dtype=np.uint8)  # written; under numpy's huge-page size
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

serving = faults()
kept = keep_freed_memory()
faults()  # the heap grows to hold one block, once
print(serving, faults(), kept)
"""


def probe(**env: str) -> tuple[int, int, bool]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, **env},
    ).stdout.split()
    return int(out[0]), int(out[1]), out[2] == "True"


def test_training_policy_reuses_freed_blocks_instead_of_faulting_them_in_again() -> None:
    serving, training, kept = probe(SNAPSHOP_KEEP_FREED_MEMORY="1")
    pages = 20 * (3 << 20) // 4096
    assert kept
    assert serving >= pages // 2  # each block mapped afresh: about one fault per page
    assert training < serving // 20


def test_the_environment_can_keep_the_serving_policy_in_training() -> None:
    serving, training, kept = probe(SNAPSHOP_KEEP_FREED_MEMORY="0")
    assert not kept
    assert training > serving // 2
