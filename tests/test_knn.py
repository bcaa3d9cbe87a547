"""Weighted k-NN against a direct numpy computation; group-wise held-out split; monitoring in a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.data.tiling import TileConfig, tile
from bonylib.evaluation.knn import cross_validated_knn, slide_folds, weighted_knn
from bonylib.evaluation.metrics import accuracy, balanced_accuracy


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


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Accuracy of one train/test split's weighted k-NN (k = 20, T = 0.07)."""
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    return accuracy(test_labels, weighted_knn(train, train_labels, test, classes))


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


def test_slide_folds_keep_groups_whole_balanced_and_deterministic() -> None:
    groups = pd.Series([f"slide{i % 40}" for i in range(400)])
    fold = slide_folds(groups, 5)
    assert (pd.Series(fold).groupby(groups).nunique() == 1).all(), "a slide is never in two folds"
    assert sorted(pd.Series(fold).groupby(groups).first().value_counts()) == [8] * 5, "8 slides per fold"
    assert (slide_folds(groups, 5) == fold).all(), "deterministic"


def test_cross_validation_equals_fold_by_fold_knn() -> None:
    rng = np.random.default_rng(3)
    groups = pd.Series([f"s{i // 20}" for i in range(300)])
    labels = torch.tensor(rng.integers(0, 3, 300))
    features = torch.tensor(rng.normal(size=(300, 6)) + labels.numpy()[:, None] * 0.8, dtype=torch.float32)
    fold = slide_folds(groups, 4)
    correct = 0
    for f in range(4):  # independent computation: knn_accuracy on each split, weighted by its size
        test, train = torch.from_numpy(fold == f), torch.from_numpy(fold != f)
        correct += knn_accuracy(features[train], labels[train], features[test], labels[test]) * int(test.sum())
    assert accuracy(labels, cross_validated_knn(features, labels, groups, folds=4)) == pytest.approx(correct / 300)


def test_cross_validation_does_not_reward_slide_memory() -> None:
    """Features that only identify the slide (its stain) predict a slide's tiles perfectly from the
    same slide, and at chance from other slides: the held-out score must be the second."""
    rng = np.random.default_rng(4)
    groups = pd.Series([f"s{i // 10}" for i in range(600)])
    slide_label = rng.integers(0, 2, 60)
    labels = torch.tensor(slide_label[np.arange(600) // 10])
    features = torch.tensor(rng.normal(size=(60, 16))[np.arange(600) // 10] + rng.normal(size=(600, 16)) * 0.05,
                            dtype=torch.float32)
    mixed = torch.from_numpy(rng.random(600) < 0.5)
    assert knn_accuracy(features[mixed], labels[mixed], features[~mixed], labels[~mixed]) > 0.95
    assert abs(accuracy(labels, cross_validated_knn(features, labels, groups)) - 0.5) < 0.12


def test_cross_validation_leaves_out_classes_no_training_fold_has() -> None:
    groups = pd.Series(["a"] * 10 + ["b"] * 10 + ["c"] * 10)
    labels = torch.tensor([0] * 20 + [1] * 10)  # class 1 only on slide c
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(0)) * 0.01
    features[:, 0] += torch.tensor([1.0] * 20 + [-1.0] * 10)  # a, b alike; c far away
    # counted, slide c's tiles could only be predicted as class 0 (wrong): the score would be 20/30
    predicted = cross_validated_knn(features, labels, groups, folds=3)
    assert (predicted[20:] == -1).all() and accuracy(labels, predicted) == 1.0, "slide c is not counted"
    assert np.isnan(accuracy(labels, cross_validated_knn(features, labels, pd.Series(["a"] * 30))))


def test_balanced_accuracy_matches_sklearn_and_sees_through_a_majority_class() -> None:
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(5)
    labels = torch.tensor(rng.choice(4, 500, p=[0.7, 0.1, 0.1, 0.1]))
    predicted = torch.where(torch.from_numpy(rng.random(500) < 0.6), labels, torch.tensor(rng.integers(0, 4, 500)))
    predicted[:40] = -1  # not predictable: left out of both scores
    assert balanced_accuracy(labels, predicted) == pytest.approx(balanced_accuracy_score(labels[40:], predicted[40:]))
    assert accuracy(labels, predicted) == pytest.approx(float((predicted[40:] == labels[40:]).float().mean()))
    always_majority = torch.zeros_like(labels)
    assert accuracy(labels, always_majority) > 0.6 and balanced_accuracy(labels, always_majority) == 0.25


def test_knn_is_logged_during_pretraining(repo: Path, smoke_data: Path, tmp_path: Path) -> None:
    tiles = tile("deepgleason", [smoke_data / "deepgleason"], tmp_path / "tiles", load_config(TileConfig, None, ["tile_px=64"]))
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml", [
        f"data.manifest={tiles.manifest}", "data.tile_px=64", f"knn.manifest={tiles.manifest}"])
    out = build_trainer(cfg, tmp_path / "run").train()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_accuracy" in r]
    assert [r["epoch"] for r in knn] == [0, 1]
    for key in ("knn_accuracy", "knn_balanced_accuracy", "knn_accuracy_cancer", "knn_balanced_accuracy_cancer"):
        assert all(0.0 <= r[key] <= 1.0 or np.isnan(r[key]) for r in knn), key
    assert np.isfinite(knn[-1]["knn_accuracy_cancer"]), "the smoke tiles have benign and cancer on several slides"
