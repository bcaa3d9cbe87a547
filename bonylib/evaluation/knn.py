"""Weighted k-nearest-neighbour classification on frozen features (DINO's monitoring metric).

Each test feature votes with its ``k`` most cosine-similar training features, each vote weighted
by ``exp(similarity / T)`` (Wu et al., 2018; k = 20, T = 0.07 in DINO). Features are
L2-normalised first, so similarity is the dot product.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


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
    predicted = weighted_knn(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((predicted == test_labels).float().mean())


def held_out(groups: pd.Series, test_fraction: float) -> np.ndarray:
    """Boolean test mask: whole groups (slides, patients) go to test by a stable hash of their name."""
    codes = np.array([zlib.crc32(str(g).encode()) % 1000 for g in groups])
    return codes < int(round(test_fraction * 1000))


def manifest_knn_accuracy(backbone: torch.nn.Module, manifest: pd.DataFrame, input_size: int, mean: list[float],
                          std: list[float], test_fraction: float = 0.3, k: int = 20, temperature: float = 0.07,
                          batch_size: int = 64) -> float:
    """Weighted k-NN accuracy of ``backbone``'s features on the labelled tiles of a manifest, slides held out.

    Tiles without a label and glass are left out; the split keeps each ``group`` on one side, so
    the score measures what transfers to unseen slides, not memory of a slide's stain. Returns NaN
    when a side is empty.
    """
    from bonylib.data.datasets import TileDataset
    from bonylib.evaluation.features import EvalTransform, extract_features

    labelled = manifest[(manifest.label_name != "") & (manifest.label_name != "background")].reset_index(drop=True)
    test = held_out(labelled["group"], test_fraction)
    if test.all() or not test.any():
        return float("nan")
    classes = sorted(set(labelled.label_name))
    data = TileDataset(labelled, tile_px=input_size, transform=EvalTransform(input_size, mean, std), classes=classes,
                       source="slides")
    features, targets = extract_features(backbone, data, batch_size=batch_size)
    test_t = torch.from_numpy(test)
    # a test tile of a class no training slide has (Karolinska's ungraded "cancer" when only Radboud
    # slides are on the training side) cannot be predicted: it is left out rather than counted wrong
    seen = torch.isin(targets, targets[~test_t].unique())
    test_t &= seen
    if not test_t.any():
        return float("nan")
    train_t = ~torch.from_numpy(test)
    return knn_accuracy(features[train_t], targets[train_t], features[test_t], targets[test_t], k, temperature)
