"""Compiled kernels: cached where a cache can be written, compiled in each process where none can."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from bonylib.compiled import kernel


def test_a_kernel_is_cached_next_to_its_module() -> None:
    """In a writable checkout (the tests' own), numba keeps the machine code in the module's ``__pycache__``."""
    from bonylib.data import quality

    assert Path(quality._measure_tiles._cache._cache_path) == Path(quality.__file__).parent / "__pycache__"


def test_a_kernel_that_cannot_be_cached_is_compiled_and_said(caplog: pytest.LogCaptureFixture) -> None:
    """A function numba cannot locate a cache for (here, source from ``exec``: no file; in use, a read-only install
    run with a read-only home) raises as it is decorated with ``cache=True``; ``kernel`` compiles it uncached."""
    namespace: dict = {}
    exec("def total(values):\n    s = 0\n    for v in values:\n        s += v\n    return s\n", namespace)
    with caplog.at_level(logging.WARNING, logger="bonylib.compiled"):
        total = kernel()(namespace["total"])
    assert total(np.arange(10)) == 45
    assert "cannot cache total" in caplog.text and "NUMBA_CACHE_DIR" in caplog.text


@pytest.mark.parametrize("cells", [([0, 2], [0, 0]), ([0, -1], [0, 0]), ([0, 0], [0, 3])])
def test_cells_outside_the_grid_are_refused_before_a_kernel_reads_them(cells: tuple[list[int], list[int]]) -> None:
    from bonylib.data.mask_fractions import grid_class_fractions
    from bonylib.data.quality import grid_measures

    rows, cols = (np.array(c) for c in cells)
    with pytest.raises(IndexError, match="outside a grid of 2 x 3 tiles"):
        grid_measures(np.zeros((2, 8, 3, 8, 3), np.uint8), rows, cols)
    with pytest.raises(IndexError, match="outside a grid of 2 x 3 tiles"):
        grid_class_fractions(np.zeros((2, 8, 3, 8), np.uint8), rows, cols, "radboud")
    with pytest.raises(ValueError, match="uint8 grid"):
        grid_measures(np.zeros((2, 8, 3, 8, 3), np.float32), [0], [0])
