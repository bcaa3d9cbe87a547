"""SICAPv2's own label tables, read one way for tiling and for the benchmark.

SICAPv2 (Silva-Rodríguez et al. 2020) labels its patches in spreadsheets, not only in masks:

- ``partition/Test/{Train,Test}.xlsx`` and ``partition/Validation/Val<k>/{Train,Test}.xlsx``: one row per
  patch, ``image_name`` and one-hot ``NC, G3, G4, G5`` (its readme: the class of a cancerous patch is the
  majority vote of its annotations), split by patient. The ``Test`` partition's two sheets list every
  labelled patch once; the ``Val<k>`` folds re-split its training patients.
- ``wsi_labels.xlsx``: each slide's patient and Gleason score (``Gleason_primary``, ``Gleason_secondary``;
  ``0, 0`` for a non-cancerous slide).
- A patch's file name starts with its slide: ``16B0001851_Block_Region_1_0_0_xini_6803_yini_59786.jpg``.

The tables are input: a sheet that is not a workbook, lacks a column or holds a class that is not one-hot
raises one :class:`~bonylib.errors.BonyError` naming the file (and row). Names and ids read here are only
ever looked up or stored as values, never used to name a file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from bonylib.errors import BonyError

PATCH_CLASSES: tuple[str, ...] = ("NC", "G3", "G4", "G5")
"""The one-hot class columns of the partition spreadsheets, in grade order."""
TILE_LABELS: dict[str, str] = {"NC": "benign", "G3": "G3", "G4": "G4", "G5": "G5"}
"""Each spreadsheet class in the manifest's ``label_name`` vocabulary (NC: non-cancerous tissue)."""
SLIDE_COLUMNS = ("slide_id", "patient_id", "Gleason_primary", "Gleason_secondary")
_PATCH_NAME = re.compile(r"(?P<slide>.+?)_Block_Region_")


def slide_of(name: str) -> str:
    """The slide a SICAPv2 patch was cut from, from its file name (with or without ``.jpg``); "" if the name does
    not follow SICAPv2's pattern."""
    match = _PATCH_NAME.match(name)
    return match["slide"] if match else ""


def partition_folder(root: Path, partition: str) -> Path:
    """The folder of an official partition: ``Test`` or a validation fold ``Val<k>``."""
    return Path(root) / "partition" / ("Test" if partition == "Test" else f"Validation/{partition}")


def _workbook(path: Path) -> pd.DataFrame:
    try:
        return pd.read_excel(path)
    except FileNotFoundError:
        raise BonyError(f"{path}: not found") from None
    except Exception as exc:  # noqa: BLE001 - openpyxl and zipfile raise many kinds for a broken workbook
        raise BonyError(f"{path}: not a readable spreadsheet ({type(exc).__name__}: {exc})") from None


def read_sheet(path: Path) -> pd.DataFrame:
    """One partition spreadsheet: ``image_name`` (as written, with ``.jpg``), ``label`` (index in
    :data:`PATCH_CLASSES`) and ``cribriform`` (SICAPv2's ``G4C`` flag of a G4 patch; False where the sheet has no such
    column) of each of its patches."""
    table = _workbook(Path(path))
    if "image_name" not in table:
        raise BonyError(f"{path}: no image_name column (has {list(table.columns)})")
    missing = set(PATCH_CLASSES) - set(table.columns)
    if missing:
        raise BonyError(f"{path}: missing columns {sorted(missing)}")
    onehot = table[list(PATCH_CLASSES)].apply(pd.to_numeric, errors="coerce").fillna(-1).to_numpy()
    bad = np.flatnonzero(((onehot != 0) & (onehot != 1)).any(1) | (onehot.sum(1) != 1))
    if len(bad):
        raise BonyError(f"{path} row {bad[0] + 2}: {', '.join(PATCH_CLASSES)} is not one-hot")
    cribriform = pd.to_numeric(table["G4C"], errors="coerce").fillna(0).to_numpy() == 1 if "G4C" in table else False
    return pd.DataFrame({"image_name": table["image_name"].astype(str), "label": onehot.argmax(1),
                         "cribriform": cribriform})


def gleason_text(primary: int, secondary: int) -> str:
    """A slide's Gleason score as text: ``4+3``, or ``benign`` for SICAPv2's ``0, 0``."""
    return "benign" if primary == 0 else f"{primary}+{secondary}"


def read_slide_labels(root: Path) -> pd.DataFrame:
    """``wsi_labels.xlsx``: each slide's ``patient`` (text), ``primary`` and ``secondary`` Gleason pattern (0 for a
    non-cancerous slide), indexed by slide id. A slide listed twice, or a score that is not ``0, 0`` or two
    patterns of 3-5, is refused naming the row."""
    path = Path(root) / "wsi_labels.xlsx"
    table = _workbook(path)
    missing = set(SLIDE_COLUMNS) - set(table.columns)
    if missing:
        raise BonyError(f"{path}: missing columns {sorted(missing)} (has {list(table.columns)})")
    grades = table[["Gleason_primary", "Gleason_secondary"]].apply(pd.to_numeric, errors="coerce").to_numpy()
    benign = (grades == 0).all(1)
    graded = np.isin(grades, (3, 4, 5)).all(1)
    unnamed = table["slide_id"].isna().to_numpy() | table["patient_id"].isna().to_numpy()
    bad = np.flatnonzero(~(benign | graded) | unnamed)
    if len(bad):
        row = table.iloc[bad[0]]
        raise BonyError(f"{path} row {bad[0] + 2}: slide {row['slide_id']!r}, patient {row['patient_id']!r}, Gleason "
                        f"{row['Gleason_primary']!r}+{row['Gleason_secondary']!r} is not a slide with a patient and a "
                        f"score of 0+0 or patterns 3-5")
    slides = table["slide_id"].astype(str).str.strip()
    repeated = slides[slides.duplicated()]
    if len(repeated):
        raise BonyError(f"{path}: slide {repeated.iloc[0]!r} is listed twice")
    patients = table["patient_id"].map(lambda value: str(int(value)) if isinstance(value, float) and value.is_integer()
                                       else str(value).strip())
    return pd.DataFrame({"patient": patients.to_numpy(), "primary": grades[:, 0].astype(int),
                         "secondary": grades[:, 1].astype(int)}, index=pd.Index(slides.to_numpy(), name="slide_id"))
