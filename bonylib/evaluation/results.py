"""The results table of ``bony evaluate``, laid out like the seed's §8: a row per encoder, a column per metric.

Every cell is recomputed from the runs' saved predictions (``*.npz`` beside each metrics JSON), never
from a refit: the mean ± standard deviation of the metric over the runs (seeds, and for several-seed rows
such as random init, every seed of every member), and a percentile bootstrap 95 % interval over the test
slides of the run-averaged metric (:func:`~bonylib.evaluation.benchmarks.common.bootstrap_interval`).
Rows come in the seed's order: our encoders, timm models, Hibou, HistoEncoder, random init, handcrafted;
an encoder that could not be loaded keeps its row, with the reason.

Files (in the evaluation folder): ``results.csv`` (every column, each with mean, std, runs, split, CI
bounds), ``results.md`` (the headline columns, one cell ``mean ± std [CI] n=runs`` each) and
``results_long.csv`` (a line per encoder and column, with the column's metric and headline flag).
Notebooks read those, or one run's record and predictions with :func:`read_run`.
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
from bonylib.evaluation.benchmarks.common import Benchmark, Column, bootstrap_interval
from bonylib.evaluation.metrics import mean_std
from bonylib.files import atomic_path, write_text_atomic

ROW_ORDER = ("bony", "bony-head", "timm", "hibou", "histoencoder", "random", "handcrafted", "scattering")
"""Encoder kinds (the spec's prefix) in the order of the seed's table: ours first, then the published
encoders, then the baselines a learned encoder must beat."""
DECIMALS = {"mse": 4, "psnr": 2}
"""Digits shown per metric (MSE of masks and images is small; PSNR is in dB); others: 3."""


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
    ci_low: float
    ci_high: float
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
          resamples: int) -> Cell:
    """The cell of ``column`` over ``runs`` (records of its head on its splits): mean ± std of the runs' values, and
    the bootstrap interval of the mean over replicas, a replica being one member and seed, its splits' rows pooled."""
    mean, std = mean_std([meta["metrics"][column.metric] for meta, _ in runs])
    replicas: dict[tuple[int, int], list[dict[str, np.ndarray]]] = defaultdict(list)
    for meta, arrays in sorted(runs, key=lambda run: column.splits.index(run[0]["split"])):
        replicas[(meta["member"], meta["seed"])].append(arrays)
    pooled = [{key: np.concatenate([a[key] for a in parts]) for key in parts[0] if not key.startswith("example_")}
              for parts in replicas.values()]
    aligned = all(np.array_equal(p["rows"], pooled[0]["rows"]) for p in pooled)
    low, high = (bootstrap_interval(column.metric, pooled, pooled[0]["groups"], classes, resamples)
                 if aligned else (math.nan, math.nan))
    return Cell(mean, std, len(runs), low, high, "+".join(column.splits))


def summarize(rows: Sequence[Row], benchmarks: Sequence[Benchmark], resamples: int) -> pd.DataFrame:
    """One line per (row, column): the long form of the table, with every number a cell rests on."""
    loaded: dict[tuple[str, str, str], list[tuple[dict[str, Any], dict[str, np.ndarray]]]] = defaultdict(list)
    lines = []
    for row in rows:
        for record in row.records:
            meta, arrays = read_run(record)
            loaded[(row.name, meta["benchmark"], meta["head"])].append((meta, arrays))
        for bench in benchmarks:
            for column in bench.columns:
                runs = [run for run in loaded[(row.name, bench.name, column.head)] if run[0]["split"] in column.splits]
                cell = _cell(column, runs, bench.classes(column.head), resamples) if runs else None
                lines.append({"encoder": row.name, "label": row.label, "column": column.name,
                              "benchmark": bench.name, "head": column.head, "metric": column.metric,
                              "headline": column.headline, "split": "+".join(column.splits),
                              **({"mean": math.nan, "std": math.nan, "runs": 0, "ci_low": math.nan, "ci_high": math.nan}
                                 if cell is None else {k: getattr(cell, k) for k in ("mean", "std", "runs", "ci_low",
                                                                                     "ci_high")}),
                              "note": "; ".join(row.notes)})
    return pd.DataFrame(lines)


def ordered(rows: Sequence[Row]) -> list[Row]:
    """Rows in the seed's order of kinds (:data:`ROW_ORDER`), config order within a kind."""
    return sorted(rows, key=lambda row: ROW_ORDER.index(row.kind) if row.kind in ROW_ORDER else len(ROW_ORDER))


def _number(value: float, metric: str) -> str:
    return f"{value:.{DECIMALS.get(metric, 3)}f}"


def cell_text(line: pd.Series) -> str:
    """``mean ± std [low, high] n=runs`` (std left out for one run, the interval when there is none), or — ."""
    if not line["runs"]:
        return "—"
    metric = line["metric"]
    text = _number(line["mean"], metric)
    if np.isfinite(line["std"]):
        text += f" ± {_number(line['std'], metric)}"
    if np.isfinite(line["ci_low"]):
        text += f" [{_number(line['ci_low'], metric)}, {_number(line['ci_high'], metric)}]"
    return f"{text} n={int(line['runs'])}"


def wide(long: pd.DataFrame) -> pd.DataFrame:
    """The table as the CSV holds it: a row per encoder; per column, its mean, std, runs, split and CI bounds."""
    stats = ("mean", "std", "runs", "split", "ci_low", "ci_high")
    table = long.pivot(index=["encoder", "label", "note"], columns="column", values=list(stats))
    columns = list(dict.fromkeys(long["column"]))
    table = table.reindex(columns=[(stat, column) for column in columns for stat in stats])
    table.columns = [f"{column}: {stat}" for stat, column in table.columns]
    order = list(dict.fromkeys(long["encoder"]))
    return table.reset_index().set_index("encoder").loc[order].reset_index()


def markdown(long: pd.DataFrame) -> str:
    """The headline columns as a markdown table, the split of each column in its header."""
    shown = long[long["headline"]]
    columns = list(dict.fromkeys(shown["column"]))
    header = ["encoder", *columns, "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, group in shown.groupby("encoder", sort=False):
        cells = dict(zip(group["column"], (cell_text(line) for _, line in group.iterrows())))
        first = group.iloc[0]
        note = str(first["note"]).replace("|", "\\|").replace("\n", " ")
        lines.append("| " + " | ".join([first["label"], *(cells[c] for c in columns), note]) + " |")
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
              f"{resamples} resamples, of the run-averaged metric]; the split is in the column header. "
              f"Every column with its numbers apart: {csv.name}.\n\n")
    write_text_atomic(md, "# Results\n\n" + legend + markdown(long))
    return csv, md


LONG_CSV = "results_long.csv"
"""The long form of the table (:func:`summarize`): what the report's figures and comparisons read."""


def read_results(out: Path) -> pd.DataFrame:
    """The long form of the results table that :func:`write_results` left in ``out`` (empty notes as "")."""
    path = Path(out) / LONG_CSV
    try:
        long = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"note": str})
    except FileNotFoundError:
        raise BonyError(f"{path}: no results table (run bony evaluate, which writes it from the saved runs)") from None
    except (OSError, ValueError) as exc:
        raise BonyError(f"{path}: unreadable results table ({exc}); rerun bony evaluate") from None
    missing = {"encoder", "label", "column", "benchmark", "metric", "headline", "mean", "ci_low", "ci_high"} - set(long)
    if missing:
        raise BonyError(f"{path}: not a results table (no column {', '.join(sorted(missing))}); rerun bony evaluate")
    return long.assign(note=long["note"].fillna(""), headline=long["headline"].astype(bool))
