"""The figures of attention maps: one tile's heads and XCiT views, tiles side by side, a slide's heatmaps.

Drawn with :mod:`bonylib.plotting`'s primitives from the arrays ``bony attention`` writes, so a figure can be
redrawn from a run's files without the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bonylib import plotting
from bonylib.attention.maps import TileMaps, top_mass_mask
from bonylib.data.heatmaps import resize_nearest


def image_figures(rgb: np.ndarray, arrays: dict[str, np.ndarray], block: int, block_name: str, mass: np.ndarray,
                  threshold: float | None, stem: Path) -> list[Path]:
    """The PNGs of one tile's maps: the chosen block's CLS heads and their mean over the tile; for an XCiT also a
    panel per block and head of its token norms over the tile and of its d x d channel attention."""
    size = rgb.shape[:2]
    heads = arrays["cls"][block]
    shown = np.concatenate([heads.mean(axis=0, keepdims=True), heads])
    masks = top_mass_mask(shown, threshold) if threshold is not None else [None] * len(shown)
    overlays = [plotting.attention_overlay(rgb, resize_nearest(m, size), None if k is None else resize_nearest(k, size))
                for m, k in zip(shown, masks)]
    titles = ["tile", f"{block_name} {block}: mean of {len(heads)} heads",
              *(f"head {h} ({100 * mass[h]:.0f} % on patches)" for h in range(len(heads)))]
    figure = plotting.image_grid([rgb, *overlays], titles, ncols=min(6, len(titles)), size=2.2)
    written = [plotting.save_figure(figure, stem.with_name(f"{stem.name}.cls.png"))]
    if "token_norms" in arrays:
        norms, channels = arrays["token_norms"], arrays["channel_attention"]
        labels = [f"block {b} head {h}" for b in range(norms.shape[0]) for h in range(norms.shape[1])]
        over_tile = [plotting.attention_overlay(rgb, resize_nearest(m, size)) for m in norms.reshape(-1, *norms.shape[2:])]
        matrices = [(255 * plotting.heat_colours(m, "viridis")[..., :3]).astype(np.uint8)
                    for m in channels.reshape(-1, *channels.shape[2:])]
        for view_name, panels in (("token_norms", over_tile), ("channel_attention", matrices)):
            grid = plotting.image_grid(panels, labels, ncols=norms.shape[1], size=1.6)  # a panel per block and head
            written.append(plotting.save_figure(grid, stem.with_name(f"{stem.name}.{view_name}.png"), dpi=100))
    return written


def attention_tiles(rows: dict[str, TileMaps], threshold: float | None = None) -> Figure:
    """Tiles in the top row and under them one row per encoder of its map over each tile
    (:func:`~bonylib.attention.command.tile_maps` of the same images), upsampled to the tile; with ``threshold``
    only each map's top attention mass is coloured, as in DINO's figures."""
    first = next(iter(rows.values()))
    for label, found in rows.items():
        if found.names != first.names:
            raise ValueError(f"attention_tiles: the maps of {label} are of other images than the first row's")
    panels, titles = list(first.tiles), [name[:14] for name in first.names]
    for label, found in rows.items():
        for i, (rgb, heat) in enumerate(zip(first.tiles, found.maps)):
            size = rgb.shape[:2]
            mask = None if threshold is None else resize_nearest(top_mass_mask(heat, threshold), size)
            panels.append(plotting.attention_overlay(rgb, resize_nearest(heat, size), mask))
            titles.append(label if i == 0 else "")
    return plotting.image_grid(panels, titles, ncols=len(first.tiles), size=1.9)


def xcit_views(rgb: np.ndarray, token_norms: np.ndarray, channel_attention: np.ndarray,
               blocks: Sequence[int] = ()) -> Figure:
    """The seed's XCiT views of one tile, compact enough for a page: each head's token-norm map over the tile for
    a few XCA ``blocks`` (default: the first, a middle and the last), then each head's d x d cross-covariance
    attention of the last block. ``token_norms`` (blocks, heads, gh, gw) and ``channel_attention`` (blocks,
    heads, d, d) as ``bony attention`` writes them."""
    count, heads = token_norms.shape[:2]
    blocks = list(blocks) or sorted({0, count // 2, count - 1})
    panels, titles = [], []
    for block in blocks:
        for head in range(heads):
            panels.append(plotting.attention_overlay(rgb, resize_nearest(token_norms[block, head], rgb.shape[:2])))
            titles.append(f"XCA block {block}, head {head}: token norms")
    for head in range(heads):
        panels.append((255 * plotting.heat_colours(channel_attention[-1, head], "viridis")[..., :3]).astype(np.uint8))
        titles.append(f"block {count - 1}, head {head}: A_XC ({channel_attention.shape[-1]} channels)")
    return plotting.image_grid(panels, titles, ncols=heads, size=2.2)


def slide_figures(thumbnail: np.ndarray, attention: np.ndarray, pca: np.ndarray, name: str, threshold: float | None,
                  out: Path) -> list[Path]:
    """The two PNGs of a slide: its mean CLS attention and the PCA colours of its tile embeddings over the
    thumbnail."""
    label = "CLS attention (1 = uniform)" + (f", top {threshold:.0%} of the mass" if threshold is not None else "")
    title = f"{name}: first 3 PCA components of the tile embeddings"
    return [plotting.save_figure(plotting.slide_heatmap(thumbnail, attention, f"{name}: {label}", label=label),
                                 out / f"{name}.attention.png"),
            plotting.save_figure(plotting.slide_heatmap(thumbnail, pca, title), out / f"{name}.pca.png")]
