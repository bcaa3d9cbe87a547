"""The real labelled sets of ../shared/data read as users hold them: a partial SICAPv2, a folder of labelled images.

Every label is checked against what the spreadsheets, wsi_labels.xlsx and the folders say, read here with pandas
and os on their own; the tests skip when ../shared/data is absent.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bonylib.config import load_config
from bonylib.data.sicapv2_tables import read_sheet
from bonylib.data.sources import list_jobs
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError

CLASSES = ("NC", "G3", "G4", "G5")
IN_MANIFEST = {"NC": "benign", "G3": "G3", "G4": "G4", "G5": "G5"}


@pytest.fixture(scope="module")
def sicap(shared_data: Path) -> Path:
    return shared_data / "sicapv2_subset"


@pytest.fixture(scope="module")
def arvaniti(shared_data: Path) -> Path:
    return shared_data / "arvaniti_tma"


def sheet_classes(root: Path) -> pd.Series:
    """Each listed patch's class, straight from the Test partition's two sheets."""
    sheets = pd.concat([pd.read_excel(root / "partition" / "Test" / f"{part}.xlsx") for part in ("Train", "Test")])
    onehot = sheets[list(CLASSES)].to_numpy()
    assert (onehot.sum(1) == 1).all()
    return pd.Series(np.array(CLASSES)[onehot.argmax(1)], index=sheets["image_name"].to_numpy())


def copy_sicapv2(root: Path, dest: Path, names: list[str]) -> Path:
    """A smaller partial copy: the tables as they are, only ``names`` of the images."""
    shutil.copytree(root / "partition", dest / "partition")
    shutil.copy(root / "wsi_labels.xlsx", dest / "wsi_labels.xlsx")
    (dest / "images").mkdir()
    for name in names:
        shutil.copy(root / "images" / name, dest / "images" / name)
    return dest


def test_a_partial_sicapv2_lists_every_patch_with_its_spreadsheet_label(sicap: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bonylib.data.sources"):
        jobs = list_jobs("sicapv2", [sicap])
    images = sorted(p.name for p in (sicap / "images").glob("*.jpg"))
    classes = sheet_classes(sicap)
    slides = pd.read_excel(sicap / "wsi_labels.xlsx").set_index("slide_id")
    test_names = set(pd.read_excel(sicap / "partition" / "Test" / "Test.xlsx")["image_name"])
    assert [job.path.name for job in jobs] == images and not any(job.error or job.mask for job in jobs)
    for job in jobs:
        name, slide = job.path.name, job.path.name.split("_Block_Region_")[0]
        listed = name in classes.index
        assert job.image_label == (classes[name] if listed else "")
        assert job.label == (IN_MANIFEST[classes[name]] if listed else "")
        assert job.parent_slide == slide and job.group == str(slides.loc[slide, "patient_id"])
        primary, secondary = slides.loc[slide, ["Gleason_primary", "Gleason_secondary"]]
        assert job.parent_label == ("benign" if primary == 0 else f"{primary}+{secondary}")
        assert job.split == ("test" if name in test_names else "train" if listed else "")
    counts = pd.Series([job.image_label for job in jobs]).value_counts()
    assert counts.to_dict() == {"": 301, "G4": 133, "NC": 100, "G3": 66}, "the data README's counts"
    benign_slides = {job.parent_slide for job in jobs if job.image_label == "NC"}
    assert benign_slides == {"16B0027040"}, "every benign patch comes from one slide"
    summary = [r for r in caplog.records if r.name == "bonylib.data.sources"]
    absent = len(set(classes.index) - set(images))
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING, "one line, not one per absent patch"
    message = summary[0].getMessage()
    for phrase in ("600 patches", "299 of them", "301 in none", f"{absent} patches the spreadsheets list",
                   "label_policy 'image'"):
        assert phrase in message, phrase


def test_a_partial_sicapv2_tiles_with_the_labels_and_policy_named(sicap: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    classes = sheet_classes(sicap)
    images = sorted(p.name for p in (sicap / "images").glob("*.jpg"))
    labelled = [next(n for n in images if classes.get(n) == c) for c in ("NC", "G3", "G4")]
    unlisted = [n for n in images if n not in classes.index][:2]
    root = copy_sicapv2(sicap, tmp_path / "copy", labelled + unlisted)
    with caplog.at_level(logging.WARNING):
        result = tile("sicapv2", [root], tmp_path / "out", load_config(TileConfig))  # the defaults a new user has
    assert result.failures.empty and result.tiled == 5
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # what the copy lacks; 10x patches upsampled
    assert "5 slides have no level as fine as mpp=0.5" in warnings[1].getMessage()
    manifest = pd.read_parquet(result.manifest)
    for name, rows in manifest.groupby("slide_id"):
        listed = f"{name}.jpg" in classes.index
        assert set(rows["label_name"]) == {IN_MANIFEST[classes[f"{name}.jpg"]] if listed else ""}
        assert set(rows["label_policy"]) == {"image" if listed else ""}
        assert set(rows["image_label"]) == {classes[f"{name}.jpg"] if listed else ""}
        assert rows["parent_label"].iloc[0] != "" and rows["frac_G3"].isna().all(), "no mask: no class fractions"


def test_an_image_folder_takes_its_classes_from_the_sub_folders(arvaniti: Path, tmp_path: Path) -> None:
    jobs = list_jobs("imagefolder", [arvaniti])
    on_disk = {(folder.name, image.stem) for folder in arvaniti.iterdir() for image in folder.glob("*.jpg")}
    assert {(job.image_label, job.slide_id) for job in jobs} == on_disk and len(jobs) == 200
    assert pd.Series([job.image_label for job in jobs]).value_counts().to_dict() == dict.fromkeys(
        ["benign", "gleason3", "gleason4", "gleason5"], 50)
    assert not any(job.group for job in jobs), "Arvaniti's patches carry no core or patient id"

    root = tmp_path / "tma"
    for folder in ("benign", "gleason5"):
        (root / folder).mkdir(parents=True)
        for image in sorted((arvaniti / folder).glob("*.jpg"))[:2]:
            shutil.copy(image, root / folder / image.name)
    with pytest.raises(BonyError, match="slide_mpp=") as caught:
        tile("imagefolder", [root], tmp_path / "none", load_config(TileConfig))
    assert "\n" not in str(caught.value)
    cfg = load_config(TileConfig, None, ["mpp=1.0", "tile_px=172", "slide_mpp=0.23"])
    manifest = pd.read_parquet(tile("imagefolder", [root], tmp_path / "out", cfg).manifest)
    assert len(manifest) == 4, "a 750-px 40x patch is one 172-µm tile at 1 µm/px"
    assert (manifest["size"] == round(172 * 1.0 / 0.23)).all() and np.allclose(manifest["mpp"], 1.0, atol=1e-3)
    assert (manifest["image_label"] == manifest["path"].map(lambda p: Path(p).parent.name)).all()
    assert (manifest["label_name"] == "").all() and (manifest["label_policy"] == "").all()


def test_an_image_folder_takes_groups_one_level_down_and_counts_strays(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "folder"
    files = ["a/x.png", "a/core1/y.png", "b/z.png", "stray.png", "a/core1/deeper/w.png", "b/notes.txt"]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            Image.new("RGB", (32, 32), (200, 100, 150)).save(root / name)
        else:
            (root / name).write_text("not an image")
    with caplog.at_level(logging.INFO, logger="bonylib.data.sources"):
        jobs = list_jobs("imagefolder", [root])
    assert {(j.slide_id, j.image_label, j.group) for j in jobs} == {("x", "a", ""), ("y", "a", "core1"), ("z", "b", "")}
    assert "2 images outside <class>/ or <class>/<group>/ left out" in caplog.records[-1].getMessage()
    (root / "b" / "x.png").write_bytes((root / "a" / "x.png").read_bytes())
    errors = {j.path.parent.name: j.error for j in list_jobs("imagefolder", [root]) if j.slide_id == "x"}
    assert errors["a"] == "" and "duplicate slide id 'x'" in errors["b"], "two classes' images may not share a name"
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "only.png")
    with pytest.raises(BonyError, match="no class sub-folders"):
        list_jobs("imagefolder", [tmp_path / "flat"])


def test_broken_sicapv2_tables_are_one_line_naming_file_and_row(sicap: Path, tmp_path: Path) -> None:
    images = sorted(p.name for p in (sicap / "images").glob("*.jpg"))[:1]
    root = copy_sicapv2(sicap, tmp_path / "copy", images)
    slides = pd.read_excel(root / "wsi_labels.xlsx")
    slides.loc[3, "Gleason_primary"] = 7
    slides.to_excel(root / "wsi_labels.xlsx", index=False)
    with pytest.raises(BonyError, match=r"wsi_labels\.xlsx row 5: .* is not a slide") as caught:
        list_jobs("sicapv2", [root])
    assert "\n" not in str(caught.value)
    shutil.copy(sicap / "wsi_labels.xlsx", root / "wsi_labels.xlsx")
    sheet = pd.read_excel(root / "partition" / "Test" / "Test.xlsx")
    sheet.loc[10, "G3"] = 1 - sheet.loc[10, "G3"]
    sheet.to_excel(root / "partition" / "Test" / "Test.xlsx", index=False)
    with pytest.raises(BonyError, match=r"Test\.xlsx row 12: NC, G3, G4, G5 is not one-hot"):
        list_jobs("sicapv2", [root])


def test_a_partition_sheet_reads_as_pandas_reads_it(sicap: Path) -> None:
    """Every Train and Test sheet of the partial SICAPv2: the class and the cribriform flag of each patch, as the
    one-hot and G4C columns give them (the dataset chapter's counts and its grid read them through this reader)."""
    paths = sorted(p for p in (sicap / "partition").rglob("*.xlsx") if p.stem in ("Train", "Test"))
    assert len(paths) >= 2
    for path in paths:
        raw = pd.read_excel(path)
        table = read_sheet(path)
        assert table["image_name"].tolist() == raw["image_name"].tolist()
        assert [CLASSES[k] for k in table["label"]] == [CLASSES[row.argmax()] for row in raw[list(CLASSES)].to_numpy()]
        assert table["cribriform"].tolist() == (raw["G4C"] == 1).tolist()
        assert table["cribriform"].sum() == raw["G4C"].sum()
