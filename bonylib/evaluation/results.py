"""The results table of ``bony evaluate``, laid out like the seed's §8: a row per encoder, a column per metric.

Every cell is recomputed from the runs' saved predictions (``*.npz`` beside each metrics JSON), never
from a refit: the mean ± standard deviation of the metric over the runs (seeds, and for several-seed rows
such as random init, every seed of every member), and an interval of the run-averaged metric where the test
part supports one (:mod:`bonylib.evaluation.intervals`): a percentile bootstrap 95 % interval over the test
slides, or for a column that pools cross-validation folds the range of the per-fold scores, or else the
reason there is none. Rows come in the seed's order: our encoders, timm models, Hibou, HistoEncoder, random
init, handcrafted; an encoder that could not be loaded keeps its row, with the reason.

Files (in the evaluation folder): ``results.csv`` (every column, each with mean, std, runs, split, interval
bounds, method and missing reason), ``results.md`` (the headline columns, one cell ``mean ± std [CI] n=runs``
each) and ``results_long.csv`` (a line per encoder and column, with the column's metric, headline and summary
flags). Notebooks read those, or one run's record and predictions with :func:`read_run`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonylib.errors import BonyError
from bonylib.evaluation.benchmarks.common import LOWER_IS_BETTER, Benchmark, Column, bootstrap_interval
from bonylib.evaluation.intervals import Interval, fold_range
from bonylib.evaluation.metrics import mean_std
from bonylib.files import atomic_path, write_text_atomic

ROW_ORDER = ("bony", "bony-head", "timm", "hibou", "histoencoder", "random", "handcrafted", "scattering")
"""Encoder kinds (the spec's prefix) in the order of the seed's table: ours first, then the published
encoders, then the baselines a learned encoder must beat."""
DECIMALS = {"psnr": 2}
"""Digits after the point per metric (PSNR is in dB); others: 3, or for an error (MSE of masks and images) scientific
notation when all of a column's values are below :data:`SCIENTIFIC_BELOW` (the seed's 2.934e-06)."""
SCIENTIFIC_BELOW = 0.01
SUMMARY = (("panda", "mlp", "accuracy"), ("deepgleason", "mask", "mse"), ("sicapv2", "reconstruction", "mse"),
           ("isup", "abmil", "quadratic_weighted_kappa"))
"""The one number per benchmark of the results page's first table, in this order: the seed's §8 columns (PANDA tile
accuracy of its MLP, DeepGleason mask MSE, SICAPv2 reconstruction MSE), then PANDA's official slide-level metric. A
benchmark run without that head shows its first headline column instead."""


@dataclass
class Row:
    """One encoder of the table: its config name and label, why some or all of its numbers are missing, and its runs."""

    name: str
    label: str
    kind: str
    notes: list[str] = field(default_factory=list)
    records: list[Path] = field(default_factory=list)
    """Metrics JSON of every run this evaluation expects of the encoder (finished or just written)."""


@dataclass(frozen=True)
class Cell:
    """One number of the table and what it rests on."""

    mean: float
    std: float
    runs: int
    interval: Interval
    split: str


def read_run(record: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A run's metrics JSON and the predictions saved beside it (for plots and recomputation)."""
    record = Path(record)
    try:
        meta = json.loads(record.read_text())
        with np.load(record.with_name(meta["predictions"]), allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
    except (OSError, KeyError, ValueError) as exc:
        raise BonyError(f"{record}: unreadable run record ({exc}); delete it and rerun bony evaluate") from None
    return meta, arrays


def _cell(column: Column, runs: Sequence[tuple[dict[str, Any], dict[str, np.ndarray]]], classes: Sequence[str],
          resamples: int, unit: str) -> Cell:
    """The cell of ``column`` over ``runs`` (records of its head on its splits): mean ± std of the runs' values, and
    the interval of the mean over replicas, a replica being one member and seed, its splits' rows pooled: the
    bootstrap over the pooled test groups where they support it, else, for a column of several folds, the range of
    the per-fold scores (:mod:`bonylib.evaluation.intervals`)."""
    mean, std = mean_std([meta["metrics"][column.metric] for meta, _ in runs])
    replicas: dict[tuple[int, int], list[dict[str, np.ndarray]]] = defaultdict(list)
    for meta, arrays in sorted(runs, key=lambda run: column.splits.index(run[0]["split"])):
        replicas[(meta["member"], meta["seed"])].append(arrays)
    pooled = [{key: np.concatenate([a[key] for a in parts]) for key in parts[0] if not key.startswith("example_")}
              for parts in replicas.values()]
    aligned = all(np.array_equal(p["rows"], pooled[0]["rows"]) for p in pooled)
    interval = (bootstrap_interval(column.metric, pooled, pooled[0]["groups"], classes, resamples, unit) if aligned
                else Interval.missing("runs scored on different rows"))
    if not interval.shown and len(column.splits) > 1:
        per_fold = [np.mean([meta["metrics"][column.metric] for meta, _ in runs if meta["split"] == split])
                    for split in column.splits if any(meta["split"] == split for meta, _ in runs)]
        folds = fold_range(per_fold)
        interval = folds if folds.shown else interval
    return Cell(mean, std, len(runs), interval, "+".join(column.splits))


def _summary_column(bench: Benchmark) -> Column | None:
    """The column of ``bench`` that the results page's first table shows (:data:`SUMMARY`)."""
    wanted = next(((head, metric) for name, head, metric in SUMMARY if name == bench.name), None)
    chosen = [c for c in bench.columns if (c.head, c.metric) == wanted] or [c for c in bench.columns if c.headline]
    return chosen[0] if chosen else None


def summarize(rows: Sequence[Row], benchmarks: Sequence[Benchmark], resamples: int) -> pd.DataFrame:
    """One line per (row, column): the long form of the table, with every number a cell rests on."""
    loaded: dict[tuple[str, str, str], list[tuple[dict[str, Any], dict[str, np.ndarray]]]] = defaultdict(list)
    empty = {"mean": math.nan, "std": math.nan, "runs": 0, "ci_low": math.nan, "ci_high": math.nan, "interval": "",
             "interval_note": ""}
    lines = []
    for row in rows:
        for record in row.records:
            meta, arrays = read_run(record)
            loaded[(row.name, meta["benchmark"], meta["head"])].append((meta, arrays))
        for bench in benchmarks:
            summary = _summary_column(bench)
            for column in bench.columns:
                runs = [run for run in loaded[(row.name, bench.name, column.head)] if run[0]["split"] in column.splits]
                cell = (_cell(column, runs, bench.classes(column.head), resamples, bench.group_unit) if runs
                        else None)
                lines.append({"encoder": row.name, "label": row.label, "column": column.name,
                              "benchmark": bench.name, "head": column.head, "metric": column.metric,
                              "headline": column.headline, "summary": column == summary,
                              "split": "+".join(column.splits),
                              **(empty if cell is None else
                                 {"mean": cell.mean, "std": cell.std, "runs": cell.runs, "ci_low": cell.interval.low,
                                  "ci_high": cell.interval.high, "interval": cell.interval.method,
                                  "interval_note": cell.interval.reason}),
                              "note": "; ".join(row.notes)})
    return pd.DataFrame(lines)


def ordered(rows: Sequence[Row]) -> list[Row]:
    """Rows in the seed's order of kinds (:data:`ROW_ORDER`), config order within a kind."""
    return sorted(rows, key=lambda row: ROW_ORDER.index(row.kind) if row.kind in ROW_ORDER else len(ROW_ORDER))


def number_format(metric: str, values: Sequence[float] | np.ndarray) -> str:
    """The format of a column's numbers, from its metric and the scale of its ``values`` (the means): an error whose
    values are all below :data:`SCIENTIFIC_BELOW` in scientific notation (small MSEs), else fixed digits
    (:data:`DECIMALS`; scores live in [0, 1])."""
    finite = np.abs(np.asarray(values, np.float64))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if metric in LOWER_IS_BETTER and finite.size and finite.max() < SCIENTIFIC_BELOW:
        return ".2e"
    return f".{DECIMALS.get(metric, 3)}f"


def cell_text(line: pd.Series, fmt: str) -> str:
    """``mean ± std [low, high] n=runs``: std left out for one run; the interval as ``[low, high]`` (95 % bootstrap),
    ``[low–high over folds]`` (range of the per-fold scores) or ``(no CI: why)``; — without runs. ``fmt``: the
    column's :func:`number_format`."""
    if not line["runs"]:
        return "—"
    text = format(line["mean"], fmt)
    if np.isfinite(line["std"]):
        text += f" ± {format(line['std'], fmt)}"
    if line["interval"] == "bootstrap":
        text += f" [{format(line['ci_low'], fmt)}, {format(line['ci_high'], fmt)}]"
    elif line["interval"] == "folds":
        text += f" [{format(line['ci_low'], fmt)}–{format(line['ci_high'], fmt)} over folds]"
    text += f" n={int(line['runs'])}"
    if line["interval_note"]:
        text += f" (no CI: {line['interval_note']})"
    return text


def text_table(long: pd.DataFrame) -> pd.DataFrame:
    """Lines of the long form as a table of text cells (:func:`cell_text`, each column in its own format): a row per
    encoder named by its label, a column per results column in their order, and the row's note last."""
    formats = {column: number_format(group["metric"].iloc[0], group["mean"])
               for column, group in long.groupby("column", sort=False)}
    long = long.assign(text=[cell_text(line, formats[line["column"]]) for _, line in long.iterrows()])
    rows, columns = list(dict.fromkeys(long["encoder"])), list(dict.fromkeys(long["column"]))
    table = long.pivot(index="encoder", columns="column", values="text").loc[rows, columns]
    firsts = long.groupby("encoder", sort=False).first().loc[rows]
    table["note"] = firsts["note"]
    table.index = firsts["label"].to_numpy()  # labels name the rows; names (unique) key them
    table.index.name = None
    table.columns.name = None
    return table


def direction(metric: str) -> str:
    """↓ for an error (lower is better), ↑ for a score."""
    return "↓" if metric in LOWER_IS_BETTER else "↑"


def wide(long: pd.DataFrame) -> pd.DataFrame:
    """The table as the CSV holds it: a row per encoder; per column, its mean, std, runs, split and CI bounds."""
    stats = ("mean", "std", "runs", "split", "ci_low", "ci_high", "interval", "interval_note")
    table = long.pivot(index=["encoder", "label", "note"], columns="column", values=list(stats))
    columns = list(dict.fromkeys(long["column"]))
    table = table.reindex(columns=[(stat, column) for column in columns for stat in stats])
    table.columns = [f"{column}: {stat}" for stat, column in table.columns]
    order = list(dict.fromkeys(long["encoder"]))
    return table.reset_index().set_index("encoder").loc[order].reset_index()


def markdown(long: pd.DataFrame) -> str:
    """The headline columns as a markdown table, the split of each column in its header."""
    table = text_table(long[long["headline"]])
    header = ["encoder", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cells in table.iterrows():
        texts = [str(text).replace("|", "\\|").replace("\n", " ") for text in cells]
        lines.append("| " + " | ".join([str(label), *texts]) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: Sequence[Row], benchmarks: Sequence[Benchmark], resamples: int) -> tuple[Path, Path]:
    """Summarize the runs of ``rows`` and write ``results.csv``, ``results.md`` and the long form
    ``results_long.csv`` (what figures read: each column's metric and whether it is a headline) into ``out``,
    each atomically."""
    long = summarize(ordered(rows), benchmarks, resamples)
    csv, md = Path(out) / "results.csv", Path(out) / "results.md"
    with atomic_path(Path(out) / LONG_CSV) as tmp:
        long.to_csv(tmp, index=False)
    with atomic_path(csv) as tmp:
        wide(long).to_csv(tmp, index=False)
    legend = (f"Each cell: mean ± standard deviation over n runs [95 % bootstrap interval over the test slides, "
              f"{resamples} resamples, of the run-averaged metric; or the range of the per-fold scores; or why the "
              f"test part supports no interval]; the split is in the column header. "
              f"Every column with its numbers apart: {csv.name}.\n\n")
    write_text_atomic(md, "# Results\n\n" + legend + markdown(long))
    return csv, md


LONG_CSV = "results_long.csv"
"""The long form of the table (:func:`summarize`): what the report's figures and comparisons read."""


def read_results(out: Path) -> pd.DataFrame:
    """The long form of the results table that :func:`write_results` left in ``out`` (empty notes as "")."""
    path = Path(out) / LONG_CSV
    try:
        long = pd.read_csv(path, keep_default_na=False, na_values=[""],
                           dtype={"note": str, "interval": str, "interval_note": str})
    except FileNotFoundError:
        raise BonyError(f"{path}: no results table (run bony evaluate, which writes it from the saved runs)") from None
    except (OSError, ValueError) as exc:
        raise BonyError(f"{path}: unreadable results table ({exc}); rerun bony evaluate") from None
    missing = {"encoder", "label", "column", "benchmark", "metric", "headline", "summary", "mean", "ci_low", "ci_high",
               "interval", "interval_note"} - set(long)
    if missing:
        raise BonyError(f"{path}: not a results table (no column {', '.join(sorted(missing))}); rerun bony evaluate")
    return long.assign(note=long["note"].fillna(""), interval=long["interval"].fillna(""),
                       interval_note=long["interval_note"].fillna(""), headline=long["headline"].astype(bool),
                       summary=long["summary"].astype(bool))
