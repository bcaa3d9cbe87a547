"""Slide readers: OpenSlide, the tifffile fallback and plain images agree on pixels and geometry."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from bonylib.config import load_config
from bonylib.data.slides import ImageSlide, OpenSlideSlide, SlideError, TiffSlide, open_slide
from bonylib.data.synthetic.panda import PROVIDER_MPP
from bonylib.data.tiling import TileConfig, plan_reading


@pytest.fixture(scope="module")
def panda_slide(smoke_data: Path) -> Path:
    return sorted((smoke_data / "panda" / "train_images").glob("*.tiff"))[0]


def test_openslide_and_tifffile_readers_agree(panda_slide: Path) -> None:
    with OpenSlideSlide(panda_slide) as a, TiffSlide(panda_slide) as b:
        assert a.level_dimensions == b.level_dimensions
        assert a.level_downsamples == pytest.approx(b.level_downsamples)
        assert a.mpp == pytest.approx(b.mpp) and a.mpp in [pytest.approx(m) for m in PROVIDER_MPP.values()]
        w, h = a.level_dimensions[0]
        # a region across TIFF tile borders and one sticking out of the image
        for location, level, size in (((200, 300), 0, (300, 270)), ((w - 100, h - 50), 0, (160, 120)), ((64, 128), 1, (100, 90))):
            ra, rb = a.read_region(location, level, size), b.read_region(location, level, size)
            assert ra.shape == rb.shape == (size[1], size[0], 3)
            assert np.abs(ra.astype(int) - rb.astype(int)).max() <= 2, "same JPEG tiles, same decoder up to rounding"
        outside = a.read_region((w - 100, h - 50), 0, (160, 120))
        assert (outside[60:, :] == 255).all() and (outside[:, 110:] == 255).all(), "beyond the image reads as white"


def test_tifffile_reads_level_zero_as_written(panda_slide: Path) -> None:
    with tifffile.TiffFile(panda_slide) as tif:
        expected = tif.pages[0].asarray()[500:700, 300:620]
    with TiffSlide(panda_slide) as slide:
        assert np.array_equal(slide.read_region((300, 500), 0, (320, 200)), expected)


def test_a_region_read_by_cells_decodes_only_the_tiles_they_touch(panda_slide: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (x, y), size, cell = (300, 200), (3 * 224, 2 * 224), 224
    cells = np.array([[True, False, False], [False, False, True]])
    with TiffSlide(panda_slide) as slide:
        whole = slide.read_region((x, y), 0, size)
        codes = slide.read_codes((x, y), 0, size)
        page = slide._pages[0]
        decoded: list[int] = []
        original = TiffSlide._tile
        monkeypatch.setattr(TiffSlide, "_tile",
                            lambda self, level, index, channel=None: decoded.append(index) or original(self, level, index))
        slide._cache.clear()
        some = slide.read_region((x, y), 0, size, cells)
    boxes = [(x + col * cell, y + row * cell) for row, col in zip(*np.nonzero(cells))]
    for bx, by in boxes:
        box = np.s_[by - y:by - y + cell, bx - x:bx - x + cell]
        assert np.array_equal(some[box], whole[box])
    tw, th, across = page.tilewidth, page.tilelength, -(-page.imagewidth // page.tilewidth)
    overlapping = {ty * across + tx for ty in range(10) for tx in range(10)
                   if any(tx * tw < bx + cell and bx < (tx + 1) * tw and ty * th < by + cell and by < (ty + 1) * th
                          for bx, by in boxes)}
    assert sorted(decoded) == sorted(overlapping) and len(overlapping) < 12, "12 file tiles lie under the whole region"
    assert np.array_equal(codes, whole[..., 0]), "read_codes is the red channel"


def test_plain_image_is_a_one_level_slide_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :30, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba).save(tmp_path / "tile.png")
    with open_slide(tmp_path / "tile.png") as slide:
        assert isinstance(slide, ImageSlide) and slide.level_count == 1 and slide.mpp is None
        rgb = slide.read_level(0)
    assert (rgb[:, :30] == [200, 0, 0]).all() and (rgb[:, 30:] == 255).all()
    with open_slide(tmp_path / "tile.png", mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_reading_plans(panda_slide: Path, tmp_path: Path) -> None:
    with open_slide(panda_slide) as slide:
        mpp = slide.mpp
        assert plan_reading(slide, load_config(TileConfig)).level == 0
        assert plan_reading(slide, load_config(TileConfig)).size == 224, "0.486 or 0.453 is 0.5 within 10 %"
        coarse = plan_reading(slide, load_config(TileConfig, None, ["mpp=2.0"]))
        assert (coarse.level, coarse.size) == (1, 224) and coarse.tile_mpp == pytest.approx(4 * mpp)
        between = plan_reading(slide, load_config(TileConfig, None, ["mpp=1.0"]))
        assert between.level == 0 and between.size == round(224 * 1.0 / mpp)
        assert between.tile_mpp == pytest.approx(mpp * between.size / 224)
        by_level = plan_reading(slide, load_config(TileConfig, None, ["mpp=null", "level=2"]))
        assert (by_level.level, by_level.size) == (2, 224)
    Image.new("RGB", (300, 300), "white").save(tmp_path / "plain.jpg")
    with open_slide(tmp_path / "plain.jpg") as slide, pytest.raises(SlideError, match="slide_mpp=") as err:
        plan_reading(slide, load_config(TileConfig))
    assert "plain.jpg" in str(err.value)


def test_bad_files_name_the_file(tmp_path: Path, panda_slide: Path) -> None:
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "absent.svs")
    (tmp_path / "junk.tiff").write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideError, match="junk.tiff"):
        open_slide(tmp_path / "junk.tiff")
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SlideError, match="junk.jpg"):
        open_slide(tmp_path / "junk.jpg")


def test_deflate_mask_tiles_read_as_written_and_a_broken_one_names_the_file(tmp_path: Path) -> None:
    """Label masks are deflate tiles, inflated by zlib-ng rather than tifffile: the codes must be the file's, and a
    tile that does not inflate, or inflates short, must be refused with the file and the tile named."""
    codes = np.random.default_rng(0).integers(0, 6, (48, 64, 3), dtype=np.uint8)
    path = tmp_path / "mask.tiff"
    tifffile.imwrite(path, codes, tile=(16, 16), compression="zlib", photometric="rgb")
    with TiffSlide(path, require_rgb=False) as mask:
        assert np.array_equal(mask.read_codes((0, 0), 0, (64, 48)), codes[..., 0])
        assert np.array_equal(mask.read_codes((5, 7), 0, (40, 30)), codes[7:37, 5:45, 0])
        assert np.array_equal(mask.read_region((0, 0), 0, (64, 48)), codes), "the RGB read keeps its own tiles"
    # codes are inflated into one reused buffer: a tile served later from the cache must not be the next tile's
    with TiffSlide(path, require_rgb=False) as mask:
        first = mask.read_codes((0, 0), 0, (16, 16))
        assert np.array_equal(mask.read_codes((16, 0), 0, (16, 16)), codes[:16, 16:32, 0])
        assert np.array_equal(mask.read_codes((0, 0), 0, (16, 16)), first)
        assert np.array_equal(first, codes[:16, :16, 0])
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    raw = bytearray(path.read_bytes())
    raw[offset:offset + count] = b"\xff" * count
    path.write_bytes(bytes(raw))
    with TiffSlide(path, require_rgb=False) as mask, pytest.raises(SlideError, match=r"mask.tiff: tile 1 of level 0"):
        mask.read_codes((0, 0), 0, (64, 48))
    short = zlib.compress(b"\x01" * 100)  # a valid stream of 100 bytes where a tile holds 16 x 16 x 3
    raw[offset:offset + len(short)] = short
    path.write_bytes(bytes(raw))
    with TiffSlide(path, require_rgb=False) as mask, pytest.raises(SlideError, match=r"inflates to 100 bytes"):
        mask.read_codes((0, 0), 0, (64, 48))


def test_real_slides(shared_data: Path) -> None:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        assert isinstance(slide, OpenSlideSlide) and slide.vendor == "aperio"
        assert slide.level_dimensions[0] == (2220, 2967) and slide.mpp == pytest.approx(0.499, abs=0.01)
        region = slide.read_region((1000, 1000), 0, (224, 224))
        assert region.std() > 10, "real tissue"
    with open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        assert slide.level_dimensions[:2] == [(4443, 3567), (2221, 1783)]
        assert slide.read_region((2000, 1500), 1, (128, 128)).shape == (128, 128, 3)
    with open_slide(shared_data / "images" / "prostate_biopsy_with_ink.jpeg") as slide:
        assert slide.level_dimensions == [(5600, 1000)]
