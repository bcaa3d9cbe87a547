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


@pytest.mark.parametrize("workers", [1, 2])  # 2: the slides are tiled in bands, and their parts written by the parent
def test_full_output_disk_stops_tiling_and_resumes(panda: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   workers: int) -> None:
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
        tile("panda", [panda], out, load_config(TileConfig, None, [f"workers={workers}"]))
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


# 2. exported weights get the umask's permissions (safetensors replaced the temporary file atomic_path had set)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o007, 0o660)])
def test_exported_weights_get_the_permissions_of_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    backbone = create_backbone(NANO, seed=0)
    old = os.umask(umask)
    try:
        export_encoder(backbone, DINOHead(backbone.num_features, 16, hidden_dim=16, bottleneck_dim=8), name=NANO,
                       input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, out=tmp_path, step=0)
    finally:
        os.umask(old)
    for name in (BACKBONE_FILE, HEAD_FILE, META_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# 3. wrong numbers with exit status 0


def test_a_panda_manifest_of_one_class_is_refused_not_scored(bench: dict[str, Path], tmp_path: Path) -> None:
    from bonylib.evaluation.benchmarks.panda import PandaConfig, PandaTiles

    one_class = tmp_path / "manifest.parquet"
    pd.read_parquet(bench["panda"]).assign(label_name="benign").to_parquet(one_class)
    cfg = load_config(PandaConfig, None, [f"manifest={one_class}", f"data={bench['panda-data']}",
                                          "fractions=[0.5,0.25,0.25]", "runs=1"])
    with pytest.raises(BonyError) as caught:
        PandaTiles(cfg, tmp_path / "selections")
    one_line(str(caught.value), str(one_class), "1 class (benign)", "cannot be wrong")


def test_an_image_folder_of_one_class_is_refused_not_scored(tmp_path: Path) -> None:
    """main's images benchmark (issue 20) gets the same rule: its k folds train and test on one class otherwise."""
    from bonylib.evaluation.benchmarks.images import ImageClasses
    from tests.test_real_benchmarks import folder_manifest, images_config

    one_class = tmp_path / "one.parquet"
    pd.read_parquet(folder_manifest(tmp_path / "m.parquet")).assign(image_label="benign").to_parquet(one_class)
    with pytest.raises(BonyError) as caught:
        ImageClasses(images_config(one_class), tmp_path)
    one_line(str(caught.value), str(one_class), "hold 1 class (benign)")


@pytest.mark.parametrize("temperature", ["0", "-0.07", "nan", "inf"])
def test_a_knn_temperature_that_is_not_positive_is_refused(temperature: str) -> None:
    from bonylib.evaluation.evaluate import EvaluateConfig

    with pytest.raises(ConfigError, match=r"probe.knn_temperature must be a positive number") as caught:
        load_config(EvaluateConfig, None, [f"panda.probe.knn_temperature={temperature}", "benchmarks=[panda]",
                                           "panda.manifest=m", "panda.data=d", "encoders=[{name: a, specs: [x]}]"])
    one_line(str(caught.value))


def test_a_small_knn_temperature_still_votes_for_the_nearest_neighbours() -> None:
    """exp(s / T) overflowed to infinity for T = 1e-3 and every vote tied (class 0 won); the vote of a small T is the
    nearest neighbour's class."""
    from bonylib.evaluation.knn import weighted_knn

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.9, 0.12], [0.9, 0.14], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0, 0, 0])
    test = torch.tensor([[1.0, 0.01]])  # nearest: the single class-1 row; three class-0 rows a little farther
    assert weighted_knn(train, labels, test, 2, k=4, temperature=1e-3).tolist() == [1]
    assert weighted_knn(train, labels, test, 2, k=4, temperature=10.0).tolist() == [0]  # a flat vote: the majority


@pytest.fixture(scope="module")
def store(bench: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished store of XCiT-nano CLS features of the DeepGleason tiles."""
    return embed(bench["deepgleason"], nano_encoder(), tmp_path_factory.mktemp("store"), "cls", TINY_EMBED).store


def test_nan_or_edited_bytes_in_an_embedding_store_are_refused_when_read(store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    chunk = copy / "chunks" / "000001.npy"
    values = np.load(chunk)
    values[3, 5] = np.nan
    np.save(chunk, values)
    with pytest.raises(BonyError) as caught:
        load_embeddings(copy)
    one_line(str(caught.value), str(chunk), "do not match 000001.npy.sha256")
    (copy / "chunks" / "000001.npy.sha256").write_text(hashlib.sha256(chunk.read_bytes()).hexdigest() + "\n")
    with pytest.raises(BonyError) as caught:
        load_embeddings(copy)
    one_line(str(caught.value), str(chunk), "manifest row 11 has values that are not finite")


@pytest.mark.parametrize(("change", "needle"), [({"chunk_rows": 0}, "chunk_rows 0"), ({"rows": "42"}, "rows '42'"),
                                                ({"row_shape": [10**12]}, "needs"), ({"dtype": "object"}, "stored as")])
def test_a_damaged_store_meta_is_one_line(store: Path, tmp_path: Path, change: dict, needle: str) -> None:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(BonyError) as caught:
        load_embeddings(copy)
    one_line(str(caught.value), needle)


@pytest.fixture(scope="module")
def cnn_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("cnn") / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict(), str(path))
    return path


@pytest.mark.parametrize("output", ["patch", "cls+mean"])
def test_a_cnns_feature_map_is_not_read_as_patch_tokens(bench: dict[str, Path], cnn_weights: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], output: str) -> None:
    out = tmp_path / "embeddings"
    assert main(["embed", str(bench["deepgleason"]), "--encoder", f"timm:test_resnet:{cnn_weights}", "--out", str(out),
                 "--output", output, "device=cpu", "workers=0", "precision=fp32"]) == 2
    one_line(error_line(capsys.readouterr().err), "timm:test_resnet has no patch tokens")
    assert not out.exists() or not list(out.rglob("*.npy"))
    assert main(["embed", str(bench["deepgleason"]), "--encoder", f"timm:test_resnet:{cnn_weights}", "--out", str(out),
                 "device=cpu", "workers=0", "precision=fp32", "batch_size=64"]) == 0  # its pooled feature is fine


# 4. a full disk in numpy's form (an OSError without errno) is a full disk


def full_disk_save(file, array, *args, **kwargs) -> None:  # noqa: ANN001 - np.save's signature
    """np.save on a disk that fills up: numpy's own tofile error, "N requested and 0 written", with no errno."""
    np.asarray(array).tofile("/dev/full")


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@needs_dev_full
def test_numpys_short_write_is_reported_as_a_full_disk(tmp_path: Path) -> None:
    from bonylib.files import DiskFullError, reporting_full_disk

    with pytest.raises(DiskFullError, match=rf"{tmp_path}: the output disk is full"):
        with reporting_full_disk(tmp_path, "an array"):
            np.zeros(10**6).tofile("/dev/full")


@needs_dev_full
def test_a_full_disk_in_embed_and_attention_is_one_line_and_keeps_finished_work(
        bench: dict[str, Path], nano_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "embeddings"
    manifest = str(bench["deepgleason"])
    args = ["embed", manifest, "--encoder", f"bony:{nano_export}", "--out", str(out), "device=cpu", "workers=0",
            "precision=fp32", "chunk_rows=8"]
    real_save = np.save
    calls = []

    def fills_after_two_chunks(file, array, *a, **k) -> None:  # noqa: ANN001
        calls.append(1)
        (full_disk_save if len(calls) > 4 else real_save)(file, array, *a, **k)

    monkeypatch.setattr(np, "save", fills_after_two_chunks)
    assert main(args) == 2
    one_line(error_line(capsys.readouterr().err), "chunks: the output disk is full")
    monkeypatch.setattr(np, "save", real_save)
    assert main(args) == 0
    assert "4 chunks computed, 2 already done" in capsys.readouterr().out, "the two finished chunks were kept"
    image = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(image)
    monkeypatch.setattr(np, "save", full_disk_save)
    assert main(["attention", str(nano_export), str(image), "--out", str(tmp_path / "maps"), "device=cpu"]) == 2
    one_line(error_line(capsys.readouterr().err), "maps: the output disk is full")


# 5 and 9. one bad encoder is a row that says why; bony evaluate's exit status says so too


def hibou_folder(root: Path, config: object) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "model.safetensors").write_bytes(b"\0" * 64)  # never read: the config is refused first
    return root


HIBOU_SMALL = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 28, "patch_size": 14, "num_register_tokens": 4, "use_swiglu_ffn": True}


@pytest.mark.parametrize(("config", "needle"), [
    ([], "a JSON list, not an object"),
    ({**HIBOU_SMALL, "num_attention_heads": 0}, "num_attention_heads 0 is not a whole number"),
    ({**HIBOU_SMALL, "num_hidden_layers": 200_000}, "num_hidden_layers 200000 is not a whole number in 1..128"),
    ({**HIBOU_SMALL, "num_hidden_layers": 128, "hidden_size": 8192, "num_attention_heads": 64}, "GiB of memory"),
    ({**HIBOU_SMALL, "num_attention_heads": 3}, "hidden_size 32 is not a multiple of num_attention_heads 3"),
    ({**HIBOU_SMALL, "qkv_bias": "yes"}, "qkv_bias 'yes' is not true or false"),
])
def test_a_hibou_config_is_checked_before_a_network_is_built(tmp_path: Path, config: object, needle: str) -> None:
    folder = hibou_folder(tmp_path / "hibou", config)
    with pytest.raises(BonyError) as caught:
        encoder_from_spec(f"hibou:{folder}")
    one_line(str(caught.value), str(folder / "config.json"), needle)


def test_root_keeps_a_spec_path_with_a_colon_whole(tmp_path: Path) -> None:
    assert rooted_spec("bony:exp:colon", tmp_path) == f"bony:{tmp_path / 'exp:colon'}"
    assert rooted_spec("timm:test_vit:w:1.safetensors", tmp_path) == f"timm:test_vit:{tmp_path / 'w:1.safetensors'}"


def evaluate_config(path: Path, bench: dict[str, Path], encoders: list[dict], root: Path) -> Path:
    decoder = {"out_size": 14, "width": 8, "max_epochs": 2, "patience": 2, "batch_size": 16, "examples": 1}
    path.write_text(json.dumps({
        "root": str(root), "encoders": encoders, "benchmarks": ["deepgleason"], "bootstrap": 10,
        "embed": {"batch_size": 64, "device": "cpu", "workers": 0, "precision": "fp32"},
        "deepgleason": {"manifest": str(bench["deepgleason"]), "data": str(bench["deepgleason-data"]), "runs": 1,
                        "heads": ["mask"], "decoder": decoder}}))
    return path


def test_bad_encoders_get_rows_that_say_why_and_a_failing_exit_status(
        bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    from safetensors.torch import save_file

    vit = tmp_path / "test_vit3.safetensors"  # a ViT of fixed input size (160 px), as vit_small_patch16_224 is
    save_file(timm.create_model("test_vit3", pretrained=False, num_classes=0).state_dict(), str(vit))
    (tmp_path / "exp:colon").mkdir()  # a run folder whose name has a colon, and no export in it
    bad = [
        {"name": "vit96", "specs": [f"timm:test_vit3:{vit}"], "input_size": 96},  # a 160-px ViT given 96-px tiles
        {"name": "hibou-list", "specs": [f"hibou:{hibou_folder(tmp_path / 'h1', [])}"]},
        {"name": "hibou-heads", "specs": [f"hibou:{hibou_folder(tmp_path / 'h2', {**HIBOU_SMALL, 'num_attention_heads': 0})}"]},
        {"name": "colon", "specs": ["bony:exp:colon"]},
    ]
    good = {"name": "hand", "specs": ["handcrafted"], "input_size": 32}
    config, out = evaluate_config(tmp_path / "e.yaml", bench, [*bad, good], tmp_path), tmp_path / "out"
    assert main(["evaluate", "--config", str(config), "--out", str(out)]) == 3
    captured = capsys.readouterr()
    one_line(error_line(captured.err), "4 of 5 encoders not evaluated (vit96, hibou-list, hibou-heads, "
                                                    "colon)")
    table = (out / "results.md").read_text()
    for needle in ("cannot embed 96-px tiles (AssertionError", "a JSON list, not an object",
                   "num_attention_heads 0 is not a whole number", f"{tmp_path / 'exp:colon'}: no exported encoder"):
        assert needle in table, needle
    records = sorted((out / "runs").rglob("*.json"))
    assert [r.parent.name for r in records] == ["hand"]

    # 12. a run record whose predictions were deleted is fitted again, not a stop
    records[0].with_suffix(".npz").unlink()
    assert main(["evaluate", "--config", str(config), "--out", str(out)]) == 3
    assert records[0].with_suffix(".npz").is_file()
    capsys.readouterr()

    only_bad = evaluate_config(tmp_path / "bad.yaml", bench, bad, tmp_path)
    assert main(["evaluate", "--config", str(only_bad), "--out", str(tmp_path / "out2")]) == 2
    one_line(error_line(capsys.readouterr().err), "no encoder could be evaluated (vit96, hibou-list")

    # 4. a full disk while evaluate writes its embeddings
    if Path("/dev/full").exists():
        monkeypatch.setattr(np, "save", full_disk_save)
        assert main(["evaluate", "--config", str(config), "--out", str(tmp_path / "out3")]) == 2
        one_line(error_line(capsys.readouterr().err), "the output disk is full")


# 6. an unreadable tile read by a DataLoader worker is the reader's one line, not the worker's traceback


def test_an_unreadable_tile_in_a_worker_is_one_line(bench: dict[str, Path], tmp_path: Path) -> None:
    frame = pd.read_parquet(bench["deepgleason"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(frame.loc[0, "path"]).read_bytes()[:300])  # a JPEG cut short
    manifest = tmp_path / "manifest.parquet"
    frame.assign(path=np.where(frame.slide_id == frame.loc[0, "slide_id"], str(broken), frame.path)).to_parquet(manifest)
    for workers in (0, 1):
        with pytest.raises(BonyError) as caught:
            embed(manifest, nano_encoder(), tmp_path / f"out{workers}", "cls",
                  EmbedConfig(batch_size=8, device="cpu", precision="fp32", workers=workers, chunk_rows=8))
        one_line(str(caught.value), str(broken))


# 7. two runs on one store: neither removes the other's temporary file


def test_a_run_does_not_remove_the_temporary_file_another_run_is_writing(bench: dict[str, Path], tmp_path: Path) -> None:
    encoder = nano_encoder()
    store = store_path(tmp_path / "embeddings", encoder, "cls")
    (store / "chunks").mkdir(parents=True)
    ready = tmp_path / "ready"
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, pathlib, time
        store = pathlib.Path({str(store)!r})
        with open(store / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a run writing chunk 0, as bony embed writes one
            tmp = store / "chunks" / ".000000.abcdefgh.tmp.npy"
            tmp.write_bytes(b"half a chunk")
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(3)
            os.replace(tmp, store / "written-by-the-other-run")
        """)])
    deadline = time.monotonic() + 60
    while not ready.exists() and other.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    result = embed(bench["deepgleason"], encoder, tmp_path / "embeddings", "cls", TINY_EMBED)
    assert other.wait(timeout=60) == 0, "the other run's temporary file was removed under it"
    assert (store / "written-by-the-other-run").read_bytes() == b"half a chunk"
    assert result.missing == 0 and len(load_embeddings(result.store)[0]) == len(pd.read_parquet(bench["deepgleason"]))


# 8. the export's JSON is input: types and ranges checked before a network is built from it


@pytest.mark.parametrize(("change", "needle"), [
    ({"input_size": "abc"}, "input_size 'abc' is not a whole number"),
    ({"input_size": 0}, "input_size 0 is not"),
    ({"input_size": -5}, "input_size -5 is not"),
    ({"input_size": 100000}, "input_size 100000 is not"),
    ({"input_size": True}, "input_size True is not"),
    ({"mean": [0.5, 0.5]}, "mean [0.5, 0.5] is not 3 finite numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "std [0.2, 0.0, 0.2] is not 3 positive"),
    ({"std": "abc"}, "std 'abc' is not 3 positive"),
    ({"backbone": "resnet50"}, "backbone 'resnet50' is not one Bony builds"),
    ({"sha256": 7}, "sha256 7 is not a SHA-256"),
    ({"head": {"in_dim": 128, "out_dim": 10**11, "hidden_dim": 16, "bottleneck_dim": 8, "layers": 3}},
     "head out_dim 100000000000 is not a whole number in 1..1048576"),
    ({"head": {"in_dim": 128, "out_dim": 1 << 20, "hidden_dim": 65536, "bottleneck_dim": 65536, "layers": 16}},
     "GiB of memory"),
    ({"head": [1, 2]}, "head is a list"),
])
def test_an_export_json_is_checked_before_a_network_is_built(nano_export: Path, tmp_path: Path, change: dict,
                                                            needle: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(nano_export, run)
    meta = json.loads((run / META_FILE).read_text())
    (run / META_FILE).write_text(json.dumps({**meta, **change}))
    for spec in ("bony", "bony-head"):
        with pytest.raises(BonyError) as caught:
            encoder_from_spec(f"{spec}:{run}")
        one_line(str(caught.value), str(run / META_FILE), needle)


def test_weights_that_do_not_fit_name_the_keys(nano_export: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(nano_export, run)
    meta = json.loads((run / META_FILE).read_text())
    (run / META_FILE).write_text(json.dumps({**meta, "backbone": "xcit_tiny_12_p16_224"}))
    with pytest.raises(BonyError) as caught:
        encoder_from_spec(f"bony:{run}")
    one_line(str(caught.value), str(run / BACKBONE_FILE), "size mismatch for cls_token")


# 10. sizes read from files are bounded by what the machine can hold


def test_a_manifest_tile_size_beyond_memory_is_refused(bench: dict[str, Path], nano_export: Path, tmp_path: Path) -> None:
    from bonylib.attention.command import AttentionConfig, attention

    frame = pd.read_parquet(bench["panda"])
    slide = Path(frame.loc[0, "path"])
    manifest = tmp_path / "manifest.parquet"
    frame[frame.path == str(slide)].assign(size=1_000_000).to_parquet(manifest)
    with pytest.raises(BonyError) as caught:
        attention(str(nano_export), slide, tmp_path / "maps", AttentionConfig(device="cpu"), manifest=manifest)
    one_line(str(caught.value), str(manifest), "a tile of size 1000000 px needs")
    frame.assign(level=-1).to_parquet(manifest)  # python's negative index picked the last level silently
    with pytest.raises(BonyError, match="level -1 is negative"):
        embed(manifest, nano_encoder(), tmp_path / "out", "cls", TINY_EMBED)


def test_a_large_jpeg_is_decoded_at_a_fraction_of_its_size_for_a_small_tile(nano_export: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    from bonylib.attention.command import AttentionConfig, attention

    big = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 6000), (200, 120, 160)).save(big, quality=50)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):  # noqa: ANN001, ANN202 - PIL's signature
        result = real_load(self)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    written = attention(str(nano_export), big, tmp_path / "maps", AttentionConfig(device="cpu", figures=False))
    assert (tmp_path / "maps" / "big.cls.npy") in written
    assert decoded and max(max(size) for size in decoded) <= 6000 // 8, decoded


# probes of the closing note that broke


def test_a_folder_given_as_the_manifest_is_one_line(bench: dict[str, Path], tmp_path: Path) -> None:
    """Found by probing: pyarrow read a folder holding a manifest.parquet as the manifest, and hashing it for the
    store's meta was an IsADirectoryError traceback."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    shutil.copy(bench["panda"], folder / "manifest.parquet")
    with pytest.raises(BonyError) as caught:
        embed(folder, nano_encoder(), tmp_path / "out", "cls", TINY_EMBED)
    one_line(str(caught.value), str(folder), "a folder, not a manifest file")


@pytest.mark.parametrize("size", ["100000", "8"])
def test_an_input_size_setting_beyond_any_tile_is_one_line(bench: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], size: str) -> None:
    """Found by probing: ``bony attention ... input_size=100000`` allocated one blank tile of 120 GB (a traceback);
    an evaluate entry's input_size had no upper bound either."""
    image = tmp_path / "tile.png"
    Image.new("RGB", (64, 64), (200, 100, 150)).save(image)
    assert main(["attention", f"random:{NANO}:0", str(image), "--out", str(tmp_path / "maps"), "device=cpu",
                 f"input_size={size}"]) == 2
    one_line(error_line(capsys.readouterr().err), "input_size", "16..4096 px", size)
    config = evaluate_config(tmp_path / "eval.json", bench, [{"name": "big", "specs": [f"random:{NANO}:0"],
                                                             "input_size": int(size)}], tmp_path)
    assert main(["evaluate", "--config", str(config), "--out", str(tmp_path / "eval")]) == 2
    one_line(error_line(capsys.readouterr().err), "big.input_size", "16..4096 px")
    assert not (tmp_path / "eval").exists()


# 11. SLURM arrays that are not contiguous, scripts without arguments, list lines that are not one notebook


def run_script(repo: Path, tmp_path: Path, script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``bash slurm/<script> args`` with SLURM's array variables ``env`` and a stand-in ``python`` that prints its
    arguments, so what the script would run is visible without running it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text("#!/bin/bash\necho \"python $*\"\n")
    (bin_dir / "python").chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "BONY_IMAGE"}
    environment |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(repo), **env}
    return subprocess.run(["bash", str(repo / "slurm" / script), *args], env=environment, capture_output=True,
                          text=True, timeout=60)


def array_env(ids: list[int], task: int, step: int | None = None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(min(ids)),
           "SLURM_ARRAY_TASK_MAX": str(max(ids)), "SLURM_ARRAY_TASK_COUNT": str(len(ids)), "SLURM_CPUS_PER_TASK": "2"}
    return env | ({"SLURM_ARRAY_TASK_STEP": str(step)} if step is not None else {})


@pytest.mark.parametrize(("ids", "step"), [([0, 2, 4, 6], 2), ([1, 5, 9], 1), ([1, 5, 9], None), ([3, 4, 5], 1),
                                           ([7], 1)])
@pytest.mark.parametrize("script", ["embed_array.sbatch", "tile_array.sbatch"])
def test_every_task_of_an_evenly_spaced_array_gets_its_own_shard(repo: Path, tmp_path: Path, ids: list[int],
                                                                  step: int | None, script: str) -> None:
    shards = []
    for task in ids:
        done = run_script(repo, tmp_path, script, ["in", "out", "fmt"], **array_env(ids, task, step))
        assert done.returncode == 0, done.stderr
        shards.append(done.stdout.split("--shard ")[1].split()[0])
    assert shards == [f"{i}/{len(ids)}" for i in range(len(ids))]


def test_an_array_whose_ids_are_not_evenly_spaced_is_refused(repo: Path, tmp_path: Path) -> None:
    done = run_script(repo, tmp_path, "embed_array.sbatch", ["m", "o", "e"], **array_env([1, 2, 9], 2, 1))
    assert done.returncode == 2 and "python" not in done.stdout
    one_line(done.stderr, "are not evenly spaced", "--array=0-2")
    done = run_script(repo, tmp_path, "tile_array.sbatch", ["in", "out", "fmt"])
    assert done.returncode == 2
    one_line(done.stderr, "not an array job")


@pytest.mark.parametrize(("ids", "task", "count"), [([0, 1, 2, 3], 9, None), ([4, 5, 6, 7], 1, None), ([0], 0, 0)])
def test_an_array_task_outside_its_arrays_ids_is_refused(repo: Path, tmp_path: Path, ids: list[int], task: int,
                                                         count: int | None) -> None:
    """Found by probing: such a task computed shard 9/4 or -3/4, and a count of 0 was called "not evenly spaced"."""
    env = array_env(ids, task, 1) | ({"SLURM_ARRAY_TASK_COUNT": str(count)} if count is not None else {})
    done = run_script(repo, tmp_path, "embed_array.sbatch", ["m", "o", "e"], **env)
    assert done.returncode == 2 and "python" not in done.stdout, done.stdout
    one_line(done.stderr, f"array task {task} is not one of its array's ids")


def test_array_ids_are_read_in_base_10(repo: Path, tmp_path: Path) -> None:
    """Found by probing: a task id 08 was read as octal by bash's arithmetic, and the script died of "unbound
    variable"."""
    done = run_script(repo, tmp_path, "tile_array.sbatch", ["in", "out", "fmt"],
                      **(array_env(list(range(10)), 8, 1) | {"SLURM_ARRAY_TASK_ID": "08"}))
    assert done.returncode == 0, done.stderr
    assert "--shard 8/10" in done.stdout


def test_a_notebook_list_of_comments_only_says_it_has_no_line(repo: Path, tmp_path: Path) -> None:
    """Found by probing: grep found no line, pipefail ended the script with status 1 and no message."""
    listing = tmp_path / "notebooks.txt"
    listing.write_text("# nothing yet\n\n")
    done = run_script(repo, tmp_path, "notebook.sbatch", ["runs/x", str(listing)], **array_env([0], 0))
    assert done.returncode == 2 and "python" not in done.stdout
    one_line(done.stderr, str(listing), "no line 1 for array task 0")


@pytest.mark.parametrize(("script", "usage"), [("embed_array.sbatch", "MANIFEST OUT ENCODER"),
                                               ("tile_array.sbatch", "INPUT OUT FORMAT"), ("notebook.sbatch", "RUN LIST"),
                                               ("pretrain.sbatch", "CONFIG OUT"), ("report.sbatch", "RUN")])
def test_a_script_without_its_arguments_prints_its_usage(repo: Path, tmp_path: Path, script: str, usage: str) -> None:
    done = run_script(repo, tmp_path, script, [])
    assert done.returncode == 2 and not done.stdout
    one_line(done.stderr, f"usage: sbatch", usage)
    assert "unbound variable" not in done.stderr


@pytest.mark.parametrize(("line", "needle"), [("01_datasets,04_pretraining\n", "not one numbered notebook stem"),
                                              ("01_datasets params.yaml\r\n", "carriage return"),
                                              ("01_datasets\r\n", "carriage return"),
                                              ("../01_x\n", "not one numbered notebook stem")])
def test_a_notebook_list_line_that_is_not_one_notebook_is_refused(repo: Path, tmp_path: Path, line: str,
                                                                  needle: str) -> None:
    listing = tmp_path / "notebooks.txt"
    listing.write_text(line)
    done = run_script(repo, tmp_path, "notebook.sbatch", ["runs/x", str(listing)], **array_env([0], 0))
    assert done.returncode == 2 and "python" not in done.stdout, done.stdout
    one_line(done.stderr, str(listing), needle)
    listing.write_text("# chapters\n01_datasets  params/01.yaml\n")
    done = run_script(repo, tmp_path, "notebook.sbatch", ["runs/x", str(listing)], **array_env([0], 0))
    assert done.returncode == 0 and "--parameters params/01.yaml notebooks=[01_datasets]" in done.stdout


# 12. smaller ones


@pytest.mark.parametrize("seed", ["18446744073709551616", "99999999999999999999999", "-1"])
def test_a_random_seed_beyond_64_bits_is_one_line(seed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        encoder_from_spec(f"random:{NANO}:{seed}")
    one_line(str(caught.value), "integer seed in 0..2^63-1")


def test_attention_retiles_a_slide_when_asked_to_as_its_error_says(bench: dict[str, Path], nano_export: Path,
                                                                   tmp_path: Path) -> None:
    from bonylib.attention.command import AttentionConfig, attention

    slide = Path(pd.read_parquet(bench["panda"]).loc[0, "path"])
    out = tmp_path / "maps"

    def cfg(tile_px: int) -> AttentionConfig:
        return load_config(AttentionConfig, None, ["device=cpu", "figures=false", f"tile.tile_px={tile_px}",
                                                   "tile.mpp=2.0"])

    attention(str(nano_export), slide, out, cfg(64))
    with pytest.raises(BonyError, match="--overwrite") as caught:
        attention(str(nano_export), slide, out, cfg(96))
    one_line(str(caught.value))
    assert "--overwrite" in build_parser()._subparsers._group_actions[0].choices["attention"].format_help()  # type: ignore[union-attr]
    attention(str(nano_export), slide, out, cfg(96), overwrite=True)
    assert set(pd.read_parquet(out / "tiles" / "manifest.parquet")["size"]) != set()
