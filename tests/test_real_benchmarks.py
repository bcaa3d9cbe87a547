"""The benchmarks the real-tissue chapter adds: an image folder's classes by k-fold, SICAPv2 patches by k-NN and each
slide's Gleason score from its patches; on made-up manifests and the smoke SICAPv2, and on the real partial SICAPv2
(skipped without ../shared/data). Numbers are checked against scikit-learn, the grading rules applied by hand to
the spreadsheets' classes, and the partition sheets read with pandas."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from bonylib.config import load_config
from bonylib.data.labels import gleason_score, isup_grade
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation.benchmarks import sicapv2 as sicapv2_benchmark
from bonylib.evaluation.benchmarks.images import ImageClasses, ImagesConfig
from bonylib.evaluation.benchmarks.sicapv2 import Sicapv2, Sicapv2Config
from bonylib.evaluation.evaluate import EvaluateConfig, rooted
from bonylib.evaluation.features import Features
from tests.test_benchmarks import FAST_PROBE, bench_data, separable

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning",
                                        "ignore:A single label was found:UserWarning")
CLASSES = ["benign", "gleason3", "gleason4", "gleason5"]


def folder_manifest(path: Path, images: int = 40, tiles: int = 2, groups: bool = False) -> Path:
    """An image folder's manifest as bony tile writes it: ``tiles`` tiles per image, classes in turn, and (with
    ``groups``) a core per two images of a class."""
    rows = []
    for i in range(images):
        label = CLASSES[i % len(CLASSES)]
        for t in range(tiles):
            rows.append({"slide_id": f"im{i}", "x": 100 * t, "y": 0, "level": 0, "size": 100, "image_label": label,
                         "label_name": "", "group": f"core{i // 8}-{label}" if groups else "",
                         "path": f"/data/{label}/im{i}.jpg"})
    pd.DataFrame(rows).to_parquet(path)
    return path


def images_config(manifest: Path, **changes: object) -> ImagesConfig:
    overrides = [f"manifest={manifest}", "title=TMA", *(f"probe.{k}={v}" for k, v in FAST_PROBE.items()),
                 *(f"{k}={v}" for k, v in changes.items())]
    return load_config(ImagesConfig, None, [o.replace(" ", "") for o in overrides])


def test_image_folds_test_every_image_once_stratified_and_say_they_are_by_image(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        bench = ImageClasses(images_config(folder_manifest(tmp_path / "m.parquet")), tmp_path)
    assert not bench.by_group and "folds are by image" in caplog.text
    assert all("folds by image" in column.label for column in bench.columns)
    assert sorted(np.unique(bench.fold)) == [1, 2, 3, 4, 5]
    for k in range(1, 6):
        assert sorted(bench.targets[bench.fold == k]) == [0, 0, 1, 1, 2, 2, 3, 3], "two of each class per fold"
    assert bench.classes("knn") == CLASSES and [h for h in bench.heads] == ["knn", "linear"]
    assert len(bench.heads["knn"].runs) == 5 and len(bench.heads["linear"].runs) == 5

    grouped = ImageClasses(images_config(folder_manifest(tmp_path / "g.parquet", groups=True)), tmp_path)
    assert grouped.by_group and all("folds by group" in column.label for column in grouped.columns)
    folds_of_group = pd.Series(grouped.fold).groupby(grouped.units).nunique()
    assert (folds_of_group == 1).all(), "a core stays on one side of every fold"


def test_image_heads_read_the_mean_of_an_images_tiles_and_score_like_sklearn(tmp_path: Path) -> None:
    bench = ImageClasses(images_config(folder_manifest(tmp_path / "m.parquet")), tmp_path)
    shift = np.random.default_rng(1).normal(0, 5, (len(bench.frame), len(CLASSES))).astype(np.float32)
    shift[1::2] = -shift[0::2]  # an image's two tiles are far apart, and only their mean carries its class
    features = separable(bench.targets[bench.tile_image], len(CLASSES), noise=0.0) + shift
    pooled = []
    for k in range(1, 6):
        result = bench.fit("knn", f"fold{k}", 0, Features(features), CPU)
        truth, predicted = result.arrays["y_true"], result.arrays["y_pred"]
        assert result.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted)) == 1.0
        assert set(result.arrays["rows"]) == set(bench.images[bench.fold == k])
        pooled.append(result.arrays["rows"])
    assert sorted(np.concatenate(pooled)) == sorted(bench.images), "every image tested once over the folds"
    linear = bench.fit("linear", "fold2", 0, Features(features), CPU)
    assert linear.metrics["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(linear.arrays["y_true"], linear.arrays["y_pred"]))
    assert linear.info["folds_by"] == "image" and linear.info["n_test"] == 8 and linear.info["n_train"] < 32


def test_image_benchmark_refuses_what_it_cannot_fold(tmp_path: Path) -> None:
    manifest = folder_manifest(tmp_path / "m.parquet")
    frame = pd.read_parquet(manifest)
    frame.drop(columns="image_label").to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(BonyError, match="no image_label column"):
        ImageClasses(images_config(tmp_path / "plain.parquet"), tmp_path)
    with pytest.raises(BonyError, match="has 10 images, fewer than the 12 folds"):
        ImageClasses(images_config(manifest, folds=12), tmp_path)
    frame.loc[1, "image_label"] = "gleason5"
    frame.to_parquet(tmp_path / "mixed.parquet")
    with pytest.raises(BonyError, match="'im0' has tiles of two classes"):
        ImageClasses(images_config(tmp_path / "mixed.parquet"), tmp_path)


# ---- SICAPv2: patches by k-NN, slides from patches ---------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, smoke_data: Path, repo: Path) -> dict[str, Path]:
    return bench_data(tmp_path_factory.getbasetemp() / "bench-data", smoke_data, repo)


def sicap_config(manifest: Path, folder: Path, **changes: object) -> Sicapv2Config:
    overrides = [f"manifest={manifest}", f"data={folder}", "runs=1", "val_fraction=0.34",
                 *(f"probe.{k}={v}" for k, v in FAST_PROBE.items()), *(f"{k}={v}" for k, v in changes.items())]
    return load_config(Sicapv2Config, None, overrides)


def expected_score(classes: list[str]) -> tuple[int, int] | None:
    """A slide's score from its patches' classes by hand: patterns on fewer than 5 % of its cancer patches dropped,
    then the grading rules."""
    counts = {int(c[1]): classes.count(c) for c in ("G3", "G4", "G5")}
    cancer = sum(counts.values())
    return gleason_score({g: n for g, n in counts.items() if n >= 0.05 * cancer})


def test_slides_take_their_score_from_their_patches_by_the_grading_rules(data: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = data["sicapv2-data"]
    bench = Sicapv2(sicap_config(data["sicapv2"], root, heads="[patches_knn,slides]"), tmp_path)
    assert [run[1] for run in bench.heads["slides"].runs] == [0] * 5, "k-NN: one run per partition"
    features = separable(bench.labels[bench.tile_patch], 4)
    knn = bench.fit("patches_knn", "Val1", 0, Features(features), CPU)
    assert "best_step" not in knn.info, "k-NN is not trained"
    assert knn.info["n_train"] == np.isin(bench.patch_parts["Val1"], ("train", "val")).sum(), "val patients vote"

    def oracle(kind: str, x: torch.Tensor, targets: torch.Tensor, parts: np.ndarray, *rest: object) -> tuple:
        assert kind == "knn" and set(parts) <= {"train", "test"}
        return {"test": targets.numpy()[parts == "test"]}, {}  # every patch called its spreadsheet class

    monkeypatch.setattr(sicapv2_benchmark, "classify", oracle)
    sheets = pd.concat([pd.read_excel(root / "partition" / "Test" / f"{p}.xlsx") for p in ("Train", "Test")])
    sheet_class = dict(zip(sheets["image_name"].str.removesuffix(".jpg"),
                           sheets[["NC", "G3", "G4", "G5"]].idxmax(axis=1)))
    wsi = pd.read_excel(root / "wsi_labels.xlsx").set_index("slide_id")
    tested = []
    for partition in ("Test", "Val1", "Val2", "Val3", "Val4"):
        result = bench.fit("slides", partition, 0, Features(features), CPU)
        names = set(pd.read_excel(root / "partition" / ("Test" if partition == "Test" else f"Validation/{partition}")
                                  / "Test.xlsx")["image_name"].str.split("_Block_Region_").str[0])
        assert set(result.arrays["rows"]) == names & set(bench.slides)
        for slide, score, truth, patient in zip(result.info["slides"], result.info["predicted_scores"],
                                                result.arrays["y_true"], result.arrays["groups"]):
            mine = [sheet_class[p] for p in bench.patches if p.startswith(f"{slide}_")]
            expected = expected_score(mine)
            assert score == ("benign" if expected is None else f"{expected[0]}+{expected[1]}"), slide
            primary, secondary = wsi.loc[slide, ["Gleason_primary", "Gleason_secondary"]]
            assert truth == isup_grade(None if primary == 0 else (int(primary), int(secondary)))
            assert patient == str(wsi.loc[slide, "patient_id"])
        tested += list(result.arrays["rows"])
    assert sorted(tested) == sorted(bench.slides), "Test and the four folds test every slide once"


def test_the_official_partition_runs_on_the_real_partial_sicapv2(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "sicapv2_subset"
    manifest = tile("sicapv2", [root], tmp_path / "tiles", load_config(TileConfig, None, ["mpp=1.0", "tile_px=172"]))
    bench = Sicapv2(sicap_config(manifest.manifest, root, heads="[patches,patches_knn,slides]", runs=1), tmp_path)
    test_sheet = pd.read_excel(root / "partition" / "Test" / "Test.xlsx")["image_name"].str.removesuffix(".jpg")
    listed_test = sorted(set(test_sheet) & set(bench.patches))
    wsi = pd.read_excel(root / "wsi_labels.xlsx").set_index("slide_id")
    test_patients = {str(wsi.loc[name.split("_Block_Region_")[0], "patient_id"]) for name in listed_test}
    assert test_patients == {"471646", "757015", "474321"}
    features = np.random.default_rng(0).normal(size=(len(bench.frame), 8)).astype(np.float32)
    result = bench.fit("patches", "Test", 0, Features(features), CPU)
    assert sorted(result.arrays["rows"]) == listed_test and set(result.arrays["groups"]) == test_patients
    slides = bench.fit("slides", "Test", 0, Features(features), CPU)
    assert sorted(slides.arrays["rows"]) == ["16B0024177", "16B0026795", "17B0031108"]
    assert slides.info["n_test_patches"] > len(listed_test), "a test slide's unlisted patches are graded too"


def test_the_images_section_needs_only_its_manifest_and_takes_it_from_root() -> None:
    encoders = "encoders=[{name: a, specs: [handcrafted]}]"
    with pytest.raises(ConfigError, match=r"^images\.manifest must be set to run benchmark images$"):
        load_config(EvaluateConfig, None, [encoders, "benchmarks=[images]"])
    cfg = rooted(load_config(EvaluateConfig, None, [encoders, "benchmarks=[images]", "images.manifest=tiles/m.parquet",
                                                    "root=/runs/x"]))
    assert cfg.images.manifest == "/runs/x/tiles/m.parquet"
    assert load_config(EvaluateConfig, None, [encoders, "panda.manifest=a", "panda.data=b", "deepgleason.manifest=a",
                                              "deepgleason.data=b", "sicapv2.manifest=a", "sicapv2.data=b",
                                              "isup.manifest=a", "isup.data=b"]).benchmarks == [
        "panda", "deepgleason", "sicapv2", "isup"], "the default is the seed's four: images needs its own folder"
