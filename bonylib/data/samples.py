"""The real sample scans shipped beside the project (``../shared/data``), and folders of sample tiles.

Tests and notebooks use the scans to check readers and tissue detection on real files; they are not
part of the repository, so callers must cope with their absence. Tools that take a folder of tiles
(``bony attention``) get one from a large region image or from a spread of existing tiles.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from bonylib.errors import BonyError
from bonylib.files import atomic_path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """The sample-data folder: ``$BONY_SHARED_DATA`` or ``<repo>/../shared/data``; ``None`` if absent."""
    candidate = Path(os.environ.get("BONY_SHARED_DATA", _REPO_ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


def _fresh(folder: Path) -> Path:
    """``folder`` emptied (tiles left from an earlier call, e.g. of regenerated data, would be mapped too)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def region_tiles(image: Path, dest: Path, side: int = 512, count: int = 4) -> Path:
    """``count`` crops of ``side`` px from the centres of a grid over a large image (a region of a scan), written
    as PNGs named ``<image>-<x>-<y>.png`` into the emptied folder ``dest``; returns ``dest``."""
    with Image.open(image) as opened:
        region = opened.convert("RGB")
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    if region.width < side * columns or region.height < side * rows:
        raise BonyError(f"{image}: {region.width} x {region.height} px is too small for {count} crops of {side} px")
    _fresh(dest)
    for k in range(count):
        column, row = k % columns, k // columns
        x = round((column + 0.5) * region.width / columns - side / 2)
        y = round((row + 0.5) * region.height / rows - side / 2)
        with atomic_path(dest / f"{image.stem}-{x}-{y}.png") as tmp:
            region.crop((x, y, x + side, y + side)).save(tmp, format="PNG")
    return dest


def spread_tiles(tiles: Sequence[Path], dest: Path, count: int) -> Path:
    """Copies of ``count`` of ``tiles`` spread evenly over their sorted order (over the slides, for tiles named
    by slide) in the emptied folder ``dest``; returns ``dest``."""
    ordered = sorted(tiles)
    if not ordered:
        raise BonyError(f"{dest}: no tiles to copy")
    _fresh(dest)
    for path in ordered[:: max(1, len(ordered) // count)][:count]:
        with atomic_path(dest / path.name) as tmp:
            shutil.copyfile(path, tmp)
    return dest
