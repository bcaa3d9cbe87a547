"""The benchmarks on smoke data with features made for the test: splits keep slides whole, targets are read where the
tiles are, heads reach near-perfect scores on features that carry the answer, and every saved number is recomputed
independently (scikit-learn, scipy, numpy) from the predictions saved beside it."""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, jaccard_score

from bonylib.config import load_config
from bonylib.data.synthetic import SynthConfig, synthesize
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.benchmarks.common import bootstrap_interval, ladder_size, overlap_scores, score, select_tiles
from bonylib.evaluation.benchmarks.deepgleason import CLASSES, DeepGleasonConfig, DeepGleasonMasks, class_maps
from bonylib.evaluation.benchmarks.isup import IsupConfig, SlideIsup
from bonylib.evaluation.benchmarks.panda import PandaConfig, PandaTiles
from bonylib.evaluation.benchmarks.sicapv2 import PATCH_CLASSES, Sicapv2, Sicapv2Config, read_partition
from bonylib.evaluation.features import Features
from bonylib.evaluation.intervals import group_bootstrap

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning",
                                        "ignore:A single label was found:UserWarning")
FAST_PROBE = {"max_steps": 60, "eval_every": 10, "patience": 3, "mlp_hidden": [32], "batch_size": 32, "lr": 1e-2}
FAST_DECODER = {"out_size": 14, "width": 16, "max_epochs": 60, "patience": 60, "batch_size": 8, "lr": 3e-3}


def bench_data(base: Path, smoke_data: Path, repo: Path) -> dict[str, Path]:
    """Tiled smoke datasets for the benchmarks at 64 px, written once per session under ``base`` (both test modules
    call this; a lock and a marker make the second call reuse the first's).

    PANDA needs more slides than the smoke set's two for a three-part split by slide: four small slides are
    synthesized, tiled at 2 µm/px (a few dozen tiles). DeepGleason and SICAPv2 are the smoke sets.
    """
    base.mkdir(parents=True, exist_ok=True)
    paths = {"panda-data": base / "panda-data", "panda": base / "panda" / "manifest.parquet",
             "deepgleason-data": smoke_data / "deepgleason", "deepgleason": base / "deepgleason" / "manifest.parquet",
             "sicapv2-data": smoke_data / "sicapv2", "sicapv2": base / "sicapv2" / "manifest.parquet"}
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "ready").is_file():
            cfg = load_config(SynthConfig, repo / "configs" / "synth" / "smoke.yaml",
                              ["panda.slides=4", "panda.core_length_um=500", "panda.core_width_um=300"])
            synthesize("panda", paths["panda-data"], cfg)
            for name, overrides in {"panda": ["tile_px=64", "mpp=2.0"], "deepgleason": ["tile_px=64"],
                                    "sicapv2": ["tile_px=64", "mpp=1.0"]}.items():
                tile(name, [paths[f"{name}-data"]], base / name, load_config(TileConfig, None, overrides))
            (base / "ready").touch()
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, smoke_data: Path, repo: Path) -> dict[str, Path]:
    return bench_data(tmp_path_factory.getbasetemp() / "bench-data", smoke_data, repo)


def panda_config(data: dict[str, Path], **changes: object) -> PandaConfig:
    overrides = [f"manifest={data['panda']}", f"data={data['panda-data']}", "fractions=[0.5,0.25,0.25]", "runs=1",
                 *(f"probe.{k}={v}" for k, v in FAST_PROBE.items()), *(f"{k}={v}" for k, v in changes.items())]
    return load_config(PandaConfig, None, [o.replace(" ", "") for o in overrides])


def separable(targets: np.ndarray, classes: int, noise: float = 0.05) -> np.ndarray:
    """Features that carry the class by construction: its one-hot code, plus small noise."""
    rng = np.random.default_rng(0)
    return (np.eye(classes)[targets] * 3 + rng.normal(0, noise, (len(targets), classes))).astype(np.float32)


# ---- PANDA tiles and slide-level ISUP ----------------------------------------------------------------------


def test_panda_split_keeps_slides_whole_and_isup_shares_it(data: dict[str, Path], tmp_path: Path) -> None:
    bench = PandaTiles(panda_config(data), tmp_path)
    slides = bench.frame["slide_id"]
    assert (pd.Series(bench.parts).groupby(slides.to_numpy()).nunique() == 1).all()
    assert set(bench.parts) == {"train", "val", "test"}
    isup = SlideIsup(load_config(IsupConfig, None, [f"manifest={data['panda']}", f"data={data['panda-data']}",
                                                     "fractions=[0.5,0.25,0.25]"]), tmp_path)
    tile_part = dict(zip(slides, bench.parts))
    assert [tile_part[s] for s in isup.slides] == list(isup.parts)
    grades = pd.read_csv(data["panda-data"] / "train.csv").set_index("image_id")["isup_grade"]
    assert list(isup.grades) == list(grades.loc[isup.slides])


@pytest.mark.parametrize("head", ["linear", "mlp", "knn"])
def test_panda_heads_are_near_perfect_on_separable_features(data: dict[str, Path], tmp_path: Path, head: str) -> None:
    bench = PandaTiles(panda_config(data, heads=f"[{head}]"), tmp_path)
    result = bench.fit(head, "test", 0, Features(separable(bench.targets, len(bench.classes(head)))), CPU)
    truth, predicted = result.arrays["y_true"], result.arrays["y_pred"]
    assert result.metrics["accuracy"] >= 0.95
    assert result.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert result.metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert result.metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    test = bench.parts == "test"
    assert list(result.arrays["rows"]) == list(bench.ids[test])
    assert list(result.arrays["groups"]) == list(bench.frame["slide_id"][test])
    assert np.array_equal(np.array(result.info["confusion_matrix"]),
                          pd.crosstab(truth, predicted).reindex(index=range(len(bench.classes(head))),
                                                                columns=range(len(bench.classes(head))), fill_value=0))


def test_panda_max_tiles_selects_one_seeded_file(data: dict[str, Path], tmp_path: Path) -> None:
    first = select_tiles(data["panda"], None, 20, 0, tmp_path)
    assert select_tiles(data["panda"], None, 20, 0, tmp_path) == first
    assert len(pd.read_parquet(first)) == 20 and first.parent == tmp_path
    assert select_tiles(data["panda"], None, 0, 0, tmp_path) == data["panda"]
    assert select_tiles(data["panda"], None, 20, 1, tmp_path) != first


def test_isup_abmil_scores_match_sklearn(data: dict[str, Path], tmp_path: Path) -> None:
    isup = SlideIsup(load_config(IsupConfig, None, [f"manifest={data['panda']}", f"data={data['panda-data']}",
                                                     "fractions=[0.5,0.25,0.25]", "max_epochs=5"]), tmp_path)
    frame = pd.read_parquet(isup.manifest)
    result = isup.fit("abmil", "test", 0, Features(separable(np.zeros(len(frame), int), 6)), CPU)
    truth, predicted = result.arrays["y_true"], result.arrays["y_pred"]
    assert list(result.arrays["rows"]) == list(isup.slides[isup.parts == "test"])
    assert result.metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    defined = len(set(truth) | set(predicted)) > 1
    kappa = cohen_kappa_score(truth, predicted, labels=range(6), weights="quadratic") if defined else float("nan")
    assert result.metrics["quadratic_weighted_kappa"] == pytest.approx(kappa, nan_ok=True)


def test_panda_refuses_too_few_slides_and_unknown_names(data: dict[str, Path], tmp_path: Path) -> None:
    frame = pd.read_parquet(data["panda"])
    two = tmp_path / "two-slides.parquet"
    frame[frame["slide_id"].isin(sorted(set(frame["slide_id"]))[:2])].to_parquet(two)
    with pytest.raises(BonyError, match="part is empty"):
        PandaTiles(panda_config(data, manifest=two), tmp_path)
    with pytest.raises(ConfigError, match="unknown head 'svm'"):
        panda_config(data, heads="[svm]")
    with pytest.raises(ConfigError, match="not a tile label"):
        panda_config(data, classes="[tumour]")


# ---- DeepGleason -------------------------------------------------------------------------------------------


def dg_config(data: dict[str, Path], **changes: object) -> DeepGleasonConfig:
    overrides = [f"manifest={data['deepgleason']}", f"data={data['deepgleason-data']}", "runs=1",
                 *(f"decoder.{k}={v}" for k, v in FAST_DECODER.items()), *(f"{k}={v}" for k, v in changes.items())]
    return load_config(DeepGleasonConfig, None, overrides)


def test_deepgleason_masks_are_read_where_the_tiles_are(data: dict[str, Path], tmp_path: Path) -> None:
    bench = DeepGleasonMasks(dg_config(data), tmp_path)
    table = pd.read_csv(data["deepgleason-data"] / "tiles.csv").set_index("tile_id")
    lookup = {0: 0, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}  # DeepGleason codes -> background, benign, G3, G4, G5
    for row, tile_row in bench.frame.iterrows():
        codes = np.asarray(Image.open(data["deepgleason-data"] / table.loc[tile_row["slide_id"], "mask"]))
        y, x, size = int(tile_row["y"]), int(tile_row["x"]), int(tile_row["size"])
        assert np.array_equal(bench.codes[row], codes[y : y + size, x : x + size])
        assert np.array_equal(class_maps(bench.codes[row]), np.vectorize(lookup.get)(codes[y : y + size, x : x + size]))
    assert list(CLASSES) == ["background", "benign", "G3", "G4", "G5"]
    groups = bench.frame["group"].to_numpy()
    assert (pd.Series(bench.parts).groupby(groups).nunique() == 1).all()


def mask_features(masks: np.ndarray, side: int = 7) -> np.ndarray:
    """Features that hold the mask: its class indices at side x side, flattened."""
    small = np.stack([np.asarray(Image.fromarray(m).resize((side, side), Image.Resampling.NEAREST)) for m in masks])
    return small.reshape(len(masks), -1).astype(np.float32)


def test_deepgleason_decoders_read_the_mask_from_informative_features(data: dict[str, Path], tmp_path: Path) -> None:
    bench = DeepGleasonMasks(dg_config(data), tmp_path)
    informative = mask_features(class_maps(bench.codes))
    noise = np.random.default_rng(0).normal(size=informative.shape).astype(np.float32)
    learned, guessed = (bench.fit("mask", "test", 0, Features(f), CPU) for f in (informative, noise))
    assert learned.metrics["mse"] < 0.6 * guessed.metrics["mse"]
    assert learned.metrics["mse"] == pytest.approx(learned.arrays["mse"].mean())
    classes, chance = (bench.fit("classes", "test", 0, Features(f), CPU) for f in (informative, noise))
    assert classes.metrics["mean_iou"] > chance.metrics["mean_iou"] + 0.1
    truth, predicted = classes.arrays["example_true"], classes.arrays["example_pred"]
    assert truth.shape == predicted.shape == (min(8, int((bench.parts == "test").sum())), 14, 14)
    # per-image confusion matrices against scikit-learn on the saved example maps (labels weighted by their pixels)
    confusion = classes.arrays["confusion"][: len(truth)]
    for image, counts in enumerate(confusion):
        assert np.array_equal(counts, metrics.confusion_matrix(truth[image], predicted[image], len(CLASSES)))
    pooled = overlap_scores(classes.arrays["confusion"].sum(0), CLASSES)
    assert pooled["mean_iou"] == pytest.approx(classes.metrics["mean_iou"])
    assert pooled["dice_benign"] == pytest.approx(classes.metrics["dice_benign"], nan_ok=True)


def test_deepgleason_patch_decoder_starts_from_the_token_grid(data: dict[str, Path], tmp_path: Path) -> None:
    bench = DeepGleasonMasks(dg_config(data, heads="[patch]"), tmp_path)
    tokens = np.random.default_rng(0).normal(size=(len(bench.frame), 4, 8)).astype(np.float16)
    result = bench.fit("patch", "test", 0, Features(tokens), CPU)
    assert result.info["out_size"] == ladder_size(2, 14) == 16
    assert result.arrays["example_pred"].shape[-1] == 16
    with pytest.raises(BonyError, match="square grid"):
        bench.fit("patch", "test", 0, Features(tokens[:, :3]), CPU)
    assert ladder_size(6, 56) == 48 and ladder_size(14, 224) == 224 and ladder_size(16, 224) == 256


def test_deepgleason_refuses_a_foreign_split_column(data: dict[str, Path], tmp_path: Path) -> None:
    frame = pd.read_parquet(data["deepgleason"])
    frame.loc[0, "split"] = "holdout"
    odd = tmp_path / "manifest.parquet"
    frame.to_parquet(odd)
    with pytest.raises(BonyError, match="'holdout'"):
        DeepGleasonMasks(dg_config(data, manifest=odd), tmp_path)
    bench = DeepGleasonMasks(dg_config(data, manifest=odd, split="slides", fractions="[0.34,0.33,0.33]"), tmp_path)
    assert (pd.Series(bench.parts).groupby(frame["group"].to_numpy()).nunique() == 1).all()


# ---- SICAPv2 -----------------------------------------------------------------------------------------------


def sicap_config(data: dict[str, Path], **changes: object) -> Sicapv2Config:
    overrides = [f"manifest={data['sicapv2']}", f"data={data['sicapv2-data']}", "runs=1", "val_fraction=0.34",
                 "blur_sigma=1.0", *(f"decoder.{k}={v}" for k, v in FAST_DECODER.items()),
                 *(f"probe.{k}={v}" for k, v in FAST_PROBE.items()), *(f"{k}={v}" for k, v in changes.items())]
    return load_config(Sicapv2Config, None, overrides)


def test_sicapv2_partitions_are_patient_wise_and_the_folds_cover_training_once(data: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    bench = Sicapv2(sicap_config(data), tmp_path)
    tested_in_folds: list[str] = []
    for partition, parts in bench.patch_parts.items():
        patients = {part: set(bench.patients[parts == part]) for part in ("train", "val", "test")}
        assert all(patients.values()), partition
        assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
        assert not patients["train"] & patients["val"]
        if partition != "Test":
            tested_in_folds += list(bench.patches[parts == "test"])
    test_train = read_partition(data["sicapv2-data"], "Test").query("part == 'train'")["image_name"]
    listed = {name.removesuffix(".jpg") for name in test_train} & set(bench.patches)
    assert sorted(tested_in_folds) == sorted(listed)
    sheet = pd.read_excel(data["sicapv2-data"] / "partition" / "Test" / "Test.xlsx")
    for _, row in sheet.iterrows():
        stem = row["image_name"].removesuffix(".jpg")
        if stem in set(bench.patches):
            index = list(bench.patches).index(stem)
            assert PATCH_CLASSES[bench.labels[index]] == next(c for c in PATCH_CLASSES if row[c] == 1)


def test_sicapv2_reconstruction_target_is_the_blurred_tile_and_scores_recompute(data: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    bench = Sicapv2(sicap_config(data, heads="[reconstruction]"), tmp_path)
    frame = bench.frame
    source = Image.open(frame.loc[0, "path"]).convert("RGB")
    x, y, size = (int(frame.loc[0, k]) for k in ("x", "y", "size"))
    tile = np.asarray(source.crop((x, y, x + size, y + size)).resize((14, 14), Image.Resampling.BILINEAR)) / 255
    # torchvision's kernel reaches ceil(3 sigma) and reflects without repeating the edge: scipy's 'mirror'
    expected = np.stack([ndimage.gaussian_filter(tile[..., c], 1.0, mode="mirror", truncate=3.0) for c in range(3)])
    assert np.allclose(bench.blurred[0].numpy(), expected, atol=1e-5)
    features = bench.blurred.flatten(1).numpy()
    result = bench.fit("reconstruction", "test", 0, Features(features), CPU)
    shown_true, shown_pred = result.arrays["example_true"].astype(np.float64), result.arrays["example_pred"]
    by_hand = ((shown_true - shown_pred.astype(np.float64)) ** 2).reshape(len(shown_true), -1).mean(1)
    assert np.allclose(result.arrays["mse"][: len(shown_true)], by_hand, atol=1e-3)
    assert result.metrics["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / result.arrays["mse"])))
    assert result.metrics["ssim"] == pytest.approx(result.arrays["ssim"].mean())


def test_sicapv2_patch_probe_matches_sklearn(data: dict[str, Path], tmp_path: Path) -> None:
    bench = Sicapv2(sicap_config(data, heads="[patches]"), tmp_path)
    # noise-free: two training patches in this fold, and z-scoring makes noise as loud as the signal
    features = separable(bench.labels[bench.tile_patch], len(PATCH_CLASSES), noise=0.0)
    result = bench.fit("patches", "Val1", 0, Features(features), CPU)
    truth, predicted = result.arrays["y_true"], result.arrays["y_pred"]
    assert result.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted)) == 1.0
    assert set(result.arrays["groups"]) == set(bench.patients[bench.patch_parts["Val1"] == "test"])


def test_sicapv2_refuses_partition_names_that_are_paths(data: dict[str, Path]) -> None:
    for name in ("../Test", "Val1/../../x", "Validation"):
        with pytest.raises(ConfigError, match="partitions"):
            sicap_config(data, partitions=f"[Test,'{name}']")


# ---- scoring from saved predictions ------------------------------------------------------------------------


def test_standardize_uses_training_rows_only() -> None:
    features = torch.tensor([[1.0, 5.0], [3.0, 5.0], [100.0, -7.0]])
    train = torch.tensor([True, True, False])
    out = Features(features).standardized(train)[:]
    assert torch.allclose(out[:2], torch.tensor([[-1.0, 0.0], [1.0, 0.0]]) / 2**0.5)  # sample std of (1, 3): sqrt 2
    assert torch.allclose(out[2], torch.tensor([(100.0 - 2.0) / 2**0.5, -12.0]))  # constant channel: centred only
    tokens = torch.randn(4, 3, 2) * 5 + 2
    assert torch.allclose(Features(tokens).standardized(torch.ones(4, dtype=torch.bool))[:].reshape(-1, 2).mean(0),
                          torch.zeros(2), atol=1e-5)


def test_scores_and_intervals_recompute_from_saved_predictions() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 300)
    runs = [np.where(rng.random(300) < 0.7, truth, rng.integers(0, 4, 300)) for _ in range(3)]
    slides = np.repeat(np.arange(30), 10).astype(str)
    replicas = [{"y_true": truth, "y_pred": predicted} for predicted in runs]
    classes = list("abcd")
    assert score("macro_f1", replicas[0], classes) == pytest.approx(f1_score(truth, runs[0], average="macro"))
    assert score("quadratic_weighted_kappa", replicas[0], classes) == pytest.approx(
        cohen_kappa_score(truth, runs[0], weights="quadratic"))
    one = bootstrap_interval("balanced_accuracy", replicas[:1], slides, classes, 200)
    assert one == group_bootstrap(lambda rows: metrics.balanced_accuracy(truth[rows], runs[0][rows]), slides, 200,
                                  np.eye(4, dtype=bool)[truth], classes), "balanced accuracy needs every true class"
    both = bootstrap_interval("accuracy", replicas, slides, classes, 200)
    assert both.low < np.mean([accuracy_score(truth, p) for p in runs]) < both.high
    three = np.repeat(np.arange(3), 100).astype(str)
    assert not bootstrap_interval("accuracy", replicas, three, classes, 200).shown, "3 slides: no interval"
    maps_true, maps_pred = rng.integers(0, 3, (5, 8, 8)), rng.integers(0, 3, (5, 8, 8))
    confusion = np.stack([metrics.confusion_matrix(t, p, 3) for t, p in zip(maps_true, maps_pred)])
    scores = overlap_scores(confusion.sum(0), ["x", "y", "z"])
    dice = f1_score(maps_true.ravel(), maps_pred.ravel(), average=None)
    assert [scores[f"dice_{c}"] for c in "xyz"] == pytest.approx(dice)
    assert scores["mean_iou"] == pytest.approx(jaccard_score(maps_true.ravel(), maps_pred.ravel(), average="macro"))
