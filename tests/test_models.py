"""EfficientNet-Lite0 export: torch/ONNX agreement, model card, export cache, broken model dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snapshop.demo import demo_products, render
from snapshop.errors import ConfigError, ModelError
from snapshop.models import export
from snapshop.models.card import CARD_FILE, MODEL_FILE, read_card, sha256_file
from snapshop.models.efficientnet_lite import weights_path
from snapshop.models.embedder import Embedder, load_embedder, preprocess
from snapshop.models.heads import create_embedding_net


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    products = demo_products(3)
    images = [render(p, seed=i, size=200) for i, p in enumerate(products)]
    images.append(Image.fromarray(rng.integers(0, 256, (150, 300, 3), dtype=np.uint8)))
    images.append(Image.new("RGB", (224, 224), (255, 255, 255)))
    return images


def test_onnx_matches_torch(lite0_model_dir: Path) -> None:
    images = sample_images()
    batch = np.stack([preprocess(im, 224) for im in images])
    net = create_embedding_net("efficientnet_lite0", dim=None, pretrained=True).eval()
    with torch.no_grad():
        reference = net(torch.from_numpy(batch)).numpy()
    onnx_out = Embedder(lite0_model_dir, precision="fp32").embed_images(images)
    assert onnx_out.dtype == np.float32 and onnx_out.shape == (len(images), 1280)
    assert np.abs(onnx_out - reference).max() < 1e-4
    # the embeddings are informative: different images are not all the same vector
    sims = onnx_out @ onnx_out.T
    assert sims[np.triu_indices(len(images), 1)].min() < 0.95


def test_embeddings_l2_normalised_and_batch_independent(lite0_embedder: Embedder) -> None:
    images = sample_images()
    together = lite0_embedder.embed_images(images)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([lite0_embedder.embed_images([im]) for im in images])
    assert np.abs(together - alone).max() < 1e-5
    assert lite0_embedder.embed_images([]).shape == (0, 1280)


def test_small_batch_size_gives_same_vectors(
    lite0_model_dir: Path, lite0_embedder: Embedder
) -> None:
    images = sample_images()
    small = Embedder(lite0_model_dir, batch_size=2)
    assert np.abs(small.embed_images(images) - lite0_embedder.embed_images(images)).max() < 1e-5


def test_preprocess_shorter_side_and_centre_crop() -> None:
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # a white centre third: fills the centre crop exactly
    out = preprocess(Image.fromarray(arr), 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    assert np.allclose(out[:, :, 2:-2], (255 - 127) / 128, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_preprocess_of_a_long_thin_image_resamples_only_its_centre(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 2 x 40,000 strip (a 2 KB PNG) resized whole would be 64 x 1.28M pixels, gigabytes at
    the real input size, to keep only its centre square."""
    rng = np.random.default_rng(3)
    strip = Image.fromarray(rng.integers(0, 256, (40_000, 2, 3), dtype=np.uint8))
    sizes: list[tuple[int, int]] = []
    real_resize = Image.Image.resize

    def recording_resize(self: Image.Image, size: tuple[int, int], *args, **kwargs):
        sizes.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    assert preprocess(strip, 64).shape == (3, 64, 64)
    assert max(w * h for w, h in sizes) <= 64 * 64
    monkeypatch.undo()
    # The same pixels (to one level of rounding) as resizing the whole image, where that is cheap.
    short = strip.crop((0, 19_000, 2, 21_000))
    scale = 64 / 2
    whole = short.resize((64, round(2_000 * scale)), Image.Resampling.BILINEAR, reducing_gap=None)
    top = (whole.height - 64) // 2
    expected = (np.asarray(whole.crop((0, top, 64, top + 64)), np.float32) - 127) / 128
    assert np.abs(preprocess(short, 64) - expected.transpose(2, 0, 1)).max() <= 1 / 128 + 1e-6


def test_model_card(lite0_model_dir: Path) -> None:
    card = read_card(lite0_model_dir)
    data = json.loads((lite0_model_dir / CARD_FILE).read_text())
    for key in (
        "name",
        "backbone",
        "input_size",
        "normalisation",
        "output_dim",
        "source_weights_sha256",
        "onnx_sha256",
    ):
        assert key in data
    assert card.name == "efficientnet_lite0" and card.backbone == "efficientnet_lite0"
    assert card.input_size == 224 and card.output_dim == 1280
    assert card.normalisation == {"mean": 127.0, "std": 128.0}
    assert card.source_weights_sha256 == sha256_file(weights_path("efficientnet_lite0"))
    assert card.onnx_sha256 == sha256_file(lite0_model_dir / MODEL_FILE)
    assert card.model_id == f"efficientnet_lite0@{card.onnx_sha256[:12]}"
    assert Embedder(lite0_model_dir, verify=True).model_id == card.model_id


def test_cached_export_is_reused(lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = lite0_model_dir / MODEL_FILE
    before = (onnx.stat().st_mtime_ns, sha256_file(onnx))

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-exported a cached model")

    monkeypatch.setattr(export, "export_pretrained", no_export)
    assert export.resolve_model_dir("efficientnet_lite0") == lite0_model_dir
    assert load_embedder("efficientnet_lite0").model_dir == lite0_model_dir
    assert export.resolve_model_dir(lite0_model_dir) == lite0_model_dir  # a directory as is
    assert (onnx.stat().st_mtime_ns, sha256_file(onnx)) == before


@pytest.mark.parametrize("damage", ["onnx_bytes", "card_json", "card_missing_onnx_sha"])
def test_damaged_cache_is_exported_again(
    lite0_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    home = tmp_path / "home"
    cached = home / "models" / "efficientnet_lite0"
    shutil.copytree(lite0_model_dir, cached)
    if damage == "onnx_bytes":
        with open(cached / MODEL_FILE, "r+b") as fh:
            fh.seek(1000)
            fh.write(b"\x00" * 64)
    elif damage == "card_json":
        (cached / CARD_FILE).write_text("{not json")
    else:
        data = json.loads((cached / CARD_FILE).read_text())
        del data["onnx_sha256"]
        (cached / CARD_FILE).write_text(json.dumps(data))
    exported: list[Path] = []

    def fake_export(name: str, model_dir: Path) -> None:  # copying is what export would write
        exported.append(model_dir)
        shutil.rmtree(model_dir)
        shutil.copytree(lite0_model_dir, model_dir)

    monkeypatch.setenv("SNAPSHOP_HOME", str(home))
    monkeypatch.setattr(export, "export_pretrained", fake_export)
    assert export.resolve_model_dir("efficientnet_lite0") == cached
    assert exported == [cached]


def test_missing_model_dir_or_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model directory"):
        export.resolve_model_dir(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="known backbone"):
        load_embedder("resnet9000")


@pytest.mark.parametrize(
    "damage", ["no_card", "bad_json", "incomplete_card", "no_onnx", "bad_onnx"]
)
def test_corrupt_model_dir_raises_model_error(
    lite0_model_dir: Path, tmp_path: Path, damage: str
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(lite0_model_dir, model_dir)
    if damage == "no_card":
        (model_dir / CARD_FILE).unlink()
    elif damage == "bad_json":
        (model_dir / CARD_FILE).write_text('{"name": ')
    elif damage == "incomplete_card":
        (model_dir / CARD_FILE).write_text(json.dumps({"name": "x"}))
    elif damage == "no_onnx":
        (model_dir / MODEL_FILE).unlink()
    else:
        (model_dir / MODEL_FILE).write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelError) as info:
        Embedder(model_dir)
    assert str(model_dir) in str(info.value)


def test_verify_detects_modified_onnx(lite0_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(lite0_model_dir, model_dir)
    data = json.loads((model_dir / CARD_FILE).read_text())
    data["onnx_sha256"] = "0" * 64
    (model_dir / CARD_FILE).write_text(json.dumps(data))
    Embedder(model_dir, verify=False)  # loads when asked not to verify
    with pytest.raises(ModelError, match="sha256 differs"):
        Embedder(model_dir)  # verified by default: two embedding spaces under one model_id


def with_card_field(model_dir: Path, copy: Path, field: str, value: object) -> Path:
    """A copy of ``model_dir`` whose card says ``value`` for ``field``."""
    shutil.copytree(model_dir, copy)
    data = json.loads((copy / CARD_FILE).read_text())
    data[field] = value
    (copy / CARD_FILE).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("input_size", "abc", "input_size"), ("input_size", 0, "input_size"),
        ("input_size", 5000, "input_size"), ("input_size", True, "input_size"),
        ("output_dim", "x", "output_dim"), ("output_dim", 0, "output_dim"),
        ("normalisation", {}, "normalisation"),
        ("normalisation", {"mean": 127.0, "std": 0}, "normalisation"),
        ("normalisation", {"mean": float("nan"), "std": 1.0}, "normalisation"),
        ("onnx_sha256", 5, "onnx_sha256"),
    ],
)  # fmt: skip
def test_a_card_no_model_can_have_is_refused_on_read(
    lite0_model_dir: Path, tmp_path: Path, field: str, value: object, message: str
) -> None:
    model_dir = with_card_field(lite0_model_dir, tmp_path / "model", field, value)
    with pytest.raises(ModelError, match=message) as info:
        Embedder(model_dir, verify=False)
    assert str(model_dir) in str(info.value)


@pytest.mark.parametrize(("field", "value"), [("output_dim", 16), ("input_size", 256)])
def test_a_card_that_disagrees_with_its_graph_is_refused(
    lite0_model_dir: Path, tmp_path: Path, field: str, value: int
) -> None:
    """A card naming another dim would put vectors of the wrong length into a catalog."""
    model_dir = with_card_field(lite0_model_dir, tmp_path / "model", field, value)
    with pytest.raises(ModelError, match="does not match the model card"):
        Embedder(model_dir)


def test_sessions_do_not_spin_unless_asked(
    lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshop.models.runtime import SPINNING_ENV, cpu_session

    def spinning(session: object) -> str:
        options = session.get_session_options()  # type: ignore[attr-defined]
        return str(options.get_session_config_entry("session.intra_op.allow_spinning"))

    monkeypatch.delenv(SPINNING_ENV, raising=False)
    embedder = Embedder(lite0_model_dir, threads=1)
    assert spinning(embedder.session) == "0"
    assert embedder.session.get_session_options().intra_op_num_threads == 1
    data = (lite0_model_dir / MODEL_FILE).read_bytes()
    assert spinning(cpu_session(data)) == "0"  # bytes work as a path does
    monkeypatch.setenv(SPINNING_ENV, "1")
    with pytest.raises(Exception, match="allow_spinning"):  # unset: ONNX Runtime's default
        spinning(cpu_session(data))


def test_parallel_single_image_calls_match_one_batched_call(
    lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #16: by default images run one per call on a small pool of one-thread calls; the
    vectors are those of one batched call (parallel=0, the previous behaviour). In fp32, where
    the pool threads share one session (bf16 threads have their own: test_runtime.py)."""
    import threading

    images = sample_images()
    batched = Embedder(lite0_model_dir, parallel=0, precision="fp32")
    assert batched.session.get_session_options().intra_op_num_threads == 0  # ORT's choice
    default = Embedder(lite0_model_dir)
    assert default.parallel >= 1
    assert default.session.get_session_options().intra_op_num_threads == 1
    reference = batched.embed_images(images)

    pool = Embedder(lite0_model_dir, parallel=3, precision="fp32")
    shapes: list[tuple[int, ...]] = []
    names: set[str] = set()
    run = pool.session.run

    def recording_run(outputs: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        shapes.append(next(iter(feeds.values())).shape)
        names.add(threading.current_thread().name)
        return run(outputs, feeds)

    monkeypatch.setattr(pool.session, "run", recording_run, raising=False)
    vectors = pool.embed_images(images)
    assert np.abs(vectors - reference).max() < 1e-5
    assert [s[0] for s in shapes] == [1] * len(images)  # one image per call
    assert names and all(n.startswith("snapshop-embed") for n in names)  # on the pool
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert pool.embed_images([]).shape == (0, 1280)
    # preprocessed arrays (what ingest's decode workers send) take the same path
    shapes.clear()
    arrays = np.stack([preprocess(im, pool.input_size) for im in images])
    assert np.abs(pool.embed_arrays(arrays) - reference).max() < 1e-5
    assert [s[0] for s in shapes] == [1] * len(images)
    # two threads per call halve the default number of calls side by side
    assert Embedder(lite0_model_dir, threads=2).parallel == max(1, default.parallel // 2)
    with pytest.raises(ConfigError, match="parallel"):
        Embedder(lite0_model_dir, parallel=-1)
    monkeypatch.setenv("SNAPSHOP_EMBED_PARALLEL", "0")  # the setting for a whole process
    assert Embedder(lite0_model_dir).parallel == 0
    assert Embedder(lite0_model_dir, parallel=2).parallel == 2  # an argument wins
    monkeypatch.setenv("SNAPSHOP_EMBED_PARALLEL", "two")
    with pytest.raises(ConfigError, match="SNAPSHOP_EMBED_PARALLEL"):
        Embedder(lite0_model_dir)


def test_the_model_cards_normalisation_is_what_the_embedder_applies(
    lite0_model_dir: Path, tmp_path: Path
) -> None:
    """The card's `normalisation` is read, not assumed: a card that says 0-255 -> 0-1 changes
    the input the network sees, on the pool path and the batched path alike."""
    model = tmp_path / "model"
    shutil.copytree(lite0_model_dir, model)
    card = json.loads((model / CARD_FILE).read_text())
    card["normalisation"] = {"mean": 0.0, "std": 255.0}
    (model / CARD_FILE).write_text(json.dumps(card))
    image = render(demo_products(1)[0], seed=2, size=96)
    size = read_card(model).input_size
    expected = Embedder(model, parallel=0).embed_arrays(
        preprocess(image, size, {"mean": 0.0, "std": 255.0})[None]
    )
    for parallel in (0, 2):
        got = Embedder(model, parallel=parallel).embed_images([image, image])
        np.testing.assert_allclose(got, np.vstack([expected, expected]), atol=1e-5)
    default = Embedder(lite0_model_dir, parallel=0).embed_images([image])
    assert float(default[0] @ expected[0]) < 0.999  # the default scale gives another vector


def test_gem_pooling_against_numpy_and_its_bounds() -> None:
    from snapshop.models.heads import GEM_P, global_pool

    rng = np.random.default_rng(3)
    maps = rng.uniform(0, 6, (3, 7, 5, 4)).astype(np.float32)  # ReLU6-like activations
    maps[0, 0] = 0.0  # a dead channel: pooled to ~0, not NaN
    gem = global_pool(torch.from_numpy(maps), "gem").numpy()
    reference = np.mean(maps.astype(np.float64) ** GEM_P, axis=(2, 3)) ** (1 / GEM_P)
    assert np.allclose(gem, reference, atol=1e-5)
    avg = global_pool(torch.from_numpy(maps), "avg").numpy()
    assert np.allclose(avg, maps.mean(axis=(2, 3)), atol=1e-6)
    # a power mean lies between the mean and the maximum
    assert np.all(gem >= avg - 1e-5) and np.all(gem <= maps.max(axis=(2, 3)) + 1e-5)
    assert abs(gem[0, 0]) < 1e-5
    with pytest.raises(ConfigError, match="pooling"):
        global_pool(torch.from_numpy(maps), "max")
    with pytest.raises(ConfigError, match="pooling"):
        create_embedding_net("efficientnet_lite0", dim=8, pretrained=False, pooling="max")


def test_gem_embedding_net_exports_to_the_same_vectors(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    net = create_embedding_net("efficientnet_lite0", dim=16, pretrained=True, pooling="gem").eval()
    export.export_onnx(net, tmp_path / "gem.onnx", 128)
    batch = np.stack([preprocess(im, 128) for im in sample_images()])
    with torch.no_grad():
        reference = net(torch.from_numpy(batch)).numpy()
        averaged = create_embedding_net("efficientnet_lite0", dim=16, pretrained=True).eval()
        averaged.head.load_state_dict(net.head.state_dict())  # type: ignore[union-attr]
        avg_out = averaged(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(tmp_path / "gem.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert np.abs(onnx_out - reference).max() < 1e-4
    assert np.abs(avg_out - reference).max() > 1e-2  # the pooling is really in the graph


def test_a_resized_model_embeds_as_torch_does_at_its_new_size(
    lite0_model_dir: Path, tmp_path: Path
) -> None:
    """Lite0's stride-2 layers see even sizes at 224 and at 288, so the SAME padding traced at
    224 is the one torch computes at 288: the resized graph must equal torch there."""
    images = sample_images()
    card = export.resize_model(lite0_model_dir, 288, tmp_path / "at288")
    assert card.input_size == 288 and card.training["traced_at_size"] == 224
    assert read_card(tmp_path / "at288") == card
    assert card.onnx_sha256 == sha256_file(tmp_path / "at288" / MODEL_FILE)
    resized = Embedder(tmp_path / "at288", precision="fp32", verify=True)
    net = create_embedding_net("efficientnet_lite0", dim=None, pretrained=True).eval()
    with torch.no_grad():
        reference = net(torch.from_numpy(np.stack([preprocess(im, 288) for im in images])))
    assert np.abs(resized.embed_images(images) - reference.numpy()).max() < 1e-4
    original = Embedder(lite0_model_dir, precision="fp32").embed_images(images)
    assert np.abs(resized.embed_images(images) - original).max() > 1e-3
    # back to 224 in place: the original's vectors, and the size it was trained at kept
    back = export.resize_model(tmp_path / "at288", 224, tmp_path / "at288")
    assert back.input_size == 224 and back.training["traced_at_size"] == 224
    again = Embedder(tmp_path / "at288", precision="fp32", verify=True).embed_images(images)
    assert np.abs(again - original).max() < 1e-5


def test_resizing_refuses_odd_sizes_and_broken_models(
    lite0_model_dir: Path, tmp_path: Path
) -> None:
    for size in (0, 16, 5000):
        with pytest.raises(ModelError, match="size must be in"):
            export.resize_model(lite0_model_dir, size, tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(lite0_model_dir, broken)
    (broken / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot read the ONNX model"):
        export.resize_model(broken, 288, tmp_path / "out")
    assert not (tmp_path / "out" / MODEL_FILE).exists()
    with pytest.raises(ModelError, match="not a model directory"):
        export.resize_model(tmp_path / "nothing", 288, tmp_path / "out")


# --- several embedders as one model (models.ensemble) ---------------------------------------
@pytest.fixture(scope="module")
def two_heads(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two Lite0 embedders at 128 px that share the ImageNet trunk and differ in their heads,
    as two trainings of the last blocks do."""
    root = tmp_path_factory.mktemp("members")
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = create_embedding_net("efficientnet_lite0", dim=16, pretrained=True).eval()
        dirs.append(root / f"m{seed}")
        export.save_model(net, dirs[-1], name=f"member{seed}", source_weights_sha256="0" * 64,
                          kind="normsoftmax", input_size=128)  # fmt: skip
    return dirs


def test_a_merged_model_returns_the_members_ensemble(two_heads: list[Path], tmp_path: Path) -> None:
    from snapshop.models.ensemble import ENSEMBLE_KIND, merge_models

    card = merge_models(two_heads, tmp_path / "ens")
    assert read_card(tmp_path / "ens") == card
    assert (card.kind, card.output_dim, card.input_size) == (ENSEMBLE_KIND, 32, 128)
    assert [m["name"] for m in card.training["members"]] == ["member0", "member1"]
    images = sample_images()
    merged = Embedder(tmp_path / "ens", precision="fp32", verify=True).embed_images(images)
    members = [Embedder(d, precision="fp32").embed_images(images) for d in two_heads]
    assert np.abs(merged - np.concatenate(members, axis=1) / np.sqrt(2)).max() < 1e-5
    assert np.allclose(np.linalg.norm(merged, axis=1), 1.0, atol=1e-5)
    # the ensemble's cosine is the mean of the members' cosines, and differs from each
    mean_cosine = (members[0] @ members[0].T + members[1] @ members[1].T) / 2
    assert np.abs(merged @ merged.T - mean_cosine).max() < 1e-5
    assert np.abs(members[0] @ members[0].T - mean_cosine).max() > 1e-3
    # the shared trunk is stored once: far less than the two members' files together
    sizes = [(d / MODEL_FILE).stat().st_size for d in two_heads]
    assert (tmp_path / "ens" / MODEL_FILE).stat().st_size < 0.6 * sum(sizes)


def test_merging_refuses_what_cannot_share_an_input(two_heads: list[Path], tmp_path: Path) -> None:
    from snapshop.models.ensemble import merge_models

    out = tmp_path / "out"
    with pytest.raises(ModelError, match="at least two"):
        merge_models(two_heads[:1], out)
    member_file = (two_heads[0] / MODEL_FILE).read_bytes()
    with pytest.raises(ModelError, match="one of the members"):
        merge_models(two_heads, two_heads[0])
    assert (two_heads[0] / MODEL_FILE).read_bytes() == member_file  # the member is untouched
    export.resize_model(two_heads[1], 160, tmp_path / "at160")
    with pytest.raises(ModelError, match="disagree on input_size.*resize-model"):
        merge_models([two_heads[0], tmp_path / "at160"], out)
    for field, value in (("l2_normalised", False), ("kind", "normsoftmax+int8-static-qdq")):
        odd = tmp_path / f"odd-{field}"
        shutil.copytree(two_heads[1], odd)
        data = json.loads((odd / CARD_FILE).read_text())
        (odd / CARD_FILE).write_text(json.dumps({**data, field: value}))
        with pytest.raises(ModelError, match="L2-normalised|int8"):
            merge_models([two_heads[0], odd], out)
    import onnx

    newer = tmp_path / "newer-opset"
    shutil.copytree(two_heads[1], newer)
    graph = onnx.load(str(newer / MODEL_FILE))
    graph.opset_import[0].version += 1
    onnx.save(graph, str(newer / MODEL_FILE))
    data = json.loads((newer / CARD_FILE).read_text())
    data["onnx_sha256"] = sha256_file(newer / MODEL_FILE)
    (newer / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="different ONNX opsets"):
        merge_models([two_heads[0], newer], out)
    damaged = tmp_path / "damaged"
    shutil.copytree(two_heads[1], damaged)
    with open(damaged / MODEL_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="checksum|cannot read"):
        merge_models([two_heads[0], damaged], out)
    assert not out.exists() or not any(out.iterdir())


def test_merge_models_from_the_command_line(two_heads: list[Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from snapshop.cli import app

    runner = CliRunner()
    argv = ["merge-models", *map(str, two_heads), "--out", str(tmp_path / "e")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "32-d, 128 px" in result.output
    assert Embedder(tmp_path / "e", verify=True).dim == 32
    result = runner.invoke(app, ["merge-models", str(two_heads[0]), "--out", str(tmp_path / "f")])
    assert result.exit_code != 0 and "at least two" in result.output
    assert not (tmp_path / "f").exists()
