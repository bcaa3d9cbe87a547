"""Synthetic PANDA files, read back with OpenSlide and tifffile and checked against the format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile

from bonylib.config import load_config
from bonylib.data.synthetic.panda import PROVIDER_MPP, PandaSynth, write_slide
from bonylib.errors import ConfigError


@pytest.fixture(scope="module")
def panda(smoke_data: Path) -> Path:
    return smoke_data / "panda"


@pytest.fixture(scope="module")
def train(panda: Path) -> pd.DataFrame:
    return pd.read_csv(panda / "train.csv", dtype={"gleason_score": str})


def mask_level(panda: Path, image_id: str, level: int) -> np.ndarray:
    with tifffile.TiffFile(panda / "train_label_masks" / f"{image_id}_mask.tiff") as tif:
        return tif.pages[level].asarray()


def expected_score(areas: dict[int, int]) -> str | None:
    """Gleason score by the grading rules, written out independently of bonylib."""
    present = {g: a for g, a in areas.items() if a > 0}
    if not present:
        return None
    primary = max(present, key=lambda g: (present[g], g))
    rest = {g: a for g, a in present.items() if g != primary}
    if rest and max(rest) > primary:
        secondary = max(rest)
    elif rest and max(rest.values()) >= 0.05 * sum(present.values()):
        secondary = max(rest, key=lambda g: (rest[g], g))
    else:
        secondary = primary
    return f"{primary}+{secondary}"


ISUP = {"3+3": 1, "3+4": 2, "4+3": 3, "4+4": 4, "3+5": 4, "5+3": 4, "4+5": 5, "5+4": 5, "5+5": 5}


def test_train_csv_columns_and_ids(panda: Path, train: pd.DataFrame) -> None:
    assert list(train.columns) == ["image_id", "data_provider", "isup_grade", "gleason_score"]
    assert set(train.data_provider) == {"radboud", "karolinska"}, "smoke config must cover both providers"
    assert train.image_id.str.fullmatch(r"[0-9a-f]{32}").all()
    assert sorted(p.stem for p in (panda / "train_images").glob("*.tiff")) == sorted(train.image_id)
    assert sorted(p.stem for p in (panda / "train_label_masks").glob("*.tiff")) == sorted(train.image_id + "_mask")


def test_slides_open_in_openslide_as_three_level_generic_tiff(panda: Path, train: pd.DataFrame) -> None:
    for row in train.itertuples():
        with openslide.OpenSlide(panda / "train_images" / f"{row.image_id}.tiff") as slide:
            assert slide.properties["openslide.vendor"] == "generic-tiff"
            assert slide.level_count == 3
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            w, h = slide.level_dimensions[0]
            assert slide.level_dimensions == ((w, h), (w // 4, h // 4), (w // 16, h // 16))
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(PROVIDER_MPP[row.data_provider], rel=1e-6)
            thumb = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB"), np.float32)
            assert thumb.mean() > 150 and thumb.std() > 10, "mostly bright glass with some stained tissue"


def test_pages_are_jpeg_tiles_with_panda_resolution_tags(panda: Path, train: pd.DataFrame) -> None:
    row = train.iloc[0]
    with tifffile.TiffFile(panda / "train_images" / f"{row.image_id}.tiff") as tif:
        assert len(tif.pages) == 3
        for level, page in enumerate(tif.pages):
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.is_tiled and page.samplesperpixel == 3
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert 10000 / (num / den) == pytest.approx(PROVIDER_MPP[row.data_provider] * 4**level, rel=1e-6)
        level0, level1 = tif.pages[0].asarray().astype(np.float32), tif.pages[1].asarray().astype(np.float32)
    h, w = level1.shape[:2]
    block_mean = level0[: h * 4, : w * 4].reshape(h, 4, w, 4, 3).mean(axis=(1, 3))
    assert np.abs(block_mean - level1).mean() < 4, "level 1 is the 4x area-average of level 0 (up to JPEG)"


def test_masks_are_lossless_red_channel_pyramids(panda: Path, train: pd.DataFrame) -> None:
    codes = {"radboud": {0, 1, 2, 3, 4, 5}, "karolinska": {0, 1, 2}}
    for row in train.itertuples():
        with tifffile.TiffFile(panda / "train_label_masks" / f"{row.image_id}_mask.tiff") as tif:
            assert all(p.compression != tifffile.COMPRESSION.JPEG for p in tif.pages)
            levels = [p.asarray() for p in tif.pages]
        with openslide.OpenSlide(panda / "train_images" / f"{row.image_id}.tiff") as slide:
            assert [lv.shape[1::-1] for lv in levels] == list(slide.level_dimensions)
        assert not levels[0][..., 1:].any(), "green and blue are zero"
        assert set(np.unique(levels[0][..., 0])) <= codes[row.data_provider]
        assert {0, 1} <= set(np.unique(levels[0][..., 0])), "background and benign tissue are present"
        for level, ds in ((1, 4), (2, 16)):
            h, w = levels[level].shape[:2]
            assert np.array_equal(levels[level], levels[0][ds // 2 :: ds, ds // 2 :: ds][:h, :w])


def test_csv_grades_agree_with_masks(panda: Path, train: pd.DataFrame) -> None:
    for row in train.itertuples():
        red = mask_level(panda, row.image_id, 0)[..., 0]
        if row.data_provider == "radboud":
            score = expected_score({g: int(np.count_nonzero(red == g)) for g in (3, 4, 5)})
            assert row.gleason_score == (score or "negative")
            assert row.isup_grade == ISUP.get(score, 0)
        else:
            has_cancer = bool(np.count_nonzero(red == 2))
            assert (row.gleason_score != "0+0") == has_cancer
            assert (row.isup_grade > 0) == has_cancer
            assert row.isup_grade == ISUP.get(row.gleason_score, 0)


def test_margin_adds_glass_around_the_same_tissue(tmp_path: Path) -> None:
    """``margin_um`` sets the glass around the cores (bench_tiling's PANDA-like tissue share): the slide grows by
    twice the margin's difference on each side and the tissue stays the same (its drawing does not depend on it)."""
    tissue = {}
    for margin in (200.0, 700.0):
        root = tmp_path / str(margin)
        (root / "train_images").mkdir(parents=True)
        (root / "train_label_masks").mkdir()
        cfg = load_config(PandaSynth, None, ["core_length_um=500", "core_width_um=200", f"margin_um={margin}",
                                             "pen_fraction=0", "karolinska_fraction=0"])
        image_id = write_slide(root, cfg, 0, 0)["image_id"]
        codes = mask_level(root, str(image_id), 0)[..., 0]
        tissue[margin] = (codes.shape, int(np.count_nonzero(codes)))
    grown = 2 * 500.0 / PROVIDER_MPP["radboud"]  # pixels: 500 µm more on both sides
    (h0, w0), area0 = tissue[200.0]
    (h1, w1), area1 = tissue[700.0]
    assert abs((h1 - h0) - grown) <= 16 and abs((w1 - w0) - grown) <= 16, tissue
    assert area1 == pytest.approx(area0, rel=0.02), "the same cores, only more glass"
    with pytest.raises(ConfigError, match="margin_um at least 0"):
        PandaSynth(margin_um=-1.0)
