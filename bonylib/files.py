"""Atomic file and folder writes.

Every output of a stage is written to a temporary name beside its destination and renamed into
place, so a run killed at any moment leaves either the old file or the new one, never half of one;
a rerun then sees only complete outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bonylib.errors import BonyError


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and check that files can be created in it.

    The error names ``path`` itself and, when the cause is an ancestor that is a file or cannot be
    written, that ancestor too.
    """
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise BonyError(f"{path}: cannot create output folder ({blocker} is a file, not a folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BonyError(f"{path}: cannot create output folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BonyError(f"{path}: output folder is not writable")
    return path


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s folder; on success rename it to ``dest``.

    The temporary name keeps ``dest``'s suffix so that writers that choose a format by suffix
    (pandas, PIL, tifffile) behave as for the final name. On error the temporary file is removed
    and ``dest`` is untouched.
    """
    dest = Path(dest)
    ensure_writable_dir(dest.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(dest: Path, text: str) -> None:
    """Write ``text`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` whole.

    Used for outputs that are only meaningful complete (a synthetic dataset, an executed book):
    readers never see a folder with some of its files missing.
    """
    dest = Path(dest)
    ensure_writable_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
