"""The API keeps the contract its OpenAPI document states (issue #19): Schemathesis, every
check, a fixed seed and a bounded number of cases, against a live `snapshop serve` on a
generated catalog with an API key (so writes, deletes and their auth are fuzzed too).

Settings beyond the command line, and why, are in tests/schemathesis.toml.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import API_KEY, live_serve, small_catalog

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = 1
MAX_EXAMPLES = 10  # per operation and phase: ~560 requests, ~15 s on the 2-core dev machine


def test_the_api_keeps_its_openapi_contract(tmp_path: Path) -> None:
    pytest.importorskip("schemathesis", reason="needs the dev extra (pip install -e '.[dev]')")
    catalog = small_catalog(tmp_path / "shop")
    with live_serve(catalog, tmp_path / "serve.log") as url:
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
            "run", f"{url}/openapi.json", "--seed", str(SEED),
            "--max-examples", str(MAX_EXAMPLES), "--header", f"X-API-Key: {API_KEY}",
            "--generation-database", "none", "--workers", "1", "--no-color",
            "--request-timeout", "30",
        ]  # fmt: skip
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts, report[-2000:]
    generated, passed = map(int, counts.groups())
    assert 100 < generated == passed < 1000, report[-2000:]  # it ran, and stayed bounded
    server_log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in server_log, server_log[-4000:]
