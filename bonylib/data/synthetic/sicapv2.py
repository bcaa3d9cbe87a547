"""Synthetic SICAPv2: 512×512 patches at 10x with Gleason masks and patient-wise partitions.

Layout as published by Silva-Rodríguez et al. (2020):

- ``images/<slide>_Block_Region_<r>_<i>_<j>_xini_<x>_yini_<y>.jpg``: patches cut with 50 % overlap
  from annotated regions of each slide (about 1 µm/px);
- ``masks/<same name>.jpg``: greyscale Gleason pattern per pixel (0 non-cancerous, 3, 4, 5). The
  masks are JPEG as in the original, so readers must snap values to the nearest code;
- ``partition/Test/{Train,Test}.xlsx`` and ``partition/Validation/Val<k>/{Train,Test}.xlsx``:
  columns ``image_name, NC, G3, G4, G5, G4C``; NC/G3/G4/G5 is one-hot on the patch's most
  extensive pattern, and ``G4C`` additionally flags Gleason-4 patches with cribriform glands;
  slides (patients) never straddle a train/test split;
- ``wsi_labels.xlsx``: slide Gleason score (``slide_id, patient_id, Gleason_primary,
  Gleason_secondary``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bonylib.config import check_fractions, option
from bonylib.data.labels import gleason_score
from bonylib.data.synthetic.common import item_rng, split_ids
from bonylib.data.synthetic.layout import region_zones, sample_case
from bonylib.data.synthetic.tissue import ZONE_BACKGROUND, add_debris, render_tissue, sample_stain
from bonylib.errors import ConfigError
from bonylib.files import atomic_path

MPP = 1.0
LABEL_COLUMNS: tuple[str, ...] = ("NC", "G3", "G4", "G5", "G4C")
CRIBRIFORM_MIN_FRACTION = 0.1
"""A Gleason-4 patch is flagged G4C when cribriform glands are at least this share of its G4 pixels."""


@dataclass
class Sicapv2Synth:
    """Options of the synthetic SICAPv2 writer."""

    slides: int = option(8, "number of slides (patients); at least 5: one test slide and four validation folds")
    regions_per_slide: int = option(1, "annotated regions cut into patches per slide")
    region_patches: int = option(3, "a region is this many patch steps (256 px) on a side, plus one")
    patch_px: int = option(512, "patch side in pixels")
    min_tissue: float = option(0.2, "patches with less tissue than this fraction are not kept")
    benign_fraction: float = option(0.25, "fraction of benign slides")
    test_fraction: float = option(0.25, "fraction of slides in the test partition")
    folds: int = option(4, "cross-validation folds over the training slides (Val1..ValK)")
    jpeg_quality: int = option(95, "JPEG quality of images and masks")

    def __post_init__(self) -> None:
        if self.folds < 1:
            raise ConfigError(f"sicapv2.folds must be at least 1, got {self.folds}")
        if self.slides < self.folds + 1:
            raise ConfigError(f"sicapv2.slides must be at least folds + 1 = {self.folds + 1}, got {self.slides}")
        if self.patch_px % 2 or self.patch_px < 32:
            raise ConfigError(f"sicapv2.patch_px must be even and at least 32, got {self.patch_px}")
        if self.regions_per_slide < 1 or self.region_patches < 1:
            raise ConfigError("sicapv2.regions_per_slide and sicapv2.region_patches must be at least 1")
        check_fractions("sicapv2", self, ("min_tissue", "benign_fraction", "test_fraction"))


def patch_row(name: str, grades: np.ndarray, cribriform: np.ndarray) -> dict[str, object]:
    """The partition-spreadsheet row of a patch from its Gleason map and cribriform mask."""
    areas = {g: float(np.count_nonzero(grades == g)) for g in (3, 4, 5)}
    score = gleason_score(areas)
    label = "NC" if score is None else f"G{score[0]}"
    row: dict[str, object] = {"image_name": name, **{c: int(c == label) for c in LABEL_COLUMNS}}
    row["G4C"] = int(label == "G4" and cribriform.sum() >= CRIBRIFORM_MIN_FRACTION * areas[4])
    return row


def write_slide(root: Path, cfg: Sicapv2Synth, seed: int, index: int) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Render the regions of slide ``index``, write its patches; return its WSI label and patch rows."""
    rng = item_rng(seed, "sicapv2", index)
    slide_id = f"16B{rng.integers(0, 10**7):07d}"
    case = sample_case(rng, cfg.benign_fraction)
    stain = sample_stain(rng)
    step = cfg.patch_px // 2
    side = cfg.region_patches * step + step
    rows: list[dict[str, object]] = []
    slide_areas = {3: 0.0, 4: 0.0, 5: 0.0}
    for region in range(cfg.regions_per_slide):
        zones = region_zones(rng, case, (side, side), MPP, tissue_edge=rng.random() < 0.5)
        rendered = render_tissue(zones, rng, stain, mpp=MPP)
        add_debris(rendered.rgb, zones == ZONE_BACKGROUND, rng)
        grades = np.where(np.isin(rendered.labels, (3, 4, 5)), rendered.labels, 0).astype(np.uint8)
        x0, y0 = (int(v) for v in rng.integers(0, 60000, size=2))
        for i in range(cfg.region_patches):
            for j in range(cfg.region_patches):
                window = np.s_[i * step : i * step + cfg.patch_px, j * step : j * step + cfg.patch_px]
                if np.mean(zones[window] != ZONE_BACKGROUND) < cfg.min_tissue:
                    continue
                name = f"{slide_id}_Block_Region_{region}_{i}_{j}_xini_{x0 + j * step}_yini_{y0 + i * step}"
                with atomic_path(root / "images" / f"{name}.jpg") as tmp:
                    Image.fromarray(rendered.rgb[window]).save(tmp, quality=cfg.jpeg_quality)
                with atomic_path(root / "masks" / f"{name}.jpg") as tmp:
                    Image.fromarray(grades[window]).save(tmp, quality=cfg.jpeg_quality)
                rows.append(patch_row(f"{name}.jpg", grades[window], rendered.cribriform[window]))
        for g in slide_areas:
            slide_areas[g] += float(np.count_nonzero(grades == g))
    score = gleason_score(slide_areas)
    wsi = {
        "slide_id": slide_id,
        "patient_id": index,
        "Gleason_primary": 0 if score is None else score[0],
        "Gleason_secondary": 0 if score is None else score[1],
    }
    return wsi, rows


def _write_xlsx(path: Path, rows: list[dict[str, object]], columns: list[str]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_excel(tmp, index=False)


def write_partitions(
    root: Path, cfg: Sicapv2Synth, seed: int, wsi: list[dict[str, object]], patches: dict[str, list[dict[str, object]]]
) -> None:
    """Write the patient-wise test split, the K validation folds and ``wsi_labels.xlsx``."""
    rng = item_rng(seed, "sicapv2-partition", 0)
    train_ids, test_ids = split_ids([str(w["slide_id"]) for w in wsi], rng, cfg.test_fraction)
    columns = ["image_name", *LABEL_COLUMNS]

    def rows_of(ids: list[str]) -> list[dict[str, object]]:
        return [row for sid in sorted(ids) for row in patches[sid]]

    _write_xlsx(root / "partition" / "Test" / "Train.xlsx", rows_of(train_ids), columns)
    _write_xlsx(root / "partition" / "Test" / "Test.xlsx", rows_of(test_ids), columns)
    folds = np.array_split(np.array(train_ids, dtype=object), cfg.folds)
    for k, fold in enumerate(folds, start=1):
        held = set(fold.tolist())
        fold_dir = root / "partition" / "Validation" / f"Val{k}"
        _write_xlsx(fold_dir / "Train.xlsx", rows_of([s for s in train_ids if s not in held]), columns)
        _write_xlsx(fold_dir / "Test.xlsx", rows_of(sorted(held)), columns)
    _write_xlsx(root / "wsi_labels.xlsx", wsi, ["slide_id", "patient_id", "Gleason_primary", "Gleason_secondary"])
