"""Class fractions of label-mask regions: the share of each manifest label in each tile's mask.

Tiling counts every mask pixel it reads, so the count is a compiled kernel (numba), kept apart from
:mod:`bonylib.data.labels` so that what imports the encodings and label rules (evaluation, datasets,
synthetic data) does not import numba.
"""

from __future__ import annotations

import numpy as np

from bonylib.compiled import grid_cells, kernel
from bonylib.data.labels import LABEL_NAMES, LOSSY_ENCODINGS, MASK_ENCODINGS, snap_codes


def class_fractions(codes: np.ndarray, encoding: str) -> np.ndarray:
    """Fraction of each manifest label (``LABEL_NAMES`` order) in each mask region.

    ``codes`` is (N, H, W) uint8 (one region per tile) or (H, W); returns (N, 6) or (6,). Values
    that are not codes of a lossless ``encoding`` mean a wrong mask file and raise ``ValueError``;
    JPEG masks (``LOSSY_ENCODINGS``) are first snapped to the nearest code.
    """
    single = codes.ndim == 2
    stack = codes[None] if single else codes
    n = stack.shape[0]
    out = grid_class_fractions(stack[:, :, None], np.arange(n), np.zeros(n, np.intp), encoding)
    return out[0] if single else out


def grid_class_fractions(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, encoding: str) -> np.ndarray:
    """:func:`class_fractions` of the regions at ``(rows, cols)`` of a ``(Y, H, X, W)`` uint8 grid of mask codes (a
    block of a mask reshaped into tiles of ``H x W``), counted in place: (N, 6)."""
    table = MASK_ENCODINGS[encoding]
    valid = np.array(sorted(table), dtype=np.uint8)
    grid, rows, cols = grid_cells(grid, rows, cols, 4)
    if encoding in LOSSY_ENCODINGS:  # snapping looks at neighbours: the regions are cut out first
        grid = np.ascontiguousarray(snap_codes(grid[rows, :, cols], encoding)[:, :, None])
        rows, cols = np.arange(len(rows)), np.zeros(len(rows), np.intp)
    histogram = np.zeros((len(rows), 256), np.int64)
    _code_counts(grid, rows, cols, histogram)
    invalid = np.ones(256, bool)
    invalid[valid] = False
    bad = np.flatnonzero(invalid & histogram.any(axis=0))
    if bad.size:
        raise ValueError(f"mask values {bad.tolist()} are not {encoding} codes {valid.tolist()}")
    pixels = grid.shape[1] * grid.shape[3]
    out = np.zeros((len(rows), len(LABEL_NAMES)), np.float32)
    for code in valid:
        out[:, LABEL_NAMES.index(table[int(code)])] += histogram[:, code] / pixels
    return out


MAX_CODE_PASSES = 8
"""Regions whose codes span more values than this are counted by histogram, not by a pass per value."""


@kernel()
def _code_counts(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, counts: np.ndarray) -> None:
    """``counts[i, v]`` = pixels of value ``v`` in the region ``grid[rows[i], :, cols[i]]``.

    Tiling counts every mask pixel it reads, so this is on its hot path, and masks hold a handful
    of codes. A region's lowest and highest value are found first (a vectorised pass): a region
    inside one class is then counted; otherwise each value between them is counted by a
    vectorised comparison pass, several times faster than a histogram, whose increments of the
    same bin wait on each other. A region spanning many values (a wrong mask file, about to be
    refused) is counted by histogram."""
    height, width = grid.shape[1], grid.shape[3]
    for t in range(rows.shape[0]):
        region = grid[rows[t], :, cols[t]]
        lo, hi = np.uint8(255), np.uint8(0)
        for y in range(height):
            for x in range(width):
                lo = min(lo, region[y, x])
                hi = max(hi, region[y, x])
        if lo == hi:
            counts[t, lo] = height * width
        elif hi - lo < MAX_CODE_PASSES:
            for value in range(lo, hi + 1):
                total = 0
                for y in range(height):
                    row_total = np.int32(0)
                    for x in range(width):
                        row_total += region[y, x] == value
                    total += row_total
                counts[t, value] = total
        else:
            for y in range(height):
                for x in range(width):
                    counts[t, region[y, x]] += 1
