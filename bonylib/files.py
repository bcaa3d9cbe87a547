"""Atomic file and folder writes.

Every output of a stage is written to a temporary name beside its destination and renamed into
place, so a run killed at any moment leaves either the old file or the new one, never half of one;
a rerun then sees only complete outputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bonylib.errors import BonyError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")
"""numpy's ``tofile`` (hence ``np.save`` of a large array) on a full disk: an OSError with no errno, only this text."""


class DiskFullError(BonyError):
    """The output filesystem is full (or over quota): not the input's fault; free space and rerun to resume."""


@contextlib.contextmanager
def reporting_full_disk(folder: Path, what: str) -> Iterator[None]:
    """Turn a full disk or quota met inside the block into :class:`DiskFullError` naming ``folder``: one place
    for every writer, whatever wraps the OSError (torch.save raises "unexpected pos" with it as context)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if _is_full_disk(exc):
            raise DiskFullError(f"{folder}: the output disk is full (no space left writing {what}); free space there "
                                f"and rerun the same command: finished work is kept and the run resumes") from None
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` alone must set it to
    read it, and another thread could create a file in that moment)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_full_disk(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is a full disk or quota. Writers that wrap the
    OSError (torch.save's "unexpected pos" RuntimeError) keep it as ``__cause__`` or ``__context__``; numpy's
    ``tofile`` reports a short write without an errno (:data:`_SHORT_WRITE`), which on a local or network disk
    is the disk or quota running out."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and (current.errno in FULL_DISK or current.errno is None
                                             and _SHORT_WRITE.match(str(current))):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def sha256_json(payload: Any) -> str:
    """Hex SHA-256 of ``payload`` as canonical JSON (sorted keys; what JSON cannot hold as its ``str``): the key of a
    cached result, equal whenever everything that decides the result is."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoints of large models are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` when it names something below ``root``, else None ('..' out of it, an absolute path).

    Paths read from a CSV or a manifest are input: this is checked before they are opened. It is checked on
    the names, not on resolved links, so a dataset whose image folder links to another disk stays usable.
    """
    base = os.path.abspath(root)
    path = os.path.normpath(os.path.join(base, relative))
    if not relative or os.path.isabs(relative) or path == base or os.path.commonpath([base, path]) != base:
        return None
    return Path(path)


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
        with reporting_full_disk(path, "a new folder"):
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
    and ``dest`` is untouched. The file gets the permissions of an ordinary new file (0666 less the umask), not
    ``mkstemp``'s private 0600: on a shared cluster colleagues read the manifests and checkpoints. They are set
    again before the rename, because some writers replace the file they are given (safetensors' ``save_file``
    does, and its file was 0600). A write that runs out of space raises :class:`DiskFullError` naming the folder.
    """
    dest = Path(dest)
    ensure_writable_dir(dest.parent)
    mode = 0o666 & ~_umask()
    with reporting_full_disk(dest.parent, dest.name):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    try:
        with contextlib.suppress(OSError):  # some network and FUSE filesystems refuse chmod: keep their default
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with reporting_full_disk(dest.parent, dest.name):
            yield tmp
            with contextlib.suppress(OSError):
                os.chmod(tmp, mode)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def reserve(path: Path) -> None:
    """Allocate the disk blocks of a sparse file now (a memory-mapped array made by ``np.lib.format.open_memmap``):
    a full disk then fails here, as an OSError that :func:`atomic_path` reports, instead of killing the process with
    SIGBUS when a page of the map is written later."""
    with reporting_full_disk(Path(path).parent, Path(path).name), open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size:
            os.posix_fallocate(handle.fileno(), 0, size)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block, waiting for another holder to release it;
    yields whether the lock is held. Writers of one folder take it around what another process must not see half-done
    (a chunk and its checksum; removing the temporaries that killed writers left). Locks are advisory (``flock``,
    which Linux maps onto NFS locks); on a filesystem that refuses them, the block runs unlocked and yields False,
    so the caller can skip what is only safe under the lock.
    """
    with reporting_full_disk(Path(path).parent, Path(path).name):
        handle = open(path, "a")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            held = True
        except OSError:
            held = False
        try:
            yield held
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def append_line(dest: Path, line: str) -> None:
    """Append one line to a log (``log.jsonl``); a full disk raises :class:`DiskFullError` naming the folder.

    A kill mid-write can leave a torn last line: readers of such logs skip lines that do not parse.
    """
    with reporting_full_disk(Path(dest).parent, Path(dest).name), open(dest, "a") as handle:
        handle.write(line.rstrip("\n") + "\n")


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
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's folder is private (0700)
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


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a :class:`BonyError` naming the file when it is not JSON (a damaged record)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BonyError(f"{path}: not valid JSON ({exc})") from None
