"""The seed's §8 as the results page quotes it: every number read again from the report's own text (skipped
without ../shared/report), and the page's rendering of it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bonylib.data.samples import shared_data_dir
from bonylib.evaluation.results_page import PROTOCOL_ROW, PUBLISHED, published_table

NAMES = {"Bony": "Bony (XCiT-M/16, DINO)", "Hibou": "Hibou-B", "Histoencoder": "HistoEncoder"}


def _report_table() -> dict[str, list[float]]:
    """The rows of the report's §8 table ("Récapitulatif des résultats"), parsed from its text: a row is the model's
    name, then an accuracy in percent (maybe in <b>), two MSEs (written 2.934e - 06 or $1.003\\mathrm{e}-06$), '_'
    where the report has none."""
    data = shared_data_dir()
    reports = sorted((data.parent / "report").glob("*.txt")) if data else []
    if not reports:
        pytest.skip("the seed's report (../shared/report) is not on this machine")
    text = reports[0].read_text(encoding="utf-8")
    section = text[text.index("Récapitulatif des résultats"):]
    rows = {}
    for name in NAMES:
        line = next(line for line in section.splitlines() if line.startswith(name + "\t"))
        cells = line.split("\t")[1:4]
        values = []
        for cell in cells:
            cell = re.sub(r"</?b>|\$|%|\s", "", cell.replace("\\mathrm{e}", "e"))
            values.append(float("nan") if cell == "_" else float(cell))
        values[0] /= 100
        rows[name] = values
    return rows


def test_the_published_rows_are_the_reports_numbers() -> None:
    table = _report_table()
    assert set(PUBLISHED) == set(NAMES.values())
    for name, values in table.items():
        np.testing.assert_allclose(PUBLISHED[NAMES[name]], values, rtol=0, atol=1e-12, equal_nan=True)


def test_the_published_table_prints_as_the_report_does() -> None:
    table = published_table()
    assert list(table.index) == [*PUBLISHED, PROTOCOL_ROW]
    protocols = table.loc[PROTOCOL_ROW].tolist()
    assert protocols[0].endswith("test accuracy") and all(p.endswith("validation MSE") for p in protocols[1:])
    assert "7192" in protocols[0] and "code / 255" in protocols[1] and "σ not stated" in protocols[2]
    assert table.loc["Bony (XCiT-M/16, DINO)"].tolist() == ["81.2 %", "2.934e-06", "0.0008"]
    assert table.loc["Hibou-B"].tolist() == ["83.1 %", "1.455e-06", "0.1"]
    assert table.loc["HistoEncoder"].iloc[2] == "not run in the report"
