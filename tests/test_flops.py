"""Compute floors (issue #16): FLOPs counted from ONNX graphs match the arithmetic by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshop.errors import ModelError
from snapshop.models.flops import graph_flops, sgemm_gflops

torch = pytest.importorskip("torch")


def tiny_net() -> torch.nn.Module:
    """3x3 conv (3 -> 8), depthwise 3x3 (8), 1x1 conv (8 -> 4), linear (4*16*16 -> 10), the
    same weights every time (an unseeded net made the int8 tolerance test depend on test order)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.Conv2d(8, 4, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 16 * 16, 10),
    )


def export_tiny(path: Path) -> Path:
    from snapshop.models.export import export_module_onnx

    export_module_onnx(tiny_net(), (torch.zeros(1, 3, 16, 16),), path, input_names=["x"],
                       output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})  # fmt: skip
    return path


def test_flops_of_a_small_graph_by_hand(tmp_path: Path) -> None:
    model = export_tiny(tmp_path / "tiny.onnx")
    pixels = 16 * 16
    conv = 2 * pixels * 8 * (3 * 3 * 3)
    depthwise = 2 * pixels * 8 * (1 * 3 * 3)
    pointwise = 2 * pixels * 4 * 8
    linear = 2 * 10 * (4 * pixels)
    for batch in (1, 3):
        found = graph_flops(model, {"x": (batch, 3, 16, 16)})
        assert found.total == batch * (conv + depthwise + pointwise + linear)
        assert found.depthwise == batch * depthwise
        assert found.by_op["Conv"] == batch * (conv + depthwise + pointwise)
    # the same from the file's bytes
    assert graph_flops(model.read_bytes(), {"x": (2, 3, 16, 16)}).total == found.total * 2 / 3


def test_flops_input_errors(tmp_path: Path) -> None:
    model = export_tiny(tmp_path / "tiny.onnx")
    with pytest.raises(ModelError, match="no graph input"):
        graph_flops(model, {"images": (1, 3, 16, 16)})
    with pytest.raises(ModelError, match="rank"):
        graph_flops(model, {"x": (1, 3, 16)})
    with pytest.raises(ModelError, match="cannot read"):
        graph_flops(b"not onnx", {"x": (1, 3, 16, 16)})


def test_sgemm_speed_is_measured() -> None:
    assert sgemm_gflops(n=64, repeats=2) > 0.01
