"""Input we did not write: path-like ids, paths that leave the dataset, malformed CSV and XLSX rows, manifests
that point outside their folder, relative paths, file permissions; and for the stages after tiling (embed, evaluate,
attention, report, the SLURM array scripts) parameter keys, export and config JSON, store chunks and metadata, sizes
read from files, full disks, concurrent runs and array layouts. Each case was a defect found by a hostile try."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bonylib.cli import build_parser, main
from bonylib.config import load_config
from bonylib.data.datasets import TileDataset
from bonylib.data.sources import id_problem, list_jobs
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation.embeddings import EmbedConfig, embed, load_embeddings, store_path
from bonylib.files import atomic_path, write_text_atomic
from bonylib.models.backbones import create_backbone
from bonylib.models.encoders import IMAGENET_MEAN, IMAGENET_STD, from_backbone
from bonylib.models.export import BACKBONE_FILE, HEAD_FILE, META_FILE, export_encoder
from bonylib.models.head import DINOHead
from bonylib.models.registry import encoder_from_spec, rooted_spec


@pytest.fixture
def panda(smoke_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data" / "panda"
    shutil.copytree(smoke_data / "panda", root)
    return root


@pytest.fixture
def deepgleason(smoke_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data" / "deepgleason"
    shutil.copytree(smoke_data / "deepgleason", root)
    return root


def append(csv: Path, *lines: str) -> None:
    with open(csv, "a") as handle:
        handle.write("".join(f"{line}\n" for line in lines))


@pytest.mark.parametrize("slide_id", ["../../x", "/tmp/abs", "a/b", "..", ".hidden", "a\\b", "tab\there", "", "x" * 201])
def test_unsafe_ids_are_refused(slide_id: str) -> None:
    assert id_problem(slide_id)


@pytest.mark.parametrize("slide_id", ["d623efca3229d2ad50b4b32e3541128c", "TCGA-2A-A8VL-01Z (1)", "slide 1.v2", "Ülm_7"])
def test_real_slide_names_are_accepted(slide_id: str) -> None:
    assert id_problem(slide_id) == ""


def test_path_like_ids_never_write_outside_the_output(panda: Path, deepgleason: Path, tmp_path: Path) -> None:
    good = pd.read_csv(panda / "train.csv", dtype=str)
    append(panda / "train.csv", "../../escaped,radboud,0,0+0", "/tmp/absolute_id,radboud,0,0+0")
    (tmp_path / "other_run").mkdir()
    append(deepgleason / "tiles.csv",
           "../../other_run/manifest,DGX,train,0,0,tiles/x.jpg,masks/x.png",
           "DG_outside,DGX,train,0,0,../../../etc/hostname,masks/x.png")
    out = tmp_path / "runs" / "one" / "tiles"
    out.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    panda_result = tile("panda", [panda], out / "panda", load_config(TileConfig, None, []))
    dg_result = tile("deepgleason", [deepgleason], out / "deepgleason", load_config(TileConfig, None, ["tile_px=128"]))
    written = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(out) for p in written), sorted(p for p in written if not p.is_relative_to(out))
    assert set(panda_result.failures.slide_id) == {"../../escaped", "/tmp/absolute_id"}
    assert panda_result.failures.error.str.contains("not a safe file name").all()
    assert set(pd.read_parquet(out / "panda" / "manifest.parquet").slide_id) == set(good.image_id)
    errors = dict(zip(dg_result.failures.slide_id, dg_result.failures.error))
    assert set(errors) == {"../../other_run/manifest", "DG_outside"}
    assert "not a safe file name" in errors["../../other_run/manifest"]
    assert "image path '../../../etc/hostname' is not inside" in errors["DG_outside"]


def test_a_rejected_id_never_names_a_file_to_delete_or_read(panda: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    victim = tmp_path / "victim.abcdefgh.tmp.parquet"  # what `parts/../../victim.????????.tmp.parquet` matches
    victim.write_text("someone else's file")
    append(panda / "train.csv", "../../victim,radboud,0,0+0")
    result = tile("panda", [panda], out, load_config(TileConfig, None, []))
    assert victim.read_text() == "someone else's file"
    assert list(result.failures.slide_id) == ["../../victim"]


def test_malformed_csv_rows_fail_alone_with_their_line(panda: Path, tmp_path: Path) -> None:
    ids = list(pd.read_csv(panda / "train.csv", dtype=str).image_id)
    first = (panda / "train.csv").read_text().splitlines()[1]
    append(panda / "train.csv", "extra,radboud,0,0+0,surplus,fields", ",radboud,0,0+0", first)
    jobs = list_jobs("panda", [panda])
    failed = {job.slide_id: job.error for job in jobs if job.error}
    assert failed == {"extra": f"{panda / 'train.csv'} line 4: 6 fields, the header has 4",
                      "train.csv:5": f"{panda / 'train.csv'} line 5: empty image_id"}
    assert [job.slide_id for job in jobs if not job.error] == ids, "the duplicated row is tiled once, not failed"
    result = tile("panda", [panda], tmp_path / "out", load_config(TileConfig, None, []))
    assert len(result.failures) == 2 and result.tiled == len(ids)


def test_a_broken_partition_spreadsheet_is_one_line(smoke_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "sicapv2"
    shutil.copytree(smoke_data / "sicapv2", root)
    (root / "partition" / "Test" / "Train.xlsx").write_bytes(b"PK\x03\x04 not a workbook")
    with pytest.raises(BonyError, match=r"Train\.xlsx: not a readable spreadsheet") as caught:
        list_jobs("sicapv2", [root])
    assert "\n" not in str(caught.value)
    pd.DataFrame({"name": ["x"]}).to_excel(root / "partition" / "Test" / "Train.xlsx", index=False)
    with pytest.raises(BonyError, match="no image_name column"):
        list_jobs("sicapv2", [root])


def test_manifest_paths_are_absolute_whatever_the_working_folder(panda: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(panda.parent)
    result = tile("panda", [Path("panda")], Path("tiles"), load_config(TileConfig, None, []))
    manifest = pd.read_parquet(result.manifest)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest.path.unique())
    monkeypatch.chdir(tmp_path)  # another folder: the manifest still reads
    dataset = TileDataset(panda.parent / "tiles" / "manifest.parquet")
    assert dataset.read(0).size == (224, 224)


def test_shard_paths_outside_the_tiling_folder_are_refused(panda: Path, tmp_path: Path) -> None:
    result = tile("panda", [panda], tmp_path / "tiles", load_config(TileConfig, None, ["shards=true"]))
    manifest = pd.read_parquet(result.manifest)
    assert len(TileDataset(result.manifest)) == len(manifest)
    os.chdir(tmp_path / "tiles")  # a relative tiling folder is its own root, not "outside" it
    try:
        assert TileDataset(Path("manifest.parquet")).read(0).size == (224, 224)
    finally:
        os.chdir(tmp_path)
    for shard in ("../../secret.tar", "/etc/passwd"):
        hostile = manifest.assign(shard=shard)
        with pytest.raises(BonyError, match="outside the tiling folder"):
            TileDataset(hostile, root=tmp_path / "tiles")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o007, 0o660), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "manifest.txt", "x")
        with atomic_path(tmp_path / "checkpoint.pth") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    for name in ("manifest.txt", "checkpoint.pth"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize(("extrasamples", "premultiplied"), [("assocalpha", True), ("unassalpha", False)])
def test_transparent_tiff_pixels_read_as_glass(tmp_path: Path, tiled: bool, extrasamples: str, premultiplied: bool) -> None:
    import tifffile

    from bonylib.data.slides import open_slide

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:32] = (200, 100, 150, 255)  # opaque tissue
    rgba[32:, :32] = (0, 0, 0, 0)  # transparent: outside the scanned area
    half = (100, 50, 75, 128) if premultiplied else (200, 100, 150, 128)  # the same colour at half opacity
    rgba[32:, 32:] = half
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[extrasamples], tile=(16, 16) if tiled else None)
    with open_slide(path, 0.5) as slide:
        region = slide.read_region((0, 0), 0, (64, 64))
    assert region.shape == (64, 64, 3)
    assert (region[:32] == (200, 100, 150)).all()
    assert (region[32:, :32] == 255).all(), "transparent is glass (white), as OpenSlide reads it"
    expected = np.array([200, 100, 150]) * 128 / 255 + 127  # over white: colour x alpha + 255 x (1 - alpha)
    np.testing.assert_allclose(region[40, 40], expected, atol=1.5)


def test_full_output_disk_stops_tiling_and_resumes(panda: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import pyarrow.parquet as pq

    from bonylib.data import tiling
    from bonylib.files import DiskFullError

    written = []
    real_write = pq.write_table

    def fills_up(table, where, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(where)
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(tiling.pq, "write_table", fills_up)
    out = tmp_path / "tiles"
    with pytest.raises(DiskFullError, match=rf"{out / 'parts'}: the output disk is full"):
        tile("panda", [panda], out, load_config(TileConfig, None, []))
    assert not (out / "failures.csv").exists(), "no slide is blamed for the full disk"
    assert len(list((out / "parts").glob("*.parquet"))) == 1 and not list((out / "parts").glob(".*"))
    monkeypatch.setattr(tiling.pq, "write_table", real_write)
    result = tile("panda", [panda], out, load_config(TileConfig, None, []))
    assert (result.tiled, result.skipped, len(result.failures)) == (1, 1, 0)


# ---- embed, evaluate, attention, report and the array scripts (issue 19) --------------------------------------------
# Each test below failed on the code before its fix: a traceback, a wrong number with exit status 0, a file written
# 0600, a run that deleted another's file, a shard 6/4.

NANO = "xcit_nano_12_p16_224"
TINY_EMBED = EmbedConfig(batch_size=8, device="cpu", precision="fp32", workers=0, chunk_rows=8)


def one_line(message: str, *needles: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def error_line(stderr: str) -> str:
    """The error line of a command's stderr (its last line; progress bars and log lines come before it)."""
    assert "Traceback" not in stderr, stderr
    line = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert line.startswith("bony "), f"the error is not one line: {stderr}"
    return line


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, smoke_data: Path, repo: Path) -> dict[str, Path]:
    from tests.test_benchmarks import bench_data

    return bench_data(tmp_path_factory.getbasetemp() / "bench-data", smoke_data, repo)


@pytest.fixture(scope="module")
def nano_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Bony export of a randomly initialised XCiT-nano fed 64-px tiles, with a small DINO head."""
    out = tmp_path_factory.mktemp("export")
    backbone = create_backbone(NANO, seed=0)
    export_encoder(backbone, DINOHead(backbone.num_features, 16, hidden_dim=16, bottleneck_dim=8), name=NANO,
                   input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, out=out, step=0)
    return out


def nano_encoder(seed: int = 0):  # noqa: ANN201 - an Encoder
    return from_backbone(create_backbone(NANO, seed=seed), f"{NANO} seed {seed}", 64, IMAGENET_MEAN, IMAGENET_STD,
                         identity={"kind": "random", "backbone": NANO, "seed": seed})


# 1. report parameters: keys are pasted into the injected cell as code


def who_book(root: Path) -> Path:
    """A book of one notebook, 01_who, that writes its parameter ``who`` to the run folder."""
    import nbformat

    book = root / "book_root"
    (book / "notebooks").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        (book / name).write_text("title: t\n")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("run_dir = ''\nwho = 'default'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("open(run_dir + '/who.txt', 'w').write(str(who))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, book / "notebooks" / "01_who.ipynb")
    return book


@pytest.mark.parametrize(("yaml_text", "needle"), [
    ("\"x = 1; open('MARKER', 'w').close(); y\": 1\n", "is not a Python name"),
    ("class: 1\n", "'class' is not a Python name"),
    ("1who: 2\n", "'1who' is not a Python name"),
    ("who: 2024-01-01\n", "holds a date"),
    ("who: !!set {a: null}\n", "holds a set"),
    ("who: {1: one}\n", "mapping key 1 that is not text"),
])
def test_report_parameters_papermill_cannot_pass_safely_are_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, needle: str) -> None:
    book, run, params = who_book(tmp_path), tmp_path / "run", tmp_path / "params.yaml"
    params.write_text(yaml_text)
    assert main(["report", "--run", str(run), "--book", str(book), "--parameters", str(params),
                 "notebooks=[01_who]", "build=false"]) == 2
    one_line(error_line(capsys.readouterr().err), str(params), needle)
    assert not list(tmp_path.rglob("MARKER")), "a key ran as code"
    assert not run.exists() and not (book / "book" / "executed").exists(), "nothing is saved before the refusal"


def test_report_config_parameters_and_cell_timeout_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    book, run = who_book(tmp_path), tmp_path / "run"
    for override, needle in (("cell_timeout_s=0", "cell_timeout_s must be at least 1"),
                             ("cell_timeout_s=-5", "cell_timeout_s must be at least 1"),
                             ("parameters.01_who.import=1", "parameters.01_who: parameter 'import' is not a Python name"),
                             ("parameters.../x.who=1", "is not a numbered notebook stem")):
        assert main(["report", "--run", str(run), "--book", str(book), override, "build=false"]) == 2, override
        one_line(error_line(capsys.readouterr().err), needle)
    assert not run.exists()
    (tmp_path / "params.yaml").write_text("who: 3\n")  # what is allowed still reaches the notebook, as itself
    assert main(["report", "--run", str(run), "--book", str(book), "--parameters", str(tmp_path / "params.yaml"),
                 "notebooks=[01_who]", "build=false"]) == 0
    assert (run / "who.txt").read_text() == "3"
