"""The chapters' figures that read data first: dataset overviews, tiles on their slide, quality-measure examples,
the Haar bands of a tile.

Reading goes through the data layer (slides through :func:`bonylib.data.slides.open_slide`, tiles through
:class:`bonylib.data.datasets.TileDataset`) and drawing through :mod:`bonylib.plotting`, which never opens a
file; these functions only join the two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from bonylib import plotting
from bonylib.data.datasets import TileDataset
from bonylib.data.heatmaps import read_thumbnail
from bonylib.data.labels import snap_codes
from bonylib.data.quality import pen_mask
from bonylib.data.sicapv2_tables import PATCH_CLASSES, partition_folder, read_sheet
from bonylib.data.slides import open_slide
from bonylib.models.stems import haar_dwt2


def _level(path: Path, level: int, require_rgb: bool = True) -> np.ndarray:
    """A whole pyramid level of a slide (the coarsest if it has fewer); the level must fit in memory."""
    with open_slide(path, require_rgb=require_rgb) as slide:
        return slide.read_level(min(level, slide.level_count - 1))


def panda_overview(root: Path, max_slides: int = 4) -> Figure:
    """Slides of a PANDA-format folder at their third level, each beside its mask overlay."""
    table = pd.read_csv(Path(root) / "train.csv").head(max_slides)
    images, overlays, titles, legends = [], [], [], []
    for row in table.itertuples():
        image = _level(Path(root) / "train_images" / f"{row.image_id}.tiff", 2)
        mask = _level(Path(root) / "train_label_masks" / f"{row.image_id}_mask.tiff", 2, require_rgb=False)[..., 0]
        names = plotting.RADBOUD_NAMES if row.data_provider == "radboud" else plotting.KAROLINSKA_NAMES
        images.append(image)
        overlays.append(plotting.overlay(image, mask, names))
        titles.append((f"{row.image_id[:8]}…  {row.data_provider}",
                       f"mask: ISUP {row.isup_grade}, Gleason {row.gleason_score}"))
        legends.append(list(names.values()))
    return plotting.slides_with_masks(images, overlays, titles, legends)


def sicapv2_grid(root: Path, per_class: int = 4) -> Figure:
    """SICAPv2 patches by class (from the test-partition spreadsheets), mask drawn over each."""
    root = Path(root)
    folder = partition_folder(root, "Test")
    table = pd.concat([read_sheet(folder / f"{s}.xlsx") for s in ("Train", "Test")])
    images, titles = [], []
    for k, label in enumerate(PATCH_CLASSES):
        for row in table[table["label"] == k].head(per_class).itertuples():
            rgb = _level(root / "images" / row.image_name, 0)
            grades = _level(root / "masks" / row.image_name, 0)[..., 0]
            images.append(plotting.overlay(rgb, snap_codes(grades, "sicapv2"), plotting.GLEASON_NAMES, alpha=0.3))
            titles.append(f"{label}{' (G4C)' if row.cribriform else ''}")
    return plotting.image_grid(images, titles, ncols=per_class)


def deepgleason_grid(root: Path, n: int = 8) -> Figure:
    """DeepGleason-style tiles beside their class masks."""
    root = Path(root)
    table = pd.read_csv(root / "tiles.csv").head(n)
    images, titles = [], []
    for row in table.itertuples():
        rgb = _level(root / row.image, 0)
        with Image.open(root / row.mask) as opened:  # class codes: a palette-free 8-bit PNG, read as is
            mask = np.asarray(opened)
        present = ", ".join(plotting.DEEPGLEASON_NAMES[c] for c in np.unique(mask) if c)
        images += [rgb, plotting.overlay(rgb, mask, plotting.DEEPGLEASON_NAMES, alpha=0.5)]
        titles += [f"{row.slide_id} ({row.split})", present or "background"]
    return plotting.image_grid(images, titles, ncols=4, size=2.6)


def thumbnail(path: Path, max_px: int = 768) -> np.ndarray:
    """A small RGB view of a slide or a plain image, longest side ``max_px``."""
    with open_slide(Path(path)) as slide:
        return read_thumbnail(slide, max_px)


def marker_ink(path: Path, max_px: int = 1024) -> Figure:
    """A slide's thumbnail beside the marker ink its pen rules find (:func:`bonylib.data.quality.pen_mask`), shown in
    magenta over the faded slide: what tiling drops as ``pen``."""
    image = thumbnail(path, max_px)
    ink = pen_mask(image)
    faded = (0.35 * image + 0.65 * 255).astype(np.uint8)
    faded[ink] = (255, 0, 255)
    return plotting.image_grid([image, faded], [Path(path).name, f"marker ink: {ink.mean():.1%} of the pixels"],
                               ncols=2, size=5)


def tiles_on_slide(path: Path, tiles: pd.DataFrame, max_px: int = 1024) -> Figure:
    """A slide at the level closest to ``max_px`` with every measured tile outlined: kept in green, dropped in the
    colour of its reason."""
    with open_slide(Path(path)) as slide:
        level = int(np.argmin([abs(max(d) - max_px) for d in slide.level_dimensions]))
        image = slide.read_level(level)
        downsample = slide.level_downsamples[level]
        read_downsample = slide.level_downsamples[int(tiles.level.iloc[0])] if len(tiles) else 1.0
    return plotting.tiles_on_slide(image, downsample, tiles, read_downsample, Path(path).name)


def read_tiles(tiles: pd.DataFrame) -> list[np.ndarray]:
    """The tiles of manifest rows, read from their slides, as RGB arrays."""
    data = TileDataset(tiles.assign(label_name=""), source="slides")
    return [np.asarray(data.read(i)) for i in range(len(data))]


def measure_examples(tiles: pd.DataFrame, measure: str, n: int = 6) -> Figure:
    """Tiles spread over the range of one quality measure (lowest to highest), read from their slides."""
    ordered = tiles.sort_values(measure).reset_index(drop=True)
    picks = ordered.iloc[np.unique(np.linspace(0, len(ordered) - 1, n).round().astype(int))]
    return plotting.value_examples(read_tiles(picks), list(picks[measure]), list(picks.reason), measure)


def class_grid(manifest: pd.DataFrame, per_class: int = 6, seed: int = 0) -> Figure:
    """A few kept tiles of each class in the manifest."""
    picks = [group.sample(min(per_class, len(group)), random_state=seed)
             for _, group in manifest[manifest.label_name != ""].groupby("label_name", sort=False)]
    chosen = pd.concat(picks).reset_index(drop=True) if picks else manifest.head(0)
    titles = [f"{row.label_name} ({row.provider})" for row in chosen.itertuples()]
    return plotting.image_grid(read_tiles(chosen), titles, ncols=per_class, size=1.9)


def haar_bands(rgb: np.ndarray) -> Figure:
    """A tile and its one-level Haar bands, computed as the wavelet stem computes them."""
    x = torch.from_numpy(np.array(rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2]))  # a writable copy
    approx, details = haar_dwt2(x.permute(2, 0, 1)[None].double() / 255)
    return plotting.haar_bands(rgb, approx[0].permute(1, 2, 0).numpy(),
                               [band[0].permute(1, 2, 0).numpy() for band in details])
