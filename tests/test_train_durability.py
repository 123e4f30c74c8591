"""Training's files survive a crash mid-write and never serve stale or mismatched contents:
the checkpoint, the frozen-feature cache and the cache's exported frozen part."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from snapshop.data.manifest import ManifestRow
from snapshop.errors import ConfigError
from snapshop.train.loop import EpochLoop

SIZE = 64  # the smallest input worth a backbone: every run here is about files, not accuracy


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[ManifestRow]:
    """Two products of two noise images each."""
    root = tmp_path_factory.mktemp("durability")
    rng = np.random.default_rng(0)
    out = []
    for product in range(2):
        for j in range(2):
            path = root / f"p{product}-{j}.png"
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
            out.append(ManifestRow(path, f"sku{product}", "gallery", {}))
    return out


def _config(**kw: Any):
    from snapshop.train.trainer import TrainConfig

    base: dict[str, Any] = dict(
        backbone="efficientnet_lite0",
        dim=8,
        epochs=1,
        classes_per_batch=2,
        samples_per_class=2,
        views=1,
        input_size=SIZE,
        threads=1,
        onnx_frozen=False,
    )
    return TrainConfig(**{**base, **kw})


def _top(pretrained: bool = True, train_blocks: int = 0):
    from snapshop.models.heads import create_embedding_net
    from snapshop.train.frozen import TrainableTop

    torch.manual_seed(0)
    net = create_embedding_net("efficientnet_lite0", dim=8, pretrained=pretrained)
    return TrainableTop(net, len(net.backbone.blocks) - train_blocks, train_blocks).eval()


def _torn_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save writes the first bytes of what it would write, then the process 'dies'."""
    real_save = torch.save

    def torn(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        head = buffer.getvalue()[:200]
        if isinstance(f, str | os.PathLike):
            Path(f).write_bytes(head)
        else:
            f.write(head)
        raise KeyboardInterrupt  # not an Exception: nothing on the way up may swallow it

    monkeypatch.setattr(torch, "save", torn)


# --- the checkpoint -------------------------------------------------------------------------
class _Loop(EpochLoop):
    """One weight stepped by one per epoch; its checkpoint holds the weight."""

    def __init__(self, path: Path, epochs: int) -> None:
        super().__init__()
        self.checkpoint_path, self.epochs = path, epochs

    def setup(self) -> None:
        self.weight = 0.0

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        self.weight += 1
        return {"loss": 1.0 / self.weight}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def restore(self, state: dict[str, Any]) -> None:
        self.weight = float(state["weight"])


def test_a_checkpoint_torn_by_a_crash_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    _Loop(path, epochs=2).run()
    with monkeypatch.context() as patched:
        _torn_save(patched)
        with pytest.raises(KeyboardInterrupt):
            _Loop(path, epochs=4).run(resume=True)  # dies writing epoch 3's checkpoint
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind either
    loop = _Loop(path, epochs=4)
    assert [r["epoch"] for r in loop.run(resume=True)] == [0, 1, 2, 3]
    assert loop.weight == 4


def _foreign_dict(path: Path) -> None:
    torch.save({"x": 1}, path)


def _no_state(path: Path) -> None:
    torch.save({"epoch": 0, "history": []}, path)  # a checkpoint of another loop


def _truncated(path: Path) -> None:
    _Loop(path, epochs=1).run()
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b""),
        _truncated,
        lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000)),
        _foreign_dict,
        _no_state,
    ],
    ids=["empty", "truncated", "garbage", "foreign", "other-loop"],
)
def test_an_unusable_checkpoint_is_a_config_error_naming_it(tmp_path: Path, damage) -> None:
    path = tmp_path / "checkpoint.pt"
    damage(path)
    with pytest.raises(ConfigError, match="checkpoint.pt: cannot resume.*without --resume"):
        _Loop(path, epochs=2).run(resume=True)
    assert [r["epoch"] for r in _Loop(path, epochs=1).run(resume=False)] == [0]


def test_train_resume_from_an_empty_checkpoint_says_what_to_do(tmp_path: Path, rows) -> None:
    """``snapshop train --resume`` used to print only "Aborted." here (click's EOFError)."""
    from typer.testing import CliRunner

    from snapshop.cli import app

    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,product_id,role\n" + "".join(f"{r.path},{r.sku},{r.role}\n" for r in rows)
    )
    out = tmp_path / "model"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    argv = ["train", "--manifest", str(manifest), "--out", str(out), "--resume"]
    argv += ["--backbone", "efficientnet_lite0", "--epochs", "1", "--views", "1", "--dim", "8"]
    argv += ["-p", "2", "-k", "2", "--input-size", str(SIZE), "--no-cache"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "cannot resume" in result.output and "without --resume" in result.output


# --- the frozen-feature cache ---------------------------------------------------------------
def test_a_cache_torn_by_a_crash_is_recomputed(
    tmp_path: Path, rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshop.train.frozen import compute_frozen

    top, config = _top(), _config()
    with monkeypatch.context() as patched:
        _torn_save(patched)
        with pytest.raises(KeyboardInterrupt):
            compute_frozen(top, rows, SIZE, 1, config, 0, tmp_path)
    assert os.listdir(tmp_path) == []  # the write did not reach the cache's name
    feats, kept = compute_frozen(top, rows, SIZE, 1, config, 0, tmp_path)
    assert kept == [0, 1, 2, 3] and feats.shape[:2] == (4, 1)


def test_an_unreadable_cache_is_logged_and_recomputed(
    tmp_path: Path, rows, caplog: pytest.LogCaptureFixture
) -> None:
    from snapshop.train.frozen import compute_frozen

    top, config = _top(), _config()
    feats, _ = compute_frozen(top, rows, SIZE, 1, config, 0, tmp_path)
    (cache_file,) = tmp_path.glob("train-*.pt")
    for damaged in (cache_file.read_bytes()[:300], b"", b"not a cache"):
        cache_file.write_bytes(damaged)
        caplog.clear()
        again, kept = compute_frozen(top, rows, SIZE, 1, config, 0, tmp_path)
        assert torch.equal(again, feats) and kept == [0, 1, 2, 3]
        assert "unreadable frozen-feature cache" in caplog.text
    torch.save({"features": feats[:2], "kept": [0, 1, 2, 3]}, cache_file)  # rows of another run
    assert torch.equal(compute_frozen(top, rows, SIZE, 1, config, 0, tmp_path)[0], feats)
    caplog.clear()
    compute_frozen(top, rows, SIZE, 1, config, 0, tmp_path)  # the rewritten file is whole
    assert "unreadable" not in caplog.text


def test_an_image_rewritten_in_place_is_not_served_from_the_cache(
    tmp_path: Path, rows: list[ManifestRow]
) -> None:
    from snapshop.train.frozen import _rows_key, compute_frozen

    folder = tmp_path / "images"
    folder.mkdir()
    mine = []
    for r in rows:
        (folder / r.path.name).write_bytes(r.path.read_bytes())
        mine.append(ManifestRow(folder / r.path.name, r.sku, r.role, {}))
    top, config = _top(), _config()
    before, _ = compute_frozen(top, mine, SIZE, 1, config, 0, tmp_path / "cache")
    key = _rows_key(mine, config, 1, "train")

    target = mine[0].path
    stamp = target.stat().st_mtime_ns
    Image.new("RGB", (48, 48), (200, 30, 30)).save(target)  # other pixels, the same path
    os.utime(target, ns=(stamp + 10**9, stamp + 10**9))  # a coarse clock may not have moved
    after, _ = compute_frozen(top, mine, SIZE, 1, config, 0, tmp_path / "cache")
    fresh, _ = compute_frozen(top, mine, SIZE, 1, config, 0, None)
    assert torch.equal(after, fresh) and not torch.equal(after[0], before[0])
    assert torch.equal(after[1:], before[1:])

    os.utime(target, ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))  # touched, same size: a new key
    assert len({key, _rows_key(mine, config, 1, "train")}) == 2
    missing = [ManifestRow(folder / "gone.png", "sku0", "gallery", {}), *mine[1:]]
    assert _rows_key(missing, config, 1, "train")  # a missing image keys too (it is skipped)


# --- the cache's exported frozen part -------------------------------------------------------
def test_the_exported_frozen_part_is_kept_per_input_size_and_weights(tmp_path: Path, rows) -> None:
    """``--cache-dir X`` then ``--cache-dir X --input-size 256`` used to reuse the first run's
    ONNX graph (fixed at its input size) and fail in ONNX Runtime; other weights reused it too."""
    from snapshop.train.frozen import compute_frozen

    blocks = 15  # all but the first block train: the smallest frozen part, the quickest export
    pretrained, scratch = _top(True, blocks), _top(False, blocks)
    for size in (SIZE, SIZE + 32):
        config = _config(onnx_frozen=True, input_size=size, train_blocks=blocks)
        feats, kept = compute_frozen(pretrained, rows, size, 1, config, 0, tmp_path)
        assert kept == [0, 1, 2, 3] and feats.shape[:2] == (4, 1)
    config = _config(onnx_frozen=True, pretrained=False, train_blocks=blocks)
    random_weights, _ = compute_frozen(scratch, rows, SIZE, 1, config, 0, tmp_path)
    config = _config(pretrained=False, train_blocks=blocks)
    expected, _ = compute_frozen(scratch, rows, SIZE, 1, config, 0, None)
    assert torch.allclose(random_weights.float(), expected.float(), atol=0.05)
    assert len(list(tmp_path.glob("*.onnx"))) == 3
