"""Synthetic PANDA: pyramidal JPEG TIFF slides, red-channel label masks, ``train.csv``.

The layout and encodings are those of the Kaggle PANDA challenge, so every reader in Bony works on
the real dataset unchanged:

- ``train_images/<image_id>.tiff``: tiled RGB TIFF, JPEG tiles, three pages at downsample 1, 4
  and 16, resolution tags in pixels per centimetre (µm/px = 10000 / XResolution);
- ``train_label_masks/<image_id>_mask.tiff``: the same pyramid, lossless, class in the red channel,
  Radboud (0 background, 1 stroma, 2 benign epithelium, 3/4/5 Gleason) or Karolinska
  (0 background, 1 benign tissue, 2 cancer) encoding;
- ``train.csv``: ``image_id,data_provider,isup_grade,gleason_score``, the score derived from the
  mask areas by the grading rules, so labels and masks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from bonylib.config import check_fractions, option
from bonylib.data.labels import KAROLINSKA_BENIGN, KAROLINSKA_CANCER, gleason_score, gleason_score_text, isup_grade
from bonylib.data.synthetic.common import block_mean, block_nearest, item_rng
from bonylib.data.synthetic.layout import biopsy_zones, sample_case
from bonylib.data.synthetic.tissue import (
    ZONE_BACKGROUND,
    ZONE_G3,
    ZONE_G4,
    ZONE_G5,
    add_debris,
    add_pen_ink,
    render_tissue,
    sample_stain,
)
from bonylib.errors import ConfigError
from bonylib.files import atomic_path

DOWNSAMPLES: tuple[int, ...] = (1, 4, 16)
PROVIDER_MPP: dict[str, float] = {"radboud": 0.48619, "karolinska": 0.45255}
"""Level-0 µm/px of the two PANDA scanners (3DHistech at Radboud, Hamamatsu at Karolinska)."""


@dataclass
class PandaSynth:
    """Options of the synthetic PANDA writer."""

    slides: int = option(6, "number of slides to write")
    karolinska_fraction: float = option(0.5, "fraction of slides from Karolinska (the others are Radboud)")
    benign_fraction: float = option(0.25, "fraction of benign slides (ISUP 0); cancer slides draw ISUP 1-5 uniformly")
    min_cores: int = option(1, "fewest biopsy cores on a slide")
    max_cores: int = option(3, "most biopsy cores on a slide")
    core_length_um: float = option(2400.0, "length of a biopsy core in micrometres (slide size scales with it)")
    core_width_um: float = option(500.0, "width of a biopsy core in micrometres")
    margin_um: float = option(600.0, "glass around the cores in micrometres: 600 keeps demo slides small, tissue "
                              "then covers about a quarter of level 0; PANDA's slides (about 20k x 20k px, 269 kept "
                              "tiles each) are about 3 % tissue, as with 3000")
    pen_fraction: float = option(0.3, "fraction of slides with pen-marker strokes")
    jpeg_quality: int = option(90, "JPEG quality of the image tiles")
    tile_px: int = option(256, "side of the TIFF tiles in pixels (a multiple of 16)")

    def __post_init__(self) -> None:
        if self.slides < 1:
            raise ConfigError(f"panda.slides must be at least 1, got {self.slides}")
        if not 1 <= self.min_cores <= self.max_cores:
            raise ConfigError(f"panda cores: need 1 <= min_cores <= max_cores, got {self.min_cores}, {self.max_cores}")
        check_fractions("panda", self, ("karolinska_fraction", "benign_fraction", "pen_fraction"))
        if self.tile_px % 16 or self.tile_px < 16:
            raise ConfigError(f"panda.tile_px must be a positive multiple of 16, got {self.tile_px}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"panda.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.core_length_um <= 0 or self.core_width_um <= 0 or self.margin_um < 0:
            raise ConfigError("panda.core_length_um and panda.core_width_um must be positive, panda.margin_um at least 0")


def write_pyramid(path: Path, levels: list[np.ndarray], mpp: float, tile_px: int, lossless: bool, quality: int) -> None:
    """Write a PANDA-style multi-page tiled TIFF: one page per level, largest first.

    Lower levels are marked as reduced-resolution pages and carry their own resolution, which is
    what OpenSlide's generic-tiff reader and tifffile's series detection expect.
    """
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for level, (array, downsample) in enumerate(zip(levels, DOWNSAMPLES, strict=True)):
            pixels_per_cm = 10000.0 / (mpp * downsample)
            compression = ("zlib", {"level": 6}) if lossless else ("jpeg", {"level": quality})
            tif.write(
                array,
                photometric="rgb",
                tile=(tile_px, tile_px),
                compression=compression[0],
                compressionargs=compression[1],
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
            )


def _levels(image: np.ndarray, reduce) -> list[np.ndarray]:
    """The pyramid, each level reduced from level 0 so that mask level k samples block centres of level 0."""
    return [image if ds == 1 else reduce(image, ds) for ds in DOWNSAMPLES]


def provider_of(index: int, karolinska_fraction: float) -> str:
    """Providers interleaved in the configured proportion (not drawn), so even two slides have both."""
    f = karolinska_fraction
    return "karolinska" if int((index + 1) * f) > int(index * f) else "radboud"


def write_slide(root: Path, cfg: PandaSynth, seed: int, index: int) -> dict[str, object]:
    """Render slide ``index`` and write its image and mask; return its ``train.csv`` row."""
    rng = item_rng(seed, "panda", index)
    image_id = rng.bytes(16).hex()
    provider = provider_of(index, cfg.karolinska_fraction)
    mpp = PROVIDER_MPP[provider]
    case = sample_case(rng, cfg.benign_fraction)
    cores = int(rng.integers(cfg.min_cores, cfg.max_cores + 1))
    zones = biopsy_zones(rng, case, mpp, cores, cfg.core_length_um, cfg.core_width_um, cfg.margin_um)
    rendered = render_tissue(zones, rng, sample_stain(rng), mpp=mpp)
    rgb = rendered.rgb
    add_debris(rgb, zones == ZONE_BACKGROUND, rng)
    if rng.random() < cfg.pen_fraction:
        add_pen_ink(rgb, rng)
    if provider == "radboud":
        code = rendered.labels
        areas = {g: float(np.count_nonzero(code == g)) for g in (3, 4, 5)}
    else:
        # Karolinska outlines cancer regions rather than glands: the zone, not the epithelium
        code = np.where(zones == ZONE_BACKGROUND, 0, KAROLINSKA_BENIGN).astype(np.uint8)
        code[np.isin(zones, (ZONE_G3, ZONE_G4, ZONE_G5))] = KAROLINSKA_CANCER
        areas = {g: float(np.count_nonzero(zones == g)) for g in (3, 4, 5)}
    score = gleason_score(areas)
    mask = np.zeros((*code.shape, 3), np.uint8)
    mask[..., 0] = code
    write_pyramid(root / "train_images" / f"{image_id}.tiff", _levels(rgb, block_mean), mpp, cfg.tile_px,
                  lossless=False, quality=cfg.jpeg_quality)
    write_pyramid(root / "train_label_masks" / f"{image_id}_mask.tiff", _levels(mask, block_nearest), mpp,
                  cfg.tile_px, lossless=True, quality=cfg.jpeg_quality)
    return {
        "image_id": image_id,
        "data_provider": provider,
        "isup_grade": isup_grade(score),
        "gleason_score": gleason_score_text(score, provider),
    }


def write_train_csv(root: Path, rows: list[dict[str, object]]) -> None:
    """Write ``train.csv`` with PANDA's columns and order."""
    frame = pd.DataFrame(rows, columns=["image_id", "data_provider", "isup_grade", "gleason_score"])
    with atomic_path(root / "train.csv") as tmp:
        frame.to_csv(tmp, index=False)
