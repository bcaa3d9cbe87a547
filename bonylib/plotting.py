"""Figures for the notebooks: slides with their label masks, patch grids per class.

One colour per class across the whole report (benign green, Gleason 3 yellow, 4 orange, 5 red,
Karolinska cancer purple), so a reader learns the legend once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import openslide
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from bonylib.data.labels import snap_codes
from bonylib.files import atomic_path

if TYPE_CHECKING:
    from bonylib.attention.command import TileMaps

CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (255, 255, 255),
    "stroma": (120, 190, 255),
    "benign": (60, 170, 75),
    "G3": (240, 200, 30),
    "G4": (245, 120, 20),
    "G5": (200, 20, 30),
    "cancer": (140, 60, 170),
    "artefact": (40, 40, 40),
}
RADBOUD_NAMES = {0: "background", 1: "stroma", 2: "benign", 3: "G3", 4: "G4", 5: "G5"}
KAROLINSKA_NAMES = {0: "background", 1: "benign", 2: "cancer"}
GLEASON_NAMES = {0: "background", 3: "G3", 4: "G4", 5: "G5"}
DEEPGLEASON_NAMES = {0: "background", 1: "artefact", 2: "benign", 3: "G3", 4: "G4", 5: "G5"}


def overlay(rgb: np.ndarray, labels: np.ndarray, names: dict[int, str], alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over ``rgb`` wherever the label is not background."""
    out = rgb.astype(np.float32).copy()
    for code, name in names.items():
        if name == "background":
            continue
        hit = labels == code
        out[hit] = (1 - alpha) * out[hit] + alpha * np.asarray(CLASS_COLOURS[name], np.float32)
    return out.astype(np.uint8)


def legend(ax: plt.Axes, names: Sequence[str]) -> None:
    """A legend of class colours on ``ax``."""
    handles = [Patch(color=np.asarray(CLASS_COLOURS[n]) / 255, label=n) for n in names if n != "background"]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)


def read_level(path: Path, level: int) -> np.ndarray:
    """A whole pyramid level of a slide as RGB (OpenSlide; the level must fit in memory)."""
    with openslide.OpenSlide(str(path)) as slide:
        level = min(level, slide.level_count - 1)
        region = slide.read_region((0, 0), level, slide.level_dimensions[level])
    return np.asarray(region.convert("RGB"))


def panda_overview(root: Path, max_slides: int = 4) -> Figure:
    """Slides of a PANDA-format folder at the lowest level, each beside its mask overlay."""
    table = pd.read_csv(Path(root) / "train.csv").head(max_slides)
    fig, axes = plt.subplots(len(table), 2, figsize=(12, 2.6 * len(table)), squeeze=False)
    for (_, row), (ax_img, ax_mask) in zip(table.iterrows(), axes, strict=True):
        image = read_level(Path(root) / "train_images" / f"{row.image_id}.tiff", 2)
        mask = read_level(Path(root) / "train_label_masks" / f"{row.image_id}_mask.tiff", 2)[..., 0]
        names = RADBOUD_NAMES if row.data_provider == "radboud" else KAROLINSKA_NAMES
        ax_img.imshow(image)
        ax_img.set_title(f"{row.image_id[:8]}…  {row.data_provider}", fontsize=9)
        ax_mask.imshow(overlay(image, mask, names))
        ax_mask.set_title(f"mask: ISUP {row.isup_grade}, Gleason {row.gleason_score}", fontsize=9)
        legend(ax_mask, list(names.values()))
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 6, size: float = 2.0) -> Figure:
    """Images in a grid with a title each."""
    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, image, title in zip(axes.ravel(), images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def sicapv2_grid(root: Path, per_class: int = 4) -> Figure:
    """SICAPv2 patches by class (from the test-partition spreadsheets), mask drawn over each."""
    root = Path(root)
    table = pd.concat([pd.read_excel(root / "partition" / "Test" / f"{s}.xlsx") for s in ("Train", "Test")])
    images, titles = [], []
    for label in ("NC", "G3", "G4", "G5"):
        for name in table.loc[table[label] == 1, "image_name"].head(per_class):
            rgb = np.asarray(Image.open(root / "images" / name).convert("RGB"))
            grades = np.asarray(Image.open(root / "masks" / name).convert("L"))
            images.append(overlay(rgb, snap_codes(grades, "sicapv2"), GLEASON_NAMES, alpha=0.3))
            cribriform = " (G4C)" if int(table.loc[table.image_name == name, "G4C"].iloc[0]) else ""
            titles.append(f"{label}{cribriform}")
    return image_grid(images, titles, ncols=per_class)


def deepgleason_grid(root: Path, n: int = 8) -> Figure:
    """DeepGleason-style tiles beside their class masks."""
    root = Path(root)
    table = pd.read_csv(root / "tiles.csv").head(n)
    images, titles = [], []
    for row in table.itertuples():
        rgb = np.asarray(Image.open(root / row.image).convert("RGB"))
        mask = np.asarray(Image.open(root / row.mask))
        present = ", ".join(DEEPGLEASON_NAMES[c] for c in np.unique(mask) if c)
        images += [rgb, overlay(rgb, mask, DEEPGLEASON_NAMES, alpha=0.5)]
        titles += [f"{row.slide_id} ({row.split})", present or "background"]
    return image_grid(images, titles, ncols=4, size=2.6)


def thumbnail(path: Path, max_px: int = 768) -> np.ndarray:
    """A small RGB view of a slide (OpenSlide formats) or a plain image, longest side ``max_px``."""
    path = Path(path)
    try:
        with openslide.OpenSlide(str(path)) as slide:
            image = slide.get_thumbnail((max_px, max_px))
    except openslide.OpenSlideUnsupportedFormatError:
        image = Image.open(path)
        image.thumbnail((max_px, max_px))
    return np.asarray(image.convert("RGB"))


REASON_COLOURS: dict[str, str] = {
    "": "#2ca02c", "background": "#7f7f7f", "pen": "#1f77b4", "blur": "#9467bd", "edges": "#ff7f0e", "homogeneity": "#d62728",
}


def tiles_on_slide(path: Path, tiles: pd.DataFrame, max_px: int = 1024) -> Figure:
    """A slide thumbnail with every measured tile outlined: kept in green, dropped in the colour of its reason."""
    from matplotlib.patches import Rectangle

    from bonylib.data.slides import open_slide

    with open_slide(Path(path)) as slide:
        level = int(np.argmin([abs(max(d) - max_px) for d in slide.level_dimensions]))
        image = slide.read_level(level)
        ds = slide.level_downsamples[level]
        read_ds = slide.level_downsamples[int(tiles.level.iloc[0])] if len(tiles) else 1.0
    fig, ax = plt.subplots(figsize=(10, 10 * image.shape[0] / image.shape[1] + 0.5))
    ax.imshow(image)
    for row in tiles.itertuples():
        side = row.size * read_ds / ds
        ax.add_patch(Rectangle((row.x / ds, row.y / ds), side, side, fill=False, lw=0.8,
                               edgecolor=REASON_COLOURS.get(row.reason, "black")))
    counts = tiles.reason.replace("", "kept").value_counts()
    handles = [Patch(edgecolor=REASON_COLOURS.get("" if r == "kept" else r, "black"), fill=False, label=f"{r} ({n})")
               for r, n in counts.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(Path(path).name, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def read_tiles(tiles: pd.DataFrame) -> list[np.ndarray]:
    """The tiles of manifest rows, read from their slides, as RGB arrays."""
    from bonylib.data.datasets import TileDataset

    data = TileDataset(tiles.assign(label_name=""), source="slides")
    return [np.asarray(data.read(i)) for i in range(len(data))]


def measure_examples(tiles: pd.DataFrame, measure: str, n: int = 6) -> Figure:
    """Tiles spread over the range of one quality measure (lowest to highest), read from their slides."""
    ordered = tiles.sort_values(measure).reset_index(drop=True)
    picks = ordered.iloc[np.unique(np.linspace(0, len(ordered) - 1, n).round().astype(int))]
    images = read_tiles(picks)
    titles = [f"{measure}={v:.3g}" + ("" if r == "" else f"\n(dropped: {r})") for v, r in zip(picks[measure], picks.reason)]
    return image_grid(images, titles, ncols=n, size=1.9)


def class_grid(manifest: pd.DataFrame, per_class: int = 6, seed: int = 0) -> Figure:
    """A few kept tiles of each class in the manifest."""
    picks = [group.sample(min(per_class, len(group)), random_state=seed)
             for _, group in manifest[manifest.label_name != ""].groupby("label_name", sort=False)]
    chosen = pd.concat(picks).reset_index(drop=True) if picks else manifest.head(0)
    images = read_tiles(chosen)
    return image_grid(images, [f"{row.label_name} ({row.provider})" for row in chosen.itertuples()], ncols=per_class, size=1.9)


def save_figure(fig: Figure, dest: Path, dpi: int = 150) -> Path:
    """Write ``fig`` as an image atomically (a killed run leaves no half-written PNG) and close it."""
    with atomic_path(Path(dest)) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(dest)


def heat_colours(values: np.ndarray, cmap: str = "inferno", vmin: float | None = None,
                 vmax: float | None = None) -> np.ndarray:
    """RGBA floats (..., 4) of a 2-D map through ``cmap``, scaled to [vmin, vmax] (default: the map's own range);
    NaN (no tile there) is fully transparent."""
    low = float(np.nanmin(values)) if vmin is None else vmin
    high = float(np.nanmax(values)) if vmax is None else vmax
    scaled = (np.asarray(values, np.float64) - low) / (high - low if high > low else 1.0)
    return plt.colormaps[cmap](np.clip(scaled, 0.0, 1.0))


def attention_overlay(rgb: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.6,
                      cmap: str = "inferno") -> np.ndarray:
    """``heat`` (h, w, the size of ``rgb``) coloured over ``rgb`` (uint8); pixels outside ``mask`` (DINO's top
    attention mass) are shown darkened and uncoloured, so the kept regions stand out as in DINO's figures."""
    colours = heat_colours(heat, cmap)
    weight = alpha * colours[..., 3:]
    out = (1 - weight) * rgb.astype(np.float64) + weight * 255 * colours[..., :3]
    if mask is not None:
        out = np.where(mask[..., None], out, 0.35 * rgb)
    return out.round().astype(np.uint8)


def class_colours(fractions: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Colours in [0, 1] (h, w, 3) of per-pixel class fractions (h, w, classes) in the report's class colours,
    mixed where tiles of several classes overlap; NaN where there is no tile."""
    table = np.array([CLASS_COLOURS[name] for name in names], np.float64) / 255
    return fractions @ table


def slide_heatmap(thumbnail: np.ndarray, heat: np.ndarray, title: str, cmap: str = "inferno", alpha: float = 0.7,
                  label: str = "", names: Sequence[str] = ()) -> Figure:
    """A slide thumbnail with a stitched heatmap over it (NaN where no tile, so the slide shows through).

    ``heat`` is (h, w, 1), drawn through ``cmap`` with a colour bar named ``label``, or (h, w, 3) colours in
    [0, 1] (PCA components, :func:`class_colours`), with a legend of the classes ``names`` when given.
    """
    fig, ax = plt.subplots(figsize=(10, 10 * thumbnail.shape[0] / thumbnail.shape[1] + 0.6))
    draw_heat(ax, thumbnail, heat, title, cmap, alpha, label, names)
    fig.tight_layout()
    return fig


def draw_heat(ax: plt.Axes, thumbnail: np.ndarray, heat: np.ndarray, title: str, cmap: str = "inferno",
              alpha: float = 0.7, label: str = "", names: Sequence[str] = ()) -> None:
    """:func:`slide_heatmap` on the axes ``ax`` of a larger figure (slides side by side)."""
    ax.imshow(thumbnail)
    if heat.shape[-1] == 1:
        # the colour range spans the 1st to 99th percentile: a few peaked tiles would otherwise darken all the rest
        low, high = np.nanpercentile(heat, [1, 99]) if np.isfinite(heat).any() else (0.0, 1.0)
        shown = ax.imshow(np.ma.masked_invalid(heat[..., 0]), cmap=cmap, alpha=alpha, interpolation="nearest",
                          vmin=low, vmax=max(high, low + 1e-12))
        ax.figure.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, label=label, extend="both")
    else:
        rgba = np.concatenate([np.nan_to_num(heat), alpha * ~np.isnan(heat[..., :1])], axis=-1)
        ax.imshow(np.clip(rgba, 0.0, 1.0), interpolation="nearest")
    if names:
        legend(ax, names)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def haar_bands(rgb: np.ndarray) -> Figure:
    """A tile and its one-level Haar bands as the wavelet stem computes them: the approximation (the 2x2 block
    mean, at half resolution) and the three detail bands (their magnitude, averaged over RGB, each on its own
    scale: the details are small next to the approximation)."""
    import torch

    from bonylib.models.stems import haar_dwt2

    x = torch.from_numpy(np.array(rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2]))  # a writable copy
    approx, details = haar_dwt2(x.permute(2, 0, 1)[None].double() / 255)
    panels = [rgb, np.clip(approx[0].permute(1, 2, 0).numpy() / 2, 0, 1)]
    panels += [band[0].abs().mean(dim=0).numpy() for band in details]
    titles = ["tile", "cA: approximation / 2", "|cH|: horizontal detail", "|cV|: vertical detail",
              "|cD|: diagonal detail"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2))
    for ax, panel, title in zip(axes, panels, titles):
        ax.imshow(panel, cmap="magma" if panel.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def training_comparison(logs: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> Figure:
    """Pretraining runs side by side, from their logs (:func:`bonylib.ssl.runs.training_log`): the DINO loss
    with ln K dashed, the teacher's per-image entropy, images/s, and the k-NN balanced accuracy at each epoch
    end (both tasks, when the runs had a monitor)."""
    if not logs:
        raise ValueError("training_comparison: no runs to compare")
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for i, (label, (steps, knn)) in enumerate(logs.items()):
        colour = f"C{i}"
        axes[0].plot(steps["step"], steps["loss"], color=colour, label=label)
        axes[1].plot(steps["step"], steps["teacher_entropy"], color=colour)
        axes[2].plot(steps["step"], steps["images_per_s"], color=colour)
        if not knn.empty:
            axes[3].plot(knn["step"], knn["knn_balanced_accuracy"], "o-", color=colour)
            if "knn_balanced_accuracy_cancer" in knn:
                axes[3].plot(knn["step"], knn["knn_balanced_accuracy_cancer"], "s--", color=colour)
    steps = next(iter(logs.values()))[0]
    for ax in axes[:2]:
        ax.axhline(steps["collapse_entropy"].iloc[0], color="grey", ls="--", lw=0.8)
    titles = ["DINO loss (dashed: ln K)", "teacher entropy per image", "images / s",
              "k-NN balanced accuracy (o: grades, s: cancer)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def attention_tiles(rows: dict[str, TileMaps], threshold: float | None = None) -> Figure:
    """Tiles in the top row and under them one row per encoder of its map over each tile
    (:func:`bonylib.attention.command.tile_maps` of the same images), upsampled to the tile; with ``threshold``
    only each map's top attention mass is coloured, as in DINO's figures."""
    from bonylib.attention.heatmaps import resize_nearest
    from bonylib.attention.maps import top_mass_mask

    first = next(iter(rows.values()))
    for label, found in rows.items():
        if found.names != first.names:
            raise ValueError(f"attention_tiles: the maps of {label} are of other images than the first row's")
    panels, titles = list(first.tiles), [name[:14] for name in first.names]
    for label, found in rows.items():
        for i, (rgb, heat) in enumerate(zip(first.tiles, found.maps)):
            size = rgb.shape[:2]
            mask = None if threshold is None else resize_nearest(top_mass_mask(heat, threshold), size)
            panels.append(attention_overlay(rgb, resize_nearest(heat, size), mask))
            titles.append(label if i == 0 else "")
    return image_grid(panels, titles, ncols=len(first.tiles), size=1.9)


def xcit_views(rgb: np.ndarray, token_norms: np.ndarray, channel_attention: np.ndarray,
               blocks: Sequence[int] = ()) -> Figure:
    """The seed's XCiT views of one tile, compact enough for a page: each head's token-norm map over the tile for
    a few XCA ``blocks`` (default: the first, a middle and the last), then each head's d x d cross-covariance
    attention of the last block. ``token_norms`` (blocks, heads, gh, gw) and ``channel_attention`` (blocks,
    heads, d, d) as ``bony attention`` writes them."""
    from bonylib.attention.heatmaps import resize_nearest

    count, heads = token_norms.shape[:2]
    blocks = list(blocks) or sorted({0, count // 2, count - 1})
    fig, axes = plt.subplots(len(blocks) + 1, heads, figsize=(2.2 * heads, 2.3 * (len(blocks) + 1)), squeeze=False)
    for row, block in enumerate(blocks):
        for head in range(heads):
            axes[row, head].imshow(attention_overlay(rgb, resize_nearest(token_norms[block, head], rgb.shape[:2])))
            axes[row, head].set_title(f"XCA block {block}, head {head}: token norms", fontsize=7)
    for head in range(heads):
        axes[-1, head].imshow(channel_attention[-1, head], cmap="viridis")
        axes[-1, head].set_title(f"block {count - 1}, head {head}: A_XC ({channel_attention.shape[-1]} channels)",
                                 fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def token_colour_tiles(tiles: Sequence[np.ndarray], names: Sequence[str], rows: dict[str, np.ndarray]) -> Figure:
    """Tiles in the top row and under them one row per encoder of its patch tokens' colours ((tiles, grid, grid, 3) in
    [0, 1]: :func:`bonylib.attention.tokens.token_colours` of these tiles), each token drawn as a block (matplotlib
    upsamples a small image by nearest neighbour)."""
    panels, titles = list(tiles), [name[:14] for name in names]
    for label, colours in rows.items():
        if len(colours) != len(tiles):
            raise ValueError(f"token_colour_tiles: {label} has colours for {len(colours)} tiles, not {len(tiles)}")
        panels += list(colours)
        titles += [label] + [""] * (len(tiles) - 1)
    return image_grid(panels, titles, ncols=len(tiles), size=1.9)
