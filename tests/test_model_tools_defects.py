"""Defects found in the model tools (merge-models, resize-model, quantize of merged models) and
in the embedder's run-time options, each pinned by a test that failed before its fix."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from snapshop.errors import ConfigError, ModelError
from snapshop.models import export
from snapshop.models.card import MODEL_FILE, read_card, sha256_file, write_card
from snapshop.models.embedder import PARALLEL_ENV, Embedder
from snapshop.models.ensemble import merge_models
from snapshop.models.heads import EmbeddingNet, create_embedding_net


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny embedders at 128 px: two Lite0 heads on one trunk and a Lite1 (another trunk)."""
    root = tmp_path_factory.mktemp("members")
    dirs = {}
    for key, backbone, seed in (("a", "efficientnet_lite0", 0), ("b", "efficientnet_lite0", 1),
                                ("lite1", "efficientnet_lite1", 2)):  # fmt: skip
        torch.manual_seed(seed)
        net = create_embedding_net(backbone, dim=16, pretrained=True).eval()
        dirs[key] = root / key
        export.save_model(net, dirs[key], name=key, source_weights_sha256="0" * 64,
                          kind="normsoftmax", input_size=128)  # fmt: skip
    return dirs


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (96, 120, 3), dtype=np.uint8)) for _ in range(n)]


def test_merging_one_model_twice_says_so(
    members: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[A, A] makes a model twice as slow whose ranking is A's (test_search.py relies on
    that); the merge says so."""
    copy = tmp_path / "copy"
    shutil.copytree(members["a"], copy)
    merge_models([members["a"], copy], tmp_path / "out")
    assert "are the same model" in caplog.text


def test_merging_refuses_a_member_whose_graph_is_not_the_size_its_card_says(
    members: dict[str, Path], tmp_path: Path
) -> None:
    """Cards saying 160 px on graphs traced at 128: each member alone is refused by the
    Embedder, and the merge took them, embedding at 160 what was made for 128."""
    liars = []
    for key in ("a", "b"):
        liar = tmp_path / key
        shutil.copytree(members[key], liar)
        write_card(liar, dataclasses.replace(read_card(liar), input_size=160))
        liars.append(liar)
    with pytest.raises(ModelError, match="shape"):
        Embedder(liars[0])
    with pytest.raises(ModelError, match=r"input shape \[0, 3, 128, 128\] does not match"):
        merge_models(liars, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class _Unnormalised(torch.nn.Module):
    """An embedding net without its final L2 normalisation (vectors of length ~5)."""

    def __init__(self, net: EmbeddingNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.net.pool(self.net.backbone.forward_features(x))
        assert self.net.head is not None
        return 5 * self.net.head(pooled)


def test_merging_refuses_a_member_whose_vectors_are_not_unit_length(
    members: dict[str, Path], tmp_path: Path
) -> None:
    """A card that says l2_normalised over a graph that is not: the member's part outweighed
    the other's ~10 to 1 in the merged vector, silently."""
    torch.manual_seed(3)
    net = create_embedding_net("efficientnet_lite0", dim=16, pretrained=True).eval()
    raw = tmp_path / "raw"
    export.export_onnx(_Unnormalised(net), raw / MODEL_FILE, 128)  # type: ignore[arg-type]
    card = dataclasses.replace(read_card(members["b"]), name="raw",
                               onnx_sha256=sha256_file(raw / MODEL_FILE))  # fmt: skip
    write_card(raw, card)
    with pytest.raises(ModelError, match="member 2 returns vectors of length"):
        merge_models([members["a"], raw], tmp_path / "out")
    assert not (tmp_path / "out" / MODEL_FILE).exists()


@pytest.mark.parametrize("size", [np.int64(160), 160.0, 159.5, "160", True])
def test_resizing_in_place_with_an_odd_size_leaves_the_model_whole(
    members: dict[str, Path], tmp_path: Path, size: Any
) -> None:
    """np.int64(160) passed the range check, the new graph replaced model.onnx, and then the
    card refused the size: the model was left with a graph its card no longer describes."""
    model = tmp_path / "m"
    shutil.copytree(members["a"], model)
    before = (model / MODEL_FILE).read_bytes()
    if isinstance(size, np.integer):
        card = export.resize_model(model, size, model)  # a numpy integer is a whole number
        assert card.input_size == 160 and type(card.input_size) is int
        assert Embedder(model, precision="fp32").input_size == 160
        return
    with pytest.raises(ModelError, match="size must be in"):
        export.resize_model(model, size, model)
    assert (model / MODEL_FILE).read_bytes() == before
    assert Embedder(model, precision="fp32").input_size == 128


@pytest.mark.parametrize(
    ("option", "value"),
    [("threads", -1), ("threads", 1.5), ("threads", True), ("parallel", 2.5),
     ("parallel", True), ("parallel", -1), ("batch_size", 0), ("batch_size", -1)],
)  # fmt: skip
def test_the_embedder_names_an_odd_option(
    members: dict[str, Path], option: str, value: object
) -> None:
    """threads=-1 was reported as 'cannot load ONNX model' (OpenVINO's refusal), batch_size=0
    failed only when embedding (range() arg 3 must not be zero), parallel=2.5 was kept."""
    kwargs: dict[str, Any] = {"parallel": 0} if option == "batch_size" else {}
    with pytest.raises(ConfigError, match=option):
        Embedder(members["a"], **{**kwargs, option: value})


def test_a_negative_parallel_from_the_environment_names_the_variable(
    members: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PARALLEL_ENV, "-1")
    with pytest.raises(ConfigError, match=PARALLEL_ENV):
        Embedder(members["a"])


def _float_convs(model_dir: Path) -> set[str]:
    """Convolutions of a quantised graph whose weights are not dequantised int8."""
    import onnx

    graph = onnx.load(str(model_dir / MODEL_FILE)).graph
    producers = {name: node for node in graph.node for name in node.output}
    return {
        node.name
        for node in graph.node
        if node.op_type == "Conv"
        and getattr(producers.get(node.input[1]), "op_type", None) != "DequantizeLinear"
    }


def test_quantizing_a_merged_model_keeps_every_members_ends_float(
    members: dict[str, Path], tmp_path: Path
) -> None:
    """keep_ends_float kept the first and the last Conv in node order: one member's stem and
    the other's head; the other stem and head were quantised."""
    from snapshop.models.quantize import QuantizeConfig, quantize_model

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i, image in enumerate(_images()):
        image.save(calibration / f"{i}.png")
    merge_models([members["a"], members["lite1"]], tmp_path / "ens")
    quantize_model(tmp_path / "ens", calibration, tmp_path / "int8", QuantizeConfig(batch_size=4))
    assert _float_convs(tmp_path / "int8") == {
        f"m{i}//_conv_{end}/Conv" for i in (0, 1) for end in ("stem", "head")
    }


def test_quantizing_calibrates_with_the_cards_normalisation(
    members: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Embedder feeds (x - mean) / std as the card says; calibration fed the default
    (x - 127) / 128 whatever the card said, so the activation ranges were another input's."""
    from snapshop.models import quantize

    model = tmp_path / "m"
    shutil.copytree(members["a"], model)
    unit_scale = {"mean": 0.0, "std": 255.0}
    write_card(model, dataclasses.replace(read_card(model), normalisation=unit_scale))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i, image in enumerate(_images(2)):
        image.save(calibration / f"{i}.png")
    seen: list[np.ndarray] = []

    def capture(source: Path, target: Path, batches: Any, *args: Any, **kwargs: Any) -> None:
        seen.extend(batches)
        shutil.copy(source, target)

    monkeypatch.setattr(quantize, "quantize_onnx", capture)
    quantize.quantize_model(model, calibration, tmp_path / "int8")
    fed = np.concatenate(seen)
    assert fed.min() >= 0.0 and fed.max() <= 1.0 and fed.max() > 0.5


def test_model_tools_never_replace_a_model_in_out_without_overwrite(
    members: dict[str, Path], tmp_path: Path
) -> None:
    """merge-models, resize-model and quantize wrote over a model already in --out (a mistyped
    --out replaced a trained model); now refused, the model untouched, unless --overwrite."""
    from typer.testing import CliRunner

    from snapshop.cli import app
    from snapshop.models.quantize import QuantizeConfig, quantize_model

    trained = tmp_path / "trained"
    shutil.copytree(members["b"], trained)
    before = sha256_file(trained / MODEL_FILE), read_card(trained)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    _images(1)[0].save(calibration / "0.png")
    attempts = {
        "merge": lambda **kw: merge_models([members["a"], members["lite1"]], trained, **kw),
        "resize": lambda **kw: export.resize_model(members["a"], 160, trained, **kw),
        "quantize": lambda **kw: quantize_model(
            members["a"], calibration, trained, QuantizeConfig(batch_size=1), **kw
        ),
    }
    for write in attempts.values():
        with pytest.raises(ModelError, match="already holds a model.*--overwrite"):
            write()
        assert (sha256_file(trained / MODEL_FILE), read_card(trained)) == before
    argv = ["merge-models", str(members["a"]), str(members["lite1"]), "--out", str(trained)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1 and "already holds a model" in result.output
    assert sha256_file(trained / MODEL_FILE) == before[0]
    result = CliRunner().invoke(app, [*argv, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert read_card(trained).kind == "ensemble"
    # rewriting the source itself stays what resize-model is for; quantize in place is not
    card = export.resize_model(trained, 160, trained)
    assert card.input_size == 160
    with pytest.raises(ModelError, match="the model to quantize"):
        quantize_model(trained, calibration, trained, overwrite=True)


def test_a_merged_model_as_a_member_counts_as_its_members(
    members: dict[str, Path], tmp_path: Path
) -> None:
    """merge(merge(a, lite1), b) gave b half the weight (the pair's vector counted as one
    member); it now ranks as merge(a, lite1, b): the mean of the three cosines."""
    pair = tmp_path / "pair"
    merge_models([members["a"], members["lite1"]], pair)
    nested = merge_models([pair, members["b"]], tmp_path / "nested")
    flat = merge_models([members["a"], members["lite1"], members["b"]], tmp_path / "flat")
    assert [m["name"] for m in nested.training["members"]] == ["a", "lite1", "b"]
    assert nested.output_dim == flat.output_dim == 48
    images = _images(3)
    by_nested = Embedder(tmp_path / "nested", precision="fp32").embed_images(images)
    by_flat = Embedder(tmp_path / "flat", precision="fp32").embed_images(images)
    assert np.allclose(by_nested, by_flat, atol=1e-5)
    assert np.allclose(np.linalg.norm(by_nested, axis=1), 1.0, atol=1e-5)
    alone = [
        Embedder(members[k], precision="fp32").embed_images(images) for k in ("a", "lite1", "b")
    ]
    mean_cosine = np.mean([v @ v[::-1].T for v in alone], axis=0)
    assert np.allclose(by_nested @ by_nested[::-1].T, mean_cosine, atol=1e-4)
