"""Synthetic DeepGleason-style tiles: table, files, mask codes, grid coordinates, slide-wise splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def test_tiles_masks_and_table(smoke_data: Path, smoke_config) -> None:
    root, cfg = smoke_data / "deepgleason", smoke_config.deepgleason
    classes = {int(k): v for k, v in json.loads((root / "classes.json").read_text()).items()}
    assert classes == {0: "background", 1: "artefact", 2: "tissue", 3: "G3", 4: "G4", 5: "G5"}
    table = pd.read_csv(root / "tiles.csv")
    assert list(table.columns) == ["tile_id", "slide_id", "split", "x", "y", "image", "mask"]
    assert table.slide_id.nunique() == cfg.slides
    assert len(table) == cfg.slides * cfg.tiles_per_side**2
    assert table.groupby("slide_id").split.nunique().eq(1).all(), "a slide is in one split"
    assert set(table.split) <= {"train", "val", "test"} and "train" in set(table.split)
    grid = set(range(0, cfg.tiles_per_side * cfg.tile_px, cfg.tile_px))
    assert set(table.x) == grid and set(table.y) == grid
    seen = set()
    for row in table.itertuples():
        image, mask = Image.open(root / row.image), Image.open(root / row.mask)
        assert image.size == mask.size == (cfg.tile_px, cfg.tile_px)
        assert (image.mode, mask.format, mask.mode) == ("RGB", "PNG", "L")
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(classes)
        seen |= values
    assert {0, 2} <= seen, "background and regular tissue occur"
