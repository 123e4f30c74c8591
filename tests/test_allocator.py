"""The process's allocator policies (snapshop.allocator), measured in a fresh interpreter:
page faults per freed-and-reallocated 1.5 MiB block."""

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
        # written; 1.5 MiB: over the 1 MiB threshold, under numpy's and the kernel's huge pages
        block = np.ones(3 << 19, dtype=np.uint8)
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
    pages = 20 * (3 << 19) // 4096
    assert kept
    assert serving >= pages // 2  # each block mapped afresh: about one fault per page
    assert training < serving // 20


@pytest.mark.parametrize("word", ["0", "false", " No "])
def test_the_environment_can_keep_the_serving_policy_in_training(word: str) -> None:
    serving, training, kept = probe(SNAPSHOP_KEEP_FREED_MEMORY=word)
    assert not kept
    assert training > serving // 2


def test_an_unreadable_setting_is_refused_before_anything_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from snapshop.allocator import keep_freed_memory
    from snapshop.errors import ConfigError

    monkeypatch.setenv("SNAPSHOP_KEEP_FREED_MEMORY", "sometimes")
    with pytest.raises(ConfigError, match="SNAPSHOP_KEEP_FREED_MEMORY.*sometimes"):
        keep_freed_memory()
