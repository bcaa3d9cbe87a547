"""bony tile: grid, labels against masks drawn here, resume after kill -9, bad slides, shards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy.ndimage import median_filter

from bonylib.config import load_config
from bonylib.data.datasets import TileDataset
from bonylib.data.labels import LABEL_NAMES
from bonylib.data.synthetic.panda import write_pyramid
from bonylib.data.synthetic.tissue import ZONE_G3, render_tissue, sample_stain
from bonylib.data.sources import SlideJob, list_jobs
from bonylib.data.tiling import TileConfig, _band_blocks, band_counts, read_part, tile
from bonylib.errors import BonyError

T = 224
MPP = 0.48619
RANK = {"background": 0, "benign": 1, "cancer": 2, "G3": 3, "G4": 4, "G5": 5}
# Tissue cells (row, col) of the drawn slide; everything else is glass.
TISSUE = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


def draw_case(provider: str) -> tuple[np.ndarray, np.ndarray]:
    """A 4x5-tile slide: real-looking tissue in TISSUE cells on glass, and a mask drawn cell by cell."""
    rng = np.random.default_rng(7)
    zones = np.zeros((4 * T, 5 * T), np.uint8)
    for r, c in TISSUE:
        zones[r * T : (r + 1) * T, c * T : (c + 1) * T] = ZONE_G3
    rgb = render_tissue(zones, rng, sample_stain(rng), mpp=MPP).rgb
    mask = np.where(zones > 0, 1, 0).astype(np.uint8)  # benign tissue (Radboud stroma / Karolinska benign)

    def cell(r: int, c: int) -> np.ndarray:
        return mask[r * T : (r + 1) * T, c * T : (c + 1) * T]

    if provider == "radboud":
        cell(1, 1)[:20, :20] = 4  # a speck of G4 (0.8 %)
        cell(1, 2)[:, : T // 2] = 3  # half G3 ...
        cell(1, 2)[:, T // 2 : T // 2 + 67] = 5  # ... and 30 % G5
        cell(2, 2)[: int(0.6 * T)] = 4  # 60 % G4
        cell(2, 3)[:, :10] = 2  # benign epithelium
    else:
        cell(1, 3)[: T // 10] = 2  # 10 % cancer
        cell(2, 1)[:5, :5] = 2  # a speck of cancer
    return rgb, mask


def write_panda(root: Path, slides: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> Path:
    """A PANDA-format folder from drawn images and masks."""
    (root / "train_images").mkdir(parents=True)
    (root / "train_label_masks").mkdir()
    rows = []
    for image_id, (provider, rgb, mask) in slides.items():
        pyramid = [rgb, rgb[::4, ::4], rgb[::16, ::16]]
        write_pyramid(root / "train_images" / f"{image_id}.tiff", pyramid, MPP, 256, lossless=False, quality=90)
        red = np.zeros((*mask.shape, 3), np.uint8)
        red[..., 0] = mask
        masks = [red, red[2::4, 2::4], red[8::16, 8::16]]
        write_pyramid(root / "train_label_masks" / f"{image_id}_mask.tiff", masks, MPP, 256, lossless=True, quality=90)
        rows.append({"image_id": image_id, "data_provider": provider, "isup_grade": 0, "gleason_score": "0+0"})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("drawn") / "panda"
    slides = {}
    masks = {}
    for image_id, provider in (("rad", "radboud"), ("kar", "karolinska")):
        rgb, mask = draw_case(provider)
        slides[image_id] = (provider, rgb, mask)
        masks[image_id] = mask
    return write_panda(root, slides), masks


def expected_labels(mask: np.ndarray, provider: str, policy: str) -> dict[tuple[int, int], str]:
    """Labels of the tissue cells by each policy, computed from the drawn mask."""
    names = {0: "background", 1: "benign", 2: "benign", 3: "G3", 4: "G4", 5: "G5"} if provider == "radboud" \
        else {0: "background", 1: "benign", 2: "cancer"}
    out = {}
    for r, c in TISSUE:
        cell = mask[r * T : (r + 1) * T, c * T : (c + 1) * T]
        share: dict[str, float] = {}
        for code, name in names.items():
            share[name] = share.get(name, 0.0) + float((cell == code).mean())
        present = [n for n, f in share.items() if f > 0]
        if policy == "max":
            out[(r, c)] = max(present, key=RANK.get)
        elif policy == "majority":
            out[(r, c)] = max(present, key=lambda n: (share[n], RANK[n]))
        else:
            tissue = 1 - share["background"]
            cancer = [n for n in present if RANK[n] >= 2 and share[n] >= 0.05 * tissue]
            out[(r, c)] = max(cancer, key=RANK.get) if cancer else "benign"
    return out


@pytest.mark.parametrize("policy", ["max", "majority", "min_fraction"])
def test_labels_and_grid_match_the_drawn_masks(drawn, tmp_path: Path, policy: str) -> None:
    root, masks = drawn
    cfg = load_config(TileConfig, None, [f"label_policy={policy}"])
    result = tile("panda", [root], tmp_path / "out", cfg)
    assert result.failures.empty and result.tiled == 2
    manifest = pd.read_parquet(result.manifest)
    for column in ("slide_id", "x", "y", "level", "size", "label_name", "background", "edges", "homogeneity", "blur", "pen"):
        assert column in manifest.columns
    for image_id, provider in (("rad", "radboud"), ("kar", "karolinska")):
        rows = manifest[manifest.slide_id == image_id]
        assert (rows.level == 0).all() and (rows["size"] == T).all()
        assert (rows.x % T == 0).all() and (rows.y % T == 0).all(), "tiles sit on the 224 grid"
        got = {(int(y) // T, int(x) // T): label for x, y, label in zip(rows.x, rows.y, rows.label_name)}
        assert set(got) == set(TISSUE), "every tissue cell kept, no glass cell"
        assert got == expected_labels(masks[image_id], provider, policy)
        for (r, c), row in zip(((int(y) // T, int(x) // T) for x, y in zip(rows.x, rows.y)), rows.itertuples()):
            cell = masks[image_id][r * T : (r + 1) * T, c * T : (c + 1) * T]
            background = float((cell == 0).mean())
            assert row.frac_background == pytest.approx(background, abs=1e-6)
    assert set(manifest.label_name) <= set(LABEL_NAMES)


def test_kill_and_rerun_gives_the_same_manifest(tmp_path: Path, repo: Path) -> None:
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "bonylib", "synth", "panda", str(data), "--config",
                    str(repo / "configs/synth/smoke.yaml"), "panda.slides=5", "panda.core_length_um=1500"],
                   check=True, capture_output=True)
    command = [sys.executable, "-m", "bonylib", "tile", str(data), "--format", "panda"]
    subprocess.run([*command, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "parts").glob("*.parquet")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run was still going when killed"
    assert 0 < len(list((killed / "parts").glob("*.parquet"))) < 5
    assert not (killed / "manifest.parquet").exists()
    # files a kill in the middle of a write would leave: the rerun must clear them
    pending = sorted({p.name.split("_mask")[0] for p in (data / "train_label_masks").iterdir()}
                     - {p.stem for p in (killed / "parts").glob("*.parquet")})
    (killed / "parts" / f".{pending[0]}.abcd1234.tmp.parquet").write_bytes(b"half")
    (killed / ".manifest.abcd1234.tmp.parquet").write_bytes(b"half")
    rerun = subprocess.run([*command, "--out", str(killed)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout
    whole, resumed = pd.read_parquet(tmp_path / "whole" / "manifest.parquet"), pd.read_parquet(killed / "manifest.parquet")
    assert len(whole) > 0
    pd.testing.assert_frame_equal(whole, resumed)
    leftovers = [p for p in killed.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"half-written files left: {leftovers}"


@pytest.mark.parametrize("workers", [1, 3])  # 3: the good slides are tiled in bands, beside the refused jobs
def test_bad_slides_are_recorded_and_the_run_goes_on(drawn, tmp_path: Path, workers: int) -> None:
    good, _ = drawn
    root = tmp_path / "panda"
    shutil.copytree(good, root)
    images, masks = root / "train_images", root / "train_label_masks"
    rows = pd.read_csv(root / "train.csv").to_dict("records")

    def add(image_id: str, provider: str = "radboud") -> None:
        rows.append({"image_id": image_id, "data_provider": provider, "isup_grade": 0, "gleason_score": "0+0"})

    data = (images / "rad.tiff").read_bytes()
    (images / "truncated.tiff").write_bytes(data[: len(data) // 3])
    shutil.copy(masks / "rad_mask.tiff", masks / "truncated_mask.tiff")
    add("truncated")
    shutil.copy(images / "rad.tiff", images / "nomask.tiff")
    add("nomask")
    shutil.copy(images / "rad.tiff", images / "othersize.tiff")
    small = np.zeros((T * 2, T * 2, 3), np.uint8)
    write_pyramid(masks / "othersize_mask.tiff", [small, small[::4, ::4], small[::16, ::16]], MPP, 256, True, 90)
    add("othersize")
    grey = np.full((T * 4, T * 5), 128, np.uint8)
    with tifffile.TiffWriter(images / "grey.tiff") as tif:
        for ds in (1, 4, 16):
            tif.write(grey[::ds, ::ds], photometric="minisblack", tile=(256, 256), compression="zlib")
    shutil.copy(masks / "rad_mask.tiff", masks / "grey_mask.tiff")
    add("grey")
    white = np.full((T * 4, T * 5, 3), 242, np.uint8)
    write_pyramid(images / "blank.tiff", [white, white[::4, ::4], white[::16, ::16]], MPP, 256, False, 90)
    shutil.copy(masks / "rad_mask.tiff", masks / "blank_mask.tiff")
    add("blank")
    add("rad", provider="karolinska")  # the same id for another slide (an exact repeat of a row is tiled once)
    shutil.copy(images / "rad.tiff", images / "alien.tiff")
    add("alien", provider="mars")
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bonylib", "tile", str(root), "--format", "panda", "--out", str(out),
                             f"workers={workers}"], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    failures = pd.read_csv(out / "failures.csv").set_index("slide_id").error
    expected = {
        "truncated": "truncated.tiff",
        "nomask": "mask file missing",
        "othersize": "differs from the slide",
        "grey": "not an 8-bit RGB slide",
        "blank": "no tissue found",
        "rad": "duplicate slide id",
        "alien": "unknown data_provider 'mars'",
    }
    assert set(failures.index) == set(expected)
    for slide_id, phrase in expected.items():
        assert phrase in failures[slide_id], (slide_id, failures[slide_id])
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert set(manifest.slide_id) == {"rad", "kar"}, "good slides are tiled whatever the bad ones do"
    assert len(manifest[manifest.slide_id == "rad"]) == len(TISSUE)

    # the good slides are done: a rerun tries only the failed ones again
    again = subprocess.run([sys.executable, "-m", "bonylib", "tile", str(root), "--format", "panda", "--out", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 3 and "0 slides tiled" in again.stdout


def test_missing_masks_can_be_tiled_unlabelled(drawn, tmp_path: Path) -> None:
    good, _ = drawn
    root = tmp_path / "panda"
    shutil.copytree(good, root)
    (root / "train_label_masks" / "kar_mask.tiff").unlink()
    cfg = load_config(TileConfig, None, ["missing_mask=unlabelled"])
    result = tile("panda", [root], tmp_path / "out", cfg)
    manifest = pd.read_parquet(result.manifest)
    assert result.failures.empty
    assert (manifest[manifest.slide_id == "kar"].label_name == "").all()
    assert (manifest[manifest.slide_id == "rad"].label_name != "").all()


def test_a_changed_config_needs_a_new_folder_or_overwrite(drawn, tmp_path: Path) -> None:
    root, _ = drawn
    tile("panda", [root], tmp_path / "out", load_config(TileConfig))
    with pytest.raises(BonyError, match="another config"):
        tile("panda", [root], tmp_path / "out", load_config(TileConfig, None, ["label_policy=majority"]))
    result = tile("panda", [root], tmp_path / "out", load_config(TileConfig, None, ["label_policy=majority"]), overwrite=True)
    assert result.tiled == 2 and result.skipped == 0


def test_array_shards_then_assembly_equal_one_run(drawn, tmp_path: Path) -> None:
    root, _ = drawn
    cfg = load_config(TileConfig)
    one = tile("panda", [root], tmp_path / "one", cfg)
    first = tile("panda", [root], tmp_path / "sharded", cfg, shard=(0, 2))
    second = tile("panda", [root], tmp_path / "sharded", cfg, shard=(1, 2))
    assert first.manifest is None and second.manifest is None and first.tiled + second.tiled == 2
    final = tile("panda", [root], tmp_path / "sharded", cfg)
    assert final.tiled == 0 and final.skipped == 2
    pd.testing.assert_frame_equal(pd.read_parquet(one.manifest), pd.read_parquet(final.manifest))


def test_shards_hold_the_same_tiles_as_the_slides(drawn, tmp_path: Path) -> None:
    root, _ = drawn
    result = tile("panda", [root], tmp_path / "out", load_config(TileConfig, None, ["shards=true", "workers=2"]))
    from_shards = TileDataset(result.manifest, source="shards")
    from_slides = TileDataset(result.manifest, source="slides")
    assert len(from_shards) == len(from_slides) == 2 * len(TISSUE)
    for i in range(len(from_shards)):
        a, target = from_shards[i]
        b, _ = from_slides[i]
        assert a.size == b.size == (T, T)
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < 3, "JPEG q95 round trip"
        assert target == LABEL_NAMES.index(from_shards.frame.label_name[i])


def test_real_slides_tile_without_masks(shared_data: Path, tmp_path: Path) -> None:
    result = tile("slides", [shared_data / "slides"], tmp_path / "out", load_config(TileConfig))
    # the TCGA file carries no resolution: it is reported, the Aperio slide is tiled
    assert result.failures.slide_id.tolist() == ["tcga-cr-7395-01a-01-ts1"]
    assert "set slide_mpp=" in result.failures.error.iloc[0]
    result = tile("slides", [shared_data / "slides"], tmp_path / "out2", load_config(TileConfig, None, ["slide_mpp=0.5"]))
    assert result.failures.empty, result.failures.error.tolist()
    manifest = pd.read_parquet(result.manifest)
    counts = manifest.groupby("slide_id").size()
    assert set(counts.index) == {"CMU-1-Small-Region", "tcga-cr-7395-01a-01-ts1"}
    assert (counts > 20).all()
    assert (manifest.label_name == "").all() and (manifest.background < 0.9).all()
    cmu = manifest[manifest.slide_id == "CMU-1-Small-Region"]
    assert cmu.mpp.iloc[0] == pytest.approx(0.499, abs=0.01), "the file's own resolution wins over slide_mpp"


def test_sicapv2_patches_take_labels_and_splits_from_their_files(smoke_data: Path, tmp_path: Path) -> None:
    root = smoke_data / "sicapv2"
    cfg = load_config(TileConfig, None, ["mpp=null", "level=0", "tile_px=128"])  # the whole smoke patch
    manifest = pd.read_parquet(tile("sicapv2", [root], tmp_path / "out", cfg).manifest)
    test_names = set(pd.read_excel(root / "partition" / "Test" / "Test.xlsx").image_name)
    patients = pd.read_excel(root / "wsi_labels.xlsx").set_index("slide_id")["patient_id"]
    assert len(manifest) == len(list((root / "images").glob("*.jpg")))
    for row in manifest.itertuples():
        values = np.asarray(Image.open(root / "masks" / f"{row.slide_id}.jpg")).astype(int)
        snapped = np.array([0, 3, 4, 5])[np.abs(values[..., None] - [0, 3, 4, 5]).argmin(-1)]
        highest = int(median_filter(snapped, size=5, mode="nearest").max())  # JPEG ringing removed
        assert row.label_name == ("benign" if highest == 0 else f"G{highest}") and row.label_policy == "max"
        assert row.split == ("test" if f"{row.slide_id}.jpg" in test_names else "train")
        assert row.slide_id.startswith(f"{row.parent_slide}_Block_Region_") and row.mpp == pytest.approx(1.0)
        assert row.group == str(patients[row.parent_slide]), "the group is the patient (the partition's unit)"


def test_deepgleason_tiles_are_cut_and_labelled_from_their_masks(smoke_data: Path, tmp_path: Path) -> None:
    root = smoke_data / "deepgleason"
    result = tile("deepgleason", [root], tmp_path / "out", load_config(TileConfig, None, ["tile_px=64"]))
    assert result.failures.empty, "a tile of glass is not a failed slide"
    parts = pd.concat([pd.read_parquet(p) for p in (tmp_path / "out" / "parts").glob("*.parquet")])
    table = pd.read_csv(root / "tiles.csv").set_index("tile_id")
    names = {0: "background", 1: "background", 2: "benign", 3: "G3", 4: "G4", 5: "G5"}
    assert len(parts) == len(table) * (128 // 64) ** 2, "every 64-px cell of every 128-px tile is measured"
    for row in parts.itertuples():
        mask = np.asarray(Image.open(root / table.loc[row.slide_id, "mask"]))[row.y : row.y + 64, row.x : row.x + 64]
        assert row.label_name == max((names[int(v)] for v in np.unique(mask)), key=RANK.get)
        assert row.split == table.loc[row.slide_id, "split"] and row.group == table.loc[row.slide_id, "slide_id"]


def _tissue_image(path: Path, height: int, width: int, strip: int | None = None) -> None:
    """A plain-image slide of synthetic tissue; with ``strip``, only a band that wide is tissue."""
    rng = np.random.default_rng(3)
    zones = np.full((height, width), ZONE_G3, np.uint8)
    if strip is not None:
        zones[:, strip:] = 0
    Image.fromarray(render_tissue(zones, rng, sample_stain(rng), mpp=0.5).rgb).save(path)


def test_a_slide_without_candidate_tiles_does_not_break_the_manifest(tmp_path: Path) -> None:
    _tissue_image(tmp_path / "a_strip.png", 4 * T, 4 * T, strip=90)  # tissue covers < 50 % of every tile
    _tissue_image(tmp_path / "b_tissue.png", 2 * T, 3 * T)
    cfg = load_config(TileConfig, None, ["slide_mpp=0.5", "min_tissue=0.5"])
    result = tile("slides", [tmp_path / "a_strip.png", tmp_path / "b_tissue.png"], tmp_path / "out", cfg)
    assert result.failures.empty and result.tiled == 2
    manifest = pd.read_parquet(result.manifest)
    assert set(manifest.slide_id) == {"b_tissue"} and len(manifest) == 6
    slides = pd.read_parquet(tmp_path / "out" / "slides.parquet").set_index("slide_id")
    assert slides.loc["a_strip", "read_tiles"] == 0 and slides.loc["a_strip", "grid_tiles"] == 16


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_a_tile_never_written_reads_as_glass(tmp_path: Path, compression: str | None) -> None:
    """Sparse TIFFs leave empty tiles unwritten (byte count 0): they read white, the others as written."""
    from bonylib.data.slides import TiffSlide, open_slide

    image = np.random.default_rng(0).integers(0, 200, (512, 768, 3), dtype=np.uint8)
    tiles = (image[y:y + 256, x:x + 256] for y in (0, 256) for x in (0, 256, 512))
    written = (None if k == 1 else tile for k, tile in enumerate(tiles))
    tifffile.imwrite(tmp_path / "sparse.tiff", written, shape=image.shape, dtype=np.uint8, tile=(256, 256),
                     photometric="rgb", compression=compression)
    expected = np.pad(image, ((0, 100), (0, 100), (0, 0)), constant_values=255)
    expected[:256, 256:512] = 255
    with open_slide(tmp_path / "sparse.tiff", mpp=0.5) as slide:
        assert isinstance(slide, TiffSlide)
        for x, y, w, h in [(100, 50, 400, 300), (0, 0, 768, 512), (600, 400, 260, 200)]:
            np.testing.assert_array_equal(slide.read_region((x, y), 0, (w, h)), expected[y:y + h, x:x + w])


def test_a_worker_that_dies_fails_only_its_slide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bonylib.data.tiling as tiling

    for name in ("a", "b", "c"):
        _tissue_image(tmp_path / f"{name}.png", T, 2 * T)
    real = tiling.tile_slide

    def crash_on_b(job, cfg, out, band=(0, 1)):  # a decoder segfault, as the pool sees it
        if job.slide_id == "b":
            os._exit(139)
        return real(job, cfg, out, band)

    monkeypatch.setattr(tiling, "tile_slide", crash_on_b)  # forked workers inherit the patch
    cfg = load_config(TileConfig, None, ["slide_mpp=0.5", "workers=2"])
    result = tile("slides", [tmp_path / f"{n}.png" for n in "abc"], tmp_path / "out", cfg)
    assert result.failures.slide_id.tolist() == ["b"]
    assert "worker process died" in result.failures.error.iloc[0]
    assert set(pd.read_parquet(result.manifest).slide_id) == {"a", "c"}


@pytest.mark.parametrize("block_tiles", [1, 4])  # 4: a slide's tiles are one block, and its other bands are empty
def test_slides_tiled_in_bands_give_the_parts_of_whole_slides(drawn, tmp_path: Path, block_tiles: int) -> None:
    root, _ = drawn
    whole = tile("panda", [root], tmp_path / "whole", load_config(TileConfig, None, [f"block_tiles={block_tiles}"]))
    cfg = load_config(TileConfig, None, ["workers=3", f"block_tiles={block_tiles}"])
    assert band_counts(list_jobs("panda", [root]), cfg) == [3, 3], "two slides over three workers: three bands each"
    banded = tile("panda", [root], tmp_path / "banded", cfg)
    assert banded.tiled == 2 and banded.failures.empty
    for slide_id in ("rad", "kar"):
        pd.testing.assert_frame_equal(read_part(tmp_path / "banded", slide_id), read_part(tmp_path / "whole", slide_id))
    pd.testing.assert_frame_equal(pd.read_parquet(banded.manifest), pd.read_parquet(whole.manifest))
    slides = [pd.read_parquet(out / "slides.parquet").drop(columns="seconds") for out in (tmp_path / "banded", tmp_path / "whole")]
    pd.testing.assert_frame_equal(*slides)


def test_a_band_that_fails_fails_its_slide_alone(drawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bonylib.data.tiling as tiling

    root, _ = drawn
    real = tiling.tile_slide

    def second_band_of_rad_fails(job, cfg, out, band=(0, 1)):
        if job.slide_id == "rad" and band[0] == 1:
            raise BonyError(f"{job.path}: a corrupt tile in band {band}")
        return real(job, cfg, out, band)

    monkeypatch.setattr(tiling, "tile_slide", second_band_of_rad_fails)  # forked workers inherit the patch
    result = tile("panda", [root], tmp_path / "out", load_config(TileConfig, None, ["workers=3", "block_tiles=1"]))
    assert result.failures.slide_id.tolist() == ["rad"] and "band (1, 3)" in result.failures.error.iloc[0]
    assert sorted(p.stem for p in (tmp_path / "out" / "parts").glob("*.parquet")) == ["kar"]
    assert set(pd.read_parquet(result.manifest).slide_id) == {"kar"}


def test_bands_cut_a_slides_blocks_in_order_into_runs_of_about_equal_tiles() -> None:
    blocks = [np.arange(size) for size in (3, 1, 4, 2, 5, 1)]
    for n in range(1, 8):
        bands = [_band_blocks(blocks, (k, n)) for k in range(n)]
        joined = [block for band in bands for block in band]
        assert len(joined) == len(blocks) and all(a is b for a, b in zip(joined, blocks)), "every block once, in order"
    assert [sum(len(b) for b in _band_blocks(blocks, (k, 2))) for k in range(2)] == [8, 8]


def test_only_a_slide_larger_than_its_share_of_the_workers_is_banded(tmp_path: Path) -> None:
    def job(name: str, size: int, patch: bool = False) -> SlideJob:
        (tmp_path / name).write_bytes(b"\0" * size)
        return SlideJob(name, tmp_path / name, patch=patch)

    few = [job("big", 9000), job("mid", 3000), job("small", 1000), job("patch", 9000, patch=True)]
    counts = lambda jobs, *overrides: band_counts(jobs, load_config(TileConfig, None, list(overrides)))  # noqa: E731
    assert counts(few, "workers=2") == [2, 1, 1, 1]  # a quarter of 22000 is 5500
    assert counts(few, "workers=4") == [4, 2, 1, 1]  # an eighth is 2750
    assert counts(few, "workers=1") == counts(few, "workers=4", "shards=true") == [1, 1, 1, 1]
    many = [job(f"s{i}", 1000 + i) for i in range(40)]
    assert counts(many, "workers=16") == [1] * 40


def test_resume_may_change_workers(drawn, tmp_path: Path) -> None:
    root, _ = drawn
    tile("panda", [root], tmp_path / "out", load_config(TileConfig, None, ["workers=1"]))
    again = tile("panda", [root], tmp_path / "out", load_config(TileConfig, None, ["workers=2", "block_tiles=8"]))
    assert again.skipped == 2 and again.tiled == 0


def test_relabel_applies_a_policy_to_the_manifest_fractions(drawn, tmp_path: Path) -> None:
    from bonylib.data.labels import relabel

    root, masks = drawn
    manifest = pd.read_parquet(tile("panda", [root], tmp_path / "out", load_config(TileConfig)).manifest)
    for policy in ("max", "majority", "min_fraction"):
        labels = relabel(manifest, policy)
        for image_id, provider in (("rad", "radboud"), ("kar", "karolinska")):
            rows = manifest.slide_id == image_id
            got = {(int(y) // T, int(x) // T): lab for x, y, lab in zip(manifest.x[rows], manifest.y[rows], labels[rows])}
            assert got == expected_labels(masks[image_id], provider, policy)
    unlabelled = manifest.head(2).assign(**{c: np.nan for c in manifest.columns if c.startswith("frac_")})
    assert (relabel(unlabelled, "max") == "").all()
