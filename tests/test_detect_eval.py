"""Detector evaluation (CCP-format boxes), the evaluate-detector CLI and catalog integration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from catalog_helpers import make_images
from PIL import Image
from script_helpers import load_script
from typer.testing import CliRunner

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.cli import app
from snapshop.detect.base import Box, Detection
from snapshop.detect.factory import register_detector
from snapshop.errors import ConfigError, ManifestError
from snapshop.evaluate.detection import (
    PositionScore,
    evaluate_detector,
    load_ground_truth,
    score_image,
)

HEADER = "path,image_id,group,x1,y1,x2,y2\n"


class HalfDetector:
    """Upper = top half, lower = bottom half of every image; counts its calls."""

    name = "halves"

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, image: Image.Image) -> list[Detection]:
        self.calls += 1
        w, h = image.size
        return [
            Detection(Box(0, 0, w, h / 2), "top", "upper", 0.9),
            Detection(Box(0, 0, 4, 4), "top", "upper", 0.1),  # weaker: ignored
            Detection(Box(0, h / 2, w, h), "trousers", "lower", 0.8),
            Detection(Box(0, 0, w, h), "bag", None, 1.0),  # no position: ignored
        ]


register_detector("halves", lambda args: HalfDetector())


def test_ground_truth_union_per_position(tmp_path: Path) -> None:
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text(
        HEADER + "a.jpg,1,top,10,10,50,40\n"
        "a.jpg,1,outwear,5,12,60,70\n"
        "a.jpg,1,x_bag,0,0,100,100\n"
        "b.jpg,2,dress,10,10,40,90\n"
        "c.jpg,3,x_footwear,1,1,5,5\n"
    )
    gt = load_ground_truth(csv_path)
    assert gt["a.jpg"] == {"upper": Box(5, 10, 60, 70)}
    assert gt["b.jpg"] == {"upper": Box(10, 10, 40, 90)}  # a dress is upper, no lower
    assert gt["c.jpg"] == {}  # listed, no garments: any garment box is a false positive


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,group,x1\na.jpg,top,1\n", "missing column"),
        (HEADER + "a.jpg,1,top,1,2,x,4\n", "numbers"),
        (HEADER + "a.jpg,1,top,10,2,5,4\n", "empty box"),
        (HEADER, "no rows"),
        (HEADER + '"a.jpg,1,top,1,2,3,4\nb.jpg,2,top,1,2,3,4\n', r"bad\.csv:2: malformed"),
        (HEADER + "a.jpg,1,top,1,2,3,4,5\n", r"bad\.csv:2: more fields"),
        (HEADER + "caf\udce9.jpg,1,top,1,2,3,4\n", "not UTF-8"),
    ],
)
def test_ground_truth_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # \udce9: a Latin-1 byte
    with pytest.raises(ManifestError, match=match):
        load_ground_truth(path)


def test_score_image_counts() -> None:
    positions: dict[str, PositionScore] = {}
    truth = {"upper": Box(0, 0, 100, 100), "lower": Box(0, 100, 100, 200)}
    dets = [
        Detection(Box(0, 0, 100, 60), "top", "upper", 0.9),  # IoU .6: TP
        Detection(Box(0, 100, 100, 140), "trousers", "lower", 0.9),
    ]  # IoU .4: miss
    score_image(truth, dets, positions)
    score_image({}, dets, positions)  # two false positives
    up, low = positions["upper"], positions["lower"]
    assert (up.ground_truth, up.predicted, up.true_positive) == (1, 2, 1)
    assert (low.ground_truth, low.predicted, low.true_positive) == (1, 2, 0)
    assert up.recall == 1.0 and up.precision == 0.5 and low.recall == 0.0
    assert up.per_image == [(1, 1, 1), (0, 1, 0)] and low.per_image == [(1, 1, 0), (0, 1, 0)]


def test_position_intervals_resample_images() -> None:
    score = PositionScore()
    for i in range(40):  # 30 of 40 truths found; 10 spurious predictions
        score.add(truth=True, predicted=i < 30, true_positive=i < 30)
        score.add(truth=False, predicted=i < 10, true_positive=False)
    assert (score.recall, score.precision) == (0.75, 0.75)
    ci = score.intervals()
    for name in ("recall", "precision"):
        lo, hi = ci[name]
        assert 0.55 < lo < 0.75 < hi < 0.92
    wide = PositionScore()
    for i in range(8):
        wide.add(truth=True, predicted=i < 6, true_positive=i < 6)
    lo, hi = wide.intervals()["recall"]
    assert hi - lo > ci["recall"][1] - ci["recall"][0]  # fewer images, more doubt
    data = score.to_dict()
    assert data["recall_ci95"] == [round(v, 4) for v in ci["recall"]]
    empty = PositionScore()
    empty.add(truth=False, predicted=False, true_positive=False)
    assert empty.to_dict()["recall_ci95"] is None  # no truth: nothing to resample


def _dataset(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    for name in ("p1", "p2", "p3"):
        Image.new("RGB", (40, 80), (200, 30, 30)).save(tmp_path / "images" / f"{name}.jpg")
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text(
        HEADER + "images/p1.jpg,1,top,0,0,40,40\n"
        "images/p1.jpg,1,trousers,0,40,40,80\n"
        "images/p2.jpg,2,dress,0,0,40,80\n"
        "images/p3.jpg,3,shorts,0,60,40,80\n"
    )
    return csv_path


def test_evaluate_detector_end_to_end(tmp_path: Path) -> None:
    detector = HalfDetector()
    report = evaluate_detector(_dataset(tmp_path), detector)
    assert report.images == 3 and detector.calls == 3 and len(report.latency_ms) == 3
    up, low = report.positions["upper"], report.positions["lower"]
    # upper: p1 exact (TP), p2 dress 0-80 vs 0-40 (IoU .5: TP), p3 no truth (FP)
    assert (up.ground_truth, up.predicted, up.true_positive) == (2, 3, 2)
    # lower: p1 exact, p2 dress has no lower (FP), p3 shorts 60-80 vs 40-80 (IoU .5: TP)
    assert (low.ground_truth, low.predicted, low.true_positive) == (2, 3, 2)
    data = report.to_dict()
    assert data["positions"]["upper"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert data["latency_ms"]["p50"] >= 0


def test_cli_evaluate_detector(tmp_path: Path) -> None:
    csv_path = _dataset(tmp_path)
    runner = CliRunner()
    out_json = tmp_path / "out" / "det.json"
    result = runner.invoke(
        app,
        [
            "evaluate-detector",
            "--boxes",
            str(csv_path),
            "--detector",
            "halves",
            "--json-out",
            str(out_json),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "upper" in result.output and "0.667" in result.output
    assert "95 % bootstrap interval" in result.output
    data = json.loads(out_json.read_text())
    assert data["images"] == 3
    assert data["positions"]["upper"]["recall_ci95"] == [1.0, 1.0]  # 2 of 2 in every resample
    bad = runner.invoke(
        app, ["evaluate-detector", "--boxes", str(tmp_path / "nope.csv"), "--detector", "halves"]
    )
    assert bad.exit_code != 0 and "cannot read" in bad.output and "Traceback" not in bad.output
    unknown = runner.invoke(
        app, ["evaluate-detector", "--boxes", str(csv_path), "--detector", "nosuch"]
    )
    assert unknown.exit_code == 2 and "unknown detector" in unknown.output
    nothing = runner.invoke(
        app, ["evaluate-detector", "--boxes", str(csv_path), "--detector", "none"]
    )
    assert nothing.exit_code == 2 and "--detector none has nothing to evaluate" in nothing.output


def test_catalog_records_detector_and_search_uses_it(tmp_path: Path, lite0_model_dir: Path) -> None:
    make_images(tmp_path / "shop", n_products=2, per_product=1, size=64)
    cat = tmp_path / "cat"
    report = api.index_source(tmp_path / "shop", cat, model=str(lite0_model_dir), detector="halves")
    assert report.crops == 4  # upper + lower per image
    catalog = open_catalog(cat)
    assert catalog.detector == "halves" and catalog.info()["detector"] == "halves"
    catalog.close()
    assert json.loads((cat / "catalog.json").read_text())["detector"] == "halves"

    searcher = api.open_searcher(cat)
    assert isinstance(searcher.detector, HalfDetector)
    query = next((tmp_path / "shop").rglob("*.jpg"))
    result = searcher.search(query, k=2)
    searcher.catalog.close()
    assert sorted(item.position for item in result.item_results) == ["lower", "upper"]
    no_items = api.search_image(query, cat, k=2, detector="none")
    assert no_items.item_results == [] and no_items.image_results

    # a later ingest without --detector keeps making crops with the recorded one
    make_images(tmp_path / "more", n_products=1, per_product=1, size=64, seed=5)
    again = api.index_source(tmp_path / "more", cat, model=str(lite0_model_dir))
    assert again.added == 1 and again.crops == 2


def test_detector_breakdown_outcomes_and_label_rows(tmp_path: Path) -> None:
    from snapshop.detect.base import Box, Detection
    from snapshop.evaluate import breakdown as bd

    truth = {"upper": Box(0, 0, 10, 10), "lower": Box(0, 10, 10, 20)}
    found = [
        Detection(Box(0, 0, 10, 9), "top", "upper", 0.9),  # IoU 0.9: right
        Detection(Box(0, 0, 10, 10), "top", "upper", 0.1),  # lower score: ignored
        Detection(Box(0, 18, 10, 30), "skirt", "lower", 0.8),
    ]  # IoU 0.1: off
    assert bd.position_outcomes(truth, found) == {"upper": "right", "lower": "off"}
    assert bd.position_outcomes({"upper": Box(0, 0, 10, 10)}, found[2:]) == {
        "upper": "missed",
        "lower": "spurious",
    }
    assert bd.position_outcomes({}, []) == {"upper": "right", "lower": "right"}

    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text(
        "path,group,ccp_label,x1,y1,x2,y2\n"
        "a.jpg,top,blouse,0,0,10,10\na.jpg,skirt,skirt,0,10,10,20\n"
        "b.jpg,dress,dress,0,0,10,20\n"
    )
    labels = bd.photo_labels(csv_path)
    assert labels == {"a.jpg": frozenset({"blouse", "skirt"}), "b.jpg": frozenset({"dress"})}
    photos = [
        bd.PhotoOutcome("a.jpg", labels["a.jpg"], {"upper": "right", "lower": "off"}),
        bd.PhotoOutcome("b.jpg", labels["b.jpg"], {"upper": "right", "lower": "spurious"}),
    ]
    rows = {label: (n, counts) for label, n, counts in bd.breakdown(photos, min_photos=1)}
    assert set(rows) == {"all photos", "blouse", "skirt", "dress"}
    assert rows["all photos"][0] == 2 and rows["all photos"][1]["upper"]["right"] == 2
    assert rows["dress"][1]["lower"] == {"spurious": 1}
    assert [label for label, _, _ in bd.breakdown(photos, min_photos=2)] == ["all photos"]


def test_detector_breakdown_pools_folds_like_evaluate_detector(tmp_path: Path) -> None:
    from snapshop.evaluate.breakdown import score_folds

    boxes = _dataset(tmp_path)
    rows = boxes.read_text().splitlines()
    first, second = tmp_path / "fold1.csv", tmp_path / "fold2.csv"
    first.write_text("\n".join(rows[:3]) + "\n")  # p1
    second.write_text("\n".join(rows[:1] + rows[3:]) + "\n")  # p2, p3
    outcomes, scores = score_folds([("halves", first), ("halves", second)], tmp_path)
    pooled = {position: score.to_dict() for position, score in scores.items()}
    whole = evaluate_detector(boxes, HalfDetector()).to_dict()["positions"]
    for position in ("upper", "lower"):
        for key in ("ground_truth", "predicted", "true_positive", "recall", "precision"):
            assert pooled[position][key] == whole[position][key]
    assert pooled["upper"]["ground_truth"] == 2 and pooled["lower"]["predicted"] == 3
    assert sorted(o.path for o in outcomes) == sorted(whole_paths(boxes))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        score_folds([("none", first)], tmp_path)

    # The script is a shell over the library: the same pooled counts, as JSON.
    out = tmp_path / "breakdown.json"
    script = load_script("benchmarks/detector_breakdown.py")
    assert (
        script.main(
            [
                "--fold",
                f"halves={first}",
                "--fold",
                f"halves={second}",
                "--images-root",
                str(tmp_path),
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["pooled"] == pooled


def whole_paths(boxes_csv: Path) -> set[str]:
    return {line.split(",")[0] for line in boxes_csv.read_text().splitlines()[1:]}


@pytest.mark.parametrize(
    ("category", "position"),
    [
        ("Women > Tops", "upper"),
        ("T-Shirts", "upper"),
        ("Shirt dress", "upper"),
        ("dresses", "upper"),
        ("long_sleeve_outwear", "upper"),
        ("lower", "lower"),
        ("Skinny jeans", "lower"),
        ("Men/Trousers", "lower"),
        ("skirts", "lower"),
        ("Shorts", "lower"),
        ("Sale", None),
        ("jumpsuits", None),
        ("", None),
        (None, None),
        ("Tops / ", "upper"),
    ],
)
def test_position_of_category(category: str | None, position: str | None) -> None:
    from snapshop.detect.base import position_of_category

    assert position_of_category(category) == position


class OnlyProductDetector:
    """A flat product shot as a person-less detector reports it: one whole-product box."""

    name = "only-product"

    def detect(self, image: Image.Image) -> list[Detection]:
        return [Detection(Box(5, 6, 30, 70), "product", None, 1.0)]


def test_category_keeps_its_position_and_boxes_flat_shots(tmp_path: Path) -> None:
    from snapshop.ingest import _detect_crops

    photo = Image.new("RGB", (40, 80), (255, 255, 255))
    photo.paste((20, 40, 160), (10, 20, 30, 60))  # the garment on a white background
    halves = HalfDetector()

    def found(detector: object, category: str | None) -> list[tuple[str, str, tuple]]:
        crops = _detect_crops(detector, photo, "pad", category)  # type: ignore[arg-type]
        return [(pos, label, box) for pos, label, _, box, _ in crops]

    assert (
        found(halves, None)
        == found(halves, "Sale")
        == [("lower", "trousers", (0, 40, 40, 80)), ("upper", "top", (0, 0, 40, 40))]
    )
    assert found(halves, "Women > Jeans") == [("lower", "trousers", (0, 40, 40, 80))]
    assert found(halves, "tops") == [("upper", "top", (0, 0, 40, 40))]
    # no detection at the category's position: the whole product is the garment
    assert found(OnlyProductDetector(), "skirts") == [("lower", "product", (5, 6, 30, 70))]
    assert found(OnlyProductDetector(), None) == []  # no position: nothing to crop

    class Nothing:
        name = "nothing"

        def detect(self, image: Image.Image) -> list[Detection]:
            return []

    assert found(Nothing(), "T-shirts") == [("upper", "product", (10.0, 20.0, 30.0, 60.0))]

    # a packshot of a garment product is not detected: the whole product is the crop
    calls = halves.calls
    crops = _detect_crops(halves, photo, "pad", "Women > Jeans", packshot=True)
    assert [(p, label, box) for p, label, _, box, _ in crops] == [
        ("lower", "product", (10.0, 20.0, 30.0, 60.0))
    ]
    assert halves.calls == calls
    assert len(_detect_crops(halves, photo, "pad", "Sale", packshot=True)) == 2  # no position


def test_catalog_crops_follow_product_categories(tmp_path: Path, lite0_model_dir: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = ["product_id,image_path,category"]
    for n, category in enumerate(("Tops", "Jeans", "Accessories")):
        Image.new("RGB", (48, 96), (40 * n, 90, 200 - 40 * n)).save(tmp_path / "img" / f"{n}.jpg")
        rows.append(f"p{n},img/{n}.jpg,{category}")
    (tmp_path / "catalog.csv").write_text("\n".join(rows) + "\n")
    report = api.index_source(
        tmp_path / "catalog.csv", tmp_path / "cat", model=str(lite0_model_dir), detector="halves"
    )
    assert report.added == 3 and report.crops == 4  # tops: upper, jeans: lower, other: both
    catalog = open_catalog(tmp_path / "cat")
    by_sku = {}
    for sku in ("p0", "p1", "p2"):
        product = catalog.store.find_product(sku)
        images = catalog.store.images_of(product.id)
        rows_ = catalog.store.crops_of_image(images[0].id)
        by_sku[sku] = sorted(c.position for c in rows_)
    catalog.close()
    assert by_sku == {"p0": ["upper"], "p1": ["lower"], "p2": ["lower", "upper"]}


def test_paired_ratio_difference_matches_a_draw_by_draw_reference() -> None:
    import numpy as np

    from snapshop.evaluate.stats import paired_ratio_difference

    rng = np.random.default_rng(3)
    den_a = rng.integers(0, 2, 60)
    num_a = den_a * rng.integers(0, 2, 60)
    den_b = rng.integers(0, 2, 60)
    num_b = den_b * rng.integers(0, 2, 60)
    delta, lo, hi = paired_ratio_difference((num_a, den_a), (num_b, den_b), resamples=300, seed=5)
    assert delta == pytest.approx(num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum())
    draws = np.random.default_rng(5).integers(0, 60, (300, 60))  # the same draws, one by one
    reference = [
        num_b[d].sum() / den_b[d].sum() - num_a[d].sum() / den_a[d].sum()
        for d in draws
        if den_a[d].sum() and den_b[d].sum()
    ]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reference, [0.025, 0.975])))
    # Identical detectors: no difference at all; one more success: exactly that, every draw.
    assert paired_ratio_difference((num_a, den_a), (num_a, den_a)) == (0.0, 0.0, 0.0)
    better = num_a.copy()
    better[np.argmax(den_a > num_a)] += 1
    d, lo, hi = paired_ratio_difference((num_a, den_a), (better, den_a))
    assert d > 0 and lo >= 0.0 and hi > 0
    with pytest.raises(ConfigError):
        paired_ratio_difference((num_a, den_a), (num_b[:5], den_b[:5]))


class LowerOnlyDetector(HalfDetector):
    """:class:`HalfDetector` without its upper box."""

    name = "lower-only"

    def detect(self, image: Image.Image) -> list[Detection]:
        return [d for d in super().detect(image) if d.position != "upper"]


register_detector("lower-only", lambda args: LowerOnlyDetector())


def test_detector_compare_prints_both_detectors_and_their_paired_difference(
    tmp_path: Path,
) -> None:
    boxes = _dataset(tmp_path)
    script = load_script("benchmarks/detector_compare.py")
    out = tmp_path / "compare.json"
    argv = ["--base", f"halves={boxes}", "--variant", f"lower-only={boxes}"]
    assert script.main([*argv, "--images-root", str(tmp_path), "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    whole = evaluate_detector(boxes, HalfDetector()).to_dict()["positions"]
    assert report["upper"]["recall"]["base"] == whole["upper"]["recall"]
    assert report["upper"]["recall"]["variant"] == 0.0
    assert report["upper"]["recall"]["delta"] == -whole["upper"]["recall"]
    assert report["lower"]["precision"]["delta"] == 0.0  # the same lower boxes
    other = tmp_path / "other.csv"
    other.write_text(boxes.read_text())
    with pytest.raises(SystemExit):  # folds must pair up
        script.main(["--base", f"halves={boxes}", "--variant", f"halves={other}",
                     "--images-root", str(tmp_path)])  # fmt: skip
