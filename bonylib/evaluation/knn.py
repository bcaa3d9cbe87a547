"""Weighted k-nearest-neighbour classification on frozen features (DINO's monitoring metric).

Each test feature votes with its ``k`` most cosine-similar training features, each vote weighted
by ``exp(similarity / T)`` (Wu et al., 2018; k = 20, T = 0.07 in DINO). Features are
L2-normalised first, so similarity is the dot product.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bonylib.runtime import Precision


@torch.no_grad()
def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each test feature; the train and test sets are (N, D) and (M, D)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test), chunk):
        similarity = test[start : start + chunk] @ train.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_labels[index], (top / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Share of test features whose weighted k-NN prediction is their label."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return accuracy(weighted_knn(train_features, train_labels, test_features, num_classes, k, temperature), test_labels)


def slide_folds(groups: pd.Series, folds: int) -> np.ndarray:
    """Fold index (0 .. folds-1) of each row, whole groups (slides, patients) per fold.

    Groups are ordered by a stable hash of their name (not by name, which often encodes the site or
    date) and dealt round-robin, so folds differ in size by at most one group.
    """
    names = sorted(set(map(str, groups)), key=lambda g: (zlib.crc32(g.encode()), g))
    fold_of = {g: i % folds for i, g in enumerate(names)}
    return np.array([fold_of[str(g)] for g in groups], dtype=np.int64)


def cross_validated_knn(features: torch.Tensor, labels: torch.Tensor, groups: pd.Series, folds: int = 5,
                        k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Weighted k-NN prediction of every tile with its slide held out; -1 where there is none.

    The groups are split into ``folds`` folds; the tiles of each fold are classified by the tiles
    of all other folds, so every slide is tested once. One fixed split of a few slides swings by
    several points with the slides it happens to hold out; cross-validation averages that away.
    A tile whose class no training fold has (Karolinska's ungraded "cancer" when every other slide
    is Radboud) cannot be predicted and gets -1 rather than a wrong answer.
    """
    fold = torch.from_numpy(slide_folds(groups, folds))
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    predicted = torch.full_like(labels, -1)
    for f in fold.unique():
        test, train = fold == f, fold != f
        test &= torch.isin(labels, labels[train].unique())
        if train.any() and test.any():
            predicted[test] = weighted_knn(features[train], labels[train], features[test], num_classes, k, temperature)
    return predicted


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the predicted tiles (``predicted >= 0``) that are right; NaN when none is predicted."""
    counted = predicted >= 0
    return float((predicted[counted] == labels[counted]).float().mean()) if counted.any() else float("nan")


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the share of each class's predicted tiles that are right (macro recall).

    With 70 % benign tiles a model that answers "benign" to everything scores 0.7 accuracy but 1 /
    (number of classes) balanced accuracy; kaiko eva reports this for its patch benchmarks too.
    """
    counted = predicted >= 0
    recalls = [float((predicted[counted & (labels == c)] == c).float().mean()) for c in labels[counted].unique()]
    return float(np.mean(recalls)) if recalls else float("nan")


def labelled_tiles(manifest: pd.DataFrame) -> pd.DataFrame:
    """The tiles k-NN can score: those with a label that is not glass."""
    return manifest[(manifest.label_name != "") & (manifest.label_name != "background")]


LABEL_TASKS: dict[str, dict[str, str]] = {
    "labels": {},
    "cancer": {"G3": "cancer", "G4": "cancer", "G5": "cancer"},
}
"""k-NN tasks on one set of features: the manifest's labels as they are (benign and grades), and
cancer vs benign (grades merged, the distinction Karolinska's masks make)."""


def manifest_knn_scores(backbone: torch.nn.Module, manifest: pd.DataFrame, input_size: int, mean: list[float],
                       std: list[float], folds: int = 5, k: int = 20, temperature: float = 0.07,
                       batch_size: int = 64, tasks: Sequence[str] = tuple(LABEL_TASKS),
                       precision: Precision | None = None) -> dict[str, dict[str, float]]:
    """Cross-validated weighted k-NN accuracy and balanced accuracy of ``backbone``'s features on the
    labelled tiles of a manifest, per task: ``{task: {"accuracy": ..., "balanced_accuracy": ...}}``.

    Tiles without a label and glass are left out; folds keep each ``group`` whole, so the score
    measures what transfers to unseen slides, not memory of a slide's stain. Features are
    extracted once (in ``precision``, default fp32) and scored for each of ``tasks`` (keys of :data:`LABEL_TASKS`).
    """
    from bonylib.data.datasets import TileDataset
    from bonylib.evaluation.features import EvalTransform, extract_features

    labelled = labelled_tiles(manifest).reset_index(drop=True)
    if labelled.empty:
        return {task: {"accuracy": float("nan"), "balanced_accuracy": float("nan")} for task in tasks}
    data = TileDataset(labelled, tile_px=input_size, transform=EvalTransform(input_size, mean, std),
                       classes=sorted(set(labelled.label_name)), source="slides")
    features, _ = extract_features(backbone, data, batch_size=batch_size, precision=precision)
    scores = {}
    for task in tasks:
        names = labelled.label_name.replace(LABEL_TASKS[task])
        classes = sorted(set(names))
        targets = torch.tensor([classes.index(name) for name in names])
        predicted = cross_validated_knn(features, targets, labelled["group"], folds, k, temperature)
        scores[task] = {"accuracy": accuracy(predicted, targets), "balanced_accuracy": balanced_accuracy(predicted, targets)}
    return scores
