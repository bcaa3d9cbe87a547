"""Folders of sample tiles: crops of a region image at the coordinates their names give, a spread of tiles,
each into an emptied folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonylib.errors import BonyError
from bonylib.data.samples import region_tiles, spread_tiles


def test_region_crops_are_the_image_at_the_coordinates_in_their_names(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "region.png")
    dest = tmp_path / "crops"
    dest.mkdir()
    (dest / "stale.png").write_bytes(b"left from an earlier call")
    assert region_tiles(tmp_path / "region.png", dest, side=100, count=4) == dest
    assert len(list(dest.iterdir())) == 4 and not (dest / "stale.png").exists()
    centres = set()
    for path in dest.iterdir():
        _, x, y = path.stem.split("-")
        x, y = int(x), int(y)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels[y:y + 100, x:x + 100])
        centres.add((x + 50, y + 50))
    assert centres == {(100, 75), (300, 75), (100, 225), (300, 225)}  # the centres of a 2 x 2 grid
    with pytest.raises(BonyError, match="too small for 9 crops of 200 px"):
        region_tiles(tmp_path / "region.png", dest, side=200, count=9)


def test_spread_tiles_copies_evenly_spaced_tiles_into_an_emptied_folder(tmp_path: Path) -> None:
    tiles = []
    for k in range(10):
        tiles.append(tmp_path / f"slide{k:02d}.jpg")
        tiles[-1].write_bytes(bytes([k]) * 10)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.jpg").write_bytes(b"old")
    spread_tiles(tiles[::-1], dest, 3)
    assert sorted(p.name for p in dest.iterdir()) == ["slide00.jpg", "slide03.jpg", "slide06.jpg"]
    assert (dest / "slide03.jpg").read_bytes() == bytes([3]) * 10
    with pytest.raises(BonyError, match="no tiles to copy"):
        spread_tiles([], dest, 3)
