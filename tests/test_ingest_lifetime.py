"""Issue #19 defect 4: `kill -9` of `snapshop index` must take its decode workers (and
multiprocessing's resource tracker) with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from catalog_helpers import make_images

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def session_members(session_id: int) -> set[int]:
    """Pids of every live (not zombie) process in session ``session_id``: a child started
    with ``start_new_session`` and all its descendants, re-parented or not."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == session_id:
            members.add(int(entry.name))
    return members


def test_kill_9_of_index_ends_its_decode_workers(tmp_path: Path, lite0_model_dir: Path) -> None:
    make_images(tmp_path / "shop", n_products=10, per_product=12, size=64)
    snapshop = [sys.executable, "-c", "from snapshop.cli import app; app()"]
    proc = subprocess.Popen(
        [
            *snapshop,
            "index",
            str(tmp_path / "shop"),
            "--catalog",
            str(tmp_path / "cat"),
            "--model",
            str(lite0_model_dir),
            "--workers",
            "2",
            "--batch-size",
            "4",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        # The ingest, its two decode workers and the resource tracker.
        while len(session_members(proc.pid)) < 4:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the decode workers never started"
            time.sleep(0.01)
        descendants = session_members(proc.pid) - {proc.pid}
        proc.send_signal(signal.SIGKILL)  # the parent alone, as an operator's kill -9 does
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (alive := session_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"still running after their parent died: {sorted(alive)}"
        assert descendants  # the kill landed while the workers were there
    finally:
        for pid in session_members(proc.pid):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
