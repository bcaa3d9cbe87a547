"""Seeded synthesis: the same config writes byte-identical files; another seed writes others."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from bonylib.data.synthetic import synthesize
from bonylib.errors import BonyError


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, smoke_config, smoke_data: Path) -> None:
    again = synthesize("deepgleason", tmp_path / "again", smoke_config)[0]
    assert digest(again) == digest(smoke_data / "deepgleason")
    other = synthesize("deepgleason", tmp_path / "other", replace(smoke_config, seed=1))[0]
    a, b = digest(other), digest(again)
    assert a.keys() != b.keys() or a != b


def test_rerun_keeps_and_other_config_needs_overwrite(tmp_path: Path, smoke_config) -> None:
    out = synthesize("sicapv2", tmp_path / "s", smoke_config)[0]
    before = digest(out)
    stamp = (out / "wsi_labels.xlsx").stat().st_mtime_ns
    synthesize("sicapv2", out, smoke_config)
    assert (out / "wsi_labels.xlsx").stat().st_mtime_ns == stamp, "same config: nothing rewritten"
    other = replace(smoke_config, seed=7)
    with pytest.raises(BonyError, match="--overwrite"):
        synthesize("sicapv2", out, other)
    assert digest(out) == before, "a refused write leaves the folder as it was"
    synthesize("sicapv2", out, other, overwrite=True)
    assert digest(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "no temporary folders left behind"


def test_unknown_dataset(tmp_path: Path, smoke_config) -> None:
    with pytest.raises(BonyError, match="unknown dataset 'camelyon'"):
        synthesize("camelyon", tmp_path / "x", smoke_config)
