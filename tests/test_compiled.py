"""Compiled kernels: cached where a cache can be written, compiled in each process where none can."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bonylib.compiled import kernel


def test_a_kernel_is_cached_next_to_its_module() -> None:
    from bonylib.data import quality

    assert quality._measure_tiles._cache._cache_path, "quality's kernels have a cache location"


def test_a_kernel_that_cannot_be_cached_is_compiled_and_said(caplog: pytest.LogCaptureFixture) -> None:
    """A function numba cannot locate a cache for (here, source from ``exec``: no file; in use, a read-only install
    run with a read-only home) raises as it is decorated with ``cache=True``; ``kernel`` compiles it uncached."""
    namespace: dict = {}
    exec("def total(values):\n    s = 0\n    for v in values:\n        s += v\n    return s\n", namespace)
    with caplog.at_level(logging.WARNING, logger="bonylib.compiled"):
        total = kernel()(namespace["total"])
    assert total(np.arange(10)) == 45
    assert "cannot cache total" in caplog.text and "NUMBA_CACHE_DIR" in caplog.text
