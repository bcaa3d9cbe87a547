"""Reading a tile manifest as input: the table ``bony tile`` writes, checked before any of its rows names a file.

Every stage after tiling (embeddings, benchmarks, attention maps over a slide) reads manifests through
:func:`read_manifest`, so a manifest is validated one way. Row ids are ``<slide_id>:<level>:<x>:<y>``: the
manifest contract has no id column, and these four values name a tile uniquely (a slide is tiled on one grid
at one level). A slide id that is not a plain name (:func:`bonylib.data.sources.id_problem`), a coordinate
that is not an integer, a negative level, a tile side that is not a whole number of pixels or whose pixels this
machine could not hold, and a repeated id are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bonylib.data.sources import id_problem
from bonylib.errors import BonyError
from bonylib.memory import check_fits

ID_COLUMNS = ("slide_id", "level", "x", "y")
"""The columns whose values make a tile's row id."""


def _integers(manifest: pd.DataFrame, column: str, where: Path) -> np.ndarray:
    """``column`` as float64 values that are all whole numbers (below 2^53, where float64 still counts every one),
    else :class:`BonyError` naming the first row that is not."""
    values = pd.to_numeric(manifest[column], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) >= 2**53))
    if len(bad):
        raise BonyError(f"{where}: row {bad[0]}: {column} {manifest[column].tolist()[bad[0]]!r} is not an integer")
    return values


def check_tile_sizes(manifest: pd.DataFrame, where: Path) -> None:
    """Refuse a ``size`` column (the tile side read from the slide, in pixels) that is not a whole number >= 1, or whose
    largest tile this machine could not hold as RGBA pixels (a side of 10^6 asked for 3.6 TiB)."""
    if "size" not in manifest:
        return
    sizes = _integers(manifest, "size", where)
    if len(sizes) and sizes.min() < 1:
        row = int(np.argmin(sizes))
        raise BonyError(f"{where}: row {row}: size {int(sizes[row])} is not a tile side (at least 1 pixel)")
    if len(sizes):
        row = int(np.argmax(sizes))
        check_fits(4 * sizes[row] ** 2, f"{where}: row {row}: a tile of size {int(sizes[row])} px")


def row_ids(manifest: pd.DataFrame, where: Path) -> np.ndarray:
    """The id of every manifest row, ``<slide_id>:<level>:<x>:<y>``, checked: raises :class:`BonyError` naming
    ``where`` and the first bad row for a missing column, an unsafe slide id, a non-integer coordinate, a negative
    level, a tile side out of bounds (:func:`check_tile_sizes`) or a repeat."""
    missing = [c for c in ID_COLUMNS if c not in manifest]
    if missing:
        raise BonyError(f"{where}: not a tile manifest (no column {', '.join(missing)})")
    slides = manifest["slide_id"].to_numpy()
    for slide_id in pd.unique(slides):  # one check per slide, not per tile (PANDA: 2.85 M rows)
        problem = "slide id is not text" if not isinstance(slide_id, str) else id_problem(slide_id)
        if problem:
            raise BonyError(f"{where}: row {int(np.argmax(slides == slide_id))}: {problem}")
    text = pd.Series(slides, dtype=object).astype(str)
    for column in ID_COLUMNS[1:]:
        values = _integers(manifest, column, where)
        if column == "level" and len(values) and values.min() < 0:
            row = int(np.argmin(values))
            raise BonyError(f"{where}: row {row}: level {int(values[row])} is negative (levels count from 0)")
        text = text + ":" + pd.Series(values.astype(np.int64)).astype(str)
    check_tile_sizes(manifest, where)
    repeated = np.flatnonzero(text.duplicated().to_numpy())
    if len(repeated):
        raise BonyError(f"{where}: row {repeated[0]}: row id {text.iloc[repeated[0]]!r} (slide_id:level:x:y) repeats an "
                        f"earlier row; {len(repeated)} rows repeat earlier tiles")
    return text.to_numpy(dtype=str)


def read_manifest(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A tile manifest (parquet) and its checked row ids; a file that is not one raises :class:`BonyError` naming it."""
    path = Path(path)
    if path.is_dir():  # pyarrow would read a folder of parquet files as one table, which has no one checksum
        raise BonyError(f"{path}: a folder, not a manifest file (give its manifest.parquet)")
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise BonyError(f"{path}: manifest not found") from None
    except (OSError, ValueError) as exc:
        raise BonyError(f"{path}: not a readable parquet manifest ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    return frame.reset_index(drop=True), row_ids(frame, path)
