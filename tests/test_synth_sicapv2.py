"""Synthetic SICAPv2: names, patch sizes, masks, one-hot spreadsheets and patient-wise partitions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

NAME = re.compile(r"(?P<slide>16B\d{7})_Block_Region_\d+_\d+_\d+_xini_\d+_yini_\d+\.jpg")
COLUMNS = ["image_name", "NC", "G3", "G4", "G5", "G4C"]


@pytest.fixture(scope="module")
def sicap(smoke_data: Path) -> Path:
    return smoke_data / "sicapv2"


def sheet(sicap: Path, *parts: str) -> pd.DataFrame:
    return pd.read_excel(sicap.joinpath("partition", *parts))


def slides_of(table: pd.DataFrame) -> set[str]:
    return {NAME.fullmatch(n)["slide"] for n in table.image_name}


def test_images_and_masks(sicap: Path, smoke_config) -> None:
    images = sorted(p.name for p in (sicap / "images").iterdir())
    assert images and images == sorted(p.name for p in (sicap / "masks").iterdir())
    size = smoke_config.sicapv2.patch_px
    for name in images:
        assert NAME.fullmatch(name), name
        image = Image.open(sicap / "images" / name)
        mask = Image.open(sicap / "masks" / name)
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (size, size))
        assert (mask.format, mask.mode, mask.size) == ("JPEG", "L", (size, size))
        values = np.asarray(mask).astype(int)
        assert np.abs(values[..., None] - [0, 3, 4, 5]).min(-1).max() <= 1, "mask values are 0/3/4/5 up to JPEG"


def test_partition_spreadsheets(sicap: Path, smoke_config) -> None:
    test_split = [sheet(sicap, "Test", "Train.xlsx"), sheet(sicap, "Test", "Test.xlsx")]
    every = pd.concat(test_split)
    for table in test_split:
        assert list(table.columns) == COLUMNS
        assert (table[["NC", "G3", "G4", "G5"]].sum(axis=1) == 1).all(), "NC/G3/G4/G5 is one-hot"
        assert (table.G4C <= table.G4).all(), "cribriform flag only on Gleason-4 patches"
    assert sorted(every.image_name) == sorted(p.name for p in (sicap / "images").iterdir())
    train_slides, test_slides = slides_of(test_split[0]), slides_of(test_split[1])
    assert train_slides and test_slides and not train_slides & test_slides
    held_out = []
    for k in range(1, smoke_config.sicapv2.folds + 1):
        fold_train, fold_test = sheet(sicap, "Validation", f"Val{k}", "Train.xlsx"), sheet(sicap, "Validation", f"Val{k}", "Test.xlsx")
        assert list(fold_test.columns) == COLUMNS
        assert not slides_of(fold_train) & slides_of(fold_test)
        assert slides_of(fold_train) | slides_of(fold_test) == train_slides
        held_out.append(slides_of(fold_test))
    assert sorted(s for fold in held_out for s in fold) == sorted(train_slides), "folds partition the train slides"


def test_patch_label_is_most_extensive_pattern_of_its_mask(sicap: Path) -> None:
    table = pd.concat([sheet(sicap, "Test", "Train.xlsx"), sheet(sicap, "Test", "Test.xlsx")])
    for row in table.itertuples():
        values = np.asarray(Image.open(sicap / "masks" / row.image_name)).astype(int)
        snapped = np.array([0, 3, 4, 5])[np.abs(values[..., None] - [0, 3, 4, 5]).argmin(-1)]
        areas = {g: int((snapped == g).sum()) for g in (3, 4, 5)}
        label = next(c for c in ("NC", "G3", "G4", "G5") if getattr(row, c) == 1)
        if label == "NC":
            assert sum(areas.values()) < 0.01 * snapped.size
        else:
            assert areas[int(label[1])] >= 0.9 * max(areas.values()), (row.image_name, label, areas)


def test_wsi_labels(sicap: Path) -> None:
    wsi = pd.read_excel(sicap / "wsi_labels.xlsx")
    assert list(wsi.columns) == ["slide_id", "patient_id", "Gleason_primary", "Gleason_secondary"]
    assert set(wsi.slide_id) >= slides_of(sheet(sicap, "Test", "Train.xlsx")) | slides_of(sheet(sicap, "Test", "Test.xlsx"))
    assert set(wsi.Gleason_primary) <= {0, 3, 4, 5} and set(wsi.Gleason_secondary) <= {0, 3, 4, 5}
    assert ((wsi.Gleason_primary == 0) == (wsi.Gleason_secondary == 0)).all()
