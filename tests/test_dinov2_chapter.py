"""The DINOv2 chapter's verdict (compose.dinov2.against_dino) on a results table made here: each arm's gain over the
DINO arm on the judged columns, in the metric's better direction, against the run-to-run spread and the intervals."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bonylib.compose.dinov2 import ARMS, against_dino
from bonylib.evaluation.results import LONG_CSV


def _line(encoder: str, column: str, benchmark: str, head: str, metric: str, mean: float, std: float, runs: int,
          low: float = math.nan, high: float = math.nan) -> dict:
    return {"encoder": encoder, "label": encoder, "column": column, "benchmark": benchmark, "head": head,
            "metric": metric, "headline": True, "summary": False, "split": "test", "mean": mean, "std": std,
            "runs": runs, "ci_low": low, "ci_high": high, "interval": "", "interval_note": "", "note": ""}


def test_each_arm_is_judged_against_dino_on_the_judged_columns(tmp_path: Path) -> None:
    linear = "PANDA tiles linear bal. acc. (test)"
    knn = "PANDA tiles knn bal. acc. (test)"
    miou = "DeepGleason patch-token classes mIoU (test)"
    lines = [
        _line("dino", linear, "panda", "linear", "balanced_accuracy", 0.30, 0.05, 5),
        _line("dinov2", linear, "panda", "linear", "balanced_accuracy", 0.40, 0.02, 5),        # +0.10 > 0.05
        _line("dino", knn, "panda", "knn", "balanced_accuracy", 0.40, math.nan, 1),
        _line("dinov2", knn, "panda", "knn", "balanced_accuracy", 0.45, math.nan, 1),           # one run: no spread
        _line("dino", miou, "deepgleason", "patch", "mean_iou", 0.26, 0.01, 2, 0.25, 0.27),
        _line("dinov2", miou, "deepgleason", "patch", "mean_iou", 0.30, 0.02, 2, 0.28, 0.32),  # intervals apart
        _line("dino", "PANDA tiles linear accuracy (test)", "panda", "linear", "accuracy", 0.5, 0.1, 5),  # not judged
        _line("dinov2", "PANDA tiles linear accuracy (test)", "panda", "linear", "accuracy", 0.9, 0.1, 5),
    ]
    pd.DataFrame(lines).to_csv(tmp_path / LONG_CSV, index=False)
    arms = tuple(arm for arm in ARMS if arm.name in ("dino", "dinov2"))
    table = against_dino(tmp_path, arms)
    label = arms[1].label
    assert list(table.index) == [(label, linear), (label, knn), (label, miou)]
    row = table.loc[(label, linear)]
    assert math.isclose(row["gain"], 0.10) and row["run-to-run spread"] == 0.05
    assert row["beats DINO beyond the spread"] and not row["intervals apart"]
    row = table.loc[(label, knn)]
    assert math.isclose(row["gain"], 0.05) and math.isnan(row["run-to-run spread"])
    assert not row["beats DINO beyond the spread"]
    row = table.loc[(label, miou)]
    assert math.isclose(row["gain"], 0.04) and row["run-to-run spread"] == 0.02 and row["intervals apart"]
    assert table.columns[0] == arms[0].label


def test_no_judged_column_is_an_empty_table_not_an_error(tmp_path: Path) -> None:
    pd.DataFrame([_line("dino", "x", "sicapv2", "patches", "balanced_accuracy", 0.3, 0.1, 2)]).to_csv(
        tmp_path / LONG_CSV, index=False)
    table = against_dino(tmp_path, ARMS)
    assert table.empty and list(table.index.names) == ["arm", "column"]
