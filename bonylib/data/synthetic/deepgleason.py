"""Synthetic DeepGleason-style tiles: image tiles, a class mask per tile, a tile table.

DeepGleason (Kramer lab) classifies 1024-px tiles of prostate slides into artefact, regular
tissue and Gleason 3/4/5. Bony's DeepGleason-style set gives each tile a pixel mask with those
classes, so tile labels can be derived by any policy and masks serve dense evaluation:

- ``tiles/<slide>/<tile_id>.jpg``: RGB tiles at about 0.5 µm/px;
- ``masks/<slide>/<tile_id>.png``: lossless uint8 class per pixel, codes in ``classes.json``
  (0 background, 1 artefact (pen ink), 2 regular tissue (stroma and benign glands), 3/4/5 Gleason);
- ``tiles.csv``: ``tile_id, slide_id, split, x, y, image, mask`` (x, y: top-left in slide pixels;
  splits by slide).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bonylib.config import check_fractions, option
from bonylib.data.synthetic.common import item_rng, split_ids
from bonylib.data.synthetic.layout import region_zones, sample_case
from bonylib.data.synthetic.tissue import ZONE_BACKGROUND, add_debris, add_pen_ink, render_tissue, sample_stain
from bonylib.errors import ConfigError
from bonylib.files import atomic_path, write_text_atomic

MPP = 0.5
CLASSES: dict[int, str] = {0: "background", 1: "artefact", 2: "tissue", 3: "G3", 4: "G4", 5: "G5"}


@dataclass
class DeepGleasonSynth:
    """Options of the synthetic DeepGleason-style writer."""

    slides: int = option(4, "number of slides")
    tiles_per_side: int = option(3, "each slide region is this many tiles on a side")
    tile_px: int = option(512, "tile side in pixels (DeepGleason uses 1024)")
    benign_fraction: float = option(0.25, "fraction of benign slides")
    pen_fraction: float = option(0.3, "fraction of slides with pen-marker strokes (artefact class)")
    val_fraction: float = option(0.25, "fraction of slides in the validation split")
    test_fraction: float = option(0.25, "fraction of slides in the test split")
    jpeg_quality: int = option(90, "JPEG quality of the image tiles")

    def __post_init__(self) -> None:
        if self.slides < 1 or self.tiles_per_side < 1:
            raise ConfigError("deepgleason.slides and deepgleason.tiles_per_side must be at least 1")
        if self.tile_px < 32:
            raise ConfigError(f"deepgleason.tile_px must be at least 32, got {self.tile_px}")
        check_fractions("deepgleason", self, ("benign_fraction", "pen_fraction", "val_fraction", "test_fraction"))


def class_mask(labels: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """DeepGleason class codes from Radboud labels and the pen-ink mask (ink over tissue or glass is artefact)."""
    out = np.where(labels >= 3, labels, np.where(labels > 0, 2, 0)).astype(np.uint8)
    out[ink] = 1
    return out


def write_slide(root: Path, cfg: DeepGleasonSynth, seed: int, index: int) -> list[dict[str, object]]:
    """Render slide ``index`` as a grid of tiles with masks; return its rows of ``tiles.csv`` (split unset)."""
    rng = item_rng(seed, "deepgleason", index)
    slide_id = f"DG{index:04d}_{rng.bytes(3).hex()}"
    side = cfg.tiles_per_side * cfg.tile_px
    zones = region_zones(rng, sample_case(rng, cfg.benign_fraction), (side, side), MPP, tissue_edge=True)
    rendered = render_tissue(zones, rng, sample_stain(rng), mpp=MPP)
    add_debris(rendered.rgb, zones == ZONE_BACKGROUND, rng)
    ink = add_pen_ink(rendered.rgb, rng) if rng.random() < cfg.pen_fraction else np.zeros(zones.shape, bool)
    classes = class_mask(rendered.labels, ink)
    rows = []
    for i in range(cfg.tiles_per_side):
        for j in range(cfg.tiles_per_side):
            y, x = i * cfg.tile_px, j * cfg.tile_px
            window = np.s_[y : y + cfg.tile_px, x : x + cfg.tile_px]
            tile_id = f"{slide_id}_x{x}_y{y}"
            image, mask = f"tiles/{slide_id}/{tile_id}.jpg", f"masks/{slide_id}/{tile_id}.png"
            with atomic_path(root / image) as tmp:
                Image.fromarray(rendered.rgb[window]).save(tmp, quality=cfg.jpeg_quality)
            with atomic_path(root / mask) as tmp:
                Image.fromarray(classes[window]).save(tmp)
            rows.append({"tile_id": tile_id, "slide_id": slide_id, "x": x, "y": y, "image": image, "mask": mask})
    return rows


def write_index(root: Path, cfg: DeepGleasonSynth, seed: int, rows: list[dict[str, object]]) -> None:
    """Assign splits by slide and write ``tiles.csv`` and ``classes.json``."""
    rng = item_rng(seed, "deepgleason-split", 0)
    slides = sorted({str(r["slide_id"]) for r in rows})
    rest, test = split_ids(slides, rng, cfg.test_fraction)
    share = cfg.val_fraction / max(1e-9, 1 - cfg.test_fraction)
    train, val = split_ids(rest, rng, share) if cfg.val_fraction > 0 else (rest, [])
    split = {**{s: "train" for s in train}, **{s: "val" for s in val}, **{s: "test" for s in test}}
    frame = pd.DataFrame(rows)
    frame.insert(2, "split", frame["slide_id"].map(split))
    with atomic_path(root / "tiles.csv") as tmp:
        frame.to_csv(tmp, index=False)
    write_text_atomic(root / "classes.json", json.dumps({str(k): v for k, v in CLASSES.items()}, indent=2) + "\n")
