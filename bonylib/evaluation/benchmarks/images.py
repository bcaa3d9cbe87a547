"""A folder of labelled images (``bony tile --format imagefolder``): each image's class by k-fold cross-validation.

Each image's embedding is the mean of its tiles' (a tissue-microarray patch tiled at the target resolution is
one tile or a few); its class is its ``image_label``, the sub-folder it came from. Every image is tested once,
in the fold that holds it out, by weighted k-NN (DINO's frozen-feature protocol) and eva's linear probe (the
training folds' images split again for early stopping) on stratified folds.

Folds keep a group (a patient, a core: ``<class>/<group>/<image>`` in the folder) on one side when every
image has one, with scikit-learn's ``StratifiedGroupKFold``. A folder without group ids (Arvaniti's TMA
patches) can only be split by image (``StratifiedKFold``): patches of one core may then be on both sides of a
fold, which flatters every encoder alike; the table's columns and the log say so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from bonylib.config import option, section
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.benchmarks.common import (METRIC_NAMES, Column, Head, RunOutput, benchmark_tiles, check_classes,
                                                  check_heads, class_targets, label_scores, settings_of,
                                                  with_validation)
from bonylib.evaluation.benchmarks.heads import CLASSIFIERS, UNUSED_PROBE_KEYS, ProbeConfig, classify
from bonylib.evaluation.features import Features, group_means

IMAGE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")

log = logging.getLogger(__name__)


@dataclass
class ImagesConfig:
    """Image classification by k-fold cross-validation on a tiled image folder."""

    manifest: str = option("", "tile manifest.parquet of an image folder (bony tile --format imagefolder)")
    title: str = option("images", "how the results table names the dataset (e.g. Arvaniti TMA)")
    classes: list[str] = option([], "image classes in order (image_label values; other images are left out); empty: "
                                "every class in the manifest, sorted")
    heads: list[str] = option(["knn", "linear"], "heads: knn (weighted k-NN), linear (eva's probe), mlp (the seed's)")
    folds: int = option(5, "cross-validation folds; every image is tested once")
    runs: int = option(1, "fits per fold of the trained heads, seeds 0..runs-1 (k-NN has no seed: one)")
    val_fraction: float = option(0.2, "share of the training folds' images (groups) held out for early stopping")
    split_seed: int = option(0, "seed of the folds and of that hold-out")
    probe: ProbeConfig = section(ProbeConfig, "head training")

    def __post_init__(self) -> None:
        check_heads("images", self.heads, CLASSIFIERS)
        if self.folds < 2 or self.runs < 1 or not 0 < self.val_fraction < 1:
            raise ConfigError("images: folds >= 2, runs >= 1 and val_fraction in (0, 1) are needed")


class ImageClasses:
    """k-fold image classification on an image folder's tiles (see the module docstring)."""

    name = "images"

    def __init__(self, cfg: ImagesConfig, selections: Path) -> None:
        self.cfg, self.title = cfg, cfg.title
        source = Path(cfg.manifest)

        def labelled(frame: pd.DataFrame) -> np.ndarray:
            if "image_label" not in frame:
                raise BonyError(f"{source}: no image_label column (tile an image folder with bony tile --format "
                                f"imagefolder)")
            self._classes = list(cfg.classes) or sorted(set(frame["image_label"]) - {""})
            return frame["image_label"].isin(self._classes).to_numpy()

        self.manifest, self.frame, _ = benchmark_tiles(source, 0, cfg.split_seed, selections, labelled)
        self.images, self.tile_image = np.unique(self.frame["slide_id"].to_numpy(), return_inverse=True)
        per_image = self.frame.groupby("slide_id").agg(label=("image_label", "first"), labels=("image_label", "nunique"),
                                                       group=("group", "first")).loc[self.images]
        if (per_image["labels"] > 1).any():
            raise BonyError(f"{source}: image {per_image.index[per_image['labels'] > 1][0]!r} has tiles of two classes")
        self.targets = class_targets(per_image["label"], self._classes)
        self.by_group = bool((per_image["group"] != "").all())
        self.units = per_image["group"].to_numpy() if self.by_group else self.images
        self.group_unit = "groups" if self.by_group else "images"  # what the intervals resample
        # every image is trained on in some folds and tested in one: a folder of one class cannot be scored
        check_classes(np.concatenate([self.targets, self.targets]), np.repeat(["train", "test"], len(self.targets)),
                      self._classes, f"{source}: image classes")
        counts = np.bincount(self.targets, minlength=len(self._classes))
        if counts.min() < cfg.folds:
            raise BonyError(f"{source}: class {self._classes[int(counts.argmin())]!r} has {counts.min()} images, fewer "
                            f"than the {cfg.folds} folds")
        self.fold = self._folds()
        if not self.by_group:
            log.warning("%s: no group ids (patient or core) for its images: the %d folds are by image, and images of one "
                        "core may be on both sides of a fold", source, cfg.folds)
        splits = tuple(f"fold{k}" for k in range(1, cfg.folds + 1))
        self.heads = {h: Head(h, "cls", tuple((split, seed) for split in splits
                                              for seed in range(1 if h == "knn" else cfg.runs))) for h in cfg.heads}
        unit = "group" if self.by_group else "image"
        self.columns = [Column(h, m, splits, f"{self.title} {h} {METRIC_NAMES[m]}, folds by {unit}",
                               headline=m == "balanced_accuracy") for h in cfg.heads for m in IMAGE_METRICS]

    def _folds(self) -> np.ndarray:
        """The fold (1..k) that tests each image: stratified by class, whole groups per fold where there are groups."""
        splitter = (StratifiedGroupKFold if self.by_group else StratifiedKFold)(
            n_splits=self.cfg.folds, shuffle=True, random_state=self.cfg.split_seed)
        fold = np.zeros(len(self.images), np.int64)
        for k, (_, test) in enumerate(splitter.split(self.images, self.targets, self.units if self.by_group else None),
                                      start=1):
            fold[test] = k
        return fold

    def settings(self, head: str) -> dict[str, Any]:
        return settings_of(self.cfg, self.manifest, [f"probe.{key}" for key in UNUSED_PROBE_KEYS[head]])

    def classes(self, head: str) -> list[str]:
        return self._classes

    def fit(self, head: str, split: str, seed: int, features: Features, device: torch.device) -> RunOutput:
        k = int(split.removeprefix("fold"))
        parts = np.where(self.fold == k, "test", "train")
        if head != "knn":  # early stopping needs validation images, drawn from the training folds
            parts = with_validation(parts, self.units, self.cfg.val_fraction, self.cfg.split_seed + k)
        means = group_means(features, self.tile_image, len(self.images))
        predictions, info = classify(head, Features(means), torch.from_numpy(self.targets), parts, len(self._classes),
                                     self.cfg.probe, seed, device)
        predicted = predictions["test"]
        test = parts == "test"
        truth = self.targets[test]
        info.update(classes=self._classes, n_test=int(test.sum()), n_test_slides=int(len(set(self.units[test]))),
                    n_train=int((parts == "train").sum()), folds_by="group" if self.by_group else "image",
                    confusion_matrix=metrics.confusion_matrix(truth, predicted, len(self._classes)).tolist())
        return RunOutput(label_scores(truth, predicted, self._classes, IMAGE_METRICS),
                         {"rows": self.images[test], "groups": self.units[test], "y_true": truth, "y_pred": predicted},
                         info)
