"""Figures and tables of a ``bony evaluate`` output folder, for the benchmark chapters of the book.

Everything is read back from the run records (``runs/<benchmark>/<head>/<encoder>/*.json`` and the
predictions beside them) and from ``results.csv``: a chapter draws the learning curves, confusion
matrices, masks and reconstructions of the heads that were fitted, and never fits one itself.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bonylib import plotting
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation.benchmarks.common import LOWER_IS_BETTER
from bonylib.evaluation.results import read_results, read_run, text_table

Run = tuple[dict[str, Any], dict[str, np.ndarray]]


def runs_of(out: Path, benchmark: str, head: str) -> dict[str, list[Run]]:
    """The runs of one head, by row label (table order: as the folders sort), each run's (record, predictions)."""
    folder = Path(out) / "runs" / benchmark / head
    if not folder.is_dir():
        raise BonyError(f"{folder}: no runs of {benchmark}/{head} (run bony evaluate with this benchmark first)")
    found: dict[str, list[Run]] = defaultdict(list)
    for record in sorted(folder.glob("*/*.json")):
        meta, arrays = read_run(record)
        found[meta["label"]].append((meta, arrays))
    return dict(found)


def learning_curves(out: Path, benchmark: str, head: str) -> Figure:
    """Training loss and the validation score the head was early-stopped on, per step, one colour per encoder
    (each run a line); the best step of each run is marked."""
    runs = {label: [(pd.DataFrame(meta["info"]["curve"]), meta["info"]["best_step"]) for meta, _ in group]
            for label, group in runs_of(out, benchmark, head).items()}
    return plotting.learning_curves(runs, f"{benchmark} / {head}: learning curves (dotted: the kept checkpoint)")


def confusion_matrices(out: Path, benchmark: str, head: str) -> Figure:
    """Each encoder's confusion matrix on the test tiles, summed over its runs and normalised per true class."""
    matrices = {}
    for label, group in runs_of(out, benchmark, head).items():
        total = np.sum([np.asarray(meta["info"]["confusion_matrix"], float) for meta, _ in group], axis=0)
        shares = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
        matrices[label] = (shares, group[0][0]["info"]["classes"], len(group))
    return plotting.confusion_matrices(matrices)


def decoded_examples(out: Path, benchmark: str, head: str, count: int = 6) -> Figure:
    """The first run's saved test examples of each encoder: the target in the top row, each encoder's output
    below it (class maps for a class-output decoder, images for a regression one)."""
    runs = runs_of(out, benchmark, head)
    first = {label: group[0][1] for label, group in runs.items()}
    reference = next(iter(first.values()))
    count = min(count, len(reference["example_rows"]))
    for label, arrays in first.items():
        if not np.array_equal(arrays["example_rows"][:count], reference["example_rows"][:count]):
            raise BonyError(f"{out}: the {benchmark}/{head} examples of {label} are other tiles than the first row's")
    classes = next(iter(runs.values()))[0][0]["info"].get("classes", [])
    return plotting.decoded_examples(list(reference["example_true"][:count]),
                                     {label: list(arrays["example_pred"][:count]) for label, arrays in first.items()},
                                     classes)


def results_table(out: Path, benchmark: str | None = None, headline: bool = False) -> pd.DataFrame:
    """The results table as text cells, a row per encoder: ``mean ± std [interval] n=runs`` for every column of
    ``benchmark`` (all when None; only the headline columns of ``results.md`` with ``headline``), each column's numbers
    in its own format (:func:`~bonylib.evaluation.results.text_table`), and the row's note."""
    long = read_results(out)
    if benchmark is not None:
        long = long[long["benchmark"] == benchmark]
    if headline:
        long = long[long["headline"]]
    return text_table(long)


def chapter_evaluation(run_dir: str | Path, config: str | Path, overrides: list[str],
                       benchmarks: tuple[str, ...], encoders: tuple[str, ...] = ()) -> Path | None:
    """Run ``bony evaluate`` for the benchmarks of one chapter that ``config`` names, on the run folder ``run_dir``
    (its ``root``), into ``run_dir/evaluate``; None, said in a line, without a config or when it names none of them
    (the smoke report runs every chapter on data too small to split three ways by slide). ``encoders`` narrows the
    rows to those names (a chapter that compares two of them); every name must be in the config."""
    from bonylib.config import load_config
    from bonylib.evaluation.evaluate import EvaluateConfig, evaluate

    if not config:
        print("no evaluation config given: nothing to show in this chapter")
        return None
    run = Path(run_dir).resolve()
    cfg = load_config(EvaluateConfig, Path(config), [f"root={run}", *overrides])
    mine = [name for name in cfg.benchmarks if name in benchmarks]
    if not mine:
        print(f"{config} names none of {', '.join(benchmarks)}: nothing to show in this chapter")
        return None
    rows = cfg.encoders
    if encoders:
        named = {entry.name: entry for entry in cfg.encoders}
        missing = [name for name in encoders if name not in named]
        if missing:
            raise ConfigError(f"{config}: no encoder named {', '.join(missing)} (it names {', '.join(named)})")
        rows = [named[name] for name in encoders]
    out = run / "evaluate"
    evaluate(dataclasses.replace(cfg, benchmarks=mine, encoders=rows), out)
    return out


@dataclasses.dataclass(frozen=True)
class SlideClasses:
    """One test slide's tiles as class colours over its thumbnail, as a head predicted them and as labelled."""

    slide_id: str
    thumbnail: np.ndarray
    predicted: np.ndarray
    """(h, w, 3) colours in [0, 1] of the predicted classes (:func:`bonylib.plotting.class_colours`), NaN off the tiles"""
    label: np.ndarray
    classes: list[str]
    accuracy: float
    tiles: int
    encoder_label: str


def slide_classes(out: Path, benchmark: str = "panda", head: str = "linear", encoder: str = "dino",
                  slide_id: str | None = None, thumbnail_px: int = 1024) -> SlideClasses:
    """The tiles of one test slide coloured by the class a benchmark head predicted for each and by its label,
    stitched at the tiles' coordinates over the thumbnail (:class:`~bonylib.data.heatmaps.Heatmap`).

    The predictions are those of ``encoder``'s first test run of ``head``, saved by ``bony evaluate``: tiles of
    slides the head never trained on. ``slide_id``: which test slide (default: the one with the most tiles). The
    tiles' sizes and slide files come from the manifest the run recorded, matched to the predictions by tile id
    (a manifest that lost those tiles since is named).
    """
    from bonylib.data.heatmaps import Heatmap, read_thumbnail, thumbnail_size
    from bonylib.data.manifest import read_manifest
    from bonylib.data.slides import open_slide

    found = sorted((Path(out) / "runs" / benchmark / head / encoder).glob("m*-test-*.json"))
    if not found:
        raise BonyError(f"{Path(out) / 'runs' / benchmark / head / encoder}: no test run of {encoder} "
                        f"(run bony evaluate with this encoder and benchmark first)")
    meta, arrays = read_run(found[0])
    manifest_path = Path(meta["settings"]["manifest"])
    manifest, row_id = read_manifest(manifest_path)
    ids = pd.Series(np.arange(len(manifest)), index=row_id)
    slides = pd.Series(arrays["groups"])
    chosen = str(slides.value_counts().index[0]) if slide_id is None else slide_id
    if chosen not in set(slides):
        raise BonyError(f"{found[0]}: slide {chosen!r} is not among its test slides ({', '.join(sorted(set(slides)))})")
    keep = (slides == chosen).to_numpy()
    missing = [tile for tile in arrays["rows"][keep] if tile not in ids.index]
    if missing:
        raise BonyError(f"{manifest_path}: has no tile {missing[0]} of {found[0]} (changed since the run; rerun bony "
                        f"evaluate)")
    rows = manifest.iloc[ids[arrays["rows"][keep]].to_numpy()]
    classes = list(meta["info"]["classes"])
    with open_slide(Path(rows["path"].iloc[0])) as slide:
        thumbnail = read_thumbnail(slide, thumbnail_px)
        size, downsamples = slide.level_dimensions[0], np.asarray(slide.level_downsamples)
    sides = rows["size"].to_numpy(np.float64) * downsamples[rows["level"].to_numpy()]
    maps = {}
    for name, labels in (("predicted", arrays["y_pred"][keep]), ("label", arrays["y_true"][keep])):
        heat = Heatmap(size, thumbnail_size(size, thumbnail_px), len(classes))
        for x, y, side, label in zip(rows["x"], rows["y"], sides, labels):
            heat.add(x, y, side, np.eye(len(classes))[int(label)])
        maps[name] = plotting.class_colours(heat.image(), classes)
    return SlideClasses(chosen, thumbnail, maps["predicted"], maps["label"], classes,
                        float(np.mean(arrays["y_pred"][keep] == arrays["y_true"][keep])), int(keep.sum()),
                        f"{meta['label']}, {head} head")


def predicted_classes(out: Path, benchmark: str = "panda", head: str = "linear", encoder: str = "dino",
                      slide_id: str | None = None, thumbnail_px: int = 1024) -> Figure:
    """:func:`slide_classes` drawn: the predicted classes over the slide (left) beside the tile labels (right)."""
    maps = slide_classes(out, benchmark, head, encoder, slide_id, thumbnail_px)
    titles = (f"{maps.encoder_label}: predicted ({maps.accuracy:.0%} of {maps.tiles} tiles right)",
              f"{maps.slide_id}: tile labels")
    return plotting.heats_side_by_side(maps.thumbnail, list(zip((maps.predicted, maps.label), titles)), maps.classes)


def row_comparison(out: Path, first: str, second: str, headline: bool = True) -> pd.DataFrame:
    """Two rows of the results table (by encoder name) column by column: both means, ``second`` minus ``first``,
    which is better by the metric's direction (errors lower, :data:`LOWER_IS_BETTER`; scores higher), and whether
    their 95 % intervals are apart (a difference inside overlapping intervals is not a finding). ``headline``:
    only the columns of ``results.md``. Columns either row lacks (no patch tokens, not evaluated) are left out."""
    if first == second:
        raise ConfigError(f"compare two different rows, not {first} with itself")
    long = read_results(out)
    if headline:
        long = long[long["headline"]]
    missing = [name for name in (first, second) if name not in set(long["encoder"])]
    if missing:
        raise BonyError(f"{Path(out)}: no row {', '.join(missing)} (rows: {', '.join(dict.fromkeys(long['encoder']))})")
    a, b = (long[long["encoder"] == name].set_index("column") for name in (first, second))
    rows = []
    for column in a.index.intersection(b.index, sort=False):
        x, y = a.loc[column], b.loc[column]
        if pd.isna(x["mean"]) or pd.isna(y["mean"]):
            continue
        difference = float(y["mean"] - x["mean"])
        gain = -difference if x["metric"] in LOWER_IS_BETTER else difference
        rows.append({"column": column, first: float(x["mean"]), second: float(y["mean"]), "difference": difference,
                     "better": second if gain > 0 else first if gain < 0 else "same",
                     "intervals apart": bool(y["ci_low"] > x["ci_high"] or x["ci_low"] > y["ci_high"])})
    return pd.DataFrame(rows).set_index("column")


def comparison_counts(comparison: pd.DataFrame, first: str, second: str) -> str:
    """A :func:`row_comparison` in one line: on how many columns each row is better, and on how many of those
    the intervals are apart (ties counted apart)."""
    apart = comparison["intervals apart"]
    parts = [f"{name} better on {(comparison['better'] == name).sum()} "
             f"({((comparison['better'] == name) & apart).sum()} with the intervals apart)" for name in (second, first)]
    ties = (comparison["better"] == "same").sum()
    return f"of {len(comparison)} columns: " + ", ".join(parts) + (f", {ties} tied" if ties else "")
