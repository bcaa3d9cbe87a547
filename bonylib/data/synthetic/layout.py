"""Where tissue and each growth pattern go: zone maps for synthetic slides and patch regions.

The renderer (:mod:`bonylib.data.synthetic.tissue`) paints glands inside zones; this module
decides the zones. Cases are drawn like real biopsies: needle cores (long, narrow, slightly bent
bands, sometimes broken) on glass, and inside them patches of one growth pattern each, with the
tumour patterns in the proportions that a target ISUP grade implies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from bonylib.data.synthetic.tissue import ZONE_BENIGN, ZONE_STROMA

# Zone maps are computed on a grid this many times coarser than the image, then enlarged:
# boundaries are organic at this scale and the Voronoi query stays cheap at slide size.
_COARSE = 8

# (primary, secondary) patterns that give each ISUP grade group; one is drawn per cancer case.
_SCORES_BY_ISUP: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((3, 3),),
    2: ((3, 4),),
    3: ((4, 3),),
    4: ((4, 4), (3, 5), (5, 3)),
    5: ((4, 5), (5, 4), (5, 5)),
}


@dataclass(frozen=True)
class Case:
    """The composition a synthetic biopsy is drawn from: zone code → fraction of the tissue."""

    mix: dict[int, float]


def sample_case(rng: np.random.Generator, benign_fraction: float) -> Case:
    """Draw a benign case, or a cancer case of uniformly drawn ISUP grade 1–5.

    The tumour takes 35–75 % of the tissue, the primary pattern 60–85 % of the tumour; the rest is
    benign glands and stroma, as in a biopsy that hits a tumour focus.
    """
    if rng.random() < benign_fraction:
        return Case({ZONE_BENIGN: 0.6, ZONE_STROMA: 0.4})
    isup = int(rng.integers(1, 6))
    options = _SCORES_BY_ISUP[isup]
    primary, secondary = options[int(rng.integers(len(options)))]
    tumour = rng.uniform(0.35, 0.75)
    share = rng.uniform(0.6, 0.85) if primary != secondary else 1.0
    mix = {primary: tumour * share}
    if secondary != primary:
        mix[secondary] = tumour * (1 - share)
    mix[ZONE_BENIGN] = (1 - tumour) * 0.6
    mix[ZONE_STROMA] = (1 - tumour) * 0.4
    return Case(mix)


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _enlarge(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Enlarge a coarse zone map to ``shape`` with a smooth tissue outline.

    Zones are enlarged nearest-neighbour (pattern borders inside tissue are hidden by the glands
    drawn over them), but the tissue/glass border is interpolated, so the section edge is a
    smooth curve and not a staircase of coarse pixels.
    """
    def repeat(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, _COARSE, axis=0), _COARSE, axis=1)[: shape[0], : shape[1]]

    soft = ndimage.gaussian_filter((coarse > 0).astype(np.float32), 0.7)
    tissue = ndimage.zoom(soft, _COARSE, order=1, grid_mode=True, mode="nearest")[: shape[0], : shape[1]] > 0.5
    zones = repeat(coarse)
    # glass pixels that the smooth outline turns into tissue take a neighbouring zone
    grown = repeat(ndimage.grey_dilation(coarse, size=3))
    return np.ascontiguousarray(np.where(tissue, np.where(zones > 0, zones, grown), 0).astype(np.uint8))


def assign_zones(tissue: np.ndarray, case: Case, cell_px: float, rng: np.random.Generator) -> np.ndarray:
    """Split a coarse ``tissue`` mask into Voronoi cells of about ``cell_px`` and give each cell a zone.

    Cells are taken in random order and filled into the case's zones by cumulative tissue area,
    so each pattern covers about its fraction; cell borders are warped by smooth noise so that
    pattern boundaries look like tissue, not polygons.
    """
    h, w = tissue.shape
    zones = np.zeros((h, w), np.uint8)
    if not tissue.any():
        return zones
    n_cells = max(1, int(round(tissue.sum() / (cell_px * cell_px))))
    ys, xs = np.nonzero(tissue)
    pick = rng.choice(len(ys), size=min(n_cells, len(ys)), replace=False)
    seeds = np.stack([ys[pick], xs[pick]], axis=1).astype(np.float32)
    warp = cell_px * 0.35
    qy = ys + warp * _smooth_noise((h, w), cell_px / 3, rng)[ys, xs]
    qx = xs + warp * _smooth_noise((h, w), cell_px / 3, rng)[ys, xs]
    _, cell = cKDTree(seeds).query(np.stack([qy, qx], axis=1))
    area = np.bincount(cell, minlength=len(seeds)).astype(np.float64)
    codes = list(case.mix)
    bounds = np.cumsum([case.mix[c] for c in codes])
    bounds /= bounds[-1]
    order = rng.permutation(len(seeds))
    centre = (np.cumsum(area[order]) - area[order] / 2) / area.sum()
    cell_zone = np.empty(len(seeds), np.uint8)
    cell_zone[order] = np.asarray(codes, np.uint8)[np.minimum(np.searchsorted(bounds, centre), len(codes) - 1)]
    zones[ys, xs] = cell_zone[cell]
    return zones


def biopsy_zones(
    rng: np.random.Generator,
    case: Case,
    mpp: float,
    cores: int,
    core_length_um: float,
    core_width_um: float,
    margin_um: float = 600.0,
    multiple: int = 16,
) -> np.ndarray:
    """Zone map of a slide with ``cores`` needle-biopsy cores laid side by side.

    Height and width are multiples of ``multiple`` so that pyramid levels divide exactly.
    Each core is a band with a gently curving centre line, varying width, rounded ends and,
    sometimes, a break (fragmented core), as on real biopsy slides.
    """
    um = 1.0 / (mpp * _COARSE)  # coarse pixels per micron
    length, width, margin = core_length_um * um, core_width_um * um, margin_um * um
    gap = 0.8 * width
    ch = int(np.ceil(2 * margin + cores * width * 1.3 + (cores - 1) * gap))
    cw = int(np.ceil(2 * margin + length))
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    tissue = np.zeros((ch, cw), bool)
    for k in range(cores):
        x0 = margin + rng.uniform(0, 0.1) * length
        x1 = margin + length * rng.uniform(0.85, 1.0)
        yc = margin + width * 0.65 + k * (width * 1.3 + gap)
        # a capsule around a curved centre line: clipping x to the core's extent rounds the ends
        u = np.clip(xx, x0, x1)
        t = (u - x0) / max(x1 - x0, 1)
        bend = width * 0.3 * np.sin(2 * np.pi * (t * rng.uniform(0.3, 1.0) + rng.uniform()))
        half = width / 2 * (1 + 0.15 * np.sin(2 * np.pi * (t * rng.uniform(1, 3) + rng.uniform())))
        inside = np.hypot(xx - u, yy - yc - bend) < half
        if rng.random() < 0.4:  # a broken core: a thin cut across it
            cut = x0 + rng.uniform(0.3, 0.7) * (x1 - x0)
            inside &= np.abs(xx - cut) > width * rng.uniform(0.05, 0.2)
        tissue |= inside
    # ragged section edges: noise shifts the outline, and the specks it would leave on the glass
    # (tissue is one piece per core, debris is painted separately) are dropped
    edge = ndimage.gaussian_filter(tissue.astype(np.float32), 1.5) + 0.2 * _smooth_noise(tissue.shape, 2.0, rng)
    pieces, count = ndimage.label(edge > 0.5)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    tissue = (sizes >= 0.05 * width * width)[pieces] & (pieces > 0)
    zones = assign_zones(tissue, case, cell_px=350.0 * um, rng=rng)
    h = int(np.ceil(ch * _COARSE / multiple) * multiple)
    w = int(np.ceil(cw * _COARSE / multiple) * multiple)
    big = np.zeros((h, w), np.uint8)
    enlarged = _enlarge(zones, (min(h, ch * _COARSE), min(w, cw * _COARSE)))
    big[: enlarged.shape[0], : enlarged.shape[1]] = enlarged
    return big


def region_zones(
    rng: np.random.Generator, case: Case, shape: tuple[int, int], mpp: float, tissue_edge: bool
) -> np.ndarray:
    """Zone map of a rectangular tissue region (source of SICAPv2 patches and DeepGleason tiles).

    With ``tissue_edge`` a wavy tissue border crosses the region, so that some patches are partly
    glass, as at the edge of a real section.
    """
    ch, cw = -(-shape[0] // _COARSE), -(-shape[1] // _COARSE)
    tissue = np.ones((ch, cw), bool)
    if tissue_edge:
        yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        proj = (yy - ch / 2) * np.sin(angle) + (xx - cw / 2) * np.cos(angle)
        offset = rng.uniform(0.15, 0.4) * max(ch, cw)
        tissue = proj + 0.05 * max(ch, cw) * _smooth_noise((ch, cw), max(ch, cw) / 12, rng) < offset
    um = 1.0 / (mpp * _COARSE)
    zones = assign_zones(tissue, case, cell_px=300.0 * um, rng=rng)
    return _enlarge(zones, shape)

