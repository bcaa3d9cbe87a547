"""The results chapter for a reader: the answer first, the detail after.

The seed's §8 is three columns, one number per benchmark; ``results.md`` has a column per metric, two dozen
of them, too wide to read on a page. The chapter shows, in this order: :func:`summary_table` (one metric per
benchmark, the seed's columns first, :data:`~bonylib.evaluation.results.SUMMARY`), :func:`interval_figure`
(every encoder on those metrics as a dot and its interval's whisker), and every column of each benchmark
(:func:`benchmark_tables`), with the seed's own §8 beside the first as a reference (:func:`published_table`),
marked as published and not rerun. Tables go to the page as HTML (:func:`table_html`), which
the book renders as tables whatever its markdown settings (a markdown output rendered as one paragraph of pipes).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bonylib import plotting
from bonylib.evaluation.benchmarks import BENCHMARKS
from bonylib.evaluation.figures import results_table
from bonylib.evaluation.results import SUMMARY, direction, number_format, read_results, text_table

RESULTS_TABLE_ID = "results-table"
"""The HTML id of the summary table (the browser test finds it by this id)."""
PUBLISHED = {
    "Bony (XCiT-M/16, DINO)": (0.812, 2.934e-06, 0.0008),
    "Hibou-B": (0.831, 1.455e-06, 0.10),
    "HistoEncoder": (0.816, 1.003e-06, float("nan")),
}
"""The seed report's §8 as printed: PANDA test-subset accuracy, DeepGleason MSE and SICAPv2 MSE per model (the
report did not run HistoEncoder on SICAPv2). Numbers on the real datasets under the report's own protocols
(:data:`PUBLISHED_PROTOCOLS`), so a reference for the seed's columns, not a row to rank this run's encoders against."""
PUBLISHED_COLUMNS = ("PANDA test subset accuracy ↑", "DeepGleason MSE ↓", "SICAPv2 MSE ↓")
PUBLISHED_PROTOCOLS = (
    "5 classes (background, benign, G3, G4, G5); MLP 4096 → 7192 → 2048 → 512 → 128 → 5 on the 4096-d DINO head "
    "output, a fixed number of epochs; split 0.8 / 0.1 / 0.1; test accuracy",
    "Linear → 256·7·7, five ConvTranspose2d (kernel 3, stride 2) with BatchNorm + ReLU, sigmoid, on the 4096-d output; "
    "MSE against the mask read as an 8-bit image (code / 255); split 0.8 / 0.1 / 0.1; validation MSE",
    "the same decoder, RGB, against the 224-px tile Gaussian-blurred (σ not stated); split 0.8 / 0.1 / 0.1; "
    "validation MSE",
)
"""How the report obtained each column (§7), as configs/evaluate/seed.yaml reproduces it."""
PROTOCOL_ROW = "protocol (configs/evaluate/seed.yaml)"


def _summary_lines(out: Path) -> pd.DataFrame:
    """The long-form lines of the summary columns, benchmarks in :data:`SUMMARY` order, encoders in table order."""
    long = read_results(out)
    long = long[long["summary"]]
    rank = {name: i for i, (name, _, _) in enumerate(SUMMARY)}
    return long.sort_values("benchmark", key=lambda names: names.map(lambda n: rank.get(n, len(rank))), kind="stable")


def summary_table(out: Path) -> pd.DataFrame:
    """One metric per benchmark, a row per encoder, as text cells (``mean ± std [interval] n=runs``), each header
    with its direction (↑ a score, ↓ an error), and the row's note."""
    lines = _summary_lines(out)
    return text_table(lines.assign(column=[f"{c} {direction(m)}" for c, m in zip(lines["column"], lines["metric"])]))


def published_table() -> pd.DataFrame:
    """:data:`PUBLISHED` as the report prints it (accuracy in percent, errors to four significant digits), its
    missing cell said to be missing, and a last row naming each column's protocol."""
    def cell(column: int, value: float) -> str:
        if not np.isfinite(value):
            return "not run in the report"
        return f"{100 * value:.1f} %" if column == 0 else f"{value:.4g}"

    rows = {name: [cell(i, v) for i, v in enumerate(values)] for name, values in PUBLISHED.items()}
    return pd.DataFrame({**rows, PROTOCOL_ROW: list(PUBLISHED_PROTOCOLS)}, index=list(PUBLISHED_COLUMNS)).T


def benchmark_tables(out: Path) -> list[tuple[str, pd.DataFrame]]:
    """Every column of each benchmark in the results, as text cells (a row per encoder), with the benchmark's title."""
    return [(BENCHMARKS[name].title if name in BENCHMARKS else name, results_table(out, name))
            for name in dict.fromkeys(read_results(out)["benchmark"])]


def table_html(table: pd.DataFrame, caption: str = "", table_id: str = "") -> str:
    """``table`` as an HTML ``<table>`` (row labels as header cells, text escaped), with a caption above it and an
    id, in a block that scrolls sideways when the table is wider than the page (a benchmark's every column)."""
    text = table.to_html(table_id=table_id or None, classes=["bony-results"], border=0, escape=True, na_rep="")
    if caption:
        head, _, rest = text.partition(">")
        text = (f'{head}><caption style="caption-side: top; text-align: left; font-weight: bold">'
                f"{html.escape(caption)}</caption>{rest}")
    return f'<div style="overflow-x: auto">{text}</div>'


def _shared_reason(cells: pd.DataFrame) -> str:
    """The one reason every cell without an interval gives (the same test part for every encoder), or ""."""
    reasons = set(cells.loc[np.isfinite(cells["mean"]) & (cells["interval"] == ""), "interval_note"])
    return reasons.pop() if len(reasons) == 1 else ""


def interval_figure(out: Path) -> Figure:
    """Every encoder on the summary metrics: the mean over runs as a dot, its interval as a whisker (solid: the 95 %
    bootstrap over test slides; dashed: the range over folds); a cell without an interval shows its dot hollow and
    why (once, under the panel's title, when every such cell gives the same reason), and an encoder not evaluated says
    so (:func:`bonylib.plotting.interval_dots`)."""
    lines = _summary_lines(out)
    titles, formats, shared = {}, {}, {}
    for column, cells in lines.groupby("column", sort=False):
        metric = cells["metric"].iloc[0]
        titles[column] = f"{column} {direction(metric)}"
        formats[column] = number_format(metric, cells["mean"])
        shared[column] = _shared_reason(cells)
    return plotting.interval_dots(lines, titles, formats, shared)
