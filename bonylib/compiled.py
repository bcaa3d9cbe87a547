"""Compiled kernels (numba) whose machine code is cached between processes where the cache can be written.

numba compiles a kernel on its first call, for the CPU at hand, and with ``cache=True`` keeps the
machine code next to the module (or in the user's cache) so that later processes only load it.
A read-only install with no writable user cache (a container, a site-wide install run from a
read-only home) makes ``cache=True`` fail as the module is imported; such a process then compiles
its kernels itself, which costs seconds, not the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

log = logging.getLogger(__name__)


def kernel(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(cache=True, nogil=True, **options)``, or without the cache where none can be written.

    ``nogil``: a kernel holds no Python object, and threads that read slides may run it side by side."""
    def decorate(function: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, **options)(function)
        except RuntimeError as exc:
            if "cannot cache function" not in str(exc):
                raise
            log.warning("numba cannot cache %s (no writable cache next to its module or in the user's; set "
                        "NUMBA_CACHE_DIR to a writable folder): it is compiled in each process", function.__qualname__)
            return numba.njit(nogil=True, **options)(function)
    return decorate


def grid_cells(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``grid`` as a C-contiguous uint8 array of ``ndim`` dimensions, and ``rows``, ``cols`` as intp indices of its
    cells (axes 0 and 2), checked: a kernel reads memory without bounds checks, so a cell outside the grid would
    read another array's bytes (or crash) instead of raising."""
    grid = np.ascontiguousarray(grid)
    rows, cols = np.asarray(rows, np.intp).ravel(), np.asarray(cols, np.intp).ravel()
    if grid.dtype != np.uint8 or grid.ndim != ndim:
        raise ValueError(f"expected a {ndim}-d uint8 grid, got {grid.dtype} of shape {grid.shape}")
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols differ in length: {rows.size} and {cols.size}")
    if rows.size and not (0 <= rows.min() and rows.max() < grid.shape[0] and 0 <= cols.min() and cols.max() < grid.shape[2]):
        raise IndexError(f"cells outside a grid of {grid.shape[0]} x {grid.shape[2]} tiles")
    return grid, rows, cols
