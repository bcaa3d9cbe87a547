"""Tissue detection and tile quality measures.

Each measure is checked against a picture the test draws (half-white tiles, stripes, ink strokes of
known area, tissue on glass) or an independent computation (scikit-image's GLCM, SciPy's
Laplacian, a full-resolution pixel count), then the default thresholds on the real scans in
``../shared/data`` (skipped when absent) and on a synthetic PANDA slide against its label mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.feature import graycomatrix, graycoprops

from bonylib.data import quality
from bonylib.data.quality import (
    GLASS_MAX_CHROMA,
    GLASS_MIN_LEVEL,
    MEASURES,
    QualityConfig,
    TissueConfig,
    as_rgb,
    grid_measures,
    keep_tiles,
    pen_mask,
    tile_measures,
    tissue_mask,
)
from bonylib.data.synthetic.panda import PandaSynth, write_slide
from bonylib.errors import ConfigError

# Ruifrok & Johnston's optical densities of haematoxylin and eosin (R, G, B)
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.07, 0.99, 0.11])
# Marker colours as scanned (sampled from HistoPrep's blue ink and histolab's green/red pen tiles)
INKS = {"green": (60, 165, 145), "blue": (40, 60, 140), "black": (45, 45, 50), "red": (180, 25, 35)}


def he_texture(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """H&E-like uint8 tissue: smooth eosin with haematoxylin nuclei, by Beer-Lambert."""
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), 3)
    eosin = np.clip(0.45 + 4 * (smooth - smooth.mean()), 0.15, 0.8)
    nuclei = ndi.gaussian_filter((rng.random(shape) < 0.01).astype(float), 1.5) * 25
    od = eosin[..., None] * _E_OD + np.clip(nuclei, 0, 1.2)[..., None] * _H_OD
    return np.clip(240 * np.exp(-od) + rng.normal(0, 2, (*shape, 3)), 0, 255).astype(np.uint8)


def glass(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal((238, 238, 236), 1.5, (*shape, 3)), 0, 255).astype(np.uint8)


def disk_stroke(shape: tuple[int, int], centre: tuple[float, float], radius: float, width: float) -> np.ndarray:
    """An arc-shaped stroke: the ring of ``width`` around ``centre`` (a marker circling a region)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.abs(np.hypot(yy - centre[0], xx - centre[1]) - radius) < width / 2


def read_rgb(path: Path) -> np.ndarray:
    return as_rgb(np.asarray(Image.open(path)))


def bare_glass(rgb: np.ndarray) -> np.ndarray:
    lo, hi = rgb.min(axis=-1).astype(int), rgb.max(axis=-1).astype(int)
    return (lo >= 200) & (hi - lo <= 6)


def one(tile: np.ndarray) -> dict[str, float]:
    return {name: float(values[0]) for name, values in tile_measures(tile[None]).items()}


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TissueConfig(detect_mpp=0), "tissue.detect_mpp"),
        (lambda: TissueConfig(closing_um=-1), "tissue.closing_um"),
        (lambda: TissueConfig(min_pen_um2=-5), "tissue.min_pen_um2"),
        (lambda: TissueConfig(min_threshold=30, max_threshold=20), "tissue.min_threshold"),
        (lambda: QualityConfig(max_background=1.5), "quality.max_background"),
        (lambda: QualityConfig(max_pen=-0.1), "quality.max_pen"),
        (lambda: QualityConfig(min_blur=-1), "quality.min_blur"),
    ],
)
def test_bad_options_name_their_key(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_rgba_is_composited_over_white_like_pillow() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # OpenSlide's outside-the-scan pixel
    white = Image.new("RGBA", (32, 32), (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB")).astype(int)
    got = as_rgb(rgba)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert tuple(got[0, 0]) == (255, 255, 255)
    with pytest.raises(ValueError, match="uint8"):
        as_rgb(rgba.astype(np.float32))


# --- tile measures on drawn pictures and against independent computations ----------------------


@pytest.mark.parametrize("shape", [(3, 224, 224), (2, 256, 256), (1, 100, 150), (0, 224, 224)])
def test_measures_have_manifest_names_and_one_value_per_tile(shape: tuple[int, int, int]) -> None:
    n, h, w = shape
    tiles = np.stack([he_texture((h, w), seed) for seed in range(n)]) if n else np.zeros((0, h, w, 3), np.uint8)
    measures = tile_measures(tiles)
    assert tuple(measures) == MEASURES
    for values in measures.values():
        assert values.shape == (n,) and values.dtype == np.float32


def test_measures_reject_non_rgb_input() -> None:
    with pytest.raises(ValueError):
        tile_measures(np.zeros((2, 224, 224, 3), np.float32))
    with pytest.raises(ValueError):
        tile_measures(np.zeros((224, 224, 3), np.uint8))


def test_measures_in_a_block_equal_those_of_the_tiles_cut_out() -> None:
    """The tiler measures tiles in place in a block; an odd tile side puts every tile's subsampling
    grid elsewhere in the block."""
    size, rows, cols = 101, np.array([1, 0, 1, 0, 1]), np.array([2, 0, 0, 1, 1])
    block = np.concatenate([np.concatenate([he_texture((size, size), 3 * r + c) for c in range(3)], axis=1)
                            for r in range(2)])
    block[:size, size:2 * size] = glass((size, size))
    cut = np.stack([block[r * size:(r + 1) * size, c * size:(c + 1) * size] for r, c in zip(rows, cols)])
    got = grid_measures(block.reshape(2, size, 3, size, 3), rows, cols)
    expected = tile_measures(cut)
    for name in MEASURES:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert expected["background"][3] > 0.9 > expected["background"][0], "the glass tile is told from tissue"


def test_background_is_the_glass_fraction_of_a_drawn_tile() -> None:
    tissue = he_texture((224, 224))
    half = tissue.copy()
    half[:, 112:] = glass((224, 112))
    quarter = tissue.copy()
    quarter[:112, :112] = glass((112, 112))
    batch = np.stack([tissue, half, quarter, glass((224, 224))])
    background = tile_measures(batch)["background"]
    np.testing.assert_allclose(background, [0.0, 0.5, 0.25, 1.0], atol=0.02)
    # an RGBA tile that is transparent on one half: transparent is glass
    rgba = np.dstack([tissue, np.full((224, 224), 255, np.uint8)])
    rgba[:, :112, 3] = 0
    assert one(rgba)["background"] == pytest.approx(0.5, abs=0.02)


def test_blur_is_the_variance_of_scipys_laplacian_and_drops_with_gaussian_blur() -> None:
    tile = he_texture((224, 224), seed=3)
    grey = tile[::2, ::2, 1].astype(np.float64)
    expected = ndi.laplace(grey)[1:-1, 1:-1].var()
    assert one(tile)["blur"] == pytest.approx(expected, rel=1e-4)
    blurred = [ndi.gaussian_filter(tile, (s, s, 0)) for s in (1.0, 2.0, 3.0)]
    values = tile_measures(np.stack([tile, *blurred]))["blur"]
    assert np.all(np.diff(values) < 0), values
    assert values[-1] < QualityConfig().min_blur < values[0]


def test_a_tiles_measures_do_not_depend_on_its_place_among_others() -> None:
    """Tiling measures a block's tiles together, and the block size (a run-only option) decides which: the same
    tile must measure the same, to the bit, wherever it sits among the others. Noise is the sharpest tile: its
    Laplacian's sums pass 2^24, where float32 sums round (they moved a real tile's blur by 1e-4)."""
    noise = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    tiles = np.concatenate([np.stack([he_texture((224, 224), seed=s) for s in range(3)]), noise])
    alone = tile_measures(tiles[5:])
    for place in range(6):
        order = np.r_[np.arange(place), 5, np.arange(place, 5)]
        got = tile_measures(tiles[order])
        for name in MEASURES:
            assert got[name][place] == alone[name][0], (name, place)


def test_homogeneity_is_scikit_image_glcm_homogeneity() -> None:
    tiles = np.stack([he_texture((224, 224), seed=4), glass((224, 224)), np.full((224, 224, 3), 128, np.uint8)])
    got = tile_measures(tiles)["homogeneity"]
    for tile, value in zip(tiles, got, strict=True):
        levels = tile[::2, ::2, 1] // 8
        glcm = graycomatrix(levels, distances=[1], angles=[0, np.pi / 2], levels=32, symmetric=True, normed=True)
        assert value == pytest.approx(graycoprops(glcm, "homogeneity").mean(), abs=1e-5)
    assert got[2] == 1.0 and got[0] < 0.8


@pytest.mark.parametrize("side", [7, 101, 224, 225])
def test_measures_equal_their_definitions_in_plain_numpy(side: int) -> None:
    """The compiled pass against the definitions written out for one tile, on odd sides too (where the last sampled
    row and column move): background, edges and pen are counts, blur the variance of integer Laplacians."""
    rng = np.random.default_rng(side)
    tiles = np.stack([he_texture((side, side), seed=side), rng.integers(0, 256, (side, side, 3), dtype=np.uint8)])
    tiles[0, : side // 3] = (40, 160, 90)  # a stroke of green ink
    got = tile_measures(tiles)
    for i, tile in enumerate(tiles):
        colour = tile[::4, ::4].astype(np.int64)
        lo, hi = colour.min(axis=-1), colour.max(axis=-1)
        grey = tile[::2, ::2, 1].astype(np.int64)
        gradient = np.abs(grey[:-1, 1:] - grey[:-1, :-1]) + np.abs(grey[1:, :-1] - grey[:-1, :-1])
        laplacian = (4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
        assert got["background"][i] == np.float32(((lo >= 200) & (hi - lo <= 12)).mean())
        assert got["edges"][i] == np.float32((gradient > 24).mean())
        assert got["pen"][i] == np.float32(pen_mask(tile[::4, ::4]).mean())
        assert got["blur"][i] == pytest.approx(laplacian.var(), rel=1.2e-7)  # to its float32 rounding
    assert got["pen"][0] > 0.3, "the stroke is ink"


def test_homogeneity_is_exact_whatever_the_order_of_its_sums() -> None:
    """The compiled measure adds its terms in whatever order vectorises on the CPU at hand; every term is a float32
    1 / (1 + d^2) and the sums are exact in float64, so it must equal, to the bit, the sum taken from a histogram of
    the level differences (one order, computed independently here), on texture, noise and a large tile."""
    rng = np.random.default_rng(5)
    tiles = [he_texture((224, 224), seed=7), rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
             he_texture((1000, 1000), seed=8)]
    for tile in tiles:
        levels = tile[::2, ::2, 1].astype(np.int64) // 8
        weight = (np.float32(1) / (np.float32(1) + np.arange(32, dtype=np.float32) ** 2)).astype(np.float64)
        means = []
        for diff in (levels[:, 1:] - levels[:, :-1], levels[1:, :] - levels[:-1, :]):
            counts = np.bincount(np.abs(diff).ravel(), minlength=32)
            means.append(np.float32((counts * weight).sum() / diff.size))
        assert one(tile)["homogeneity"] == (means[0] + means[1]) / np.float32(2)


def test_edges_of_drawn_stripes() -> None:
    columns = np.arange(224)
    stripes = np.where((columns // 4) % 2 == 0, 80, 200).astype(np.uint8)  # 4 px dark, 4 px light
    strong = np.broadcast_to(stripes[None, :, None], (224, 224, 3)).copy()
    faint = np.broadcast_to(np.where(stripes == 80, 120, 130).astype(np.uint8)[None, :, None], (224, 224, 3)).copy()
    edges = tile_measures(np.stack([strong, faint, glass((224, 224))]))["edges"]
    # on the 2x grid the stripes alternate every 2 samples: every other neighbour pair differs
    np.testing.assert_allclose(edges, [0.5, 0.0, 0.0], atol=0.01)


@pytest.mark.parametrize("colour", sorted(INKS))
def test_pen_is_the_area_of_strokes_drawn_on_glass(colour: str) -> None:
    tile = glass((224, 224), seed=5)
    stroke = disk_stroke((224, 224), (240, -20), 180, 30) | disk_stroke((224, 224), (20, 200), 60, 12)
    rng = np.random.default_rng(6)
    n = int(stroke.sum())
    # uneven ink load (brightness varies, +-4 levels) plus a little colour noise
    ink = np.asarray(INKS[colour]) + rng.normal(0, 4, (n, 1)) + rng.normal(0, 1, (n, 3))
    tile[stroke] = np.clip(np.rint(ink), 0, 255).astype(np.uint8)
    found = pen_mask(tile)
    assert (found & stroke).sum() / (found | stroke).sum() > 0.98
    assert one(tile)["pen"] == pytest.approx(stroke.mean(), abs=0.02)


def test_pen_over_tissue_is_found_and_tissue_alone_is_not_ink() -> None:
    tissue = he_texture((224, 224), seed=7)
    assert pen_mask(tissue).mean() < 0.005
    assert one(tissue)["pen"] < 0.005
    stroke = disk_stroke((224, 224), (112, -100), 200, 40)
    inked = tissue.copy()
    # translucent green marker: the dye absorbs red and blue, tissue shows through
    inked[stroke] = (inked[stroke] * np.array([0.25, 0.8, 0.6])).astype(np.uint8)
    assert (pen_mask(inked) & stroke).sum() / stroke.sum() > 0.9
    assert not keep_tiles(tile_measures(inked[None]), QualityConfig())[0][0]


def test_keep_tiles_reports_the_first_failed_rule() -> None:
    cfg = QualityConfig()
    good = {"background": 0.1, "edges": 0.3, "homogeneity": 0.5, "blur": 1000.0, "pen": 0.0}
    rows = [
        ({}, ""),
        ({"background": 0.99, "pen": 0.5, "blur": 1.0}, "background"),
        ({"pen": 0.2, "blur": 1.0}, "pen"),
        ({"blur": 10.0, "edges": 0.0}, "blur"),
        ({"edges": 0.01, "homogeneity": 0.99}, "edges"),
        ({"homogeneity": 0.99}, "homogeneity"),
    ]
    measures = {name: np.array([{**good, **change}[name] for change, _ in rows], np.float32) for name in MEASURES}
    keep, reason = keep_tiles(measures, cfg)
    assert reason.dtype == object
    assert list(reason) == [expected for _, expected in rows]
    assert list(keep) == [expected == "" for _, expected in rows]
    with pytest.raises(KeyError, match="pen"):
        keep_tiles({name: measures[name] for name in MEASURES if name != "pen"}, cfg)


# --- tissue mask on composed slides ------------------------------------------------------------


def composed_slide(tissue_source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 200 x 320 thumbnail (8 µm/px): a tissue ellipse on glass, a green stroke crossing glass and
    tissue, grey dust specks and a dark fibre on the glass. Returns (image, tissue, ink)."""
    shape = (200, 320)
    image = glass(shape, seed=8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    tissue = ((yy - 100) / 60) ** 2 + ((xx - 150) / 110) ** 2 < 1
    texture = np.tile(tissue_source, (shape[0] // tissue_source.shape[0] + 1, shape[1] // tissue_source.shape[1] + 1, 1))
    image[tissue] = texture[: shape[0], : shape[1]][tissue]
    for y, x in [(20, 20), (180, 300), (30, 290), (170, 40)]:
        image[y - 1 : y + 2, x - 1 : x + 2] = 120  # dust
    image[10, 60:140] = 90  # a fibre
    ink = disk_stroke(shape, (260, 260), 130, 10)
    image[ink] = (image[ink] * np.array([0.25, 0.75, 0.6])).astype(np.uint8)
    return image, tissue & ~ink, ink


def check_mask(image: np.ndarray, tissue: np.ndarray, ink: np.ndarray) -> np.ndarray:
    mask = tissue_mask(image, 8.0, TissueConfig())
    assert mask.shape == tissue.shape and mask.dtype == bool
    assert (mask & tissue).sum() / (mask | tissue).sum() > 0.9
    assert not (mask & ink).any(), "marker ink is not tissue"
    assert not mask[:40].any() and not mask[-20:].any(), "dust and fibres on the glass are not tissue"
    return mask


def test_tissue_mask_finds_drawn_tissue_not_ink_or_dust() -> None:
    check_mask(*composed_slide(he_texture((64, 64), seed=9)))


def test_tissue_mask_of_rgba_equals_mask_of_composited_rgb() -> None:
    image, tissue, ink = composed_slide(he_texture((64, 64), seed=10))
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[:, :30] = 0  # transparent, as OpenSlide returns outside the scanned area
    flattened = image.copy()
    flattened[:, :30] = 255
    np.testing.assert_array_equal(tissue_mask(rgba, 8.0, TissueConfig()), tissue_mask(flattened, 8.0, TissueConfig()))


def test_tissue_mask_of_a_finer_image_is_computed_at_detect_mpp() -> None:
    """A 2 µm/px image (a slide without a low-resolution level) gives the 8 µm/px mask, scaled up."""
    image, _, _ = composed_slide(he_texture((64, 64), seed=11))
    fine = np.repeat(np.repeat(image, 4, axis=0), 4, axis=1)[:-3, :-2]  # a size that is no multiple of 4
    expected = np.repeat(np.repeat(tissue_mask(image, 8.0, TissueConfig()), 4, axis=0), 4, axis=1)[:-3, :-2]
    np.testing.assert_array_equal(tissue_mask(fine, 2.0, TissueConfig()), expected)


@pytest.mark.parametrize("max_pixels", [0, 4, 30, 10**6])
def test_small_enclosed_glass_is_filled_and_glass_at_the_border_is_not(max_pixels: int) -> None:
    """Against SciPy's hole filling: holes are the glass it fills, each filled if small enough."""
    rng = np.random.default_rng(max_pixels)
    for _ in range(50):
        mask = ndi.binary_opening(rng.random((40, 50)) < 0.6) | (rng.random((40, 50)) < 0.1)
        holes, _ = ndi.label(ndi.binary_fill_holes(mask) & ~mask)
        small = np.bincount(holes.ravel()) <= max_pixels
        small[0] = False
        np.testing.assert_array_equal(quality._fill_holes(mask, max_pixels), mask | small[holes])


def test_tissue_mask_of_glass_only_is_empty() -> None:
    assert not tissue_mask(glass((150, 150)), 8.0, TissueConfig()).any()


def test_tissue_mask_matches_synthetic_panda_labels(tmp_path: Path) -> None:
    """Slide 1 of seed 0 has marker strokes over glass and tissue; tissue is label > 0."""
    for folder in ("train_images", "train_label_masks"):
        (tmp_path / folder).mkdir()
    row = write_slide(tmp_path, PandaSynth(slides=1, max_cores=1, core_length_um=1500, core_width_um=300), 0, 1)
    image_path = tmp_path / "train_images" / f"{row['image_id']}.tiff"
    with tifffile.TiffFile(image_path) as tif:
        page = tif.series[0].levels[-1].keyframe
        numerator, denominator = page.tags["XResolution"].value
        mpp = 10000 / (numerator / denominator)
        image = tif.series[0].levels[-1].asarray()
    truth = tifffile.imread(tmp_path / "train_label_masks" / f"{row['image_id']}_mask.tiff", level=-1)[..., 0] > 0
    mask = tissue_mask(image, mpp, TissueConfig())
    ink = pen_mask(image)
    assert ink.sum() > 1000, "the slide has marker strokes"
    assert not (mask & ink).any()
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9


# --- real scans ----------------------------------------------------------------------------------

KEPT = [
    "nct_crc/ADI-AAQEFMRI.tif", "nct_crc/DEB-ACHGAMCT.tif", "nct_crc/LYM-AATTSRNN.tif", "nct_crc/MUC-AAQTMGMA.tif",
    "nct_crc/MUS-AACVWIEK.tif", "nct_crc/NORM-AAAWMSFI.tif", "nct_crc/STR-AACRYYNQ.tif", "nct_crc/TUM-AACHEHDV.tif",
    "tissue_checks/tissue-level0-4302-10273-4814-10785.png", "tissue_checks/tissue-level0-7352-11762-7864-12274.png",
    "tissue_checks/high-nuclei-score-level0.png", "tissue_checks/medium-nuclei-score-level0.png",
    "tissue_checks/low-nuclei-score-level0.png",
    # a faint red tint over tissue: below max_pen, and indistinguishable from eosin by colour
    "tissue_checks/high-nuclei-score-red-pen-level1.png",
]
DROPPED = {
    "nct_crc/BACK-AAQSHYMA.tif": "background",
    "tissue_checks/almost-white-1.png": "background",
    "tissue_checks/no-tissue.png": "background",
    "tissue_checks/no-tissue2.png": "background",
    "tissue_checks/no-tissue-line.png": "background",
    "tissue_checks/no-tissue-green-pen.png": "pen",
    "tissue_checks/no-tissue-red-pen.png": "pen",
    "tissue_checks/medium-nuclei-score-green-pen-level1.png": "pen",  # green ink over 44 % of the tissue
}


@pytest.mark.parametrize("name", KEPT + sorted(DROPPED))
def test_default_thresholds_on_real_tiles(shared_data: Path, name: str) -> None:
    tile = read_rgb(shared_data / "tiles" / name)
    keep, reason = keep_tiles(tile_measures(tile[None]), QualityConfig())
    assert (bool(keep[0]), reason[0]) == ((True, "") if name in KEPT else (False, DROPPED[name]))


def test_real_tile_measures_agree_with_full_resolution_counts(shared_data: Path) -> None:
    """The subsampled fractions estimate the full-resolution ones; ink-free tissue is not ink."""
    for path in sorted((shared_data / "tiles").glob("*/*")):
        tile = read_rgb(path)
        measures = one(tile)
        lo, hi = tile.min(axis=-1).astype(int), tile.max(axis=-1).astype(int)
        glass_fraction = np.mean((lo >= GLASS_MIN_LEVEL) & (hi - lo <= GLASS_MAX_CHROMA))
        assert measures["background"] == pytest.approx(glass_fraction, abs=0.03), path.name
        assert measures["pen"] == pytest.approx(pen_mask(tile).mean(), abs=0.03), path.name
        if "pen" not in path.name and "line" not in path.name:
            assert measures["pen"] < 0.01, path.name


def test_real_tissue_tile_on_glass_with_a_stroke(shared_data: Path) -> None:
    source = read_rgb(shared_data / "tiles" / "tissue_checks" / "tissue-level0-7352-11762-7864-12274.png")
    check_mask(*composed_slide(np.asarray(Image.fromarray(source).reduce(2))))


def test_tissue_mask_on_the_inked_prostate_biopsy(shared_data: Path) -> None:
    """HistoPrep's biopsy at 0.5 µm/px, averaged down to 8 µm/px: one long core, blue ink at its edge."""
    image = Image.open(shared_data / "images" / "prostate_biopsy_with_ink.jpeg").convert("RGB")
    small = np.asarray(image.reduce(16))
    mask = tissue_mask(small, 8.0, TissueConfig())
    ink = pen_mask(small)
    assert ink.sum() > 50 and not (mask & ink).any()
    assert 0.25 < mask.mean() < 0.4
    assert (mask & bare_glass(small)).sum() < 0.02 * bare_glass(small).sum(), "glass is not tissue"
    assert ndi.label(mask)[1] <= 3, "the core is found in one piece (or a few)"


def test_tissue_mask_on_an_aperio_slide(shared_data: Path) -> None:
    """CMU-1-Small-Region.svs (0.499 µm/px, one level) read with OpenSlide, as the tiler will."""
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        mpp = float(slide.properties["openslide.mpp-x"])
        factor = 16
        region = slide.read_region((0, 0), 0, slide.level_dimensions[0])
    small = region.resize((region.width // factor, region.height // factor), Image.BOX)
    small_rgb = as_rgb(np.asarray(small))
    mask = tissue_mask(np.asarray(small), mpp * factor, TissueConfig())
    assert 0.3 < mask.mean() < 0.5
    # glass enclosed by the tissue (under 0.25 mm²) is filled, the rest is not tissue
    assert (mask & bare_glass(small_rgb)).sum() < 0.1 * bare_glass(small_rgb).sum()
