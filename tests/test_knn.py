"""Weighted k-NN against a direct numpy computation; group-wise held-out split; monitoring in a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonylib.config import load_config
from bonylib.data.tiling import TileConfig, tile
from bonylib.evaluation.knn import held_out, knn_accuracy, weighted_knn
from bonylib.ssl.trainer import PretrainConfig, Trainer


def numpy_knn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int, k: int, t: float) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for row in test:
        sim = train @ row
        nearest = np.argsort(-sim)[:k]
        votes = np.zeros(classes)
        for j in nearest:
            votes[labels[j]] += np.exp(sim[j] / t)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def test_weighted_knn_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 16)), rng.normal(size=(50, 16))
    labels = rng.integers(0, 4, 200)
    got = weighted_knn(torch.tensor(train), torch.tensor(labels), torch.tensor(test), 4, k=20, temperature=0.07, chunk=7)
    np.testing.assert_array_equal(got.numpy(), numpy_knn(train, labels, test, 4, 20, 0.07))


def test_knn_separates_separable_classes() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 8)) * 5
    labels = rng.integers(0, 3, 300)
    features = torch.tensor(centres[labels] + rng.normal(size=(300, 8)), dtype=torch.float32)
    y = torch.tensor(labels)
    assert knn_accuracy(features[:200], y[:200], features[200:], y[200:]) > 0.95
    shuffled = y[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert knn_accuracy(features[:200], shuffled[:200], features[200:], shuffled[200:]) < 0.6


def test_held_out_keeps_groups_whole() -> None:
    groups = pd.Series([f"slide{i % 40}" for i in range(400)])
    test = held_out(groups, 0.3)
    per_group = pd.Series(test).groupby(groups).nunique()
    assert (per_group == 1).all(), "a slide is never on both sides"
    assert 0.15 < test.mean() < 0.45
    assert (held_out(groups, 0.3) == test).all(), "stable"


def test_knn_is_logged_during_pretraining(repo: Path, smoke_data: Path, tmp_path: Path) -> None:
    tiles = tile("deepgleason", [smoke_data / "deepgleason"], tmp_path / "tiles", load_config(TileConfig, None, ["tile_px=64"]))
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml", [
        f"data.manifest={tiles.manifest}", "data.tile_px=64", f"knn.manifest={tiles.manifest}", "knn.test_fraction=0.5"])
    out = Trainer(cfg, tmp_path / "run").train()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_accuracy" in r]
    assert [r["epoch"] for r in knn] == [0, 1]
    assert all(0.0 <= r["knn_accuracy"] <= 1.0 or np.isnan(r["knn_accuracy"]) for r in knn)
