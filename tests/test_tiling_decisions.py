"""Tiling's fast path (blocks, only the file tiles under candidate tiles decoded, a mask's code channel
pasted alone, codes counted per block) decides every tile as the plain full-resolution path does: each
read tile on its own with ``read_region``, its measures from :func:`tile_measures` and its class
fractions counted pixel by pixel. On the real scans and patches of ../shared/data (skipped without
it) and on synthetic PANDA slides with masks (the only masks there are: ../shared/data has none)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonylib.config import load_config
from bonylib.data.labels import FRACTION_COLUMNS, LABEL_NAMES, MASK_ENCODINGS, tile_labels
from bonylib.data.quality import MEASURES, keep_tiles, tile_measures
from bonylib.data.slides import open_slide
from bonylib.data.sources import list_jobs
from bonylib.data.tiling import TileConfig, tile


def per_tile_reference(fmt: str, root: Path, parts: pd.DataFrame, cfg: TileConfig) -> pd.DataFrame:
    """Measures, keep/drop, fractions and labels of every tile in ``parts``, each read alone at full resolution."""
    jobs = {job.slide_id: job for job in list_jobs(fmt, [root])}
    rows = []
    for slide_id, tiles in parts.groupby("slide_id"):
        job = jobs[str(slide_id)]
        with open_slide(job.path, job.mpp) as slide:
            if slide.mpp is None:
                slide.mpp = cfg.slide_mpp
            pixels = np.stack([slide.read_region((int(t.x), int(t.y)), int(t.level), (int(t.size), int(t.size)))
                               for t in tiles.itertuples()])
        measures = tile_measures(pixels)
        keep, reason = keep_tiles(measures, cfg.quality)
        frame = pd.DataFrame({"slide_id": slide_id, "x": tiles.x.to_numpy(), "y": tiles.y.to_numpy(), **measures,
                              "keep": keep, "reason": reason.astype(str)})
        if job.mask is not None and job.mask.is_file():
            table = MASK_ENCODINGS[job.encoding or ""]
            fractions = np.zeros((len(tiles), len(LABEL_NAMES)))
            with open_slide(job.mask, slide.mpp, require_rgb=False) as mask:
                for i, t in enumerate(tiles.itertuples()):
                    codes = mask.read_region((int(t.x), int(t.y)), int(t.level), (int(t.size), int(t.size)))[..., 0]
                    for code, name in table.items():
                        fractions[i, LABEL_NAMES.index(name)] += np.count_nonzero(codes == code) / codes.size
            frame[list(FRACTION_COLUMNS)] = fractions
            frame["label_name"] = tile_labels(fractions, cfg.label_policy, cfg.min_fraction)
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def assert_same_decisions(fmt: str, root: Path, out: Path, overrides: list[str]) -> pd.DataFrame:
    cfg = load_config(TileConfig, None, overrides)
    result = tile(fmt, [root], out, cfg)
    assert result.failures.empty, result.failures.error.tolist()
    parts = pd.concat([pd.read_parquet(p) for p in sorted((out / "parts").glob("*.parquet"))], ignore_index=True)
    assert len(parts) > 0
    expected = per_tile_reference(fmt, root, parts, cfg)
    got = parts.merge(expected, on=["slide_id", "x", "y"], suffixes=("", "_ref"), validate="one_to_one")
    assert len(got) == len(parts) == len(expected)
    changed = got[(got.keep != got.keep_ref) | (got.reason != got.reason_ref)]
    assert changed.empty, changed[["slide_id", "x", "y", "reason", "reason_ref"]].to_string()
    for measure in MEASURES:
        np.testing.assert_allclose(got[measure], got[f"{measure}_ref"], rtol=1e-6, atol=1e-6, err_msg=measure)
    if "label_name_ref" in got:
        masked = got.label_name_ref.notna()
        assert masked.any()
        assert (got.label_name[masked] == got.label_name_ref[masked]).all()
        for column in FRACTION_COLUMNS:
            np.testing.assert_allclose(got.loc[masked, column], got.loc[masked, f"{column}_ref"], atol=1e-6)
    return got


def test_real_slides_are_decided_as_tile_by_tile(shared_data: Path, tmp_path: Path) -> None:
    got = assert_same_decisions("slides", shared_data / "slides", tmp_path / "out", ["slide_mpp=0.5"])
    assert got.keep.sum() > 40 and (~got.keep).any(), "kept and dropped tiles both checked"


def test_real_images_are_decided_as_tile_by_tile(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for image in sorted((shared_data / "images").glob("*.jpeg")):
        shutil.copy(image, root / image.name)
    got = assert_same_decisions("slides", root, tmp_path / "out", ["slide_mpp=0.25"])
    assert got.slide_id.nunique() == 2 and (~got.keep).any(), "the biopsy's ink and glass are dropped"


def test_real_microarray_patches_are_decided_as_tile_by_tile(shared_data: Path, tmp_path: Path) -> None:
    got = assert_same_decisions("imagefolder", shared_data / "arvaniti_tma", tmp_path / "out",
                                ["mpp=1.0", "tile_px=172", "slide_mpp=0.23"])
    assert got.slide_id.nunique() == 200


def test_real_sicapv2_patches_are_decided_as_tile_by_tile(shared_data: Path, tmp_path: Path) -> None:
    got = assert_same_decisions("sicapv2", shared_data / "sicapv2_subset", tmp_path / "out", ["mpp=1.0"])
    assert got.slide_id.nunique() == 600


def test_synthetic_panda_masks_label_as_tile_by_tile(smoke_data: Path, tmp_path: Path) -> None:
    got = assert_same_decisions("panda", smoke_data / "panda", tmp_path / "out", [])
    assert got.label_name_ref.notna().all() and got.label_name.nunique() > 2
