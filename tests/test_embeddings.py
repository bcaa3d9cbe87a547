"""The embedding store: what it holds equals a direct forward pass, it resumes after a kill without recomputing,
it refuses to mix encoders or manifests, shards assemble into the unsharded store, hostile manifests are refused."""

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
import torch

from bonylib.cli import main
from bonylib.config import load_config
from bonylib.data.datasets import TileDataset
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError, ConfigError
from bonylib.data.manifest import read_manifest, row_ids
from bonylib.evaluation.embeddings import EmbedConfig, embed, load_embeddings, store_path
from bonylib.models.backbones import create_backbone
from bonylib.models.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, from_backbone
from bonylib.models.registry import encoder_from_spec, rooted_spec

ARCH = "xcit_nano_12_p16_224"
CFG = EmbedConfig(batch_size=6, device="cpu", precision="fp32", workers=0, chunk_rows=6)
"""Small chunks: 42 tiles make 7, so resuming and sharding have something to split; few forward passes."""


def random_encoder(seed: int, input_size: int = 64) -> Encoder:
    """XCiT-nano at random init, at 64 px (16 patch tokens): fast on two cores."""
    return from_backbone(create_backbone(ARCH, seed=seed), f"{ARCH} seed {seed}", input_size, IMAGENET_MEAN,
                         IMAGENET_STD, identity={"kind": "random", "backbone": ARCH, "seed": seed})


@pytest.fixture(scope="module")
def manifest(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke DeepGleason tiles (42) at 64 px."""
    out = tmp_path_factory.mktemp("tiles")
    return tile("deepgleason", [smoke_data / "deepgleason"], out, load_config(TileConfig, None, ["tile_px=64"])).manifest


@pytest.fixture(scope="module")
def reference(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """An uninterrupted, unsharded store of seed 0's CLS features."""
    result = embed(manifest, random_encoder(0), tmp_path_factory.mktemp("reference"), "cls", CFG)
    assert (result.computed, result.skipped, result.missing) == (7, 0, 0)
    return load_embeddings(result.store)


def chunk_files(store: Path) -> dict[str, tuple[int, int]]:
    """Every chunk file with its inode and modification time: a file rewritten gets new ones."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (store / "chunks").glob("[0-9]*.npy")}


@pytest.mark.parametrize("output", ["cls", "patch"])
def test_store_equals_a_direct_forward_pass_in_manifest_order(manifest: Path, tmp_path: Path, output: str) -> None:
    encoder = random_encoder(0)
    store = embed(manifest, encoder, tmp_path, output, CFG).store
    ids, values = load_embeddings(store)
    frame = pd.read_parquet(manifest)
    assert ids.tolist() == [f"{r.slide_id}:{r.level}:{r.x}:{r.y}" for r in frame.itertuples()]
    tiles = TileDataset(frame, tile_px=encoder.input_size)
    direct = encoder.embed(torch.stack([encoder.transform(tiles.read(i)) for i in range(len(frame))]), output).numpy()
    if output == "patch":  # stored as float16 to bound the size
        assert values.dtype == np.float16 and values.shape == (42, 16, 128)
        np.testing.assert_allclose(values.astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    else:
        assert values.dtype == np.float32 and values.shape == (42, encoder.dim(output))
        np.testing.assert_allclose(values, direct, rtol=1e-4, atol=1e-5)
    assert store == tmp_path / encoder.fingerprint(output)[:16]


def test_resumes_after_sigkill_without_recomputing_finished_chunks(manifest: Path, reference: tuple[np.ndarray, np.ndarray],
                                                                  tmp_path: Path, repo: Path) -> None:
    slow_run = f"""
import time
from tests.test_embeddings import CFG, random_encoder
from bonylib.evaluation.embeddings import embed
encoder = random_encoder(0)
tokens = encoder.tokens
def slow(batch):
    time.sleep(0.5)
    return tokens(batch)
encoder.tokens = slow
embed({str(manifest)!r}, encoder, {str(tmp_path)!r}, "cls", CFG)
"""
    store = store_path(tmp_path, random_encoder(0), "cls")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", slow_run], cwd=repo, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while len(list((store / "chunks").glob("*[0-9].npy"))) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
    before = chunk_files(store)
    done = [name for name in before if not name.endswith(".ids.npy")]
    assert 2 <= len(done) < 7, "killed in the middle of the run"

    result = embed(manifest, random_encoder(0), tmp_path, "cls", CFG)
    assert (result.computed, result.skipped) == (7 - len(done), len(done))
    after = chunk_files(store)
    assert {name: after[name] for name in done} == {name: before[name] for name in done}, "finished chunks were rewritten"
    assert not [p for p in (store / "chunks").iterdir() if ".tmp." in p.name], "half-written chunks were cleaned up"
    ids, values = load_embeddings(store)
    np.testing.assert_array_equal(ids, reference[0])
    np.testing.assert_array_equal(values, reference[1])


def test_refuses_another_encoder_and_a_changed_manifest(manifest: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiles" / "manifest.parquet"
    copy.parent.mkdir()
    shutil.copy(manifest, copy)
    store = embed(copy, random_encoder(0), tmp_path / "out", "cls", CFG).store
    files = chunk_files(store)

    other = random_encoder(1)  # a store folder copied or renamed onto the name of another encoder's store
    shutil.copytree(store, store_path(tmp_path / "out", other))
    with pytest.raises(BonyError, match=r"holds embeddings of encoder .*seed 0.*not of .*seed 1.*never mixed") as error:
        embed(copy, other, tmp_path / "out", "cls", CFG)
    assert str(store_path(tmp_path / "out", other)) in str(error.value)

    pd.read_parquet(manifest).iloc[1:].to_parquet(copy)  # re-tiled in place: one tile fewer
    with pytest.raises(BonyError, match=r"computed from manifest .*42 rows.*41 rows\): the manifest changed") as error:
        embed(copy, random_encoder(0), tmp_path / "out", "cls", CFG)
    assert str(store) in str(error.value)
    with pytest.raises(BonyError, match="changed since these embeddings were computed"):
        load_embeddings(store)
    assert chunk_files(store) == files, "a refused run writes nothing"


def test_shards_and_assembly_equal_the_unsharded_store(manifest: Path, reference: tuple[np.ndarray, np.ndarray],
                                                      tmp_path: Path) -> None:
    first = embed(manifest, random_encoder(0), tmp_path, "cls", CFG, shard=(0, 2))
    assert (first.computed, first.missing) == (4, 3), "chunks 0, 2, 4, 6 of 7"
    with pytest.raises(BonyError, match=r"3 of 7 chunks missing \(first: 1\).*without --shard"):
        load_embeddings(first.store)
    second = embed(manifest, random_encoder(0), tmp_path, "cls", CFG, shard=(1, 2))
    assert (second.computed, second.missing) == (3, 0)
    assembled = embed(manifest, random_encoder(0), tmp_path, "cls", CFG)
    assert (assembled.computed, assembled.skipped, assembled.missing) == (0, 7, 0)
    ids, values = load_embeddings(assembled.store)
    np.testing.assert_array_equal(ids, reference[0])
    np.testing.assert_array_equal(values, reference[1])


def test_hostile_manifests_are_refused_before_anything_is_written(manifest: Path, tmp_path: Path) -> None:
    frame = pd.read_parquet(manifest)
    hostile = {
        "slide id '../../etc/passwd' is not a safe file name": frame.assign(slide_id=["../../etc/passwd"] * len(frame)),
        r"row 42: row id '.*' \(slide_id:level:x:y\) repeats an earlier row": pd.concat([frame, frame.iloc[[3]]]),
        r"row 5: x nan is not an integer": frame.assign(x=frame.x.astype(float).where(frame.index != 5)),
        "no column level": frame.drop(columns="level"),
    }
    for problem, table in hostile.items():
        path = tmp_path / "hostile.parquet"
        table.to_parquet(path)
        with pytest.raises(BonyError, match=problem) as error:
            embed(path, random_encoder(0), tmp_path / "out", "cls", CFG)
        assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()
    assert row_ids(frame, manifest).tolist() == read_manifest(manifest)[1].tolist()


def test_patch_tokens_beyond_float16_are_refused(manifest: Path, tmp_path: Path) -> None:
    encoder = random_encoder(0)
    tokens = encoder.tokens

    def huge(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cls, patches = tokens(batch)
        return cls, patches * 1e6

    encoder.tokens = huge
    with pytest.raises(BonyError, match="not finite in float16"):
        embed(manifest, encoder, tmp_path, "patch", CFG)
    assert not list((store_path(tmp_path, encoder, "patch") / "chunks").glob("*.npy"))


def test_encoder_specs() -> None:
    problems = {"hubou:x": "unknown kind 'hubou'", "random:" + ARCH: "integer seed", "bony:": "run folder",
                "handcrafted:x": "takes nothing", "histoencoder:w.pth": "<name>:<local weights file>"}
    for spec, problem in problems.items():
        with pytest.raises(ConfigError, match=problem):
            encoder_from_spec(spec)
    assert encoder_from_spec("handcrafted").identity["kind"] == "handcrafted"
    with pytest.raises(BonyError, match="w.pth: no such file"):  # understood; its file is missing: the row's note
        encoder_from_spec("histoencoder:prostate_medium:w.pth")
    root = Path("/data/run")
    assert rooted_spec("histoencoder:prostate_small:w/p.pth", root) == "histoencoder:prostate_small:/data/run/w/p.pth"
    assert rooted_spec("bony-head:pretrain", root) == "bony-head:/data/run/pretrain"
    assert rooted_spec("bony:/abs/run", root) == "bony:/abs/run"
    assert rooted_spec(f"random:{ARCH}:0", root) == f"random:{ARCH}:0"


def test_cli_end_to_end(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    few = tmp_path / "few.parquet"  # random_init feeds 224 px: 8 tiles keep it quick
    pd.read_parquet(manifest).iloc[:8].to_parquet(few)
    args = ["embed", str(few), "--encoder", f"random:{ARCH}:0", "--out", str(tmp_path), "--output", "cls+mean",
            "batch_size=8", "device=cpu"]
    assert main(args) == 0
    store = Path(capsys.readouterr().out.split(":")[0])
    ids, values = load_embeddings(store)
    assert values.shape == (8, 256) and np.isfinite(values).all()
    assert main(args) == 0
    assert "0 chunks computed, 1 already done" in capsys.readouterr().out
    assert main(["embed", str(few), "--encoder", "nope:x", "--out", str(tmp_path)]) == 2
    assert "unknown kind 'nope'" in capsys.readouterr().err
