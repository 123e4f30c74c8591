"""NormSoftmax loss, P x K sampler, and tiny end-to-end training runs on generated images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from snapshop.data.manifest import ManifestRow
from snapshop.errors import ConfigError
from snapshop.train.losses import NormSoftmaxLoss, normsoftmax_loss
from snapshop.train.samplers import PKSampler


def test_normsoftmax_loss_matches_hand_computation() -> None:
    emb = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    proxies = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    labels = torch.tensor([0, 2])
    t = 0.5
    c = 1 / math.sqrt(2)  # cosine between an axis and the diagonal proxy
    # row 0 = (1, 0): cosines (1, 0, c); row 1 = (0, 1): cosines (0, 1, c)
    loss0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0) + math.exp(c / t)))
    loss1 = -math.log(math.exp(c / t) / (math.exp(0) + math.exp(1 / t) + math.exp(c / t)))
    got = normsoftmax_loss(emb, labels, proxies, temperature=t)
    assert got.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)


def test_normsoftmax_module_is_scale_invariant_and_checks_shapes() -> None:
    loss = NormSoftmaxLoss(dim=4, n_classes=3)
    emb, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    assert loss(emb, labels).item() == pytest.approx(loss(emb * 7, labels).item(), rel=1e-5)
    with pytest.raises(ConfigError):
        loss(torch.randn(5, 3), labels)
    with pytest.raises(ConfigError):
        NormSoftmaxLoss(dim=4, n_classes=3, temperature=0)


def test_pk_sampler_batches() -> None:
    labels = np.array([0] * 10 + [1] * 1 + [2] * 4 + [3] * 7 + [4] * 2)
    sampler = PKSampler(labels, p=3, k=4, batches=20, seed=5)
    batches = list(sampler)
    assert len(batches) == 20
    for idx in batches:
        assert idx.shape == (12,)
        assert idx.min() >= 0 and idx.max() < len(labels)
        per_class = labels[idx].reshape(3, 4)
        assert (per_class == per_class[:, :1]).all()  # K samples of one class per block
        assert len(set(per_class[:, 0])) == 3  # P distinct classes
    again = list(PKSampler(labels, p=3, k=4, batches=20, seed=5))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    assert {int(c) for idx in batches for c in labels[idx]} == {0, 1, 2, 3, 4}
    with pytest.raises(ConfigError):
        PKSampler(labels, p=0, k=4, batches=1)


# --- tiny training runs ---------------------------------------------------------------------
N_PRODUCTS, PER_PRODUCT = 6, 4


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory: pytest.TempPathFactory) -> list[ManifestRow]:
    from snapshop.demo import demo_products, render

    root = tmp_path_factory.mktemp("train-data")
    rows = []
    for n, product in enumerate(demo_products(N_PRODUCTS + 2, seed=1)):
        split = "train" if n < N_PRODUCTS else "test"
        for j in range(PER_PRODUCT):
            path = root / f"{product.sku}-{j}.jpg"
            render(product, 1000 + n * 10 + j, size=128).save(path)
            role = "query" if j == 0 else "gallery"
            rows.append(ManifestRow(path, product.sku, role, {"split": split}))
    return rows


def _config(**kw: object):
    from snapshop.train.trainer import TrainConfig

    base = dict(
        backbone="efficientnet_lite0",
        dim=32,
        epochs=4,
        lr=0.05,
        classes_per_batch=4,
        samples_per_class=2,
        views=2,
        input_size=96,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.slow
def test_training_reduces_loss_resumes_and_exports(tmp_path: Path, demo_rows) -> None:
    from snapshop.models.embedder import Embedder
    from snapshop.train.trainer import train

    train_rows = [r for r in demo_rows if r.extra["split"] == "train"]
    test_rows = [r for r in demo_rows if r.extra["split"] == "test"]
    out = tmp_path / "model"
    first = train(train_rows, out, _config(epochs=3), export=False)
    assert [h["epoch"] for h in first.history] == [0, 1, 2]
    assert (out / "checkpoint.pt").exists()
    resumed = train(
        train_rows,
        out,
        _config(epochs=6),
        eval_rows=test_rows,
        gallery_where={"split": "test"},
        resume=True,
    )
    losses = [h["loss"] for h in resumed.history]
    assert [h["epoch"] for h in resumed.history] == list(range(6))
    assert losses[:3] == [h["loss"] for h in first.history]  # the resumed run kept its history
    assert losses[-1] < 0.7 * losses[0], losses
    assert "photo_to_all" in resumed.history[-1]

    embedder = Embedder(out)
    assert embedder.dim == 32 and embedder.card.kind == "normsoftmax"
    assert embedder.card.training["classes"] == sorted({r.sku for r in train_rows})
    assert embedder.card.training["temperature"] == 0.05
    assert "photo_to_all" in embedder.card.metrics["held_out"]
    from PIL import Image

    vecs = embedder.embed_images([Image.open(r.path).convert("RGB") for r in train_rows[:3]])
    assert vecs.shape == (3, 32)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_training_last_block_without_cache_and_guards(tmp_path: Path, demo_rows) -> None:
    from snapshop.train.trainer import train

    train_rows = [r for r in demo_rows if r.extra["split"] == "train"]
    result = train(
        train_rows, tmp_path / "m", _config(epochs=2, train_blocks=1, cache=False), export=False
    )
    assert len(result.history) == 2 and result.history[0]["warmup"]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    with pytest.raises(ConfigError, match="held-out"):
        train(train_rows, tmp_path / "x", _config(), eval_rows=train_rows[:2], export=False)
    with pytest.raises(ConfigError):
        _config(train_blocks=-1, cache=True)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            train(train_rows, tmp_path / "g", _config(device="cuda", train_blocks=-1, cache=False))
    with pytest.raises(ConfigError, match="not resuming"):
        train(
            train_rows,
            tmp_path / "m",
            _config(epochs=3, dim=16, train_blocks=1, cache=False),
            resume=True,
            export=False,
        )


@pytest.mark.slow
def test_end_to_end_training_is_the_same_with_decoding_workers(tmp_path: Path, demo_rows) -> None:
    """The GPU path (whole backbone, images augmented per step) on the CPU: a corrupt image is
    skipped up front, and each view's augmentation seed travels with its index, so decoding in
    worker processes changes nothing."""
    from snapshop.train.trainer import train

    train_rows = [r for r in demo_rows if r.extra["split"] == "train"]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [*train_rows, ManifestRow(corrupt, train_rows[0].sku, "gallery", {})]
    settings = dict(epochs=2, train_blocks=-1, cache=False, input_size=64, lr=0.01)
    in_process = train(rows, tmp_path / "a", _config(**settings), export=False)
    with_workers = train(rows, tmp_path / "b", _config(**settings, workers=2), export=False)
    assert [h["loss"] for h in in_process.history] == pytest.approx(
        [h["loss"] for h in with_workers.history], rel=1e-5
    )
    assert all(math.isfinite(h["loss"]) for h in in_process.history)
    with pytest.raises(ConfigError, match="workers"):
        _config(workers=-1)


def test_backbone_learning_rate_is_scaled_down_only_for_the_whole_backbone() -> None:
    from snapshop.train.trainer import TrainConfig

    assert TrainConfig(train_blocks=-1, cache=False).backbone_lr == pytest.approx(0.001)
    assert TrainConfig(train_blocks=4).backbone_lr == pytest.approx(0.01)
    assert TrainConfig(train_blocks=-1, cache=False, backbone_lr_scale=1).backbone_lr == 0.01
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        TrainConfig(backbone_lr_scale=0)


def test_repeat_matching_lists_rare_rows_more_often_in_place() -> None:
    from snapshop.data.manifest import repeat_matching
    from snapshop.errors import ManifestError

    rows = [
        ManifestRow(Path(f"{p}-{i}.jpg"), p, "gallery", {"domain": d})
        for p in ("a", "b")
        for i, d in enumerate(("natural", "iconic", "natural"))
    ]
    out = repeat_matching(rows, {"domain": "iconic"}, 3)
    assert len(out) == len(rows) + 2 * 2
    assert [r.path.name for r in out[:5]] == ["a-0.jpg", "a-1.jpg", "a-1.jpg", "a-1.jpg", "a-2.jpg"]
    assert repeat_matching(rows, {}, 5) == rows
    assert repeat_matching(rows, {"domain": "iconic"}, 1) == rows
    with pytest.raises(ManifestError):
        repeat_matching(rows, {"domain": "iconic"}, 0)


# --- the loop skeleton every training loop shares ------------------------------------------
class _CountingLoop:
    """A toy EpochLoop: one weight pulled towards 3 by SGD; 'loss' is its squared distance."""

    @staticmethod
    def make(path: Path | None, epochs: int, stop_at: int | None = None):
        from snapshop.train.loop import EpochLoop, make_optimizer, seed_everything

        class Loop(EpochLoop):
            def __init__(self) -> None:
                super().__init__()
                self.epochs, self.checkpoint_path, self.trained = epochs, path, []

            def setup(self) -> None:
                seed_everything(0)
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.opt = make_optimizer(
                    "sgd", [{"params": [self.weight], "lr": 0.25}], weight_decay=0.0, momentum=0.0
                )

            def train_epoch(self, epoch: int) -> dict:
                self.trained.append(epoch)
                loss = ((self.weight - 3) ** 2).sum()
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                return {"loss": float(loss)}

            def evaluate(self, epoch: int) -> dict:
                return {"weight": float(self.weight)}

            def stop_after(self, epoch: int) -> bool:
                return stop_at is not None and epoch >= stop_at

            def checkpoint_state(self) -> dict:
                return {"weight": self.weight.detach().clone(), "opt": self.opt.state_dict()}

            def restore(self, state: dict) -> None:
                with torch.no_grad():
                    self.weight.copy_(state["weight"])
                self.opt.load_state_dict(state["opt"])

        return Loop()


def test_epoch_loop_checkpoints_resumes_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    whole = _CountingLoop.make(None, epochs=4).run()
    assert [r["epoch"] for r in whole] == [0, 1, 2, 3]
    assert [r["loss"] for r in whole] == pytest.approx([9.0, 2.25, 0.5625, 0.140625])  # x 1/4

    first = _CountingLoop.make(path, epochs=2)
    first.run()
    assert path.exists() and first.trained == [0, 1]
    again = _CountingLoop.make(path, epochs=4)
    history = again.run(resume=True)
    assert again.trained == [2, 3]  # only the epochs the checkpoint had not run
    assert history == whole  # the same run as without the interruption
    fresh = _CountingLoop.make(path, epochs=1)
    assert fresh.run(resume=False) == whole[:1]  # resume=False ignores the checkpoint

    stopped = _CountingLoop.make(None, epochs=5, stop_at=1)
    assert [r["epoch"] for r in stopped.run()] == [0, 1]


def test_loop_helpers_reject_what_they_cannot_do() -> None:
    from snapshop.train.loop import make_optimizer, resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}]
    assert isinstance(make_optimizer("adamw", params, weight_decay=0.0), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        make_optimizer("lamb", params, weight_decay=0.0)


def test_row_selection_defaults_to_the_protocol_split() -> None:
    from snapshop.data.manifest import RowSelection, select_rows
    from snapshop.train.trainer import TrainConfig

    rows = [
        ManifestRow(
            Path(f"{p}-{i}.jpg"),
            p,
            "gallery" if i else "query",
            {"split": split, "domain": "iconic" if i == 2 else "natural"},
        )
        for p, split in (("a", "train"), ("b", "train"), ("c", "test"))
        for i in range(3)
    ]
    train_rows, eval_rows, gallery = select_rows(rows, RowSelection())
    assert {r.sku for r in train_rows} == {"a", "b"} and len(train_rows) == 6
    assert {r.sku for r in eval_rows} == {"c"} and gallery is None
    train_rows, eval_rows, gallery = select_rows(
        rows,
        RowSelection(
            ("split=test",), ("split=train",), ("domain=iconic",), ("domain=iconic",), repeat=3
        ),
    )
    assert [r.path.name for r in train_rows] == ["c-0.jpg", "c-1.jpg"] + ["c-2.jpg"] * 3
    assert len(eval_rows) == 6 and gallery == {"domain": "iconic"}
    plain = [ManifestRow(r.path, r.sku, r.role, {}) for r in rows]  # no split column
    train_rows, eval_rows, _ = select_rows(plain, RowSelection())
    assert len(train_rows) == 9 and eval_rows == []
    with pytest.raises(ConfigError, match="no manifest row"):
        select_rows(rows, RowSelection(("split=nowhere",)))
    # features are cached unless the whole backbone trains (nothing is frozen then)
    assert TrainConfig().cache and not TrainConfig(train_blocks=-1).cache


def test_catalog_domain_augmentation_turns_only_packshots_into_photo_like_views() -> None:
    import random

    from PIL import Image, ImageDraw

    from snapshop.models.embedder import preprocess
    from snapshop.train.augment import AugmentConfig, augment

    packshot = Image.new("RGB", (96, 96), (255, 255, 255))
    ImageDraw.Draw(packshot).rectangle((30, 20, 66, 80), fill=(30, 120, 200))
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    photo = Image.fromarray(noise)
    still = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0}
    plain, domain = AugmentConfig(**still), AugmentConfig(**still, catalog_domain=True)
    for seed in range(5):  # a shop photo is augmented exactly as before
        np.testing.assert_array_equal(
            augment(photo, 64, random.Random(seed), plain),
            augment(photo, 64, random.Random(seed), domain),
        )
    white = preprocess(Image.new("RGB", (64, 64), (255, 255, 255)), 64)[:, 0, 0]

    def white_share(config: AugmentConfig) -> float:
        views = [augment(packshot, 64, random.Random(seed), config) for seed in range(42)]
        return float(np.mean([np.all(np.isclose(v, white[:, None, None]), axis=0) for v in views]))

    # Cut out onto clutter or grey, re-balanced: a packshot's white background is gone in
    # part of its views, and the product stays in them
    assert white_share(domain) < white_share(plain) - 0.08
    # piles: every packshot view a heap of the product over grey or clutter (no white left),
    # and more of the product's colour than one item on white shows; photos as before
    piles = AugmentConfig(**still, catalog_domain=True, catalog_piles=1.0)
    assert white_share(piles) < 0.01 < white_share(plain)

    def product_share(config: AugmentConfig) -> float:  # blue well above red: the product
        views = [augment(packshot, 64, random.Random(seed), config) for seed in range(20)]
        return float(np.mean([v[2] - v[0] > 1.0 for v in views]))

    assert product_share(piles) > product_share(plain)
    for seed in range(5):
        np.testing.assert_array_equal(
            augment(photo, 64, random.Random(seed), plain),
            augment(photo, 64, random.Random(seed), piles),
        )


def test_catalog_piles_are_checked_and_leave_older_cache_names_alone() -> None:
    from snapshop.train.augment import AugmentConfig

    with pytest.raises(ConfigError, match="needs catalog_domain"):
        AugmentConfig(catalog_piles=0.25)
    with pytest.raises(ConfigError, match="in 0..1"):
        AugmentConfig(catalog_domain=True, catalog_piles=1.5)
    # a cache written before the setting existed keys on exactly these settings
    before = {
        "scale": (0.35, 1.0), "ratio": (3 / 4, 4 / 3), "flip": 0.5, "brightness": 0.3,
        "contrast": 0.3, "saturation": 0.3, "catalog_domain": True,
    }  # fmt: skip
    assert AugmentConfig(catalog_domain=True).key_settings() == before
    assert AugmentConfig(catalog_domain=True, catalog_piles=0.25).key_settings() == {
        **before,
        "catalog_piles": 0.25,
    }
    from typer.testing import CliRunner

    from snapshop.cli import app

    argv = ["train", "--manifest", "x.csv", "--out", "o", "--catalog-piles", "0.5"]
    out = CliRunner().invoke(app, argv)
    assert out.exit_code != 0 and "needs catalog_domain" in out.output
    assert CliRunner().invoke(app, [*argv[:-1], "1.5", "--catalog-domain"]).exit_code == 2


def test_min_crop_reaches_the_crops_and_the_cache_key(demo_rows) -> None:
    """``train --min-crop``: a smaller crop area is drawn, a bad range is refused, and the
    cached views of two crop ranges never mix."""
    import random

    from PIL import Image
    from typer.testing import CliRunner

    from snapshop.cli import app
    from snapshop.train.augment import AugmentConfig, random_resized_crop
    from snapshop.train.frozen import _rows_key

    side = 250  # red encodes x, green y: a crop's colour ranges give its size
    ramp = np.arange(side, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.zeros((side, side))],
        axis=2,
    ).astype(np.uint8)
    image = Image.fromarray(pixels)

    def smallest_area(config: AugmentConfig) -> float:
        areas = []
        for seed in range(200):
            crop = np.asarray(random_resized_crop(image, 64, random.Random(seed), config), int)
            width = np.ptp(crop[..., 0]) + 1
            height = np.ptp(crop[..., 1]) + 1
            areas.append(width * height / side**2)
        return min(areas)

    assert (
        smallest_area(AugmentConfig(scale=(0.15, 1.0))) < 0.2 < 0.3 < smallest_area(AugmentConfig())
    )
    for bad in ((0.0, 1.0), (0.5, 0.4), (0.2, 1.5)):
        with pytest.raises(ConfigError, match="crop area"):
            AugmentConfig(scale=bad)
    keys = {
        _rows_key(demo_rows[:4], _config(augment=AugmentConfig(scale=(low, 1.0))), 2, "train")
        for low in (0.15, 0.35)
    }
    assert len(keys) == 2
    out = CliRunner().invoke(app, ["train", "--manifest", "x.csv", "--out", "o", "--min-crop", "0"])
    assert out.exit_code == 2 and "min-crop" in out.output


def test_gem_pooling_is_a_checked_setting_and_keys_only_pooled_caches(demo_rows) -> None:
    from snapshop.train.frozen import _rows_key

    rows = demo_rows[:4]
    with pytest.raises(ConfigError, match="pooling"):
        _config(pooling="max")
    frozen_trunk = [_rows_key(rows, _config(pooling=p), 2, "train") for p in ("avg", "gem")]
    last_blocks = [
        _rows_key(rows, _config(pooling=p, train_blocks=2), 2, "train") for p in ("avg", "gem")
    ]
    assert frozen_trunk[0] != frozen_trunk[1]  # a frozen trunk caches pooled features
    assert last_blocks[0] == last_blocks[1]  # with trainable blocks the pool is not cached


@pytest.mark.slow
def test_training_with_gem_pooling_exports_it(tmp_path: Path, demo_rows) -> None:
    from snapshop.models.embedder import Embedder
    from snapshop.train.trainer import train

    train_rows = [r for r in demo_rows if r.extra["split"] == "train"]
    out = tmp_path / "gem"
    result = train(train_rows, out, _config(epochs=2, train_blocks=1, pooling="gem"))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    embedder = Embedder(out, precision="fp32")
    assert embedder.card.training["config"]["pooling"] == "gem"
    with pytest.raises(ConfigError, match="not resuming"):
        train(train_rows, out, _config(epochs=3, train_blocks=1), resume=True, export=False)


@pytest.mark.slow
def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(
    tmp_path: Path, demo_rows
) -> None:
    from snapshop.train.trainer import train

    train_rows = [r for r in demo_rows if r.extra["split"] == "train"]
    out = tmp_path / "old"
    train(train_rows, out, _config(epochs=1), export=False)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    del state["config"]["pooling"]  # as written before pooling was a setting
    torch.save(state, out / "checkpoint.pt")
    resumed = train(train_rows, out, _config(epochs=2), resume=True, export=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1]  # epoch 0 came from the checkpoint
    with pytest.raises(ConfigError, match="not resuming"):  # not the default: refused
        train(train_rows, out, _config(epochs=3, pooling="gem"), resume=True, export=False)


def test_a_model_trained_with_an_embed_size_embeds_at_it(tmp_path: Path, demo_rows) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from snapshop.cli import app
    from snapshop.models.embedder import Embedder
    from snapshop.train.trainer import train

    train_rows = [r for r in demo_rows if r.extra["split"] == "train"]
    out = tmp_path / "model"
    train(train_rows, out, _config(epochs=1), export=False)
    # the size only changes the export: the checkpoint resumes under another one
    train(train_rows, out, _config(epochs=2, embed_size=160), resume=True)
    embedder = Embedder(out, precision="fp32", verify=True)
    # trained, and so traced, at the config's input_size (96); embeds at 160
    assert embedder.input_size == 160 and embedder.card.training["traced_at_size"] == 96
    assert embedder.card.training["config"]["embed_size"] == 160
    vecs = embedder.embed_images([Image.open(r.path).convert("RGB") for r in train_rows[:2]])
    assert vecs.shape == (2, 32) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    with pytest.raises(ConfigError, match="embed_size must be in 32..1024"):
        _config(embed_size=8)
    argv = ["train", "--manifest", "x.csv", "--out", "o", "--embed-size", "5000"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code != 0 and "embed_size must be in" in result.output
    # resize-model: the same copy from the command line, and a clear error for a bad size
    resized = tmp_path / "at192"
    result = CliRunner().invoke(
        app, ["resize-model", "-m", str(out), "--size", "192", "--out", str(resized)]
    )
    assert result.exit_code == 0, result.output
    assert Embedder(resized, verify=True).input_size == 192
    result = CliRunner().invoke(
        app, ["resize-model", "-m", str(out), "--size", "9", "--out", str(resized)]
    )
    assert result.exit_code != 0 and "size must be in 32..1024" in result.output
    assert Embedder(resized, verify=True).input_size == 192  # the refused size wrote nothing


def test_a_model_embeds_at_the_size_it_trained_at(tmp_path: Path, demo_rows) -> None:
    """Training views of input_size px: the exported model embeds at that size, not the
    backbone's (Lite0: 224)."""
    import onnx
    from PIL import Image
    from typer.testing import CliRunner

    from snapshop.cli import app
    from snapshop.models.embedder import Embedder
    from snapshop.train.trainer import train

    train_rows = [r for r in demo_rows if r.extra["split"] == "train"]
    out = tmp_path / "model"
    train(train_rows, out, _config(epochs=1, input_size=128))
    embedder = Embedder(out, precision="fp32", verify=True)
    assert embedder.input_size == 128 and embedder.card.training["config"]["input_size"] == 128
    dims = onnx.load(out / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 128, 128]
    vecs = embedder.embed_images([Image.open(r.path).convert("RGB") for r in train_rows[:2]])
    assert vecs.shape == (2, 32)
    with pytest.raises(ConfigError, match="input_size must be in 32..1024"):
        _config(input_size=16)
    result = CliRunner().invoke(
        app, ["train", "--manifest", "x.csv", "--out", str(out), "--input-size", "16"]
    )
    assert result.exit_code != 0 and "input_size must be in 32..1024" in result.output
    assert Embedder(out, verify=True).input_size == 128  # the refused run wrote nothing


def test_an_ensemble_trains_its_members_and_merges_them(tmp_path: Path, demo_rows) -> None:
    """`train --backbone A --backbone B --embed-size S`: each member trains as alone would, into
    OUT/members/, the merged model in OUT embeds with both, and the held-out score printed is
    the merged model's (checked against the members' vectors by hand)."""
    from PIL import Image
    from typer.testing import CliRunner

    from snapshop.cli import app
    from snapshop.data.manifest import write_manifest
    from snapshop.models.embedder import Embedder
    from snapshop.train.trainer import score_retrieval

    manifest = tmp_path / "split.csv"
    write_manifest(manifest, demo_rows)
    out = tmp_path / "ens"
    argv = [
        "train", "--manifest", str(manifest), "--out", str(out), "--backbone",
        "efficientnet_lite0", "--backbone", "efficientnet_lite0", "--dim", "16", "--epochs", "1",
        "-p", "4", "-k", "2", "--views", "2", "--input-size", "96", "--embed-size", "128",
        "--threads", "1",
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "trained 2 members on 6 products" in result.output
    merged = Embedder(out, precision="fp32", verify=True)
    assert (merged.dim, merged.input_size, merged.card.kind) == (32, 128, "ensemble")
    members = sorted((out / "members").iterdir())
    assert [d.name for d in members] == ["1-efficientnet_lite0", "2-efficientnet_lite0"]
    first, second = (Embedder(d, precision="fp32", verify=True) for d in members)
    # a backbone named twice trains with the next seed: two different members
    assert first.card.training["config"]["seed"] == 0
    assert second.card.training["config"]["seed"] == 1
    held_out = [r for r in demo_rows if r.extra["split"] == "test"]
    images = [Image.open(r.path).convert("RGB") for r in held_out]
    a, b = first.embed_images(images), second.embed_images(images)
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(merged.embed_images(images) - np.hstack([a, b]) / np.sqrt(2)).max() < 1e-5
    q = [i for i, r in enumerate(held_out) if r.role == "query"]
    g = [i for i, r in enumerate(held_out) if r.role == "gallery"]
    vecs = np.hstack([a, b]) / np.sqrt(2)
    recall, _ = score_retrieval(
        vecs[q], [held_out[i].sku for i in q], vecs[g], [held_out[i].sku for i in g]
    )
    scores = merged.card.metrics["held_out"]["photo_to_all"]
    assert scores["R@1"] == pytest.approx(recall[1], abs=1e-3)  # bf16 in the run, fp32 here


def test_an_ensemble_refuses_members_it_could_not_merge(tmp_path: Path, demo_rows) -> None:
    """Checked before anything trains: one member, or members that would embed at different
    sizes (Lite0 at 224, Lite1 at 240 without --embed-size), or an unknown backbone."""
    from snapshop.train.ensemble import member_configs, train_ensemble_from_manifest

    manifest = tmp_path / "never-read.csv"
    out = tmp_path / "ens"
    base = _config(input_size=None)
    with pytest.raises(ConfigError, match="at least two"):
        train_ensemble_from_manifest(manifest, out, [base])
    configs = member_configs(base, ["efficientnet_lite0", "efficientnet_lite1"])
    with pytest.raises(ConfigError, match=r"embed at \[224, 240\] px.*embed_size"):
        train_ensemble_from_manifest(manifest, out, configs)
    with pytest.raises(ConfigError, match="unknown backbone"):
        train_ensemble_from_manifest(manifest, out, member_configs(base, ["lite0", "lite1"]))
    assert not out.exists()


# --- the anchor term: each photo against every product's catalog image -----------------------
def _with_anchors(rows: list[ManifestRow]) -> list[ManifestRow]:
    """The demo rows with each product's second image marked as its catalog image."""
    marked = []
    for r in rows:
        is_catalog = r.path.stem.endswith("-1")
        marked.append(
            ManifestRow(
                r.path, r.sku, r.role, {**r.extra, "domain": "iconic" if is_catalog else "natural"}
            )
        )
    return marked


def test_anchor_settings_go_together() -> None:
    from snapshop.errors import ManifestError

    with pytest.raises(ConfigError, match="go together"):
        _config(anchor_weight=1.0)
    with pytest.raises(ConfigError, match="go together"):
        _config(anchor_where=("domain=iconic",))
    with pytest.raises(ConfigError, match="anchor_weight"):
        _config(anchor_where=("domain=iconic",), anchor_weight=-1.0)
    with pytest.raises(ManifestError, match="COLUMN=VALUE"):
        _config(anchor_where=("domain",), anchor_weight=1.0)


def test_anchor_loss_matches_a_brute_force_cross_entropy(tmp_path: Path, demo_rows) -> None:
    from snapshop.train.trainer import NormSoftmaxTrainer

    rows = _with_anchors([r for r in demo_rows if r.extra["split"] == "train"])
    # one product loses its catalog image: its photos have no anchor to find
    unanchored = rows[0].sku
    rows = [r for r in rows if not (r.sku == unanchored and r.extra["domain"] == "iconic")]
    config = _config(epochs=1, anchor_where=("domain=iconic",), anchor_weight=1.0)
    trainer = NormSoftmaxTrainer(rows, tmp_path / "m", config)
    trainer.setup()
    assert len(trainer.anchors) == N_PRODUCTS - 1
    anchored = [c for c in trainer.classes if c != unanchored]
    for positions, sku in zip(trainer.anchors, anchored, strict=True):
        assert {trainer.rows_kept[p].sku for p in positions} == {sku}
        assert all(trainer.rows_kept[p].extra["domain"] == "iconic" for p in positions)

    gen = torch.Generator().manual_seed(0)
    idx = np.arange(len(trainer.rows_kept))
    emb = torch.randn(len(idx), 32, generator=gen)
    anchor_emb = torch.randn(len(trainer.anchors), 32, generator=gen)
    t = config.temperature
    expected, n = 0.0, 0
    for i in idx:
        row = trainer.rows_kept[i]
        if row.sku == unanchored or row.extra["domain"] == "iconic":
            continue
        cos = torch.nn.functional.cosine_similarity(emb[i][None], anchor_emb) / t
        expected += float(torch.logsumexp(cos, 0) - cos[anchored.index(row.sku)])
        n += 1
    got = trainer.anchor_loss(emb, anchor_emb, idx)
    assert got.item() == pytest.approx(expected / n, rel=1e-5)
    only_anchors = idx[[r.extra["domain"] == "iconic" for r in trainer.rows_kept]]
    assert trainer.anchor_loss(emb, anchor_emb, only_anchors).item() == 0.0


def test_anchor_term_needs_two_anchored_products(tmp_path: Path, demo_rows) -> None:
    from snapshop.train.trainer import NormSoftmaxTrainer

    rows = _with_anchors([r for r in demo_rows if r.extra["split"] == "train"])
    keep = rows[0].sku
    rows = [r for r in rows if r.sku == keep or r.extra["domain"] != "iconic"]
    config = _config(epochs=1, anchor_where=("domain=iconic",), anchor_weight=1.0)
    with pytest.raises(ConfigError, match="1 training product"):
        NormSoftmaxTrainer(rows, tmp_path / "m", config).setup()


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False])
def test_training_with_the_anchor_term(tmp_path: Path, demo_rows, cache: bool) -> None:
    from snapshop.train.trainer import train

    rows = _with_anchors([r for r in demo_rows if r.extra["split"] == "train"])
    anchors = dict(anchor_where=("domain=iconic",), anchor_weight=1.0)
    blocks = dict(train_blocks=1, cache=False) if not cache else {}
    result = train(
        rows, tmp_path / "a", _config(epochs=6, lr=0.01, **anchors, **blocks), export=False
    )
    terms = [h["anchor_loss"] for h in result.history]
    assert terms[-1] < 0.7 * terms[0], terms
    plain = train(rows, tmp_path / "p", _config(epochs=6, lr=0.01, **blocks), export=False)
    assert all("anchor_loss" not in h for h in plain.history)
    assert [h["loss"] for h in plain.history] != [h["loss"] for h in result.history]
