"""Weighted k-nearest-neighbour classification on frozen features (DINO's monitoring metric).

Each test feature votes with its ``k`` most cosine-similar training features, each vote weighted
by ``exp(similarity / T)`` (Wu et al., 2018; k = 20, T = 0.07 in DINO). Features are
L2-normalised first, so similarity is the dot product.

The trainer's monitor (:class:`KnnConfig`, :class:`KnnMonitor`) lives here, not in the trainer: it is an
evaluation of an encoder, computed by the same code as ``bony embed`` (:func:`embed_tiles`), only kept in
memory because the weights change every epoch; the trainer receives it as a callback (:mod:`bonylib.compose.pretrain`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bonylib.config import option
from bonylib.data.labels import POLICIES, relabel
from bonylib.errors import ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.embeddings import embed_tiles
from bonylib.evaluation.features import Features
from bonylib.models.encoders import Encoder, from_backbone
from bonylib.runtime import Precision


@dataclass
class KnnConfig:
    """Periodic weighted k-NN accuracy of the teacher's features on labelled tiles (monitoring only)."""

    manifest: str = option("", "labelled tile manifest.parquet (empty: no k-NN monitoring)")
    label_policy: str = option("min_fraction", "tile labels for k-NN, recomputed from the manifest's class fractions "
                               "(max labels a stroma tile with a speck of cancer as cancer)")
    every_epochs: int = option(1, "epochs between k-NN evaluations (and one at the end)")
    max_tiles: int = option(2000, "labelled tiles drawn from the manifest (seeded)")
    folds: int = option(5, "slides (manifest group) are split into this many folds; each fold's tiles are "
                        "classified by the other folds' tiles, so every slide is tested once")
    k: int = option(20, "neighbours")
    temperature: float = option(0.07, "vote temperature")

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"knn.folds must be at least 2, got {self.folds}")
        check_vote("knn.k", self.k, "knn.temperature", self.temperature)
        if self.label_policy not in POLICIES:
            raise ConfigError(f"knn.label_policy must be one of {', '.join(POLICIES)}, got '{self.label_policy}'")


def check_vote(k_key: str, k: int, temperature_key: str, temperature: float) -> None:
    """Refuse a k-NN vote that cannot be cast: fewer than one neighbour, or a temperature that is not a positive
    finite number (0 divides by zero, a negative one makes the farthest neighbour count most)."""
    if k < 1:
        raise ConfigError(f"{k_key} must be at least 1, got {k}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"{temperature_key} must be a positive number (DINO: 0.07), got {temperature}")


@torch.no_grad()
def weighted_knn(train_features: torch.Tensor | Features, train_labels: torch.Tensor,
                 test_features: torch.Tensor | Features, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 4096, train_chunk: int = 8192) -> torch.Tensor:
    """Predicted class of each test feature (on ``train_labels``' device); the train and test sets are (N, D) and
    (M, D), tensors or :class:`~bonylib.evaluation.features.Features` read block by block.

    Blocked, so that memory is bounded by the blocks, not by N or M: ``chunk`` test rows at a time are compared with
    ``train_chunk`` train rows at a time, and each test row keeps a running top ``k`` (the block's top k merged with
    the best so far), which is the top k of all train rows. Time is not bounded: every test row meets every train
    row, O(N·M·D), so with both growing in proportion to the row count the cost grows as its square (the train rows
    are also read again for every test block: M / ``chunk`` passes over them).
    """
    device = train_labels.device
    k = min(k, len(train_features))
    predictions = []
    for start in range(0, len(test_features), chunk):
        test = F.normalize(test_features[start : start + chunk].to(device).float(), dim=1)
        top = torch.full((len(test), k), -math.inf, device=device)
        index = torch.zeros((len(test), k), dtype=torch.long, device=device)
        for train_start in range(0, len(train_features), train_chunk):
            train = F.normalize(train_features[train_start : train_start + train_chunk].to(device).float(), dim=1)
            block_top, block_index = (test @ train.T).topk(min(k, len(train)), dim=1)
            top, best = torch.cat([top, block_top], dim=1).topk(k, dim=1)
            index = torch.cat([index, block_index + train_start], dim=1).gather(1, best)
        # exp((s - s_max) / T): each row's weights scaled by one factor, so the vote is the same, and a small T
        # cannot overflow to infinity (exp(1 / 0.001) is beyond float32, and inf votes tie)
        weights = ((top - top[:, :1]) / temperature).exp()
        votes = torch.zeros(len(top), num_classes, device=device).scatter_add_(1, train_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long, device=device)


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


def labelled_tiles(manifest: pd.DataFrame) -> pd.DataFrame:
    """The tiles k-NN can score: those with a label that is not glass."""
    return manifest[(manifest.label_name != "") & (manifest.label_name != "background")]


LABEL_TASKS: dict[str, dict[str, str]] = {
    "labels": {},
    "cancer": {"G3": "cancer", "G4": "cancer", "G5": "cancer"},
}
"""k-NN tasks on one set of features: the manifest's labels as they are (benign and grades), and
cancer vs benign (grades merged, the distinction Karolinska's masks make)."""


def manifest_knn_scores(encoder: Encoder, manifest: pd.DataFrame, root: Path | None = None, folds: int = 5,
                        k: int = 20, temperature: float = 0.07, batch_size: int = 64,
                        tasks: Sequence[str] = tuple(LABEL_TASKS)) -> dict[str, dict[str, float]]:
    """Cross-validated weighted k-NN accuracy and balanced accuracy of ``encoder``'s CLS features on the
    labelled tiles of a manifest, per task: ``{task: {"accuracy": ..., "balanced_accuracy": ...}}``.

    Tiles without a label and glass are left out; folds keep each ``group`` whole, so the score
    measures what transfers to unseen slides, not memory of a slide's stain. Features are computed
    once (:func:`embed_tiles`, in the encoder's precision) and scored for each of ``tasks`` (keys of
    :data:`LABEL_TASKS`). ``root`` is the folder the manifest's shard paths are relative to.
    """
    labelled = labelled_tiles(manifest).reset_index(drop=True)
    if labelled.empty:
        return {task: {"accuracy": float("nan"), "balanced_accuracy": float("nan")} for task in tasks}
    features = embed_tiles(encoder, labelled, root, "cls", batch_size)
    scores = {}
    for task in tasks:
        names = labelled.label_name.replace(LABEL_TASKS[task])
        classes = sorted(set(names))
        targets = torch.tensor([classes.index(name) for name in names])
        predicted = cross_validated_knn(features, targets, labelled["group"], folds, k, temperature)
        scores[task] = {"accuracy": metrics.accuracy(targets, predicted),
                        "balanced_accuracy": metrics.balanced_accuracy(targets, predicted)}
    return scores


def knn_tiles(cfg: KnnConfig, seed: int) -> pd.DataFrame:
    """The labelled tiles k-NN monitoring uses: relabelled by ``cfg.label_policy``, glass left out, a seeded sample."""
    manifest = pd.read_parquet(cfg.manifest)
    labelled = labelled_tiles(manifest.assign(label_name=relabel(manifest, cfg.label_policy)))
    return labelled.sample(min(cfg.max_tiles, len(labelled)), random_state=seed)


@dataclass
class KnnMonitor:
    """The trainer's k-NN monitor (:class:`bonylib.ssl.trainer.Monitor`): weighted k-NN accuracy and balanced accuracy
    of a backbone's features on the monitoring tiles, slides held out, as flat log keys (``knn_*`` on the tiles'
    labels, ``knn_*_cancer`` on cancer vs benign), with the run's eval transform (its global crop size and
    normalisation).

    It runs between training steps, so it must leave training as it was: torch's RNG is forked and the
    backbone's train/eval mode restored (features taken in train mode would also move BatchNorm statistics).
    """

    cfg: KnnConfig
    seed: int
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]

    @property
    def every_epochs(self) -> int:
        return self.cfg.every_epochs

    def __call__(self, backbone: nn.Module, precision: Precision) -> dict[str, float]:
        was_training = backbone.training
        encoder = from_backbone(backbone, "k-NN monitor", self.input_size, tuple(self.mean), tuple(self.std),
                                identity={"kind": "training", "note": "weights change every epoch; never stored"},
                                precision=precision)
        try:
            with torch.random.fork_rng(devices=[]):
                scores = manifest_knn_scores(encoder, knn_tiles(self.cfg, self.seed), Path(self.cfg.manifest).parent,
                                             self.cfg.folds, self.cfg.k, self.cfg.temperature)
        finally:
            backbone.train(was_training)
        return {f"knn_{metric}{'' if task == 'labels' else '_' + task}": value
                for task, task_scores in scores.items() for metric, value in task_scores.items()}
