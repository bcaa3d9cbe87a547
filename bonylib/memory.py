"""How much memory this process may hold, and a check that a size read from a file fits in it.

Kept apart from :mod:`bonylib.runtime`, which imports torch: readers of slides and manifests check
sizes too, and a tiling worker has no use for torch's 700 MB (``bony tile`` imports none of it).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from bonylib.errors import BonyError


def _cgroup_memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup"),
                         proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's cgroup may use (the tightest ``memory.max`` of v2 up the tree, v1's
    ``memory.limit_in_bytes``), or None when unlimited: what Docker's ``--memory`` and SLURM's ``--mem`` set."""
    limits: list[int] = []
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, _, path = line.partition(":")[2].partition(":")
            path = path.lstrip("/")
            if hierarchy == "":
                group = cgroup_root / path
                for folder in (group, *group.parents):
                    if not str(folder).startswith(str(cgroup_root)):
                        break
                    with contextlib.suppress(OSError, ValueError):
                        value = (folder / "memory.max").read_text().strip()
                        if value != "max":
                            limits.append(int(value))
            elif "memory" in hierarchy.split(","):
                with contextlib.suppress(OSError, ValueError):
                    value = int((cgroup_root / "memory" / path / "memory.limit_in_bytes").read_text())
                    if value < 2**62:  # v1 writes a huge number for "unlimited"
                        limits.append(value)
    return min(limits) if limits else None


def memory_bytes() -> int:
    """Memory this process can hold: the machine's physical memory, capped by its cgroup's limit."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    return min(physical, limit) if limit else physical


def check_fits(nbytes: float, what: str) -> None:
    """Refuse a size read from a file (a tile side, a layer count, a head width) whose allocation could not be held:
    :class:`BonyError` when ``nbytes`` exceeds :func:`memory_bytes`. ``what`` names the file or key and the size;
    the message adds how much it needs and what the machine has."""
    limit = memory_bytes()
    if not math.isfinite(nbytes) or nbytes > limit:
        raise BonyError(f"{what} needs {nbytes / 2**30:.3g} GiB, more than this machine's {limit / 2**30:.3g} GiB of "
                        f"memory")
