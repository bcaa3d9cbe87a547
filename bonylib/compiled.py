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
