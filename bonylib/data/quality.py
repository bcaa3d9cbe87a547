"""Tissue detection on a slide thumbnail and keep/drop measures for tiles.

Two filters stand between a slide and the tile manifest:

* :func:`tissue_mask` decides, on a low-resolution image of the whole slide, where tiles may be
  read at all. It thresholds the colourfulness of each pixel: glass is white and debris or dust is
  grey, while H&E-stained tissue is always pink to purple, so *chroma* (max minus min of R, G, B)
  separates the two regardless of how bright the scanner renders the glass. Marker ink is also
  colourful, so it is found separately (:func:`pen_mask`) and removed.
* :func:`tile_measures` and :func:`keep_tiles` then judge each tile that was read: how much glass,
  how many edges, how uniform, how sharp, how much ink. They run on every tile of every slide
  beside JPEG decoding, so they are one compiled pass per tile (numba) over subsampled grids,
  in integer arithmetic (see :func:`tile_measures` for the exact definitions).

The defaults were chosen on real scans (``../shared/data``: histolab's tissue/no-tissue/pen
tiles, one NCT-CRC-HE tile per class, two Aperio slides, HistoPrep's prostate biopsy with ink)
and on the synthetic PANDA slides; the numbers are in the option help texts and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_objects

from bonylib.compiled import grid_cells, kernel
from bonylib.config import check_fractions, option
from bonylib.errors import ConfigError

MEASURES: tuple[str, ...] = ("background", "edges", "homogeneity", "blur", "pen")
"""Tile-manifest column names of :func:`tile_measures`, in this order."""

# A glass pixel: every channel bright and the three nearly equal. The brightness bound is well
# below white because some scanners render glass grey (histolab's no-tissue-line tile: 220-225);
# the chroma bound sits above the JPEG and white-balance noise of glass (99th percentile <= 10 on
# the glass tiles) but below stained tissue (pale mucin and fat membranes reach 12-40).
GLASS_MIN_LEVEL = 200
GLASS_MAX_CHROMA = 12
# Colour measures (background, pen) sample every 4th row and column: a fraction needs no more
# (56 x 56 samples of a 224 tile), and the colour rules are the costliest part of the measures.
COLOUR_STEP = 4
# An edge pixel: |dx| + |dy| of the green channel on the 2x grid above this many grey levels.
EDGE_MIN_GRADIENT = 24
# GLCM homogeneity is computed on the green channel quantised to 256 >> 3 = 32 grey levels.
HOMOGENEITY_LEVEL_BITS = 3


@dataclass
class TissueConfig:
    """Options of tissue detection (config section ``tissue`` of ``bony tile``)."""

    detect_mpp: float = option(8.0, "µm/px at which tissue is detected (the slide level closest to it is used)")
    smooth_um: float = option(
        0.0, "sigma (µm) of a Gaussian smoothing of chroma before thresholding, for a noisy image (0: none; "
             "a slide level or an area-averaged thumbnail at 8 µm/px is already the mean of >= 256 scan pixels, "
             "and smoothing widens the mask by blurring the tissue edge outwards)")
    glass_margin: float = option(
        12.0, "chroma (max-min of RGB, 0-255) above the glass's own that counts as stain: the threshold is the "
              "median chroma of Otsu's glass class plus this, so tinted glass (synthetic PANDA: 3-12) is "
              "followed and pale tissue (fat, mucin, loose stroma: 15-30 at 8 µm/px) is kept")
    min_threshold: float = option(
        10.0, "lowest chroma threshold: above the JPEG noise and dust of white glass (99th percentile <= 8)")
    max_threshold: float = option(
        25.0, "highest chroma threshold: keeps pale tissue when Otsu's 'glass' class is itself pale tissue "
              "(an image that is nearly all tissue)")
    closing_um: float = option(
        16.0, "radius (µm) of the morphological closing that joins tissue across thin pale gaps")
    max_hole_um2: float = option(
        250000.0, "enclosed glass up to this area (µm²; 0.25 mm², a large gland lumen or tear) counts as tissue")
    min_object_um2: float = option(
        10000.0, "tissue pieces smaller than this (µm²; 0.01 mm², under one 224 px tile at 0.5 µm/px) are dropped "
                 "as dust and debris")
    min_pen_um2: float = option(
        1000.0, "marker-ink pieces smaller than this (µm²) are ignored: single stain pixels that pass the ink "
                "colour rules, not strokes (a stroke is 0.3 mm wide or more)")
    pen_margin_um: float = option(
        16.0, "marker ink is removed from the mask with this margin (µm): the blurred rim of a stroke is "
              "paler than its core but not tissue")

    def __post_init__(self) -> None:
        if not self.detect_mpp > 0:
            raise ConfigError(f"tissue.detect_mpp must be positive, got {self.detect_mpp}")
        for name in ("smooth_um", "glass_margin", "closing_um", "max_hole_um2", "min_object_um2", "min_pen_um2",
                     "pen_margin_um"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tissue.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_threshold <= self.max_threshold <= 255:
            raise ConfigError(
                "tissue.min_threshold and tissue.max_threshold: need 0 <= min_threshold <= max_threshold <= 255, "
                f"got {self.min_threshold}, {self.max_threshold}")


@dataclass
class QualityConfig:
    """Per-tile keep/drop thresholds (config section ``quality``).

    A tile is dropped by the first rule it fails, in the order background, pen, blur, edges,
    homogeneity; the manifest keeps every measure so the thresholds can be changed afterwards.
    """

    max_background: float = option(
        0.85, "drop a tile whose fraction of glass pixels is above this (the seed's emptiness). Glass tiles "
              "measure >= 0.97; the emptiest tissue, fat (NCT-CRC ADI) and mucin (MUC), 0.70")
    max_pen: float = option(
        0.05, "drop a tile whose fraction of marker-ink pixels is above this: pathologists circle cancer in "
              "ink, a shortcut a self-supervised encoder would learn. Ink-free tissue measures <= 0.007")
    min_blur: float = option(
        150.0, "drop a tile whose variance of the Laplacian (green channel, 2x grid) is below this: out of "
               "focus. Sharp tissue >= 438 (synthetic PANDA; real scans >= 524), glass <= 100, real tissue "
               "tiles blurred by a Gaussian of sigma 1 px: 115-1100, of 2 px: 17-206")
    min_edges: float = option(
        0.05, "drop a tile whose fraction of edge pixels is below this: no structure to learn from. Tissue "
              ">= 0.095 (smooth muscle, synthetic PANDA), glass <= 0.026")
    max_homogeneity: float = option(
        0.9, "drop a tile whose GLCM homogeneity (0-1, 1 = flat) is above this: a uniform smear, fold or "
             "padding. Tissue <= 0.78 (fat), flat glass and ink 0.89-1")

    def __post_init__(self) -> None:
        check_fractions("quality", self, ("max_background", "max_pen", "min_edges", "max_homogeneity"))
        if self.min_blur < 0:
            raise ConfigError(f"quality.min_blur must be >= 0, got {self.min_blur}")


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 as is; ``(..., 4)`` uint8 RGBA composited over white.

    Transparent pixels are glass, not black: OpenSlide returns (0, 0, 0, 0) outside the scanned
    region, and PNG tiles may carry alpha. Dropping alpha instead would turn them into dark,
    unsaturated pixels that look like black ink.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim < 2 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected a (..., 3) RGB or (..., 4) RGBA uint8 array, got {image.dtype} {image.shape}")
    if image.shape[-1] == 3:
        return image
    alpha = image[..., 3:].astype(np.uint16)
    over_white = image[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127
    return (over_white // 255).astype(np.uint8)


@kernel(inline="always")
def _is_pen(r: int, g: int, b: int) -> bool:
    """Whether one pixel (R, G, B as signed integers) is marker ink (see :func:`pen_mask`). The one
    statement of the rules: the tissue mask and the tile measures both call it."""
    hi, lo = max(r, g, b), min(r, g, b)
    chroma = hi - lo
    gr = g - r
    # green, cyan and light blue: greener than red, which neither H nor E ever is
    cool = (gr >= 10) & (r <= 200) & (chroma >= 25)
    # dark blue: far bluer than red while not redder than green (haematoxylin is violet: R > G)
    blue = (b - r >= 60) & (gr >= -5)
    # black and grey: neutral and dark; saturated-black nuclei pixels (min < 20) are not ink
    black = (hi <= 150) & (lo >= 20) & (chroma <= 15)
    # red: deep red without the blue of eosin and red cells (B > G by 20 or more in real H&E; dense
    # eosin after Macenko's reference vector comes close in B - G but not in R - G)
    red = (r - g >= 100) & (b - g <= 15)
    return cool | blue | black | red


@kernel()
def _pen_pixels(pixels: np.ndarray, out: np.ndarray) -> None:
    """``out[i]`` = whether pixel ``i`` of ``pixels`` ((P, 3) uint8) is marker ink."""
    for i in range(pixels.shape[0]):
        out[i] = _is_pen(np.int32(pixels[i, 0]), np.int32(pixels[i, 1]), np.int32(pixels[i, 2]))


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of marker-ink pixels (green, blue, black, red) in any ``(..., 3)`` uint8 array.

    H&E dyes share a colour gamut: haematoxylin and eosin both absorb green at least as much as
    red, so stained tissue is never greener than it is red, its blue exceeds red only modestly
    and it is never neutral grey. Marker dyes leave that gamut, and pixel rules on channel
    differences find them with no per-slide fitting. Measured on real scans: ink-free tissue
    (9 NCT-CRC classes, histolab and HistoPrep tiles, two Aperio slides) has at most 0.6 % of
    pixels flagged (isolated demosaicing fringes, saturated nuclei), while the pixels of
    histolab's green ink are 97 % and of HistoPrep's blue ink 85 % flagged. Thick blue or black
    ink over dense nuclei and translucent red over eosin cannot be told from stain by colour and
    are partly missed.
    """
    rgb = as_rgb(rgb)
    out = np.empty(rgb.shape[:-1], bool)
    _pen_pixels(np.ascontiguousarray(rgb).reshape(-1, 3), out.reshape(-1))
    return out


def tissue_mask(rgb: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    """``(H, W, 3)`` uint8 image of a whole slide at ``mpp`` µm/px → ``(H, W)`` bool tissue mask.

    Stain is told from glass by chroma (max - min of R, G, B) rather than HSV saturation as in
    CLAM, HistoPrep or TRIDENT: saturation divides by brightness and explodes on dark noise,
    scanner padding and black ink. The threshold follows each slide's glass: Otsu on the chroma
    (smoothed by ``smooth_um``, if set) finds the glass class, and the threshold is that class's
    median plus ``glass_margin``, capped by Otsu itself, clamped to ``[min_threshold,
    max_threshold]``. A fixed threshold would either swallow tinted glass or lose pale tissue;
    Otsu alone splits tissue into pale and dark when a slide is nearly all tissue, and cuts pale
    tissue short because the tissue class is much broader than the glass one.

    Marker ink (:func:`pen_mask`, specks below ``min_pen_um2`` ignored, widened by
    ``pen_margin_um``) is left out of Otsu and of the mask: it is colourful too. The clean-up is
    in physical units: closing joins fragments across thin pale gaps, enclosed holes up to
    ``max_hole_um2`` are filled, and pieces smaller than ``min_object_um2`` (dust, fibres) are
    dropped. RGBA is composited over white first.

    An image two or more times finer than ``cfg.detect_mpp`` (a slide without a low-resolution
    level) is area-averaged down to it first and the mask scaled back up: the chroma thresholds
    hold for pixels that average many scan pixels, and morphology at full resolution would take
    seconds to minutes.
    """
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    rgb = as_rgb(rgb)
    if rgb.ndim != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    factor = int(cfg.detect_mpp / mpp)
    if factor < 2:
        return _tissue_mask(rgb, mpp, cfg)
    height, width = rgb.shape[:2]
    padded = np.pad(rgb, ((0, -height % factor), (0, -width % factor), (0, 0)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor, 3)
    small = np.rint(blocks.mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)
    mask = _tissue_mask(small, mpp * factor, cfg)
    return np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)[:height, :width]


def _tissue_mask(rgb: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    """:func:`tissue_mask` of an RGB image at about ``cfg.detect_mpp`` or coarser."""
    pixel_um2 = mpp * mpp
    ink = _remove_smaller(pen_mask(rgb), cfg.min_pen_um2 / pixel_um2)
    margin = int(round(cfg.pen_margin_um / mpp))
    if margin >= 1 and ink.any():
        ink = ndi.binary_dilation(ink, disk(margin))

    chroma = (rgb.max(axis=-1) - rgb.min(axis=-1)).astype(np.float32)  # uint8: the max is never below the min
    if cfg.smooth_um > 0:
        chroma = ndi.gaussian_filter(chroma, cfg.smooth_um / mpp)
    stained = chroma[~ink]
    if stained.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    otsu = threshold_otsu(stained) if stained.min() < stained.max() else float(stained[0])
    glass = float(np.median(stained[stained <= otsu]))
    threshold = float(np.clip(min(otsu, glass + cfg.glass_margin), cfg.min_threshold, cfg.max_threshold))
    mask = chroma > threshold

    radius = int(round(cfg.closing_um / mpp))
    if radius >= 1:
        # pad with the border pixels, so that tissue cut by the image edge is not eroded there
        padded = np.pad(mask, radius, mode="edge")
        mask = ndi.binary_closing(padded, disk(radius))[radius:-radius, radius:-radius]
    mask = _fill_holes(mask, int(cfg.max_hole_um2 / pixel_um2))
    return _remove_smaller(mask & ~ink, cfg.min_object_um2 / pixel_um2)


def _remove_smaller(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop connected pieces of fewer than ``min_pixels`` pixels."""
    return remove_small_objects(mask, max_size=max(int(np.ceil(min_pixels)) - 1, 0))


def _fill_holes(mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """Fill enclosed background regions of at most ``max_pixels``; glass at the image border is
    never a hole (scikit-image's ``remove_small_holes`` would fill a small glass corner too).

    The glass is labelled once and its pieces that touch the border are the outside: the same
    holes as ``ndi.binary_fill_holes`` (4-connected both ways), at a third of its time, which
    propagates the outside from the border one pixel per pass."""
    labels, _ = ndi.label(~mask)
    small = np.bincount(labels.ravel()) <= max_pixels
    small[0] = False
    small[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    return mask | small[labels]


def tile_measures(tiles: np.ndarray) -> dict[str, np.ndarray]:
    """``(N, H, W, 3)`` uint8 tiles (RGBA composited over white) → ``{measure: (N,) float32}``.

    They run beside the JPEG decoding of every tile, so they work on subsampled grids: the colour
    fractions on every 4th row and column (``COLOUR_STEP``; a fraction needs no more, and it is
    unbiased there), the texture measures on every 2nd (gradients between neighbouring samples
    still see cell-scale structure, at a quarter of the work). Grey is the green channel, where
    both haematoxylin and eosin absorb: it carries most of the H&E contrast and costs no colour
    conversion.

    - ``background``: fraction of glass pixels (min of R, G, B >= 200 and chroma <= 12);
    - ``edges``: fraction of pixels with ``|dx| + |dy|`` of grey above ``EDGE_MIN_GRADIENT``;
    - ``homogeneity``: GLCM homogeneity (scikit-image's ``sum P(i, j) / (1 + (i - j)^2)``) of grey
      quantised to 32 levels, for neighbour pairs at distance 1 along rows and along columns,
      averaged: 1 for a flat tile, near 0 for noise;
    - ``blur``: variance of the 4-neighbour Laplacian of grey; lower is blurrier;
    - ``pen``: fraction of marker-ink pixels (:func:`pen_mask`).
    """
    tiles = as_rgb(tiles)
    if tiles.ndim != 4 or tiles.shape[1] < 6 or tiles.shape[2] < 6:
        raise ValueError(f"expected (N, H, W, 3) tiles of at least 6x6 pixels, got shape {tiles.shape}")
    n = tiles.shape[0]
    return grid_measures(tiles[:, :, None], np.arange(n), np.zeros(n, np.intp))


def grid_measures(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`tile_measures` of the tiles at ``(rows, cols)`` of a ``(Y, H, X, W, 3)`` uint8 RGB grid
    (a block of a slide reshaped into tiles of ``H x W``), without cutting the tiles out.

    Each tile is measured in one compiled pass that reads only the subsampled pixels the measures
    use, straight from the grid: in numpy, gathering them and the temporaries of five measures
    cost three times as much (bench_tiling's slides: 145 against 50 µs a tile, Xeon AVX-512). A
    tile's measures depend on its pixels alone, not on the other tiles of the call: each is exact
    integer arithmetic, or a float sum that is exact in any order (see :func:`_measure_tiles`).
    """
    grid, rows, cols = grid_cells(grid, rows, cols, 5)
    if grid.shape[4] != 3 or grid.shape[1] < 6 or grid.shape[3] < 6:
        raise ValueError(f"expected RGB tiles of at least 6x6 pixels, got a grid of shape {grid.shape}")
    out = np.empty((len(MEASURES), len(rows)), np.float32)
    _measure_tiles(grid, rows, cols, out)
    return dict(zip(MEASURES, out))


@kernel(fastmath={"reassoc"}, error_model="numpy")
def _homogeneity_sum(levels: np.ndarray, neighbours: np.ndarray) -> float:
    """Sum of ``1 / (1 + d^2)`` over the differences ``d`` of two rows of grey levels, each term
    rounded to float32 as scikit-image's float32 matrix would hold it.

    Every term is a multiple of 2^-33 (the float32 ulp of the smallest, 1/962) and a tile's sum is
    at most its number of pixel pairs, below 2^20 for tiles up to 2048 px a side, so every partial
    sum is exact in float64 (20 + 33 bits): the order of the additions (free here, so that they
    vectorise) cannot change the result, on any CPU."""
    total = 0.0
    for j in range(levels.shape[0]):
        # a shift, not //: floor division's sign handling keeps the loop from vectorising (grey is never negative)
        d = np.float32((levels[j] >> HOMOGENEITY_LEVEL_BITS) - (neighbours[j] >> HOMOGENEITY_LEVEL_BITS))
        total += np.float64(np.float32(1.0) / (np.float32(1.0) + d * d))
    return total


@kernel(error_model="numpy")
def _measure_tiles(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> None:
    """``out[:, i]`` = the measures (``MEASURES`` order) of the tile at ``grid[rows[i], :, cols[i]]``.

    Counts are integers; the blur's Laplacian sums are int64 (exact, as the float64 sums of the
    definition); homogeneity sums are exact (:func:`_homogeneity_sum`). Numpy's error model: a float
    division by zero would give inf instead of a check in every loop, which keeps them vectorised;
    no divisor here can be zero (tiles are at least 6 px a side)."""
    height, width = grid.shape[1], grid.shape[3]
    colour_h, colour_w = (height + COLOUR_STEP - 1) // COLOUR_STEP, (width + COLOUR_STEP - 1) // COLOUR_STEP
    grey_h, grey_w = (height + 1) // 2, (width + 1) // 2
    grey = np.empty((grey_h, grey_w), np.int32)
    for t in range(rows.shape[0]):
        tile = grid[rows[t], :, cols[t]]
        glass = 0
        pen = 0
        for i in range(colour_h):
            for j in range(colour_w):
                y, x = i * COLOUR_STEP, j * COLOUR_STEP
                r, g, b = np.int32(tile[y, x, 0]), np.int32(tile[y, x, 1]), np.int32(tile[y, x, 2])
                lo = min(r, g, b)
                glass += (lo >= GLASS_MIN_LEVEL) & (max(r, g, b) - lo <= GLASS_MAX_CHROMA)
                pen += _is_pen(r, g, b)
        for i in range(grey_h):
            for j in range(grey_w):
                grey[i, j] = tile[2 * i, 2 * j, 1]
        edges = 0
        lap_sum, lap_squares = np.int64(0), np.int64(0)
        across, down = 0.0, 0.0
        for i in range(grey_h - 1):
            row, below = grey[i], grey[i + 1]
            row_edges = np.int32(0)
            for j in range(grey_w - 1):
                row_edges += np.abs(row[j + 1] - row[j]) + np.abs(below[j] - row[j]) > EDGE_MIN_GRADIENT
            edges += row_edges
            across += _homogeneity_sum(row[1:], row[:-1])
            down += _homogeneity_sum(below, row)
            if i >= 1:
                above = grey[i - 1]
                for j in range(1, grey_w - 1):
                    lap = np.int64(4 * row[j] - above[j] - below[j] - row[j - 1] - row[j + 1])
                    lap_sum += lap
                    lap_squares += lap * lap
        across += _homogeneity_sum(grey[grey_h - 1, 1:], grey[grey_h - 1, :-1])
        colour_samples = colour_h * colour_w
        laplacians = (grey_h - 2) * (grey_w - 2)
        lap_mean = lap_sum / laplacians
        out[0, t] = glass / colour_samples
        out[1, t] = edges / ((grey_h - 1) * (grey_w - 1))
        out[2, t] = (np.float32(across / (grey_h * (grey_w - 1))) + np.float32(down / ((grey_h - 1) * grey_w))) / 2
        out[3, t] = lap_squares / laplacians - lap_mean * lap_mean
        out[4, t] = pen / colour_samples


def keep_tiles(measures: dict[str, np.ndarray], cfg: QualityConfig) -> tuple[np.ndarray, np.ndarray]:
    """→ ``(keep, reason)``: ``keep`` (N,) bool; ``reason`` (N,) object array, ``''`` if kept, else
    the first rule the tile failed, in the order background, pen, blur, edges, homogeneity.

    The order puts the cheapest-to-explain cause first: a glass tile is also flat and has no
    edges, but "background" is what a reader of the manifest wants to see.
    """
    missing = [name for name in MEASURES if name not in measures]
    if missing:
        raise KeyError(f"measures lack {', '.join(missing)} (expected {', '.join(MEASURES)})")
    rules = (
        ("background", np.asarray(measures["background"]) > cfg.max_background),
        ("pen", np.asarray(measures["pen"]) > cfg.max_pen),
        ("blur", np.asarray(measures["blur"]) < cfg.min_blur),
        ("edges", np.asarray(measures["edges"]) < cfg.min_edges),
        ("homogeneity", np.asarray(measures["homogeneity"]) > cfg.max_homogeneity),
    )
    n = len(rules[0][1])
    reason = np.full(n, "", dtype=object)
    for name, failed in reversed(rules):
        reason[failed] = name
    return reason == "", reason
