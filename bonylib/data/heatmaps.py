"""Per-tile values stitched over a slide thumbnail at the tiles' coordinates, in memory bounded by the thumbnail.

A slide is far larger than memory; its heatmap is not. :func:`read_thumbnail` reads the slide band by band
from the level just finer than the thumbnail, so only one band of that level is held at a time, and a
:class:`Heatmap` is a canvas of the thumbnail's size that tiles are added to one at a time (a value, a
vector such as PCA colours or a one-hot class, or a small map such as a tile's attention), so a slide of
any size is processed as a stream of tiles. Coordinates are those of the tile manifest: ``x, y`` the
top-left in level-0 pixels, and a tile covers ``size * level_downsample`` level-0 pixels.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image
from sklearn.utils import gen_batches

from bonylib.data.slides import Slide
from bonylib.errors import ConfigError

BAND_BYTES = 64 * 2**20
"""Most RGB bytes of the source level held at once while reading a thumbnail."""


def thumbnail_size(slide_size: tuple[int, int], max_px: int) -> tuple[int, int]:
    """(width, height) of a slide's thumbnail: longest side ``max_px``, never larger than the slide itself."""
    if max_px < 1:
        raise ConfigError(f"thumbnail size must be at least 1 pixel, got {max_px}")
    width, height = slide_size
    scale = min(1.0, max_px / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_thumbnail(slide: Slide, max_px: int) -> np.ndarray:
    """The slide as an RGB array of :func:`thumbnail_size`, area-averaged (PIL's box filter) from the coarsest
    level at least that large, read in horizontal bands of at most :data:`BAND_BYTES` bytes.

    Each band of thumbnail rows is resized from exactly the (fractional) source rows it covers, so the result
    equals a box-filter resize of the whole level while only a band of it is ever in memory.
    """
    width, height = thumbnail_size(slide.level_dimensions[0], max_px)
    level = max((k for k, (w, h) in enumerate(slide.level_dimensions) if w >= width and h >= height), default=0,
                key=lambda k: slide.level_downsamples[k])
    source_w, source_h = slide.level_dimensions[level]
    per_row = source_h / height  # source rows per thumbnail row
    rows_per_band = max(1, int(BAND_BYTES // (3 * source_w) / per_row))
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, rows_per_band):
        bottom = min(height, top + rows_per_band)
        first, last = math.floor(top * per_row), min(source_h, math.ceil(bottom * per_row))
        location = (0, round(first * slide.level_downsamples[level]))
        band = Image.fromarray(slide.read_region(location, level, (source_w, last - first)))
        box = (0.0, top * per_row - first, float(source_w), bottom * per_row - first)
        out[top:bottom] = np.asarray(band.resize((width, bottom - top), Image.Resampling.BOX, box=box))
    return out


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` (h, w, ...) resized to ``size`` (height, width) by nearest neighbour on its first two axes: a
    patch map becomes blocks of one value each (DINO's upsampling), with no colour or class mixed in."""
    rows = (np.arange(size[0]) + 0.5) * array.shape[0] / size[0]
    cols = (np.arange(size[1]) + 0.5) * array.shape[1] / size[1]
    return array[rows.astype(np.int64)][:, cols.astype(np.int64)]


class Heatmap:
    """A canvas over a slide's thumbnail that tiles add their values to, one tile at a time.

    Where tiles overlap, their values are averaged, so the result does not depend on the order tiles arrive
    in. Each tile's footprint is its level-0 square scaled to the canvas, edges rounded, so neighbouring
    tiles abut without gaps; a tile smaller than a canvas pixel still covers one.
    """

    def __init__(self, slide_size: tuple[int, int], canvas_size: tuple[int, int], channels: int = 1) -> None:
        """``slide_size`` and ``canvas_size`` are (width, height): level 0 and the thumbnail."""
        width, height = canvas_size
        self.scale_x, self.scale_y = width / slide_size[0], height / slide_size[1]
        self.channels = channels
        self._sum = np.zeros((height, width, channels), np.float64)
        self._count = np.zeros((height, width), np.int32)

    def add(self, x: float, y: float, side: float, value: ArrayLike) -> None:
        """Add one tile: top-left ``(x, y)`` and ``side`` in level-0 pixels; ``value`` a scalar, a (channels,)
        vector, or a map (h, w) or (h, w, channels) resized over the tile's footprint by nearest neighbour."""
        value = np.asarray(value, np.float64)
        if value.ndim < 2:
            value = value.reshape(1, 1, -1)
        elif value.ndim == 2:
            value = value[..., None]
        if value.shape[-1] != self.channels:
            raise ValueError(f"a tile value with {value.shape[-1]} channels added to a {self.channels}-channel heatmap")
        height, width = self._count.shape
        x0, y0 = round(x * self.scale_x), round(y * self.scale_y)
        x1, y1 = max(x0 + 1, round((x + side) * self.scale_x)), max(y0 + 1, round((y + side) * self.scale_y))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if cx1 <= cx0 or cy1 <= cy0:
            return
        patch = resize_nearest(value, (y1 - y0, x1 - x0))[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        self._sum[cy0:cy1, cx0:cx1] += patch
        self._count[cy0:cy1, cx0:cx1] += 1

    def image(self) -> np.ndarray:
        """The canvas (height, width, channels) in float32: the mean of the tiles over each pixel, NaN where none."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self._sum / self._count[..., None]).astype(np.float32)


def pca_colours(embeddings: np.ndarray, batch_rows: int = 4096) -> np.ndarray:
    """The first three principal components of ``embeddings`` (n, D) as colours (n, 3) in [0, 1], each component
    min-max scaled over the tiles (DINOv2's feature visualisation).

    The exact PCA, from the D x D covariance summed ``batch_rows`` rows at a time, so a memory-mapped ``.npy`` of
    a large slide's embeddings is never loaded whole: scikit-learn's ``PCA`` needs every row in memory, and its
    ``IncrementalPCA`` is approximate (third component correlated 0.93 with the exact one on 500 rows in batches
    of 64). Rows are shifted by the first one before summing, against cancellation when the mean is large.
    Each component's sign is fixed (largest loading positive) so a rerun gives the same colours; components
    that n tiles of D features cannot have (beyond ``min(n - 1, D)``) are 0.
    """
    n, dim = embeddings.shape
    components = min(3, n - 1, dim)
    colours = np.zeros((n, 3), np.float32)
    if components < 1:
        return colours
    shift = np.asarray(embeddings[0], np.float64)
    total, gram = np.zeros(dim), np.zeros((dim, dim))
    for rows in gen_batches(n, batch_rows):
        chunk = np.asarray(embeddings[rows], np.float64) - shift
        total += chunk.sum(axis=0)
        gram += chunk.T @ chunk
    mean = total / n
    _, vectors = np.linalg.eigh((gram - n * np.outer(mean, mean)) / (n - 1))
    axes = vectors[:, ::-1][:, :components]  # eigh sorts ascending
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(components)])
    for rows in gen_batches(n, batch_rows):
        colours[rows, :components] = (np.asarray(embeddings[rows], np.float64) - shift - mean) @ axes
    low, high = colours.min(axis=0), colours.max(axis=0)
    return (colours - low) / np.where(high > low, high - low, 1.0)
