"""benchmarks/query_latency.py runs end to end on a tiny generated catalog (issue #16)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from script_helpers import load_script


def test_query_latency_prints_every_stage_per_variant(
    tmp_path: Path, lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    script = load_script("benchmarks/query_latency.py")
    with pytest.raises(Exception, match="NAME=MODEL,DETECTOR"):
        script.parse_variant("no-detector-part")
    argv = ["query_latency.py", "--queries", "3", "--warmup", "1", "--products", "2",
            "--variant", f"batched={lite0_model_dir},none", "--one-call", "batched",
            "--variant", f"pooled={lite0_model_dir},none",
            "--photo-after-detect", "pooled", "--workdir", str(tmp_path),
            "--floor-gflops", "100"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    out = capsys.readouterr().out
    assert "floors at 100 GFLOP/s" in out
    assert "embedding calls side by side: one batched call" in out
    for name in ("batched", "pooled"):
        for stage in script.STAGES:
            assert f"| {name} | {stage} |" in out
    # Lite0 at 224 px is 0.768 GFLOP per image, one image per query without a detector:
    # 7.68 ms of floor at 100 GFLOP/s
    embed_row = next(line for line in out.splitlines() if line.startswith("| pooled | embed |"))
    assert "| 0.768 | 7.68 |" in embed_row
