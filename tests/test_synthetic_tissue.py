"""Tests of the H&E tissue painter: labels follow the zones, sizes are physical, classes differ by
morphology rather than colour, and artefacts land where they should."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from bonylib.data.synthetic.tissue import (
    ZONE_BACKGROUND,
    ZONE_BENIGN,
    ZONE_G3,
    ZONE_G4,
    ZONE_G5,
    ZONE_STROMA,
    Rendered,
    Stain,
    add_debris,
    add_pen_ink,
    render_tissue,
    sample_stain,
)

ALLOWED = {
    ZONE_BACKGROUND: {0},
    ZONE_STROMA: {1},
    ZONE_BENIGN: {1, 2},
    ZONE_G3: {1, 3},
    ZONE_G4: {1, 4},
    ZONE_G5: {1, 5},
}


def _render(zone: int, size: int = 256, seed: int = 0, stain_seed: int = 100, mpp: float = 1.0) -> tuple[Rendered, Stain]:
    stain = sample_stain(np.random.default_rng(stain_seed))
    return render_tissue(np.full((size, size), zone, np.uint8), np.random.default_rng(seed), stain, mpp=mpp), stain


def _blocks() -> np.ndarray:
    """A 512 x 768 map with one 256 x 256 block of each zone."""
    zones = np.zeros((512, 768), np.uint8)
    for z in range(6):
        r, c = divmod(z, 3)
        zones[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = z
    return zones


@pytest.fixture(scope="module")
def mixed() -> tuple[np.ndarray, Rendered, Stain]:
    zones = _blocks()
    stain = sample_stain(np.random.default_rng(7))
    return zones, render_tissue(zones, np.random.default_rng(3), stain, mpp=1.0), stain


def _lumens(rgb: np.ndarray, stain: Stain, um: float = 1.0) -> int:
    """Clear spaces in a tissue patch: connected bright (glass-like) regions of at least (12 µm)².

    Measured from the image and the brightness of bare glass only (which a real pipeline reads off
    the slide background), whatever the stain: this is architecture, not colour.
    """
    grey = ndi.gaussian_filter(rgb.mean(axis=2), 1.5 * um)
    lab, _ = ndi.label(grey > 0.94 * float(np.mean(stain.background)))
    sizes = np.bincount(lab.ravel())[1:]
    return int((sizes >= (12 * um) ** 2).sum())


def _components(mask: np.ndarray) -> np.ndarray:
    """Pixel count of each connected component."""
    lab, _ = ndi.label(mask)
    return np.bincount(lab.ravel())[1:]


# ----------------------------------------------------------------------------------------------
# labels and zones


def test_output_types_and_shapes(mixed: tuple[np.ndarray, Rendered, Stain]) -> None:
    zones, out, _ = mixed
    assert out.rgb.shape == (*zones.shape, 3) and out.rgb.dtype == np.uint8
    assert out.labels.shape == zones.shape and out.labels.dtype == np.uint8
    assert out.cribriform.shape == zones.shape and out.cribriform.dtype == bool


def test_labels_stay_in_their_zone(mixed: tuple[np.ndarray, Rendered, Stain]) -> None:
    zones, out, _ = mixed
    for zone, allowed in ALLOWED.items():
        found = set(np.unique(out.labels[zones == zone]).tolist())
        assert found <= allowed, (zone, found)
        assert max(allowed) in found, f"zone {zone} shows no label {max(allowed)}"


def test_glass_is_label_0_and_bright(mixed: tuple[np.ndarray, Rendered, Stain]) -> None:
    zones, out, stain = mixed
    glass = zones == ZONE_BACKGROUND
    assert (out.labels[glass] == 0).all()
    assert (out.labels[~glass] > 0).all()
    glass_rgb = out.rgb[glass].astype(float)
    assert glass_rgb.mean() > 200
    np.testing.assert_allclose(glass_rgb.mean(axis=0), stain.background, atol=8)
    assert out.rgb[zones == ZONE_STROMA].mean() < glass_rgb.mean() - 20


def test_cribriform_only_in_gleason_4() -> None:
    zones = np.full((512, 512), ZONE_G4, np.uint8)
    zones[:, :128] = ZONE_G3
    zones[:128, 128:] = ZONE_G5
    found = False
    for seed in range(3):
        out = render_tissue(zones, np.random.default_rng(seed), sample_stain(np.random.default_rng(seed)), mpp=1.0)
        assert not out.cribriform[zones != ZONE_G4].any()
        # a cribriform gland is Gleason 4 epithelium perforated by lumens (label 1)
        assert set(np.unique(out.labels[out.cribriform]).tolist()) <= {1, 4}
        if out.cribriform.any():
            found = True
            holes = out.labels[out.cribriform] == 1
            assert 0.03 < holes.mean() < 0.5
    assert found


def test_rejects_bad_input() -> None:
    rng, stain = np.random.default_rng(0), sample_stain(np.random.default_rng(0))
    with pytest.raises(ValueError):
        render_tissue(np.zeros((4, 4, 3), np.uint8), rng, stain)
    with pytest.raises(ValueError):
        render_tissue(np.full((8, 8), 6, np.uint8), rng, stain)
    with pytest.raises(ValueError):
        render_tissue(np.full((8, 8), -1, np.int16), rng, stain)
    with pytest.raises(ValueError):
        render_tissue(np.full((8, 8), 1.0), rng, stain)
    with pytest.raises(ValueError):
        render_tissue(np.ones((8, 8), np.uint8), rng, stain, mpp=0.0)


@pytest.mark.parametrize("mpp", [0.25, 2.0, 8.0])
def test_other_magnifications(mpp: float) -> None:
    """Thumbnails and 40x renders work too, with the same label rules."""
    zones = _blocks()[:256, :512]
    out = render_tissue(zones, np.random.default_rng(0), sample_stain(np.random.default_rng(0)), mpp=mpp)
    for zone, allowed in ALLOWED.items():
        assert set(np.unique(out.labels[zones == zone]).tolist()) <= allowed


def test_tiny_and_glass_only_maps() -> None:
    stain = sample_stain(np.random.default_rng(0))
    out = render_tissue(np.zeros((3, 5), np.uint8), np.random.default_rng(0), stain)
    assert out.rgb.shape == (3, 5, 3) and not out.labels.any()
    out = render_tissue(np.full((1, 1), ZONE_G4, np.uint8), np.random.default_rng(0), stain)
    assert out.labels[0, 0] in ALLOWED[ZONE_G4]


# ----------------------------------------------------------------------------------------------
# determinism and scale


def test_deterministic() -> None:
    zones = _blocks()
    stain = sample_stain(np.random.default_rng(1))
    a = render_tissue(zones, np.random.default_rng(5), stain, mpp=1.0)
    b = render_tissue(zones, np.random.default_rng(5), stain, mpp=1.0)
    c = render_tissue(zones, np.random.default_rng(6), stain, mpp=1.0)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.cribriform, b.cribriform)
    assert (a.rgb != c.rgb).mean() > 0.5
    assert (a.labels != c.labels).mean() > 0.01
    assert sample_stain(np.random.default_rng(3)) == sample_stain(np.random.default_rng(3))


def test_sizes_are_physical() -> None:
    """The same tissue area at 20x (0.5 µm/px) has glands four times as many pixels as at 10x."""
    areas = {}
    for mpp, size in ((0.5, 1024), (1.0, 512)):
        per_gland = []
        for seed in range(2):
            out, _ = _render(ZONE_G3, size=size, seed=seed, mpp=mpp)
            per_gland.extend(_components(out.labels == ZONE_G3).tolist())
        assert len(per_gland) >= 20
        areas[mpp] = np.mean(per_gland)
    assert 3.0 < areas[0.5] / areas[1.0] < 5.3, areas


# ----------------------------------------------------------------------------------------------
# morphology, not colour


def test_gleason_3_glands_small_separate_with_lumens() -> None:
    out, stain = _render(ZONE_G3, size=512, seed=1)
    glands = _components(out.labels == ZONE_G3)
    # 50-120 µm glands with a 10-14 µm rim: rings of roughly 1000-5000 µm² of epithelium
    assert len(glands) >= 10
    assert 800 < np.median(glands) < 6000
    # every gland away from the patch border surrounds a lumen
    epithelium = out.labels == ZONE_G3
    filled, n = ndi.label(ndi.binary_fill_holes(epithelium))
    border = np.unique(np.concatenate([filled[0], filled[-1], filled[:, 0], filled[:, -1]]))
    inner = np.setdiff1d(np.arange(1, n + 1), border)
    with_lumen = np.unique(filled[filled.astype(bool) & ~epithelium])
    assert len(inner) >= 8
    assert np.isin(inner, with_lumen).mean() > 0.9
    assert _lumens(out.rgb, stain) >= 0.6 * len(inner)


def test_architecture_separates_grades() -> None:
    """Epithelium forms small separate rings in Gleason 3, larger masses in 4, sheets in 5.

    Sizes are area-weighted (the size of the mass a random epithelial pixel belongs to), so that
    single Gleason 5 cells do not hide its sheets.
    """
    mass = {}
    epithelium = {}
    for zone in (ZONE_G3, ZONE_G4, ZONE_G5):
        sizes, frac = [], []
        for seed in range(2):
            out, _ = _render(zone, size=384, seed=seed)
            sizes.extend(_components(out.labels == zone).tolist())
            frac.append((out.labels == zone).mean())
        sizes = np.asarray(sizes, float)
        mass[zone] = (sizes**2).sum() / sizes.sum()
        epithelium[zone] = np.mean(frac)
    assert mass[ZONE_G3] < 5000  # µm²: one small gland's rim
    assert 2 * mass[ZONE_G3] < mass[ZONE_G4] < mass[ZONE_G5], mass
    assert epithelium[ZONE_G3] < min(epithelium[ZONE_G4], epithelium[ZONE_G5]), epithelium


def test_gleason_5_has_no_lumens() -> None:
    for seed in range(3):
        out, stain = _render(ZONE_G5, size=384, seed=seed, stain_seed=seed)
        tumour = out.labels == ZONE_G5
        assert tumour.mean() > 0.2
        # no stroma (label 1) enclosed by tumour smaller than a gland lumen would be
        enclosed = ndi.binary_fill_holes(tumour) & ~tumour
        assert all(s > np.pi * 35**2 for s in _components(enclosed))
        assert _lumens(out.rgb, stain) == 0


def test_colour_overlaps_but_lumens_separate() -> None:
    """Across slides, mean colour of Gleason 3 and 5 overlaps, while lumen counts do not."""
    mean_rgb = {ZONE_G3: [], ZONE_G5: []}
    lumens = {ZONE_G3: [], ZONE_G5: []}
    for s in range(12):
        for zone in (ZONE_G3, ZONE_G5):
            out, stain = _render(zone, size=256, seed=s, stain_seed=200 + s)
            mean_rgb[zone].append(out.rgb.reshape(-1, 3).mean(axis=0))
            lumens[zone].append(_lumens(out.rgb, stain))
    g3, g5 = np.array(mean_rgb[ZONE_G3]), np.array(mean_rgb[ZONE_G5])
    for ch in range(3):
        assert max(g3[:, ch].min(), g5[:, ch].min()) < min(g3[:, ch].max(), g5[:, ch].max()), ch
    # stain moves a class's mean colour more than the class does
    assert np.ptp(g3, axis=0).max() > np.abs(g3.mean(axis=0) - g5.mean(axis=0)).max()
    assert min(lumens[ZONE_G3]) > max(lumens[ZONE_G5])


REFERENCE_STAIN = Stain(
    h_od=(0.5626, 0.7201, 0.4062), e_od=(0.2159, 0.8012, 0.5581), h_scale=1.0, e_scale=1.0,
    background=(240.0, 240.0, 240.0), blur_um=0.3, noise=1.0,
)


def _nuclear_areas(zone: int, seed: int) -> np.ndarray:
    """Areas (µm²) of haematoxylin-dark blobs inside the zone's epithelium, at 0.5 µm/px."""
    out = render_tissue(np.full((512, 512), zone, np.uint8), np.random.default_rng(seed), REFERENCE_STAIN, mpp=0.5)
    # red light is absorbed mostly by haematoxylin: optical density of the red channel finds nuclei
    od_red = -np.log(np.maximum(out.rgb[..., 0], 1) / REFERENCE_STAIN.background[0])
    areas = _components((od_red > 0.6) & (out.labels == zone)) * 0.25
    return areas[areas >= 5]


def test_nuclei_grow_with_grade() -> None:
    """Gleason 5 nuclei are larger and more varied than benign and Gleason 3 nuclei."""
    areas = {zone: np.concatenate([_nuclear_areas(zone, seed) for seed in (0, 1)]) for zone in (ZONE_BENIGN, ZONE_G3, ZONE_G5)}
    assert all(len(a) >= 30 for a in areas.values())
    median = {zone: np.median(a) for zone, a in areas.items()}
    assert 10 < median[ZONE_BENIGN] < 45 and 10 < median[ZONE_G3] < 45  # 6-8 µm nuclei
    assert median[ZONE_G5] > 1.2 * max(median[ZONE_BENIGN], median[ZONE_G3]), median
    assert np.percentile(areas[ZONE_G5], 90) > np.percentile(areas[ZONE_G3], 90)


def test_stroma_is_pink_with_sparse_nuclei(mixed: tuple[np.ndarray, Rendered, Stain]) -> None:
    zones, out, _ = mixed
    stroma = out.rgb[zones == ZONE_STROMA].astype(float)
    r, g, b = stroma.mean(axis=0)
    assert r > g and b > g  # eosin absorbs green: pink
    red = stroma[:, 0] / stroma[:, 0].max()
    assert (red < 0.6).mean() < 0.08  # nuclei are sparse


def test_stain_varies_between_slides() -> None:
    stains = [sample_stain(np.random.default_rng(s)) for s in range(20)]
    for st in stains:
        assert np.linalg.norm(st.h_od) == pytest.approx(1.0) and np.linalg.norm(st.e_od) == pytest.approx(1.0)
        assert all(200 <= v <= 255 for v in st.background)
        assert st.h_scale > 0 and st.e_scale > 0 and st.blur_um > 0
    h_scale = np.array([st.h_scale for st in stains])
    assert h_scale.max() / h_scale.min() > 1.5
    # both dyes absorb green most; haematoxylin takes more red than eosin does (it is blue-purple)
    assert all(np.argmax(st.h_od) == 1 and np.argmax(st.e_od) == 1 and st.h_od[0] > st.e_od[0] for st in stains)
    assert len({st.h_od for st in stains}) == len(stains)


# ----------------------------------------------------------------------------------------------
# artefacts


def test_pen_ink_marks_coloured_strokes() -> None:
    chromatic = 0
    for seed in range(6):
        white = np.full((300, 400, 3), 235, np.uint8)
        rgb = white.copy()
        mask = add_pen_ink(rgb, np.random.default_rng(seed))
        assert mask.shape == (300, 400) and mask.dtype == bool
        assert 0.005 < mask.mean() < 0.9
        inked = rgb[mask].astype(float)
        assert inked.mean() < 235 - 30
        # far from any stroke nothing changes
        far = ~ndi.binary_dilation(mask, iterations=12)
        np.testing.assert_array_equal(rgb[far], white[far])
        spread = inked.mean(axis=0)
        chromatic += spread.max() - spread.min() > 25
        again = white.copy()
        np.testing.assert_array_equal(add_pen_ink(again, np.random.default_rng(seed)), mask)
        np.testing.assert_array_equal(again, rgb)
    assert chromatic >= 2  # green and blue markers, not only black


def test_debris_only_on_glass(mixed: tuple[np.ndarray, Rendered, Stain]) -> None:
    zones, out, _ = mixed
    changed = 0
    for seed in range(4):
        rgb = out.rgb.copy()
        add_debris(rgb, zones == ZONE_BACKGROUND, np.random.default_rng(seed))
        diff = (rgb != out.rgb).any(axis=2)
        assert not diff[zones != ZONE_BACKGROUND].any()
        assert (rgb[diff] <= out.rgb[diff]).all()  # specks absorb light, never brighten
        changed += int(diff.sum())
    assert changed > 0
    big = np.full((1024, 1024, 3), 240, np.uint8)
    add_debris(big, np.ones((1024, 1024), bool), np.random.default_rng(0))
    assert 0 < (big < 230).any(axis=2).mean() < 0.02
