"""``bony evaluate`` end to end on smoke data with tiny encoders: run records and the results table recompute from the
saved predictions, a rerun skips finished runs and reuses the embeddings, an encoder without weights keeps a row that
says why, and hostile configs stop before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion

from bonylib.cli import main
from bonylib.config import load_config
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import evaluate as evaluate_module
from bonylib.models.registry import encoder_from_spec
from bonylib.models.encoders import Encoder
from bonylib.evaluation.evaluate import EvaluateConfig, evaluate, rooted
from bonylib.models.loaders import handcrafted
from bonylib.evaluation.results import read_run
from tests.test_benchmarks import bench_data

ARCH = "xcit_nano_12_p16_224"
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning",
                                        "ignore:A single label was found:UserWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, smoke_data: Path, repo: Path) -> dict[str, Path]:
    return bench_data(tmp_path_factory.getbasetemp() / "bench-data", smoke_data, repo)


def config_text(data: dict[str, Path]) -> dict:
    """Every benchmark at toy size: XCiT-nano at 32 px (2 x 2 patch tokens), 14-px decoders, a few steps."""
    probe = {"max_steps": 20, "eval_every": 5, "patience": 2, "mlp_hidden": [16], "batch_size": 32}
    decoder = {"out_size": 14, "width": 8, "max_epochs": 3, "patience": 2, "batch_size": 16, "examples": 2}
    return {
        "encoders": [
            {"name": "rnd", "label": "random init", "specs": [f"random:{ARCH}:0", f"random:{ARCH}:1"],
             "input_size": 32},
            {"name": "gone", "label": "ours, never trained", "specs": ["bony:/nonexistent/run"]},
            {"name": "hand", "specs": ["handcrafted"], "input_size": 32},
        ],
        "benchmarks": ["panda", "deepgleason", "sicapv2", "isup"],
        "bootstrap": 50,
        "embed": {"batch_size": 32, "device": "cpu", "workers": 0, "precision": "fp32"},
        "panda": {"manifest": str(data["panda"]), "data": str(data["panda-data"]), "fractions": [0.5, 0.25, 0.25],
                  "runs": 2, "probe": dict(probe)},
        "deepgleason": {"manifest": str(data["deepgleason"]), "data": str(data["deepgleason-data"]), "runs": 1,
                        "decoder": decoder},
        "sicapv2": {"manifest": str(data["sicapv2"]), "data": str(data["sicapv2-data"]), "runs": 1,
                    "partitions": ["Test", "Val1", "Val2"], "val_fraction": 0.34, "blur_sigma": 1.0, "probe": probe,
                    "decoder": decoder},
        "isup": {"manifest": str(data["panda"]), "data": str(data["panda-data"]), "fractions": [0.5, 0.25, 0.25],
                 "runs": 2, "max_epochs": 3},
    }


def write_config(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def with_handcrafted(spec: str) -> Encoder:
    """``encoder_from_spec`` plus ``handcrafted`` (no patch tokens), whatever specs this version's table reads."""
    return handcrafted() if spec == "handcrafted" else encoder_from_spec(spec)


@pytest.fixture(scope="module", autouse=True)
def specs_with_handcrafted() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "encoder_from_spec", with_handcrafted)
        yield


@pytest.fixture(scope="module")
def run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One evaluation of the toy config: (its config file, its output folder)."""
    folder = tmp_path_factory.mktemp("evaluate")
    config = write_config(folder / "toy.yaml", config_text(data))
    evaluate(load_config(EvaluateConfig, config), folder / "out")
    return config, folder / "out"


def records(out: Path) -> list[Path]:
    return sorted((out / "runs").rglob("*.json"))


def test_every_benchmark_head_and_run_has_a_record(run: tuple[Path, Path]) -> None:
    _, out = run
    found = {str(p.relative_to(out / "runs")) for p in records(out) if p.parts[-2] == "rnd"}
    expected = {f"panda/{h}/rnd/m{m}-test-s{s}.json" for h in ("mlp", "linear") for m in (0, 1) for s in (0, 1)}
    expected |= {f"panda/knn/rnd/m{m}-test-s0.json" for m in (0, 1)}
    expected |= {f"deepgleason/{h}/rnd/m{m}-test-s0.json" for h in ("mask", "classes", "patch") for m in (0, 1)}
    expected |= {f"sicapv2/reconstruction/rnd/m{m}-test-s0.json" for m in (0, 1)}
    expected |= {f"sicapv2/patches/rnd/m{m}-{p}-s0.json" for p in ("Test", "Val1", "Val2") for m in (0, 1)}
    expected |= {f"isup/abmil/rnd/m{m}-test-s{s}.json" for m in (0, 1) for s in (0, 1)}
    assert found == expected
    meta = json.loads((out / "runs/panda/linear/rnd/m1-test-s0.json").read_text())
    assert meta["encoder_identity"] == {"kind": "random-init", "backbone": ARCH, "seed": 1}
    assert meta["settings"]["probe"]["max_steps"] == 20 and meta["split"] == "test"
    assert meta["info"]["curve"] and meta["info"]["curve"][0]["step"] == 5
    handcrafted_heads = {p.parts[-3] for p in records(out) if p.parts[-2] == "hand"}
    assert "patch" not in handcrafted_heads and {"mask", "classes", "linear", "abmil"} <= handcrafted_heads


def test_run_metrics_recompute_from_saved_predictions(run: tuple[Path, Path]) -> None:
    _, out = run
    for record in records(out):
        meta, arrays = read_run(record)
        scores, classes = meta["metrics"], meta["info"].get("classes", [])
        if "y_pred" in arrays:
            truth, predicted = arrays["y_true"], arrays["y_pred"]
            by_sklearn = {"balanced_accuracy": balanced_accuracy_score(truth, predicted),
                          "accuracy": accuracy_score(truth, predicted),
                          "macro_f1": f1_score(truth, predicted, average="macro")}
            if len(set(truth) | set(predicted)) > 1:
                by_sklearn["quadratic_weighted_kappa"] = cohen_kappa_score(truth, predicted, weights="quadratic",
                                                                           labels=range(len(classes)))
            for name in set(scores) & set(by_sklearn):
                assert scores[name] == pytest.approx(by_sklearn[name]), (record, name)
            assert np.array_equal(meta["info"]["confusion_matrix"],
                                  sk_confusion(truth, predicted, labels=range(len(classes))))
        if "mse" in arrays:
            assert scores["mse"] == pytest.approx(arrays["mse"].mean())
        if "confusion" in arrays:
            pixels = arrays["confusion"].sum(0)
            both = pixels.sum(0) + pixels.sum(1)
            dice = 2 * np.diag(pixels)[both > 0] / both[both > 0]  # classes in neither have no Dice
            assert scores["mean_dice"] == pytest.approx(dice.mean())
        low, high = meta["ci95"][next(iter(scores))]
        assert (np.isnan(low) and np.isnan(high)) or low <= high
        assert len(arrays["rows"]) == len(arrays["groups"]) == meta["info"]["n_test"]


def test_results_table_is_the_mean_of_the_runs_with_the_missing_encoder_explained(run: tuple[Path, Path]) -> None:
    _, out = run
    table = pd.read_csv(out / "results.csv").set_index("encoder")
    assert list(table.index) == ["gone", "rnd", "hand"]  # ours, random init, handcrafted: the seed's order
    assert table.loc["hand", "note"] == "no patch tokens: deepgleason patch not run"
    assert np.isnan(table.loc["hand", "DeepGleason patch-token classes mIoU (test): mean"])
    column = "PANDA tiles linear accuracy (test)"
    values = [json.loads(p.read_text())["metrics"]["accuracy"] for p in (out / "runs/panda/linear/rnd").glob("*.json")]
    assert table.loc["rnd", f"{column}: mean"] == pytest.approx(np.mean(values))
    assert table.loc["rnd", f"{column}: std"] == pytest.approx(np.std(values, ddof=1))
    assert table.loc["rnd", f"{column}: runs"] == 4 and table.loc["rnd", f"{column}: split"] == "test"
    low, high = table.loc["rnd", f"{column}: ci_low"], table.loc["rnd", f"{column}: ci_high"]
    assert np.isnan(low) and np.isnan(high), "one test slide supports no interval"
    assert table.loc["rnd", f"{column}: interval_note"] == "1 test slide, 10 needed"
    folds = "SICAPv2 patches bal. acc. (Val1-Val2 pooled)"
    assert table.loc["rnd", f"{folds}: runs"] == 4 and table.loc["rnd", f"{folds}: split"] == "Val1+Val2"
    assert table.loc["rnd", f"{folds}: interval_note"].endswith("test patients, 10 needed"), "two folds: no range either"
    assert "/nonexistent/run: no exported encoder" in table.loc["gone", "note"]
    assert np.isnan(table.loc["gone", f"{column}: mean"])
    markdown = (out / "results.md").read_text()
    assert "| random init (2 seeds) |" in markdown and "| ours, never trained |" in markdown
    assert f"| {column} |" in markdown and " n=4 (no CI: " in markdown and "Dice benign" not in markdown

    from bonylib.evaluation.figures import results_table

    shown = results_table(out, "panda", headline=True)  # the chapters' table: results.md's columns, as text
    assert list(shown.index) == ["ours, never trained", "random init (2 seeds)", "hand"]  # a label, else the name
    assert list(shown.columns)[:-1] == [c for c in re.findall(r"\| (PANDA tiles [^|]+?) (?=\|)", markdown.splitlines()[4])]
    assert shown.loc["random init (2 seeds)", column] == (f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} n=4 "
                                                          f"(no CI: 1 test slide, 10 needed)")
    assert shown.loc["ours, never trained", column] == "—" and "no exported encoder" in shown.iloc[0]["note"]
    assert "PANDA tiles mlp macro-F1 (test)" in results_table(out, "panda").columns


def test_rerun_skips_finished_runs_and_reuses_embeddings(run: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config, out = run
    def stamps() -> dict[Path, int]:
        files = [*records(out), *(out / "embeddings").rglob("*.npy")]
        return {p: p.stat().st_mtime_ns for p in files}
    before = stamps()
    assert main(["evaluate", "--config", str(config), "--out", str(out)]) == 3  # "gone" is not evaluated: it says so
    captured = capsys.readouterr()
    assert "| random init (2 seeds) |" in captured.out
    assert "1 of 3 encoders not evaluated (gone)" in captured.err
    assert stamps() == before
    content = yaml.safe_load(config.read_text())
    content["panda"]["probe"]["max_steps"] = 15
    evaluate(load_config(EvaluateConfig, write_config(tmp_path / "changed.yaml", content)), out)
    after = stamps()
    redone = {p for p in after if after[p] != before.get(p)}
    assert redone == {p for p in records(out) if p.parts[-4] == "panda" and p.parts[-3] in ("mlp", "linear")} != set()


@pytest.mark.parametrize("change, problem", [
    ({"encoders": [{"name": "../escape", "specs": [f"random:{ARCH}:0"]}]}, "not a plain folder name"),
    ({"encoders": [{"name": "a/b", "specs": [f"random:{ARCH}:0"]}]}, "not a plain folder name"),
    ({"encoders": [{"name": ".hidden", "specs": [f"random:{ARCH}:0"]}]}, "not a plain folder name"),
    ({"encoders": [{"name": "x", "specs": ["a"]}, {"name": "x", "specs": ["b"]}]}, "used twice"),
    ({"benchmarks": ["panda", "camelyon"]}, "unknown benchmark 'camelyon'"),
    ({"encoders": [{"name": "x", "specs": ["nope:weights.pt"]}]}, "unknown kind 'nope'"),
])
def test_hostile_configs_stop_before_anything_is_written(data: dict[str, Path], tmp_path: Path, change: dict,
                                                          problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "bad.yaml", {**config_text(data), **change})
    out = tmp_path / "out"
    assert main(["evaluate", "--config", str(config), "--out", str(out)]) == 2
    assert problem in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError, match="manifest and isup.data must be set"):
        load_config(EvaluateConfig, None, [f"encoders=[{{name: a, specs: ['random:{ARCH}:0']}}]", "benchmarks=[isup]"])


def test_relative_paths_are_taken_from_root() -> None:
    """The chapters point one config at their run folder: manifests, data and weights move with root."""
    cfg = rooted(load_config(EvaluateConfig, Path(__file__).parents[1] / "configs/evaluate/demo.yaml", ["root=/runs/x"]))
    assert cfg.panda.manifest == "/runs/x/tiles/panda/manifest.parquet" and cfg.sicapv2.data == "/runs/x/data/sicapv2"
    specs = {entry.name: entry.specs for entry in cfg.encoders}
    assert specs["dino"] == ["bony:/runs/x/pretrain"] and specs["random"][0] == "random:xcit_nano_12_p16_224:0"
    assert specs["histoencoder"] == ["histoencoder:prostate_small:/runs/x/weights/histoencoder/prostate_small.pth"]


def test_a_chapter_narrows_the_config_to_its_benchmarks_and_named_rows(run: tuple[Path, Path], tmp_path: Path) -> None:
    """The wavelet chapter compares two rows of the report's config: only those are evaluated and tabled, and a
    name the config lacks stops the chapter before anything is written."""
    from bonylib.evaluation.figures import chapter_evaluation

    config, _ = run
    with pytest.raises(ConfigError, match="no encoder named nope"):
        chapter_evaluation(tmp_path / "chapter", config, [], ("panda",), ("hand", "nope"))
    assert not (tmp_path / "chapter").exists()
    out = chapter_evaluation(tmp_path / "chapter", config, [], ("panda", "not-in-config"), ("hand",))
    assert out == tmp_path / "chapter" / "evaluate"
    table = pd.read_csv(out / "results.csv")
    assert table["encoder"].tolist() == ["hand"]
    assert {p.parts[-4] for p in records(out)} == {"panda"} and {p.parts[-2] for p in records(out)} == {"hand"}


def test_a_test_slide_coloured_by_the_predicted_class_of_each_tile(run: tuple[Path, Path]) -> None:
    """Each tile's colour at its centre, found here from the tile id's coordinates, is its predicted class's (and
    its label's on the other map); a slide or an encoder the runs do not have is named."""
    from bonylib import plotting
    from bonylib.data.slides import open_slide
    from bonylib.evaluation.figures import predicted_classes, slide_classes

    _, out = run
    maps = slide_classes(out, "panda", "linear", "hand", thumbnail_px=256)
    meta, arrays = read_run(sorted((out / "runs" / "panda" / "linear" / "hand").glob("m*-test-*.json"))[0])
    manifest = pd.read_parquet(meta["settings"]["manifest"]).set_index("slide_id")
    keep = arrays["groups"] == maps.slide_id
    assert maps.tiles == keep.sum() > 0 and maps.classes == meta["info"]["classes"]
    with open_slide(Path(manifest.loc[maps.slide_id, "path"].iloc[0])) as slide:
        width, height = slide.level_dimensions[0]
        downsamples = slide.level_downsamples
    scale_x, scale_y = maps.thumbnail.shape[1] / width, maps.thumbnail.shape[0] / height
    side = int(manifest.loc[maps.slide_id, "size"].iloc[0])
    for tile, predicted, label in zip(arrays["rows"][keep], arrays["y_pred"][keep], arrays["y_true"][keep]):
        _, level, x, y = tile.split(":")
        extent = side * downsamples[int(level)]
        row, col = int((int(y) + extent / 2) * scale_y), int((int(x) + extent / 2) * scale_x)
        for colours, cls in ((maps.predicted, predicted), (maps.label, label)):
            expected = np.asarray(plotting.CLASS_COLOURS[maps.classes[int(cls)]]) / 255
            np.testing.assert_allclose(colours[row, col], expected, atol=1e-6)
    assert np.isclose(maps.accuracy, np.mean(arrays["y_pred"][keep] == arrays["y_true"][keep]))
    assert len(predicted_classes(out, "panda", "linear", "hand", thumbnail_px=256).axes) == 2
    with pytest.raises(BonyError, match="is not among its test slides"):
        slide_classes(out, "panda", "linear", "hand", slide_id="../../etc")
    with pytest.raises(BonyError, match="no test run of nobody"):
        slide_classes(out, "panda", "linear", "nobody")


def test_two_rows_compared_metric_by_metric(run: tuple[Path, Path]) -> None:
    """Means and difference from results.csv, the better row by each metric's direction (errors lower: the MSE
    columns; scores higher), the intervals apart only when one's low end is above the other's high end."""
    from bonylib.evaluation.figures import comparison_counts, row_comparison

    _, out = run
    table = pd.read_csv(out / "results.csv").set_index("encoder")
    compared = row_comparison(out, "rnd", "hand", headline=False)
    assert len(compared) > 5 and not compared.index.str.contains("patch-token").any(), "hand has no patch tokens"
    errors = {"DeepGleason mask MSE (test)", "SICAPv2 reconstruction MSE (test)"}
    assert errors <= set(compared.index) and "SICAPv2 reconstruction PSNR (dB) (test)" in compared.index
    for column, line in compared.iterrows():
        a, b = table.loc["rnd", f"{column}: mean"], table.loc["hand", f"{column}: mean"]
        assert (line["rnd"], line["hand"]) == (a, b) and np.isclose(line["difference"], b - a)
        gain = (a - b) if column in errors else (b - a)
        assert line["better"] == ("hand" if gain > 0 else "rnd" if gain < 0 else "same"), column
        low_a, high_a = table.loc["rnd", f"{column}: ci_low"], table.loc["rnd", f"{column}: ci_high"]
        low_b, high_b = table.loc["hand", f"{column}: ci_low"], table.loc["hand", f"{column}: ci_high"]
        assert line["intervals apart"] == (max(low_a, low_b) > min(high_a, high_b)), column
    headline = row_comparison(out, "rnd", "hand")
    header = (out / "results.md").read_text().splitlines()[4]  # the columns results.md shows
    assert set(headline.index) == {c for c in compared.index if f"| {c} |" in header} < set(compared.index)
    wins = (compared["better"] == "hand").sum()
    assert comparison_counts(compared, "rnd", "hand").startswith(f"of {len(compared)} columns: hand better on {wins} (")
    with pytest.raises(BonyError, match="no row gone2"):
        row_comparison(out, "rnd", "gone2")
    with pytest.raises(ConfigError, match="not rnd with itself"):
        row_comparison(out, "rnd", "rnd")


def test_results_page_puts_one_number_per_benchmark_first(run: tuple[Path, Path]) -> None:
    """The results chapter's first table: the seed's three columns, then slide ISUP, a row per encoder; small errors in
    scientific notation; the table as HTML with one body row per encoder; the figure has a panel per benchmark."""
    from bonylib.evaluation.results_page import RESULTS_TABLE_ID, interval_figure, summary_table, table_html

    _, out = run
    table = summary_table(out)
    assert list(table.columns) == ["PANDA tiles mlp accuracy (test) ↑", "DeepGleason mask MSE (test) ↓",
                                   "SICAPv2 reconstruction MSE (test) ↓", "PANDA slides ISUP ABMIL QWK (test) ↑", "note"]
    assert list(table.index) == ["ours, never trained", "random init (2 seeds)", "hand"]
    mse = {name: np.mean([json.loads(p.read_text())["metrics"]["mse"]
                          for p in (out / "runs/deepgleason/mask" / name).glob("*.json")]) for name in ("rnd", "hand")}
    shown = table["DeepGleason mask MSE (test) ↓"]
    for name, label in (("rnd", "random init (2 seeds)"), ("hand", "hand")):
        expected = f"{mse[name]:.2e}" if max(mse.values()) < 0.01 else f"{mse[name]:.3f}"
        assert shown[label].startswith(expected + " "), (shown[label], mse)
    assert shown["ours, never trained"] == "—"
    page = table_html(table, "Results", RESULTS_TABLE_ID)
    assert page.startswith(f'<div style="overflow-x: auto"><table class="dataframe bony-results" '
                           f'id="{RESULTS_TABLE_ID}"><caption style=')
    assert ">Results</caption>" in page
    body = page.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == 3 and "&lt;" not in page.replace("&lt;script", "")
    figure = interval_figure(out)
    assert len(figure.axes) == 4
    assert figure.axes[0].get_title().endswith("\nno CI: 1 test slide, 10 needed"), "the test part's one reason, once"
