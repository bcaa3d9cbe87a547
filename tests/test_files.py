"""Atomic writes: a failed write leaves the old content and no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonylib.errors import BonyError
from bonylib.files import atomic_dir, atomic_path, ensure_writable_dir, write_text_atomic


def test_atomic_path_keeps_old_file_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "table.csv"
    write_text_atomic(dest, "old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        assert tmp.suffix == ".csv" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_atomic_dir_replaces_whole_folder(tmp_path: Path) -> None:
    dest = tmp_path / "dataset"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    with atomic_dir(dest) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_unusable_output_folder_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BonyError, match=str(blocker / "out")):
        ensure_writable_dir(blocker / "out")
