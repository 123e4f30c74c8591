"""The benchmarks that score fold models on grocery-dev's folds (local_rerank.py, view_levers.py,
hubness.py, query_crops.py, ensemble_cv.py, query_cutout.py, photo_resolution.py,
colour_rerank.py) run end to end
on a tiny generated dataset: cartons (catalog image + photos of it) and plain products. Their
geometry, neighbourhoods, ensembles and saliency cut-outs against brute force."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from script_helpers import load_script
from test_catalog_views import cluttered_photo, packshot_image
from verify_helpers import package, photographed

rerank = load_script("benchmarks/local_rerank.py")
levers = load_script("benchmarks/view_levers.py")
hubness = load_script("benchmarks/hubness.py")
query_crops = load_script("benchmarks/query_crops.py")
ensemble_cv = load_script("benchmarks/ensemble_cv.py")
isnet_model = load_script("benchmarks/isnet_model.py")
query_cutout = load_script("benchmarks/query_cutout.py")
photo_resolution = load_script("benchmarks/photo_resolution.py")
colour_rerank = load_script("benchmarks/colour_rerank.py")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 products: 3 printed cartons, 3 plain ones; per product a catalog image, two gallery
    photos and two queries."""
    root = tmp_path_factory.mktemp("rerank")
    rows = []
    for n in range(6):
        folder = root / f"p{n}"
        folder.mkdir()
        packaged = n < 3
        (package(40 + n) if packaged else packshot_image(n)).save(folder / "catalog.png")
        rows.append((folder / "catalog.png", f"p{n}", "gallery", "iconic", int(packaged)))
        for i in range(4):
            photo = photographed(package(40 + n)) if packaged else cluttered_photo(10 * n + i)
            photo.save(folder / f"photo{i}.png")
            role = "gallery" if i < 2 else "query"
            rows.append((folder / f"photo{i}.png", f"p{n}", role, "natural", int(packaged)))
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "product_id", "role", "domain", "is_packaged_sku"])
        writer.writerows((str(p), *rest) for p, *rest in rows)
    return path


def test_rerank_benchmark_cross_fits_and_prints_both_protocols(
    manifest: Path, lite0_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--cache", str(tmp_path)]
    assert rerank.main([*argv, "--latency-queries", "3"]) == 0
    out = capsys.readouterr().out
    for protocol in ("photo -> catalog", "photo -> all"):
        for fold in range(3):
            assert re.search(rf"{protocol}, fold {fold}: weight [0-9.]+, floor \d+", out)
        assert f"{protocol}, packaged: 6 queries, R@1" in out
        assert f"{protocol}, produce: 6 queries, R@1" in out
    assert "| metric | cosine | verified (cross-fitted) |" in out
    assert "| R@1 - cosine, paired |" in out and "added per query (3 queries" in out
    assert (tmp_path / "verify.pkl").is_file()
    # the inlier cache gives the same tables the second time
    assert rerank.main([*argv, "--latency-queries", "0"]) == 0
    again = capsys.readouterr().out
    assert [ln for ln in again.splitlines() if ln.startswith("|")] == [
        ln for ln in out.splitlines() if ln.startswith("|")
    ]
    with pytest.raises(SystemExit):
        rerank.main([str(manifest)])  # neither --fold-models nor --baseline
    assert "give --fold-models or --baseline" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lever, views", [("piles", "2 pile views per catalog image"), ("crops", "5 crops per query")]
)
def test_view_lever_benchmark_prints_three_vectors(
    manifest: Path,
    lite0_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    lever: str,
    views: str,
) -> None:
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--lever", lever, "--views", "2"]
    assert levers.main(argv) == 0
    out = capsys.readouterr().out
    assert views in out
    assert "| metric | image | image + views | views only |" in out
    assert "photo -> catalog: 3 folds, 6 products, 12 queries, pooled" in out
    assert out.count("| R@1 - image, paired | - |") == 2


def test_view_crops_are_the_centre_and_the_corners() -> None:
    image = Image.new("RGB", (100, 60))
    crops = levers.crops_of(image)
    assert [c.size for c in crops] == [(50, 30)] * 5
    pixels = Image.new("RGB", (4, 4))
    for x in range(4):
        for y in range(4):
            pixels.putpixel((x, y), (x, y, 0))
    corners = [c.getpixel((0, 0)) for c in levers.crops_of(pixels)]
    assert corners == [(1, 1, 0), (0, 0, 0), (2, 0, 0), (0, 2, 0), (2, 2, 0)]


def test_hubness_benchmark_cross_fits_both_banks(
    manifest: Path, lite0_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hubness.main([str(manifest), "--baseline", str(lite0_model_dir)]) == 0
    out = capsys.readouterr().out
    for protocol in ("photo -> catalog", "photo -> all"):
        for bank in ("train", "held-out"):
            for fold in range(3):
                assert re.search(
                    rf"{protocol}, CSLS, {bank} bank \(cross-fitted\), fold {fold}: "
                    r"k \d+, beta [0-9.]+",
                    out,
                )
        assert f"{protocol}, cosine: R@1 by category packaged" in out
    header = (
        "| metric | cosine | CSLS, train bank (cross-fitted) | CSLS, held-out bank (cross-fitted) |"
    )
    assert out.count(header) == 2
    assert out.count("| R@1 - cosine, paired | - |") == 2


def test_a_gallery_images_neighbourhood_is_its_k_nearest_bank_photos_never_itself() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    gallery = np.concatenate([bank[[4, 17]], rng.normal(size=(3, 8)).astype(np.float32)])
    gallery[2:] /= np.linalg.norm(gallery[2:], axis=1, keepdims=True)
    self_index = np.array([4, 17, -1, -1, -1])
    got = hubness.neighbourhood(gallery, bank, 5, self_index)
    for i, g in enumerate(gallery):
        others = [float(g @ b) for j, b in enumerate(bank) if j != self_index[i]]
        assert got[i] == pytest.approx(np.mean(sorted(others)[-5:]), abs=1e-6)
    # k larger than the bank: every other photo
    everyone = hubness.neighbourhood(gallery[:1], bank, 100, self_index[:1])
    assert everyone[0] == pytest.approx(np.delete(bank @ gallery[0], 4).mean(), abs=1e-6)


def test_query_crops_benchmark_chooses_a_variant_per_fold(
    manifest: Path, lite0_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert query_crops.main([str(manifest), "--baseline", str(lite0_model_dir)]) == 0
    out = capsys.readouterr().out
    names = "|".join(["photo"] + [f"photo \\+ {s}, (mean|max)" for s in query_crops.CROP_SETS])
    for protocol in ("photo -> catalog", "photo -> all"):
        for fold in range(3):
            assert re.search(
                rf"{protocol}, crops \(cross-fitted\), fold {fold}: ({names})$", out, re.M
            )
        hindsight = re.findall(rf"^{protocol}, every fold, .*\(in hindsight\)$", out, re.M)
        assert len(hindsight) == len(query_crops.variants()) == 7
    assert out.count("| metric | photo | crops (cross-fitted) |") == 2
    # an ensemble of the model with itself ranks as the model alone
    fold = [str(lite0_model_dir)] * 3
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--ensemble-with", *fold]
    assert query_crops.main(argv) == 0
    assert capsys.readouterr().out == out
    with pytest.raises(SystemExit):
        query_crops.main([*argv[:-1]])
    assert "one model directory per fold" in capsys.readouterr().err


def test_query_crop_sets_cut_the_intended_pixels() -> None:
    pixels = Image.new("RGB", (24, 24))
    for x in range(24):
        for y in range(24):
            pixels.putpixel((x, y), (x, y, 0))
    two_thirds = [query_crops.crop(pixels, box) for box in query_crops.corners(2 / 3)]
    assert [c.size for c in two_thirds] == [(16, 16)] * 5
    assert [c.getpixel((0, 0)) for c in two_thirds] == [
        (4, 4, 0), (0, 0, 0), (8, 0, 0), (0, 8, 0), (8, 8, 0)
    ]  # fmt: skip
    zoom = [query_crops.crop(pixels, box) for box in query_crops.CROP_SETS["zoom3"]]
    assert [c.size for c in zoom] == [(18, 18), (12, 12), (8, 8)]
    assert [c.getpixel((0, 0)) for c in zoom] == [(3, 3, 0), (6, 6, 0), (8, 8, 0)]


def test_an_ensembles_cosine_is_the_mean_of_its_members_cosines() -> None:
    rng = np.random.default_rng(1)
    members = []
    for dim in (8, 5):
        v = rng.normal(size=(6, dim)).astype(np.float32)
        members.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    joint = ensemble_cv.ensemble(members)
    assert joint.shape == (6, 13)
    assert np.allclose(np.linalg.norm(joint, axis=1), 1, atol=1e-6)
    mean_cosine = (members[0] @ members[0].T + members[1] @ members[1].T) / 2
    assert np.allclose(joint @ joint.T, mean_cosine, atol=1e-6)


def test_ensemble_benchmark_prints_members_and_their_ensemble(
    manifest: Path, lite0_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fold = [str(lite0_model_dir)] * 3
    argv = [str(manifest), "--fold-models", *fold, "--fold-models", *fold]
    assert ensemble_cv.main(argv) == 0
    out = capsys.readouterr().out
    name = "/".join([lite0_model_dir.name] * 3)
    assert out.count(f"| metric | {name} | {name} (2) | ensemble |") == 2
    # a model in an ensemble with itself ranks as it does alone
    for line in out.splitlines():
        if line.startswith("| R@1 |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[1] == cells[2] == cells[3]
    with pytest.raises(SystemExit):
        ensemble_cv.main([str(manifest), "--fold-models", *fold])
    assert "two or more --fold-models sets" in capsys.readouterr().err
    # --subsets: three members give every pair and the triple as columns too
    assert ensemble_cv.main([*argv, "--fold-models", *fold, "--subsets"]) == 0
    header = f"| metric | {name} | {name} (2) | {name} (3) | ensemble 1+2 | ensemble 1+3 "
    out = capsys.readouterr().out
    assert out.count(header + "| ensemble 2+3 | ensemble |") == 2
    r1_rows = [line for line in out.splitlines() if line.startswith("| R@1 |")]
    assert len(r1_rows) == 2
    for line in r1_rows:  # every subset of one model with itself ranks as the model alone
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 8 and len(set(cells[1:])) == 1
    with pytest.raises(SystemExit):
        ensemble_cv.main([str(manifest), *["--fold-models", *fold] * 7, "--subsets"])
    assert "--subsets takes at most 6" in capsys.readouterr().err


def test_folds_without_queries_or_catalog_images_are_refused_in_one_line(
    manifest: Path, lite0_model_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from snapshop.errors import ConfigError

    no_queries = tmp_path / "no_queries.csv"
    no_queries.write_text(manifest.read_text().replace(",query,", ",gallery,"))
    model = str(lite0_model_dir)
    for script, extra in (
        (hubness, ["--baseline", model]),
        (query_crops, ["--baseline", model]),
        (ensemble_cv, ["--fold-models", *[model] * 3, "--fold-models", *[model] * 3]),
    ):
        with pytest.raises(ConfigError, match="holds no query photos"):
            script.main([str(no_queries), *extra])
    with pytest.raises(ConfigError, match=r"no catalog images \(domain=packshot\)"):
        hubness.main([str(manifest), "--baseline", model, "--catalog-where", "domain=packshot"])
    done = subprocess.run(
        [sys.executable, "benchmarks/hubness.py", str(no_queries), "--baseline", model],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: fold 0 holds no query photos")


def test_confusions_count_each_product_taken_for_another_at_rank_one() -> None:
    from snapshop.data.manifest import ManifestRow

    def row(sku: str, role: str) -> ManifestRow:
        return ManifestRow(Path(f"{sku}-{role}.jpg"), sku, role, {"product_name": sku.upper()})

    shown = [row("a", "gallery"), row("b", "gallery"), row("c", "gallery")]
    queries = [row("a", "query"), row("a", "query"), row("a", "query"), row("b", "query")]
    sims = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.1], [0.9, 0.1, 0.0], [0.0, 0.2, 0.7]])
    fold = hubness.FoldScores(sims.astype(np.float32), {}, queries, shown)
    assert hubness.confusions([fold]) == ["A -> B: 2 of 3", "B -> C: 1 of 1"]


def fixed_size_saliency(side: int) -> onnx.ModelProto:
    """A stand-in for ISNet exported at ``side`` px: near-white pixels are background, the rest
    salient, computed at half resolution and resized back by a constant output size (as the
    real export's Resize nodes are)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, values: list[float] | list[int], dtype: type) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["grey"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["grey"], ["half"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sub", ["white", "half"], ["dark"]),
        helper.make_node("Mul", ["dark", "gain"], ["logit"]),
        helper.make_node("Resize", ["logit", "", "", "sizes"], ["full"], mode="nearest"),
        helper.make_node("Sigmoid", ["full"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "saliency",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, side, side])],
        [
            const("white", [0.45], np.float32),
            const("gain", [40.0], np.float32),
            const("sizes", [1, 1, side, side], np.int64),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_isnet_resize_sizes_become_scales_the_same_at_the_export_size() -> None:
    import onnxruntime as ort

    fixed = fixed_size_saliency(64)
    free = isnet_model.any_size(fixed)
    run_fixed = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    run_free = ort.InferenceSession(free.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 3, 64, 64)).astype(np.float32)
    assert np.array_equal(run_free.run(None, {"input": x})[0], run_fixed.run(None, {"input": x})[0])
    with pytest.raises(Exception, match="dimensions"):
        run_fixed.run(None, {"input": np.zeros((1, 3, 128, 128), np.float32)})
    big = run_free.run(None, {"input": np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)})[0]
    assert big.shape == (1, 1, 128, 128)


def test_the_salient_box_and_the_cutout_keep_the_object_and_whiten_the_rest() -> None:
    image = Image.new("RGB", (100, 80), (30, 90, 200))
    mask = np.zeros((80, 100), np.uint8)
    mask[20:40, 30:80] = 255  # 50 x 20 px of object
    box, cutout = query_cutout.framed(image, mask)
    assert box.size == cutout.size == (60, 24)  # widened by 5 and 2 px a side
    assert cutout.getpixel((30, 12)) == (30, 90, 200)  # inside the object
    assert cutout.getpixel((1, 1)) == (255, 255, 255)  # margin, not salient
    assert box.getpixel((1, 1)) == (30, 90, 200)
    # the mask may come at another resolution than the photo
    assert query_cutout.framed(image, mask[::2, ::2])[0].size == (60, 24)
    tiny = np.zeros((80, 100), np.uint8)
    tiny[:5, :10] = 255  # 0.6 % of the photo
    assert query_cutout.framed(image, tiny) is None


def test_a_saliency_model_returning_nan_finds_no_object() -> None:
    class NaNModel:
        def get_inputs(self) -> list[object]:
            return [type("Input", (), {"name": "input"})()]

        def run(self, _: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.full((1, 1, *feeds["input"].shape[2:]), np.nan, np.float32)]

    mask = query_cutout.saliency(NaNModel(), Image.new("RGB", (50, 40)), 64)
    assert mask.shape == (64, 64) and not mask.any()


def test_query_cutout_benchmark_chooses_a_variant_per_fold_and_caches_masks(
    manifest: Path, lite0_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "saliency.onnx"
    onnx.save(isnet_model.any_size(fixed_size_saliency(64)), model)
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--isnet", str(model)]
    argv += ["--side", "128", "--cache", str(tmp_path / "masks")]
    assert query_cutout.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^no salient object in \d+ of 12 query photos", out, re.M)
    assert re.search(r"^ISNet at 128 px: \d+ ms a photo$", out, re.M)
    variants = "|".join(re.escape(v) for v in query_cutout.VARIANTS)
    for protocol in ("photo -> catalog", "photo -> all"):
        for fold in range(3):
            pick = rf"^{protocol}, cut-out \(cross-fitted\), fold {fold}: ({variants})$"
            assert re.search(pick, out, re.M)
        hindsight = re.findall(rf"^{protocol}, every fold, .*\(in hindsight\)$", out, re.M)
        assert len(hindsight) == 5
    assert out.count("| metric | photo | cut-out (cross-fitted) |") == 2
    assert len(list((tmp_path / "masks").glob("*.png"))) == 12
    # the second run reads every mask back and ranks the same
    assert query_cutout.main(argv) == 0
    again = capsys.readouterr().out
    assert "ms a photo" not in again
    assert again.splitlines()[1:] == out.splitlines()[2:]
    with pytest.raises(SystemExit):
        query_cutout.main([*argv, "--side", "100"])
    assert "multiple of 64" in capsys.readouterr().err


def test_photo_resolution_benchmark_chooses_a_size_per_fold(
    manifest: Path, lite0_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from snapshop.models.card import read_card

    own = read_card(lite0_model_dir).input_size
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--work", str(tmp_path)]
    sizes = ["--sizes", str(own), str(own + 32)]
    both_sizes = ["--every-image-at", str(own + 32), "--multiscale", str(own), str(own + 32)]
    assert photo_resolution.main([*argv, *sizes, *both_sizes]) == 0
    out = capsys.readouterr().out
    for protocol in ("photo -> catalog", "photo -> all"):
        for fold in range(3):
            assert re.search(
                rf"^{protocol}, photo size \(cross-fitted\), fold {fold}: "
                rf"photos at ({own}|{own + 32}) px$",
                out,
                re.M,
            )
        hindsight = re.findall(rf"^{protocol}, every fold, .*\(in hindsight\)$", out, re.M)
        assert len(hindsight) == 3  # the two photo sizes, and every image at the larger
    fixed = f"every image at {own + 32} px"
    both = f"every image at {own}+{own + 32} px"
    header = f"| metric | photos at {own} px | photo size (cross-fitted) | {fixed} | {both} |"
    assert out.count(header) == 2
    assert out.count(f"| metric | {fixed} | {both} |") == 2  # the multi-scale vs the fixed size
    # the fixed column ranks as the hindsight line of the same setting
    line = re.search(rf"^photo -> catalog, every fold, {fixed}: R@1 (\S+)", out, re.M)
    catalog_table = out.split("photo -> catalog: 3 folds")[1]
    r1_row = re.search(r"^\| R@1 \| .*$", catalog_table, re.M)
    assert line and r1_row
    in_table = float(r1_row.group(0).split("|")[4].split()[0])
    assert in_table == pytest.approx(float(line.group(1)), abs=5e-4)
    for wrong in (
        [str(own + 32), str(own)],
        [str(own), str(own)],
        [*sizes[1:], "--every-image-at", str(own)],
        [*sizes[1:], "--multiscale", str(own)],
        [*sizes[1:], "--multiscale", str(own), str(own + 64)],
    ):
        with pytest.raises(SystemExit):
            photo_resolution.main([*argv, "--sizes", *wrong])
    err = capsys.readouterr().err
    assert "the models' own input size" in err and "distinct" in err
    assert "--every-image-at must be one of --sizes other than the first" in err
    assert err.count("--multiscale takes two or more distinct sizes of --sizes") == 2


def test_a_multiscale_vector_is_the_normalised_mean_of_its_scales() -> None:
    rng = np.random.default_rng(3)
    vecs = {}
    for size in (100, 200):
        v = rng.normal(size=(4, 6)).astype(np.float32)
        vecs[size] = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert photo_resolution.mean_vector(vecs, (200,)) is vecs[200]
    both = photo_resolution.mean_vector(vecs, (100, 200))
    for i in range(4):
        mean = vecs[100][i] + vecs[200][i]
        assert np.allclose(both[i], mean / np.linalg.norm(mean), atol=1e-6)


def test_colour_benchmark_cross_fits_the_weight_per_fold(
    manifest: Path, lite0_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--cache", str(tmp_path)]
    assert colour_rerank.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"colour histogram of a query photo: p50 [0-9.]+ ms", out)
    for protocol in ("photo -> catalog", "photo -> all"):
        for fold in range(3):
            assert re.search(
                rf"{protocol}, cosine \+ w colour \(cross-fitted\), fold {fold}: w [0-9.]+", out
            )
    assert out.count("| R@1 - cosine, paired | - |") == 2
    # the second run reads every vector and histogram from the cache and prints the same table
    assert colour_rerank.main([*argv, "--weights", "0", "1"]) == 0
    again = capsys.readouterr().out
    assert "colour histogram of a query photo" not in again
    assert again.count("| cosine | cosine + w colour (cross-fitted) |") == 2


def test_colour_histogram_counts_the_products_pixels_in_their_hsv_bins() -> None:
    red = Image.new("RGB", (300, 300), (255, 255, 255))
    red.paste((220, 20, 20), (60, 60, 240, 240))  # a packshot: only the red square counts
    hist = colour_rerank.colour_histogram(red)
    assert hist.shape == (colour_rerank.BINS,) and hist.sum() == pytest.approx(1.0)
    hue, sat, _ = Image.new("RGB", (1, 1), (220, 20, 20)).convert("HSV").getpixel((0, 0))
    red_bin = (hue * colour_rerank.HUE_BINS // 256) * 2 + int(sat >= colour_rerank.SATURATION_SPLIT)
    assert hist[red_bin] > 0.9  # the rest: the square's blended edge on the 128-px copy
    # a photo (no white border): every pixel of its main-object crop, dark and grey included
    photo = Image.new("RGB", (200, 100), (10, 10, 10))
    photo.paste((128, 128, 128), (100, 0, 200, 100))
    grey = colour_rerank.colour_histogram(photo)
    assert grey[colour_rerank.HUE_BINS * 2] == pytest.approx(0.5, abs=0.05)  # dark
    assert grey[colour_rerank.HUE_BINS * 2 + 1] == pytest.approx(0.5, abs=0.05)  # mid grey
    coefficients = colour_rerank.bhattacharyya(np.stack([hist, grey]), np.stack([hist, grey]))
    np.testing.assert_allclose(np.diag(coefficients), 1.0, atol=1e-5)
    assert coefficients[0, 1] < 0.3


def test_colour_weight_moves_the_ranking_as_cos_plus_w_bc() -> None:
    rows = [
        colour_rerank.ManifestRow(path=Path(f"{n}.png"), sku=f"p{n}", role=role)
        for n, role in ((0, "query"), (0, "gallery"), (1, "gallery"))
    ]
    scores = colour_rerank.FoldScores(
        sims=np.array([[0.5, 0.6]], np.float32),
        colour=np.array([[0.9, 0.1]], np.float32),
        queries=rows[:1],
        shown=rows[1:],
    )
    label_of = {"p0": 0, "p1": 1}
    assert scores.ranks(0.0, label_of)[0][0] == 1  # cosine alone prefers p1
    assert scores.ranks(0.1, label_of)[0][0] == 1  # 0.59 < 0.61
    assert scores.ranks(0.2, label_of)[0][0] == 0  # 0.68 > 0.62
