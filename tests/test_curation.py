"""Curated sampling: k-means clusters of a bony embed store (one level, or two where the tiles are many), the
manifest column bony curate writes, the sampler that balances the clusters, and pretraining that reads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from bonylib.cli import main
from bonylib.compose.curation import cluster_overview
from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.data.curation import CurateConfig, cluster_tiles
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError
from bonylib.evaluation.embeddings import embed
from bonylib.files import sha256_file
from bonylib.models.registry import encoder_from_spec
from bonylib.ssl.data import EpochSampler, balance_weights


def blobs(sizes: list[int], seed: int = 0, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Points around ``len(sizes)`` random directions (cosine clusters), ``sizes[i]`` points each, shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 4
    truth = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[truth] + rng.normal(size=(len(truth), dim))
    order = rng.permutation(len(truth))
    return points[order], truth[order]


def test_one_and_two_level_k_means_find_the_clusters_numbered_by_size() -> None:
    """Six clusters of very unequal size (2000 tiles down to 30): one k-means finds them, and so does the two-level
    path (MiniBatchKMeans into 60 fine clusters, then k-means of their centroids) forced here by a low threshold;
    cluster 0 is the largest."""
    points, truth = blobs([2000, 900, 400, 150, 60, 30])
    one = cluster_tiles(points, CurateConfig(clusters=6))
    two = cluster_tiles(points, CurateConfig(clusters=6, hierarchical_above=1000, fine_clusters=60))
    assert one.levels == 1 and two.levels == 2
    for found in (one, two):
        assert adjusted_rand_score(truth, found.labels) == 1.0
        assert list(np.bincount(found.labels)) == [2000, 900, 400, 150, 60, 30]
    assert len(np.unique(two.fine_labels)) == 60
    assert all(len(np.unique(two.labels[two.fine_labels == f])) == 1 for f in range(60)), "a fine cluster goes whole"
    with pytest.raises(Exception, match="cannot make 6 clusters"):
        cluster_tiles(points[:5], CurateConfig(clusters=6))


def test_the_balanced_sampler_draws_every_cluster_as_often_and_splits_over_processes_as_one() -> None:
    """Clusters of 900, 90 and 10 tiles: a shuffled epoch draws them 90 / 9 / 1 %, a balanced one a third each
    (within 4 binomial standard deviations over 20 epochs of 1000 draws), and two processes' halves, interleaved,
    are the single process's order, epoch by epoch and from any batch on."""
    clusters = pd.Series(np.repeat([0, 1, 2], [900, 90, 10])).sample(frac=1, random_state=0).reset_index(drop=True)
    weights = balance_weights(clusters)
    assert weights.sum().item() == pytest.approx(1.0)
    drawn = []
    for epoch in range(20):
        sampler = EpochSampler(1000, 10, seed=3, weights=weights)
        sampler.set_epoch(epoch)
        drawn.extend(sampler)
    shares = np.bincount(clusters.to_numpy()[drawn], minlength=3) / len(drawn)
    assert np.abs(shares - 1 / 3).max() < 4 * np.sqrt(2 / 9 / len(drawn))
    plain = EpochSampler(1000, 10, seed=3)
    assert sorted(plain) == list(range(1000)), "without weights: each tile once, shuffled"
    single = EpochSampler(1000, 10, seed=3, weights=weights)
    halves = [EpochSampler(1000, 5, rank=r, world=2, seed=3, weights=weights) for r in (0, 1)]
    for epoch, start in ((0, 0), (4, 7)):
        single.set_epoch(epoch, 2 * start)
        for half in halves:
            half.set_epoch(epoch, 2 * start)
        a, b = (list(h) for h in halves)
        assert [i for pair in zip(a, b) for i in pair] == list(single)[: 2 * len(a)]


@pytest.fixture(scope="module")
def labelled(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles")
    return tile("deepgleason", [smoke_data / "deepgleason"], out, load_config(TileConfig, None, ["tile_px=64"])).manifest


def test_bony_curate_writes_the_column_and_pretraining_balances_by_it(labelled: Path, repo: Path, tmp_path: Path,
                                                                      smoke_data: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """bony curate clusters the tiles of a bony embed store into a manifest beside the original (every row and
    column kept, plus cluster), leaves the original untouched, and a run with data.balance_by=cluster trains on it
    and resumes exactly; bad inputs stop with a line naming the file or key."""
    before = sha256_file(labelled)
    store = embed(labelled, encoder_from_spec("random:vit_tiny_patch16_224:0"), tmp_path / "embeddings").store
    curated = labelled.with_name("manifest.curated.parquet")
    assert main(["curate", str(labelled), "--store", str(store), "--out", str(curated), "clusters=3"]) == 0
    assert "data.balance_by=cluster" in capsys.readouterr().out
    frame, original = pd.read_parquet(curated), pd.read_parquet(labelled)
    assert sha256_file(labelled) == before
    pd.testing.assert_frame_equal(frame.drop(columns=["cluster", "fine_cluster"]), original)
    record = json.loads(curated.with_suffix(".json").read_text())
    assert record["cluster_sizes"] == np.bincount(frame["cluster"], minlength=3).tolist() and record["levels"] == 1
    assert sorted(frame["cluster"].unique()) == [0, 1, 2]

    assert main(["curate", str(labelled), "--store", str(store), "--out", str(tmp_path / "elsewhere.parquet")]) == 2
    assert "beside manifest.parquet" in capsys.readouterr().err
    assert main(["curate", str(labelled), "--store", str(store), "--out", str(curated), "clusters=1"]) == 2
    assert "clusters must be at least 2" in capsys.readouterr().err

    cfg = lambda *o: load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",  # noqa: E731
                                 [f"data.manifest={curated}", "data.tile_px=64", "data.balance_by=cluster", *o])
    build_trainer(cfg(), tmp_path / "whole").train()
    build_trainer(cfg("max_steps=3"), tmp_path / "split").train()
    build_trainer(cfg(), tmp_path / "split").train()
    logs = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("whole", "split")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-6, abs=1e-7)
    with pytest.raises(BonyError, match="no column 'organ'"):
        build_trainer(cfg("data.balance_by=organ"), tmp_path / "bad")
    with pytest.raises(BonyError, match="not a folder of images"):
        load = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",
                           [f"data.images={smoke_data / 'deepgleason' / 'tiles'}", "data.balance_by=cluster"])
        build_trainer(load, tmp_path / "folder")

    figure = cluster_overview(curated, examples=3, classes=["benign", "G3", "G4", "G5"])
    assert len(figure.axes) == 1 + 3 * 3


def test_curated_pretraining_draws_rare_clusters_more_often(labelled: Path, tmp_path: Path) -> None:
    """What the trainer draws from a manifest whose one cluster holds 2 tiles and the other the rest: with
    balance_by, about half of the draws are the 2 tiles."""
    frame = pd.read_parquet(labelled)
    rare = np.zeros(len(frame), dtype=int)
    rare[:2] = 1
    curated = labelled.with_name("manifest.rare.parquet")
    frame.assign(cluster=rare).to_parquet(curated)
    from bonylib.ssl.data import images_from, manifest_column

    images = images_from(str(curated), "", 64)
    sampler = EpochSampler(len(images), 4, seed=0, weights=balance_weights(manifest_column(images, "cluster", str(curated))))
    drawn = torch.tensor(list(sampler))
    assert abs((drawn < 2).float().mean().item() - 0.5) < 4 * np.sqrt(0.25 / len(drawn))
