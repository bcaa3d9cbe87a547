"""Paint H&E-like prostate tissue from a zone map.

The synthetic datasets must be learnable the way real ones are: a self-supervised encoder should
tell benign tissue from Gleason 3, 4 and 5 by gland architecture and nuclear detail, not by
colour. So each class is drawn from its histological definition (ISUP 2014):

* stroma: fibromuscular, pink wavy fibres with sparse spindle nuclei;
* benign: large glands with papillary infoldings, a pale lumen and two cell layers (flat basal
  nuclei on the basement membrane, columnar luminal cells above them), in abundant stroma;
* Gleason 3: small, round, separate, well-formed glands with one cell layer and a lumen;
* Gleason 4: fused, poorly formed glands and cribriform nests (epithelium punched by many small
  round lumens);
* Gleason 5: solid sheets, cords and single cells with no lumens, sometimes comedonecrosis.

Nuclei get larger, darker, more irregular and more crowded with grade. Colour comes last, from
stain concentrations through Beer–Lambert optical density, and every slide draws its own stain
vectors, intensities and scanner brightness (:func:`sample_stain`) so that colour varies between
slides as much as between classes. Sizes are physical (µm) and converted with the microns per
pixel, so a 10x render (SICAPv2) shows the same tissue at half the pixel size of a 20x one (PANDA).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

ZONE_BACKGROUND = 0  # glass
ZONE_STROMA = 1  # stroma only, no glands
ZONE_BENIGN = 2  # benign glands in stroma
ZONE_G3 = 3  # Gleason pattern 3
ZONE_G4 = 4  # Gleason pattern 4
ZONE_G5 = 5  # Gleason pattern 5

# What each pixel is made of, which decides its stain uptake (labels only say which class it is).
_GLASS, _STROMA, _EPI, _LUMEN, _SECRETION, _NECROSIS = range(6)

# Reference H and E optical-density vectors (Macenko et al. 2009, the usual stain-normalisation
# reference; Ruifrok & Johnston's eosin absorbs too little blue and paints stroma magenta).
_H_REF = (0.5626, 0.7201, 0.4062)
_E_REF = (0.2159, 0.8012, 0.5581)

# Cytoplasm stain (eosin, haematoxylin) by Radboud label: benign luminal cells are pale and clear,
# cancer cytoplasm is amphophilic (more haematoxylin) and denser with grade.
_CYTO_E = np.array([0.0, 0.0, 0.25, 0.32, 0.34, 0.36], np.float32)
_CYTO_H = np.array([0.0, 0.0, 0.08, 0.2, 0.24, 0.26], np.float32)

# Gland grids, µm between neighbouring gland centres: benign glands sit far apart in abundant
# stroma, Gleason 3 glands are crowded but separate, Gleason 4 nests nearly touch.
_GLAND_SPACING_UM = {ZONE_BENIGN: 290.0, ZONE_G3: 95.0, ZONE_G4: 130.0}
_GLAND_GAP_UM = 7.0  # thinnest stroma left between two neighbouring glands


@dataclass(frozen=True)
class Stain:
    """Per-slide stain and scanner appearance.

    Real slides differ in haematoxylin and eosin batch, staining time, section thickness and
    scanner: this is what makes colour a poor cue across slides, and what colour augmentation in
    self-supervised training must cover.
    """

    h_od: tuple[float, float, float]  # haematoxylin optical-density vector (unit length, R G B)
    e_od: tuple[float, float, float]  # eosin optical-density vector
    h_scale: float  # haematoxylin uptake (stain time, batch)
    e_scale: float  # eosin uptake
    background: tuple[float, float, float]  # light through bare glass, 0–255 per channel (white balance)
    blur_um: float  # scanner point-spread sigma, µm (focus quality)
    noise: float  # sensor noise sigma in 8-bit levels


def sample_stain(rng: np.random.Generator) -> Stain:
    """Draw one slide's stain: vectors jittered around the reference, log-normal dye uptakes.

    The uptake spread (about ±40 %, partly shared by both dyes through section thickness) is
    wider than the colour difference between tissue classes, so that mean colour alone cannot
    tell a Gleason 5 sheet from Gleason 3 glands.
    """

    def unit(ref: tuple[float, float, float], sd: float) -> tuple[float, float, float]:
        v = np.clip(np.asarray(ref) + rng.normal(0.0, sd, 3), 0.02, None)
        v /= np.linalg.norm(v)
        return (float(v[0]), float(v[1]), float(v[2]))

    glass = np.clip(rng.uniform(218.0, 250.0) + rng.normal(0.0, 4.0, 3), 200.0, 255.0)  # brightness, white balance
    thickness = rng.normal(0.0, 0.22)  # a thicker section takes up more of both dyes
    return Stain(
        h_od=unit(_H_REF, 0.04),
        e_od=unit(_E_REF, 0.045),
        h_scale=float(np.exp(thickness + rng.normal(0.0, 0.25))),
        e_scale=float(np.exp(thickness + rng.normal(0.0, 0.25))),
        background=(float(glass[0]), float(glass[1]), float(glass[2])),
        blur_um=float(rng.uniform(0.25, 0.6)),
        noise=float(rng.uniform(1.0, 3.5)),
    )


@dataclass(frozen=True)
class Rendered:
    """A painted region and its ground truth."""

    rgb: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8, Radboud codes: 0 background, 1 stroma, 2 benign epithelium, 3/4/5 Gleason
    cribriform: np.ndarray  # (H, W) bool, footprint (epithelium and its lumens) of cribriform Gleason-4 glands


# ----------------------------------------------------------------------------------------------
# small numeric helpers


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _upsample(low: np.ndarray, step: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0:r1, columns c0:c1 of a bilinear enlargement of ``low`` by an integer ``step``.

    Full-resolution pixel (y, x) sits at coarse coordinate (y/step + 1, x/step + 1), so a coarse
    grid needs one cell of margin before and three after. Any block can be drawn alone, and
    neighbouring blocks join without seams; the integer step turns the column interpolation into
    a broadcast instead of a gather.
    """
    ys = np.arange(r0, r1)
    i = ys // step + 1
    f = ((ys % step) / step).astype(np.float32)[:, None]
    j0, j1 = c0 // step, (c1 - 1) // step + 1
    top, bottom = low[i, j0 + 1 : j1 + 2], low[i + 1, j0 + 1 : j1 + 2]
    rows = top * (1 - f) + bottom * f
    if step == 1:
        return rows[:, : c1 - c0]
    g = np.arange(step, dtype=np.float32) / np.float32(step)
    out = rows[:, :-1, None] * (1 - g) + rows[:, 1:, None] * g
    off = c0 - j0 * step
    return out.reshape(rows.shape[0], -1)[:, off : off + c1 - c0]


class _Field:
    """Unit-variance smooth Gaussian random field over an image, features about ``scale_px`` across.

    Stored on a coarse grid (about six samples per feature, so that thresholded outlines stay
    smooth curves rather than bilinear polygons) and enlarged on demand, block by block: texture
    for a slide of any size costs a few operations per pixel and little memory.
    """

    def __init__(self, shape: tuple[int, int], scale_px: float, rng: np.random.Generator, step: int | None = None) -> None:
        self.step = max(1, int(round(scale_px / 6.0))) if step is None else step
        grid = (shape[0] // self.step + 4, shape[1] // self.step + 4)
        sigma = 0.4 * scale_px / self.step
        low = ndi.gaussian_filter(rng.standard_normal(grid, dtype=np.float32), sigma)
        # scale by the filter's own gain, not the sample's spread: over an image smaller than the
        # features the field must stay nearly constant, not be inflated to unit variance
        impulse = np.zeros(2 * int(4 * sigma + 1) + 1)
        impulse[impulse.size // 2] = 1.0
        low *= np.float32(1.0 / np.square(ndi.gaussian_filter1d(impulse, sigma, mode="constant")).sum())
        self.low = low

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return _upsample(self.low, self.step, r0, r1, c0, c1)

    def at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Values at points (bilinear, same convention as :meth:`block`)."""
        u, v = np.asarray(y) / self.step + 1, np.asarray(x) / self.step + 1
        i = np.clip(np.floor(u).astype(np.intp), 0, self.low.shape[0] - 2)
        j = np.clip(np.floor(v).astype(np.intp), 0, self.low.shape[1] - 2)
        fu, fv = np.clip(u - i, 0, 1), np.clip(v - j, 0, 1)
        low = self.low
        return (low[i, j] * (1 - fu) * (1 - fv) + low[i + 1, j] * fu * (1 - fv)
                + low[i, j + 1] * (1 - fu) * fv + low[i + 1, j + 1] * fu * fv)


def _jittered_grid(
    box: tuple[int, int, int, int], spacing: float, jitter: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Points one per ``spacing`` cell, moved by up to ``jitter`` × spacing.

    Cells and glands pack like this: more even than a Poisson process (no clumps, no overlaps),
    less regular than a lattice.
    """
    y0, y1, x0, x1 = box
    gy = np.arange(y0 + spacing / 2, y1, spacing)
    gx = np.arange(x0 + spacing / 2, x1, spacing)
    cy, cx = np.meshgrid(gy, gx, indexing="ij")
    cy = cy.ravel() + rng.uniform(-jitter, jitter, cy.size) * spacing
    cx = cx.ravel() + rng.uniform(-jitter, jitter, cx.size) * spacing
    return cy, cx


def _at(image: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Values of ``image`` at the pixels nearest to points (clamped to the image)."""
    iy = np.clip(np.rint(cy).astype(np.intp), 0, image.shape[0] - 1)
    ix = np.clip(np.rint(cx).astype(np.intp), 0, image.shape[1] - 1)
    return image[iy, ix]


def _footprints(
    shape: tuple[int, int],
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    bean: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pixels covered by many small ellipses, in vectorised batches.

    Yields ``(which, flat, q2)``: the ellipse index, the flat pixel index and the squared
    normalised radius (0 at the centre, 1 on the outline) of every covered pixel. ``a`` is the
    semi-axis along ``theta`` (radians from the +x axis), ``b`` across it; ``bean`` bends the
    ellipse into a kidney shape, the irregular outline of a pleomorphic nucleus.
    """
    h, w = shape
    half = np.ceil(np.maximum(a, b) * 1.15 + 1.0).astype(np.intp)
    order = np.argsort(half, kind="stable")
    sizes, starts = np.unique(half[order], return_index=True)
    bounds = list(starts) + [order.size]
    for k, lo, hi in zip(sizes, bounds[:-1], bounds[1:]):
        off = np.arange(-k, k + 1, dtype=np.float32)
        chunk = max(1, (1 << 21) // off.size**2)
        for c0 in range(lo, hi, chunk):
            idx = order[c0 : min(hi, c0 + chunk)]
            iy, ix = np.floor(cy[idx]).astype(np.intp), np.floor(cx[idx]).astype(np.intp)
            dy = off[None, :, None] - (cy[idx] - iy).astype(np.float32)[:, None, None]
            dx = off[None, None, :] - (cx[idx] - ix).astype(np.float32)[:, None, None]
            cos = np.cos(theta[idx]).astype(np.float32)[:, None, None]
            sin = np.sin(theta[idx]).astype(np.float32)[:, None, None]
            u = (dx * cos + dy * sin) / a[idx].astype(np.float32)[:, None, None]
            v = (dy * cos - dx * sin) / b[idx].astype(np.float32)[:, None, None]
            q2 = u * u + v * v
            if bean is not None:
                q2 += bean[idx].astype(np.float32)[:, None, None] * u * v * v
            yy = iy[:, None, None] + off.astype(np.intp)[None, :, None]
            xx = ix[:, None, None] + off.astype(np.intp)[None, None, :]
            keep = (q2 < 1.0) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            which = np.broadcast_to(idx[:, None, None], q2.shape)[keep]
            yield which, (yy * w + xx)[keep], q2[keep]


# ----------------------------------------------------------------------------------------------
# nuclei


class _Nuclei:
    """Nuclei collected from every structure, painted together at the end."""

    _FIELDS = ("cy", "cx", "a", "b", "theta", "h", "bean", "vesicular", "nucleolus")

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {f: [] for f in self._FIELDS}

    def add(self, kind: str, cy: np.ndarray, cx: np.ndarray, theta: np.ndarray | None,
            rng: np.random.Generator, um: float) -> None:
        """Nuclei of one cell type; ``theta`` None for random orientation."""
        n = cy.size
        if n == 0:
            return
        a_lo, a_hi, ratio_lo, ratio_hi, h_lo, h_hi, bean, ves_hi, p_nucleolus = _NUCLEUS_STYLE[kind]
        a = rng.uniform(a_lo, a_hi, n)
        self.parts["cy"].append(np.asarray(cy, np.float64))
        self.parts["cx"].append(np.asarray(cx, np.float64))
        self.parts["a"].append(a * um)
        self.parts["b"].append(a * rng.uniform(ratio_lo, ratio_hi, n) * um)
        self.parts["theta"].append(rng.uniform(0, np.pi, n) if theta is None else np.asarray(theta, np.float64))
        self.parts["h"].append(rng.uniform(h_lo, h_hi, n))
        self.parts["bean"].append(rng.uniform(-bean, bean, n))
        self.parts["vesicular"].append(rng.uniform(0.0, ves_hi, n))
        self.parts["nucleolus"].append(np.where(rng.random(n) < p_nucleolus, rng.uniform(0.55, 0.9, n) * um, 0.0))

    def sorted(self, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """All nuclei and their nucleoli, each sorted by row so that a block finds its own fast.

        ``reach`` is the largest distance at which a nucleus (nucleolus) can still colour a pixel.
        """
        nuc = {f: np.concatenate(v) if v else np.zeros(0) for f, v in self.parts.items()}
        order = np.argsort(nuc["cy"], kind="stable")
        nuc = {f: v[order] for f, v in nuc.items()}
        nuc["reach"] = np.asarray(np.max(nuc["a"], initial=0.0) * 1.15 + 2.0)
        has = np.flatnonzero(nuc["nucleolus"] > 0)
        off = 0.3 * nuc["b"][has]
        ang = rng.uniform(0, 2 * np.pi, has.size)
        dots = {"cy": nuc["cy"][has] + off * np.sin(ang), "cx": nuc["cx"][has] + off * np.cos(ang), "r": nuc["nucleolus"][has]}
        order = np.argsort(dots["cy"], kind="stable")
        dots = {f: v[order] for f, v in dots.items()}
        dots["reach"] = np.asarray(np.max(dots["r"], initial=0.0) * 1.15 + 2.0)
        return nuc, dots


# kind: long semi-axis µm (lo, hi), short/long ratio (lo, hi), haematoxylin density (lo, hi),
# outline irregularity, vesicular chromatin (max), probability of a visible nucleolus.
# Prominent nucleoli, vesicular chromatin and size spread (pleomorphism) rise with grade.
_NUCLEUS_STYLE: dict[str, tuple[float, float, float, float, float, float, float, float, float]] = {
    "spindle": (4.5, 7.5, 0.18, 0.28, 1.8, 2.4, 0.15, 0.0, 0.0),  # fibroblasts, smooth muscle
    "lymphocyte": (2.6, 3.3, 0.85, 1.0, 2.6, 3.2, 0.05, 0.0, 0.0),
    "basal": (3.6, 5.0, 0.35, 0.5, 1.8, 2.3, 0.1, 0.0, 0.0),  # flat, along the basement membrane
    "luminal": (2.8, 3.6, 0.65, 0.85, 1.4, 1.8, 0.1, 0.2, 0.0),  # small, bland, uniform
    "g3": (3.0, 4.0, 0.72, 0.95, 1.6, 2.1, 0.2, 0.5, 0.35),
    "g4": (3.3, 4.8, 0.68, 0.95, 1.7, 2.4, 0.3, 0.7, 0.55),
    "g5": (3.6, 6.2, 0.55, 0.95, 1.8, 2.8, 0.45, 0.8, 0.6),
    "karyorrhexis": (0.7, 1.9, 0.5, 1.0, 2.4, 3.2, 0.3, 0.0, 0.0),  # nuclear dust of necrosis
}


def _in_block(cy: np.ndarray, cx: np.ndarray, reach: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Indices of points (sorted by ``cy``) whose footprint, ``reach`` px around them, meets ``box``."""
    r0, r1, c0, c1 = box
    lo, hi = np.searchsorted(cy, [r0 - reach, r1 + reach])
    near = (cx[lo:hi] > c0 - reach) & (cx[lo:hi] < c1 + reach)
    return lo + np.flatnonzero(near)


def _nuclear_density(box: tuple[int, int, int, int], nuc: dict[str, np.ndarray]) -> np.ndarray:
    """Haematoxylin density of the nuclei over ``box`` (flat float32 block).

    Overlapping nuclei take the darker value rather than adding up, as stacked nuclei in a thin
    section do not turn black. Vesicular nuclei (cancer) are paler in the middle, with chromatin
    on the nuclear membrane.
    """
    r0, r1, c0, c1 = box
    out = np.zeros((r1 - r0) * (c1 - c0), np.float32)
    idx = _in_block(nuc["cy"], nuc["cx"], float(nuc["reach"]), box)
    if idx.size == 0:
        return out
    h, ves = nuc["h"][idx].astype(np.float32), nuc["vesicular"][idx].astype(np.float32)
    for which, flat, q2 in _footprints((r1 - r0, c1 - c0), nuc["cy"][idx] - r0, nuc["cx"][idx] - c0, nuc["a"][idx],
                                       nuc["b"][idx], nuc["theta"][idx], nuc["bean"][idx]):
        value = h[which] * np.minimum((1.0 - q2) * 4.0, 1.0) * (1.0 - ves[which] * 0.5 * (1.0 - q2))
        np.maximum.at(out, flat, value)
    return out


def _paint_nucleoli(c_e: np.ndarray, c_h: np.ndarray, box: tuple[int, int, int, int], dots: dict[str, np.ndarray]) -> None:
    """Nucleoli: small magenta dots near the nuclear centre, the classic sign of prostate cancer."""
    r0, r1, c0, c1 = box
    idx = _in_block(dots["cy"], dots["cx"], float(dots["reach"]), box)
    if idx.size == 0:
        return
    r = dots["r"][idx]
    flat_e, flat_h = c_e.reshape(-1), c_h.reshape(-1)
    for _, flat, q2 in _footprints((r1 - r0, c1 - c0), dots["cy"][idx] - r0, dots["cx"][idx] - c0, r, r, np.zeros(r.size)):
        np.maximum.at(flat_e, flat, 1.2 * (1.0 - q2))
        np.maximum.at(flat_h, flat, 2.6 * (1.0 - q2))


# ----------------------------------------------------------------------------------------------
# glands


def _outline(rng: np.random.Generator, radius: float, irregular: float, folds: int = 0) -> np.ndarray:
    """Gland outline radius r(φ) on a table of angles from -π.

    Low harmonics make the gland oval or lobulated; ``folds`` narrow inward notches are the
    papillary infoldings of benign glands (stroma cores lined by epithelium on both sides).
    """
    m = int(np.clip(4 * np.pi * radius, 256, 8192))
    phi = np.linspace(-np.pi, np.pi, m, endpoint=False)
    r = np.ones(m)
    for k in range(2, 6):
        r += irregular * rng.normal() / k * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    for _ in range(folds):
        centre, width = rng.uniform(-np.pi, np.pi), rng.uniform(0.1, 0.2)
        delta = np.angle(np.exp(1j * (phi - centre)))
        r -= rng.uniform(0.15, 0.35) * np.exp(-((delta / width) ** 2))
    return radius * np.maximum(r, 0.3)


def _radial_inside(
    size: tuple[int, int], cy: float, cx: float, r_tab: np.ndarray, shrink: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a box inside a star-shaped outline ``r(φ) - shrink`` around (cy, cx).

    Also returns the angle-table index of each pixel, to look up per-angle properties.
    """
    m = r_tab.size
    dy = (np.arange(size[0], dtype=np.float32) - np.float32(cy))[:, None]
    dx = (np.arange(size[1], dtype=np.float32) - np.float32(cx))[None, :]
    rho = np.sqrt(dy * dy + dx * dx)
    pos = (np.arctan2(dy, dx) + np.float32(np.pi)) * np.float32(m / (2 * np.pi))
    i0 = pos.astype(np.intp)
    f = pos - i0
    i0 %= m
    r32 = r_tab.astype(np.float32) - np.float32(shrink)
    r = r32[i0] * (1 - f) + r32[(i0 + 1) % m] * f
    return rho < r, i0


def _rim_points(
    r_tab: np.ndarray, cy: float, cx: float, spacing: float, depth: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Evenly spaced points at ``depth`` inside the outline, with the local tangent angle.

    Used to line glands with one row of nuclei per cell layer, the palisade that makes a
    well-formed gland. Returns (y, x, tangent angle, normal angle).
    """
    m = r_tab.size
    phi = np.linspace(-np.pi, np.pi, m, endpoint=False)
    rp = (np.roll(r_tab, -1) - np.roll(r_tab, 1)) * (m / (4 * np.pi))
    tx, ty = rp * np.cos(phi) - r_tab * np.sin(phi), rp * np.sin(phi) + r_tab * np.cos(phi)
    speed = np.hypot(tx, ty)
    arc = np.concatenate([[0.0], np.cumsum(speed) * (2 * np.pi / m)])
    n = int(arc[-1] / spacing)
    if n < 3:
        return (np.zeros(0),) * 4
    s = (np.arange(n) + 0.5 + rng.uniform(-0.25, 0.25, n)) * (arc[-1] / n)
    k = np.clip(np.searchsorted(arc, s) - 1, 0, m - 1)
    nx, ny = -ty[k] / speed[k], tx[k] / speed[k]  # left normal of the anticlockwise outline: inward
    y = cy + r_tab[k] * np.sin(phi[k]) + ny * depth
    x = cx + r_tab[k] * np.cos(phi[k]) + nx * depth
    return y, x, np.arctan2(ty[k], tx[k]), np.arctan2(ny, nx)


@dataclass
class _Canvas:
    """Per-pixel maps every structure writes into."""

    zones: np.ndarray
    labels: np.ndarray
    comp: np.ndarray
    cribriform: np.ndarray
    nuclei: _Nuclei
    um: float  # pixels per micron
    corpora: list[tuple[float, float, float]]  # corpora amylacea: (y, x, radius px)


def _box(canvas: _Canvas, cy: float, cx: float, extent: float) -> tuple[int, int, int, int]:
    h, w = canvas.zones.shape
    return (max(0, int(cy - extent)), min(h, int(cy + extent) + 2), max(0, int(cx - extent)), min(w, int(cx + extent) + 2))


def _own(canvas: _Canvas, box: tuple[int, int, int, int], zone: int) -> np.ndarray:
    y0, y1, x0, x1 = box
    return canvas.zones[y0:y1, x0:x1] == zone


def _write_gland(canvas: _Canvas, box: tuple[int, int, int, int], zone: int, epi: np.ndarray,
                 lumen: np.ndarray, secretion: bool) -> None:
    """Commit one gland's epithelium and lumen (already clipped to its zone)."""
    y0, y1, x0, x1 = box
    canvas.labels[y0:y1, x0:x1][epi] = zone
    comp = canvas.comp[y0:y1, x0:x1]
    comp[epi] = _EPI
    comp[lumen] = _SECRETION if secretion else _LUMEN


def _simple_gland(canvas: _Canvas, rng: np.random.Generator, zone: int, cy: float, cx: float, cap: float) -> None:
    """A benign or Gleason 3 gland: one outline, an epithelial rim, a lumen.

    Benign glands are large with papillary infoldings and two cell layers (about 20 µm);
    Gleason 3 glands are small, round, with a single cuboidal layer (about 12 µm) and rigid
    luminal borders, sometimes with pink secretions.
    """
    um = canvas.um
    benign = zone == ZONE_BENIGN
    if benign:
        r_tab = _outline(rng, rng.uniform(65, 170) * um, 0.35, folds=int(rng.integers(3, 9)))
        thick = rng.uniform(15, 22) * um
    else:
        r_tab = _outline(rng, rng.uniform(24, 58) * um, 0.18)
        thick = rng.uniform(10, 14) * um
    r_tab *= min(1.0, cap / r_tab.max())
    if r_tab.mean() < (45 if benign else 18) * um:
        return
    # the luminal border undulates a little (apical snouts, tufts) independently of the outline
    m = r_tab.size
    phi = np.linspace(-np.pi, np.pi, m, endpoint=False)
    t_tab = np.full(m, thick, np.float32)
    ripple = 0.06 if benign else 0.03  # Gleason 3 lumens have rigid, punched-out borders
    for k in range(5, 12):
        t_tab += np.float32(thick * ripple * rng.normal()) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)).astype(np.float32)

    box = _box(canvas, cy, cx, r_tab.max() + 2)
    y0, y1, x0, x1 = box
    inside, i0 = _radial_inside((y1 - y0, x1 - x0), cy - y0, cx - x0, r_tab)
    # true distance to the outline keeps the rim even along the flanks of deep infoldings
    epi = inside & (ndi.distance_transform_edt(inside) <= t_tab[i0])
    own = _own(canvas, box, zone)
    _write_gland(canvas, box, zone, epi & own, inside & ~epi & own, secretion=not benign and rng.random() < 0.3)

    if benign:
        _rim_nuclei(canvas, rng, zone, "basal", r_tab, cy, cx, 10.0 * um, 2.0 * um, along=True)
        _rim_nuclei(canvas, rng, zone, "luminal", r_tab, cy, cx, 7.0 * um, rng.uniform(0.35, 0.5) * thick, along=False)
        if rng.random() < 0.2:
            inner = float(np.maximum(r_tab - thick, 0).min())
            if inner > 20 * um:
                rad = rng.uniform(0.3, 0.6) * inner
                ang = rng.uniform(0, 2 * np.pi)
                canvas.corpora.append((cy + 0.3 * inner * np.sin(ang), cx + 0.3 * inner * np.cos(ang), rad))
    else:
        _rim_nuclei(canvas, rng, zone, "g3", r_tab, cy, cx, 9.0 * um, 0.38 * thick, along=False, wobble=0.3)


def _rim_nuclei(canvas: _Canvas, rng: np.random.Generator, zone: int, kind: str, r_tab: np.ndarray, cy: float,
                cx: float, spacing: float, depth: float, along: bool, wobble: float = 0.0) -> None:
    """One row of nuclei lining a gland, long axis along the basement membrane (basal cells) or
    across it (columnar cells), kept inside the gland's zone."""
    y, x, tangent, normal = _rim_points(r_tab, cy, cx, spacing, depth, rng)
    angle = (tangent if along else normal) + rng.normal(0, wobble, y.size)
    keep = _at(canvas.zones, y, x) == zone
    canvas.nuclei.add(kind, y[keep], x[keep], angle[keep], rng, canvas.um)


def _fused_gland(canvas: _Canvas, rng: np.random.Generator, cy: float, cx: float, cap: float) -> None:
    """Gleason 4 fused/poorly formed glands: several small glands merged into one epithelial mass.

    Their walls merge, so the lumens that remain are small, slit-like or missing. The mass fills
    its space and may reach into its neighbours': Gleason 4 leaves little stroma.
    """
    um = canvas.um
    extent = cap * rng.uniform(1.0, 1.3)
    n = int(rng.integers(5, 11))
    radius = extent * rng.uniform(0.3, 0.5, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    dist = (extent - radius) * np.sqrt(rng.uniform(0, 1, n))
    oy, ox = dist * np.sin(ang), dist * np.cos(ang)
    box = _box(canvas, cy, cx, extent * 1.3 + 2)
    y0, y1, x0, x1 = box
    inside = np.zeros((y1 - y0, x1 - x0), bool)
    for a, b, r in zip(oy, ox, radius):
        inside |= _radial_inside(inside.shape, cy + a - y0, cx + b - x0, _outline(rng, r, 0.45))[0]
    # what is left of the lumens: small round or slit-like spaces, in some of the merged glands
    long = np.minimum(radius * rng.uniform(0.2, 0.45, n), radius - 9 * um)
    has = (rng.random(n) < 0.6) & (long > 1.5)
    long = long[has]
    lumen = np.zeros(inside.size, bool)
    for _, flat, _ in _footprints(inside.shape, cy + oy[has] - y0, cx + ox[has] - x0, long,
                                  long * rng.uniform(0.25, 0.9, long.size), rng.uniform(0, np.pi, long.size)):
        lumen[flat] = True
    lumen = lumen.reshape(inside.shape)
    inside &= _own(canvas, box, ZONE_G4)
    lumen &= inside
    _write_gland(canvas, box, ZONE_G4, inside & ~lumen, lumen, secretion=False)


def _cribriform_gland(canvas: _Canvas, rng: np.random.Generator, cy: float, cx: float, cap: float) -> None:
    """Gleason 4 cribriform gland: a large rounded epithelial nest perforated by many small,
    round, punched-out lumens (the sieve pattern that gives it its name)."""
    um = canvas.um
    r_tab = _outline(rng, rng.uniform(65, 150) * um, 0.12)
    r_tab *= min(1.0, cap / r_tab.max())
    box = _box(canvas, cy, cx, r_tab.max() + 2)
    y0, y1, x0, x1 = box
    inside = _radial_inside((y1 - y0, x1 - x0), cy - y0, cx - x0, r_tab)[0]
    depth = ndi.distance_transform_edt(inside)
    spacing = rng.uniform(24, 34) * um
    ly, lx = _jittered_grid((0, y1 - y0, 0, x1 - x0), spacing, 0.22, rng)
    lr = rng.uniform(0.2, 0.34, ly.size) * spacing
    keep = _at(depth, ly, lx) > lr + 9 * um  # a solid rim of cells outside the outermost lumens
    ly, lx, lr = ly[keep], lx[keep], lr[keep]
    lumen = np.zeros(inside.size, bool)
    for _, flat, _ in _footprints(inside.shape, ly, lx, lr, lr * rng.uniform(0.8, 1.0, lr.size), rng.uniform(0, np.pi, lr.size)):
        lumen[flat] = True
    inside &= _own(canvas, box, ZONE_G4)
    lumen = lumen.reshape(inside.shape) & inside
    _write_gland(canvas, box, ZONE_G4, inside & ~lumen, lumen, secretion=False)
    canvas.cribriform[y0:y1, x0:x1] |= inside


def _draw_glands(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Place glands of every gland-forming zone on jittered grids and draw them.

    Each gland is sized to its free space (half the distance to the nearest neighbour, less a
    stroma gap, and no further than its zone's border), so glands never overlap and Gleason 3
    glands stay separate.
    """
    um = canvas.um
    step = max(1, int(8 * um))  # distances to zone borders on an 8 µm grid are precise enough
    ys, xs, zs, rooms = [], [], [], []
    for zone, spacing in _GLAND_SPACING_UM.items():
        mask = canvas.zones == zone
        box = _bbox(mask)
        if box is None:
            continue
        cy, cx = _jittered_grid(box, spacing * um, 0.3, rng)
        keep = _at(canvas.zones, cy, cx) == zone
        coarse = mask[::step, ::step]
        room = ndi.distance_transform_edt(coarse) * step - step if not coarse.all() else np.full(coarse.shape, np.inf)
        ys.append(cy[keep])
        xs.append(cx[keep])
        zs.append(np.full(int(keep.sum()), zone))
        rooms.append(_at(room, cy[keep] / step, cx[keep] / step))
    if not ys:
        return
    cy, cx, zone = np.concatenate(ys), np.concatenate(xs), np.concatenate(zs)
    # glands keep clear of their zone's border (a gland is not cut in half by a change of
    # pattern); a lone gland (no neighbour within reach) is limited by its zone's spacing
    cap = np.minimum(np.concatenate(rooms), [0.6 * _GLAND_SPACING_UM[z] * um for z in zone])
    if cy.size > 1:
        dist, _ = cKDTree(np.column_stack([cy, cx])).query(np.column_stack([cy, cx]), k=2)
        cap = np.minimum(cap, dist[:, 1] / 2)
    cap -= _GLAND_GAP_UM * um / 2
    for y, x, z, c in zip(cy, cx, zone, cap):
        if z == ZONE_G4:
            if rng.random() < 0.45 and c > 45 * um:
                _cribriform_gland(canvas, rng, y, x, c)
            elif c > 15 * um:
                _fused_gland(canvas, rng, y, x, c)
        else:
            _simple_gland(canvas, rng, int(z), y, x, c)
    g4 = _bbox(canvas.zones == ZONE_G4)
    if g4 is not None:
        y0, y1, x0, x1 = g4
        mask = (canvas.labels[y0:y1, x0:x1] == ZONE_G4) & (canvas.comp[y0:y1, x0:x1] == _EPI)
        _crowded_nuclei(canvas, rng, "g4", 0.8, mask, (y0, x0))


# ----------------------------------------------------------------------------------------------
# Gleason 5


def _row_chunks(r0: int, r1: int, width: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about a megapixel each: float temporaries stay small on slides of any size."""
    rows = max(16, (1 << 20) // max(width, 1))
    for a in range(r0, r1, rows):
        yield a, min(r1, a + rows)


def _draw_g5(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Gleason 5: solid sheets, cords and single infiltrating cells, with no gland lumens.

    Sheets are the high parts of a smooth random field; cords are a thin band around the zero
    level of a second field (winding strands one or two cells wide); single cells are scattered in
    the stroma left over. Where a sheet is thickest its centre may be necrotic (comedonecrosis).
    """
    um = canvas.um
    zone_mask = canvas.zones == ZONE_G5
    box = _bbox(zone_mask)
    if box is None:
        return
    y0, y1, x0, x1 = box
    own = zone_mask[y0:y1, x0:x1]
    shape = own.shape
    sheet_field = _Field(shape, 110 * um, rng)
    cord_field = _Field(shape, 60 * um, rng)
    comedo_field = _Field(shape, 400 * um, rng)
    level = rng.uniform(0.2, 0.7)
    tumour = np.empty(shape, bool)
    core = np.empty(shape, bool)
    for a, b in _row_chunks(0, shape[0], shape[1]):
        sheet = sheet_field.block(a, b, 0, shape[1])
        tumour[a:b] = (sheet > level) | (np.abs(cord_field.block(a, b, 0, shape[1])) < 0.18)
        core[a:b] = (sheet > 1.6) & (comedo_field.block(a, b, 0, shape[1]) > 0.3)
    tumour &= own

    # single cells: a round cell body with its own nucleus, in stroma between sheets and cords
    sy, sx = _jittered_grid((0, y1 - y0, 0, x1 - x0), 22 * um, 0.35, rng)
    keep = _at(own & ~tumour, sy, sx) & (rng.random(sy.size) < 0.45)
    sy, sx = sy[keep], sx[keep]
    r = rng.uniform(5.5, 7.5, sy.size) * um
    cells = np.zeros(own.size, bool)
    for _, flat, _ in _footprints(shape, sy, sx, r, r * rng.uniform(0.75, 1.0, r.size), rng.uniform(0, np.pi, r.size)):
        cells[flat] = True
    cells = cells.reshape(shape) & own & ~tumour
    tumour |= cells
    canvas.nuclei.add("g5", sy + y0, sx + x0, None, rng, um)

    # fill small stroma islands enclosed by tumour: Gleason 5 has nothing lumen-like
    holes, n = ndi.label(~tumour, output=np.int32)
    size = np.zeros(n + 1, np.int64)
    for a, b in _row_chunks(0, shape[0], shape[1]):  # bincount would copy the whole map to int64
        size += np.bincount(holes[a:b].reshape(-1), minlength=n + 1)
    small = size < np.pi * (35 * um) ** 2
    small[0] = False
    for a, b in _row_chunks(0, shape[0], shape[1]):
        tumour[a:b] |= small[holes[a:b]]
    del holes
    tumour &= own
    necrosis = tumour & core
    canvas.labels[y0:y1, x0:x1][tumour] = ZONE_G5
    comp = canvas.comp[y0:y1, x0:x1]
    comp[tumour] = _EPI
    comp[necrosis] = _NECROSIS
    _crowded_nuclei(canvas, rng, "g5", 0.93, tumour & ~cells & ~necrosis, (y0, x0))
    ky, kx = _jittered_grid((0, y1 - y0, 0, x1 - x0), 7 * um, 0.5, rng)
    keep = _at(necrosis, ky, kx) & (rng.random(ky.size) < 0.3)
    canvas.nuclei.add("karyorrhexis", ky[keep] + y0, kx[keep] + x0, None, rng, um)


def _crowded_nuclei(canvas: _Canvas, rng: np.random.Generator, kind: str, density: float,
                    mask: np.ndarray, origin: tuple[int, int]) -> None:
    """Crowded nuclei filling epithelium, one per cell on a jittered grid (``mask`` is a box at ``origin``).

    For Gleason 4 nests and Gleason 5 sheets and cords: their cells have no orderly rim to line
    up on, and crowding is itself a sign of grade.
    """
    um = canvas.um
    cy, cx = _jittered_grid((0, mask.shape[0], 0, mask.shape[1]), 11.0 * um, 0.3, rng)
    keep = _at(mask, cy, cx) & (rng.random(cy.size) < density)
    canvas.nuclei.add(kind, cy[keep] + origin[0], cx[keep] + origin[1], None, rng, um)


# ----------------------------------------------------------------------------------------------
# stroma


class _Stroma:
    """Fibromuscular stroma: eosin density block by block, and its spindle nuclei.

    Two families of wavy parallel fibres (smooth-muscle bundles cut at different angles) are
    blended by a slowly varying weight; fibres are stripes of a phase field bent by a smooth
    displacement, broken into dashes by fine noise. Spindle nuclei lie along the local fibre
    direction, as fibroblast and smooth-muscle nuclei do.
    """

    def __init__(self, shape: tuple[int, int], um: float, rng: np.random.Generator) -> None:
        self.weight = _Field(shape, 250 * um, rng)
        self.density = _Field(shape, 200 * um, rng)
        self.breaks = _Field(shape, 9 * um, rng)
        base = rng.uniform(0, np.pi)
        self.families: list[tuple[float, float, _Field, float, _Field, float]] = []
        for angle in (base, base + rng.uniform(0.7, 1.6)):
            bend, wobble = _Field(shape, 160 * um, rng), _Field(shape, 30 * um, rng)
            self.families.append((angle, rng.uniform(5, 8) * um, bend, 35 * um, wobble, 10 * um))

    def _phase(self, family: int, y: np.ndarray, x: np.ndarray, block: tuple[int, int, int, int] | None) -> np.ndarray:
        """Position across the fibres of one family (px): stripes are its level sets."""
        angle, _, bend, bend_amp, wobble, wobble_amp = self.families[family]
        if block is None:
            return bend.at(y, x) * bend_amp + wobble.at(y, x) * wobble_amp + y * np.sin(angle) + x * np.cos(angle)
        disp = bend.block(*block) * np.float32(bend_amp)
        disp += wobble.block(*block) * np.float32(wobble_amp)
        disp += y * np.float32(np.sin(angle))
        disp += x * np.float32(np.cos(angle))
        return disp

    def direction(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Fibre direction (radians from +x) at points, from the gradient of the dominant family's phase."""
        w = self.weight.at(y, x) * 1.5 + 0.5
        angle = np.zeros(y.size)
        for family in (0, 1):
            gy = (self._phase(family, y + 1, x, None) - self._phase(family, y - 1, x, None)) / 2
            gx = (self._phase(family, y, x + 1, None) - self._phase(family, y, x - 1, None)) / 2
            dominant = (w >= 0.5) if family == 0 else (w < 0.5)
            angle = np.where(dominant, np.arctan2(gx, -gy), angle)
        return angle

    def _stripes(self, family: int, y: np.ndarray, x: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Fibres of one family: squared sine of the phase, dark thin lines on a paler ground."""
        stripe = np.sin(self._phase(family, y, x, box) * np.float32(2 * np.pi / self.families[family][1]))
        stripe += 1.0
        stripe *= 0.5
        return np.square(stripe, out=stripe)

    def eosin(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """Eosin concentration of stroma over a block."""
        r0, r1, c0, c1 = box
        y = np.arange(r0, r1, dtype=np.float32)[:, None]
        x = np.arange(c0, c1, dtype=np.float32)[None, :]
        w = np.clip(self.weight.block(*box) * 1.5 + 0.5, 0.0, 1.0)
        fibres = self._stripes(0, y, x, box) * w
        fibres += self._stripes(1, y, x, box) * (1 - w)
        fibres *= np.clip(self.breaks.block(*box) * 0.5 + 0.65, 0.0, 1.0)
        density = np.clip(0.78 + 0.12 * self.density.block(*box), 0.45, 1.1)
        return density * (0.85 + 0.35 * fibres)


def _stroma_nuclei(canvas: _Canvas, stroma: _Stroma, rng: np.random.Generator) -> None:
    """Sparse spindle nuclei along the fibres and a few lymphocytes, in stroma only."""
    um = canvas.um
    box = _bbox(canvas.zones != ZONE_BACKGROUND)
    if box is None:
        return
    ny, nx = _jittered_grid(box, 13 * um, 0.4, rng)
    at_stroma = _at(canvas.comp, ny, nx) == _STROMA
    u = rng.random(ny.size)
    spindle, lymph = at_stroma & (u < 0.26), at_stroma & (u > 0.985)
    canvas.nuclei.add("spindle", ny[spindle], nx[spindle], stroma.direction(ny[spindle], nx[spindle]), rng, um)
    canvas.nuclei.add("lymphocyte", ny[lymph], nx[lymph], None, rng, um)


# ----------------------------------------------------------------------------------------------
# assembly


@dataclass
class _Paint:
    """Everything the colour stage needs, so that it can run block by block."""

    canvas: _Canvas
    stain: Stain
    stroma: _Stroma
    grain: _Field  # granular cytoplasm and chromatin
    thickness: _Field  # section thickness varies over millimetres
    wisps: _Field  # luminal secretions
    nuclei: dict[str, np.ndarray]
    nucleoli: dict[str, np.ndarray]
    corpora: dict[str, np.ndarray]

    def stains(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Eosin and haematoxylin concentrations over a block of tissue."""
        r0, r1, c0, c1 = box
        comp = self.canvas.comp[r0:r1, c0:c1]
        labels = self.canvas.labels[r0:r1, c0:c1]
        c_e = self.stroma.eosin(box)
        c_h = np.full(comp.shape, 0.05, np.float32)
        epi = comp == _EPI
        c_e[epi] = _CYTO_E[labels[epi]]
        c_h[epi] = _CYTO_H[labels[epi]]
        empty = (comp == _GLASS) | (comp == _LUMEN) | (comp == _SECRETION)
        c_e[empty], c_h[empty] = 0.02, 0.01
        secretion = comp == _SECRETION
        if secretion.any():
            c_e[secretion] += np.clip(self.wisps.block(*box)[secretion] * 0.2 + 0.15, 0.0, 0.4)
        necrosis = comp == _NECROSIS
        c_e[necrosis], c_h[necrosis] = 0.6, 0.25
        self._paint_corpora(c_e, c_h, box)

        grain = self.grain.block(*box)
        nuc = _nuclear_density(box, self.nuclei).reshape(comp.shape)
        c_e *= 1.0 + 0.18 * grain
        c_e *= 1.0 - 0.45 * np.minimum(nuc, 1.0)
        c_h *= 1.0 + 0.25 * grain
        nuc *= 1.0 + 0.3 * grain
        c_h += nuc
        _paint_nucleoli(c_e, c_h, box, self.nucleoli)
        thickness = 1.0 + 0.1 * self.thickness.block(*box)
        c_e *= thickness
        c_h *= thickness
        return c_e, c_h

    def _paint_corpora(self, c_e: np.ndarray, c_h: np.ndarray, box: tuple[int, int, int, int]) -> None:
        """Corpora amylacea: round, concentrically laminated eosinophilic bodies in benign lumens,
        a hallmark of benign prostate (rare in cancer)."""
        idx = _in_block(self.corpora["cy"], self.corpora["cx"], float(self.corpora["reach"]), box)
        if idx.size == 0:
            return
        r0, r1, c0, c1 = box
        cor = {f: v[idx] for f, v in self.corpora.items() if f != "reach"}
        flat_e, flat_h = c_e.reshape(-1), c_h.reshape(-1)
        comp = self.canvas.comp[r0:r1, c0:c1].reshape(-1)
        for which, flat, q2 in _footprints(c_e.shape, cor["cy"] - r0, cor["cx"] - c0, cor["r"], cor["r2"], cor["theta"]):
            ok = comp[flat] == _LUMEN
            lam = 0.5 + 0.5 * np.cos(np.sqrt(q2[ok]) * cor["rings"][which[ok]] * 2 * np.pi)
            flat_e[flat[ok]] = 0.3 + 0.25 * lam
            flat_h[flat[ok]] = 0.04 + 0.1 * lam

    def rgb(self, r0: int, r1: int, halo: int, rng: np.random.Generator) -> np.ndarray:
        """Rows r0:r1 as 8-bit RGB: stains, scanner blur (computed with ``halo`` extra rows), Beer–Lambert, noise."""
        stain, zones = self.stain, self.canvas.zones
        h, w = zones.shape
        a0, a1 = max(0, r0 - halo), min(h, r1 + halo)
        c_e = np.full((a1 - a0, w), 0.015, np.float32)  # glass: mounting medium and coverslip haze
        c_h = np.zeros((a1 - a0, w), np.float32)
        cols = np.flatnonzero((zones[a0:a1] != ZONE_BACKGROUND).any(axis=0))
        if cols.size:
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            e, hx = self.stains((a0, a1, c0, c1))
            e *= np.float32(stain.e_scale)
            hx *= np.float32(stain.h_scale)
            glass = zones[a0:a1, c0:c1] == ZONE_BACKGROUND
            e[glass], hx[glass] = 0.015, 0.0
            c_e[:, c0:c1], c_h[:, c0:c1] = e, hx
        sigma = stain.blur_um * self.canvas.um
        ndi.gaussian_filter(c_e, sigma, output=c_e)
        ndi.gaussian_filter(c_h, sigma, output=c_h)
        c_e, c_h = np.maximum(c_e[r0 - a0 : r1 - a0], 0), np.maximum(c_h[r0 - a0 : r1 - a0], 0)
        sensor = rng.standard_normal(c_e.shape, dtype=np.float32) * np.float32(stain.noise)
        out = np.empty((*c_e.shape, 3), np.uint8)
        for ch in range(3):
            od = c_h * np.float32(stain.h_od[ch])
            od += c_e * np.float32(stain.e_od[ch])
            np.negative(od, out=od)
            np.exp(od, out=od)
            od *= np.float32(stain.background[ch])
            od += sensor
            od += 0.5
            out[..., ch] = np.clip(od, 0, 255)
        return out


def render_tissue(zones: np.ndarray, rng: np.random.Generator, stain: Stain, mpp: float = 0.5) -> Rendered:
    """Paint tissue over a zone map (``ZONE_*`` codes) at ``mpp`` microns per pixel.

    Inside a zone, gland epithelium takes the zone's grade (2–5) and lumens and the stroma between
    glands take 1, as in Radboud masks; tumour cells of Gleason 5 sheets, cords and single cells
    take 5; the background zone is glass, label 0. Deterministic for a seeded ``rng``.

    Structures are drawn on whole-image byte maps (labels, tissue components); colour is then
    computed in bands of rows, so memory stays at a few bytes per pixel plus one band of floats.
    """
    zones = np.asarray(zones)
    if zones.ndim != 2 or not np.issubdtype(zones.dtype, np.integer):
        raise ValueError(f"zones must be a 2-D integer map, got shape {zones.shape} of {zones.dtype}")
    if zones.size and not ZONE_BACKGROUND <= int(zones.min()) <= int(zones.max()) <= ZONE_G5:
        raise ValueError(f"zones must hold codes 0-5, found {int(zones.min())}..{int(zones.max())}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    zones = zones.astype(np.uint8, copy=False)
    shape = zones.shape
    um = 1.0 / mpp
    labels = (zones != ZONE_BACKGROUND).astype(np.uint8)  # stroma (1) until something else is drawn
    canvas = _Canvas(zones, labels, labels.copy(), np.zeros(shape, bool), _Nuclei(), um, [])
    rgb = np.empty((*shape, 3), np.uint8)
    if zones.size == 0:
        return Rendered(rgb=rgb, labels=labels, cribriform=canvas.cribriform)

    _draw_glands(canvas, rng)
    _draw_g5(canvas, rng)
    stroma = _Stroma(shape, um, rng)
    _stroma_nuclei(canvas, stroma, rng)
    nuclei, nucleoli = canvas.nuclei.sorted(rng)
    corpora = np.array(canvas.corpora, dtype=np.float64).reshape(-1, 3)
    order = np.argsort(corpora[:, 0], kind="stable")
    corpora = corpora[order]
    paint = _Paint(
        canvas, stain, stroma,
        grain=_Field(shape, 1.5 * um, rng, step=max(1, int(um))),
        thickness=_Field(shape, 600 * um, rng),
        wisps=_Field(shape, 12 * um, rng),
        nuclei=nuclei,
        nucleoli=nucleoli,
        corpora={
            "cy": corpora[:, 0], "cx": corpora[:, 1], "r": corpora[:, 2],
            "r2": corpora[:, 2] * rng.uniform(0.8, 1.0, len(corpora)),
            "theta": rng.uniform(0, np.pi, len(corpora)),
            "rings": rng.uniform(3, 6, len(corpora)),
            "reach": np.asarray(np.max(corpora[:, 2], initial=0.0) * 1.15 + 2.0),
        },
    )
    halo = int(np.ceil(3 * stain.blur_um * um)) + 1
    for r0, r1 in _row_chunks(0, shape[0], shape[1]):
        rgb[r0:r1] = paint.rgb(r0, r1, halo, rng)
    return Rendered(rgb=rgb, labels=labels, cribriform=canvas.cribriform)


# ----------------------------------------------------------------------------------------------
# artefacts


_INK_OD = {  # optical density of marker dye per channel (R, G, B) at full strength
    "green": (1.5, 0.45, 1.0),
    "blue": (1.4, 1.0, 0.25),
    "black": (1.6, 1.6, 1.45),
}


def add_pen_ink(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a few marker strokes in place; return the mask of inked pixels.

    Pathologists circle tumour with green, blue or black marker on the coverslip; the dye is
    translucent (tissue shows through it), strokes are thick, curved and unevenly loaded, and they
    cross glass and tissue alike. Tile filters and DeepGleason's artefact class must handle them.
    """
    h, w = rgb.shape[:2]
    mask = np.zeros((h, w), bool)
    if h == 0 or w == 0:
        return mask
    # strokes are smooth at the scale of their width: trace them on a coarse grid and enlarge
    step = max(1, int(np.ceil(max(h, w) / 768)))
    coarse = (h // step + 4, w // step + 4)
    for _ in range(int(rng.integers(1, 4))):
        od = np.asarray(_INK_OD[("green", "blue", "black")[int(rng.integers(0, 3))]], np.float32)
        strength = rng.uniform(0.5, 1.0)
        width = max(3.0, rng.uniform(0.015, 0.04) * max(h, w))
        # a random start and heading, the heading turning steadily with a little tremor
        n = 400
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.004, n)) + np.linspace(0, rng.uniform(-2.5, 2.5), n)
        length = rng.uniform(0.5, 1.4) * np.hypot(h, w)
        y = rng.uniform(0.1, 0.9) * h + np.cumsum(np.sin(heading)) * length / n
        x = rng.uniform(0.1, 0.9) * w + np.cumsum(np.cos(heading)) * length / n
        load = _Field(coarse, width / step, rng)  # uneven ink load along and across the stroke
        inside = (y > -width) & (y < h + width) & (x > -width) & (x < w + width)
        if not inside.any():
            continue
        iy = np.clip(np.rint(y[inside] / step).astype(np.intp) + 1, 0, coarse[0] - 1)
        ix = np.clip(np.rint(x[inside] / step).astype(np.intp) + 1, 0, coarse[1] - 1)
        off_line = np.ones(coarse, bool)
        off_line[iy, ix] = False
        dist = ndi.distance_transform_edt(off_line).astype(np.float32) * np.float32(step)
        alpha = np.clip((width / 2 - dist) / np.float32(0.15 * width) + 0.5, 0.0, 1.0)
        alpha *= np.clip(0.85 + 0.25 * load.block(0, coarse[0], 0, coarse[1]), 0.5, 1.0) * np.float32(strength)
        rows = np.flatnonzero(alpha.any(axis=1))
        cols = np.flatnonzero(alpha.any(axis=0))
        y0, y1 = max(0, (rows[0] - 2) * step), min(h, rows[-1] * step)
        x0, x1 = max(0, (cols[0] - 2) * step), min(w, cols[-1] * step)
        if y1 <= y0 or x1 <= x0:
            continue
        a = _upsample(alpha, step, y0, y1, x0, x1)
        for ch in range(3):
            region = rgb[y0:y1, x0:x1, ch]
            region[...] = np.clip(region * np.exp(-a * od[ch]) + 0.5, 0, 255)
        mask[y0:y1, x0:x1] |= a > 0.25
    return mask


def add_debris(rgb: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> None:
    """Dust specks and hair-like fibres on the glass, painted in place over ``background`` only.

    Tissue detection must not mistake them for tissue: they are small, grey or dark and
    unstained, unlike the pink-purple of a section.
    """
    h, w = rgb.shape[:2]
    background = np.asarray(background, bool)
    if not background.any():
        return
    grey = rgb.reshape(-1, 3) if rgb.flags.c_contiguous else None
    # specks: small round particles, a few per 100k glass pixels; drawn over the whole image and
    # kept on glass only, so their density on glass does not depend on how much glass there is
    n = int(rng.poisson(4e-5 * h * w))
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    r = np.exp(rng.uniform(np.log(0.8), np.log(4.5), n))
    level = rng.uniform(40, 170, n)
    # fibres: thin curved strands, traced as chains of tiny discs
    m = int(rng.poisson(3e-6 * h * w) + rng.integers(0, 2))
    fy, fx, fr, fl = [cy], [cx], [r], [level]
    for _ in range(m):
        steps = int(rng.uniform(60, 400))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.06, steps))
        fy.append(rng.uniform(0, h) + np.cumsum(np.sin(heading)) * 0.7)
        fx.append(rng.uniform(0, w) + np.cumsum(np.cos(heading)) * 0.7)
        fr.append(np.full(steps, rng.uniform(0.7, 1.4)))
        fl.append(np.full(steps, rng.uniform(70, 160)))
    cy, cx, r, level = (np.concatenate(v) for v in (fy, fx, fr, fl))
    if cy.size == 0:
        return
    flat_bg = background.reshape(-1)
    for which, flat, q2 in _footprints((h, w), cy, cx, r, r, np.zeros(r.size)):
        ok = flat_bg[flat]
        flat, a, lv = flat[ok], np.minimum((1.0 - q2[ok]) * 3.0, 1.0)[:, None], level[which[ok]][:, None]
        if grey is not None:
            grey[flat] = np.minimum(grey[flat], grey[flat] * (1 - a) + lv * a).astype(np.uint8)
        else:
            yy, xx = np.divmod(flat, w)
            rgb[yy, xx] = np.minimum(rgb[yy, xx], rgb[yy, xx] * (1 - a) + lv * a).astype(np.uint8)
