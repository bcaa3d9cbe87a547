"""Slide-level ISUP grading (beyond the seed): gated attention-MIL on the bag of a slide's tile embeddings.

PANDA's own task: one ISUP grade group (0-5, from ``train.csv``) per slide, no tile labels. eva's ABMIL
protocol (AdamW lr 1e-3, 32 slides a batch, at most 100 epochs, early stopping on validation quadratic
weighted kappa, PANDA's official metric), on the same slide split as the PANDA tile benchmark, with tile
embeddings z-scored by the training slides' tiles like every trained head's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonylib.config import option
from bonylib.errors import ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.benchmarks.common import (METRIC_NAMES, Column, Head, RunOutput, check_classes, curve_of,
                                                  label_scores, benchmark_tiles, settings_of)
from bonylib.evaluation.benchmarks.panda import ISUP_GRADES, check_split, read_slide_table, slide_parts
from bonylib.evaluation.features import Bags, Features
from bonylib.evaluation.probes import GatedAttentionMIL, fit_abmil, predict_logits

SLIDE_METRICS = ("quadratic_weighted_kappa", "balanced_accuracy")


@dataclass
class IsupConfig:
    """Slide-level ISUP grade from tile embeddings (PANDA's challenge task)."""

    manifest: str = option("", "PANDA tile manifest.parquet: every tile of a slide is one instance of its bag")
    data: str = option("", "the PANDA folder whose train.csv gives the ISUP grades")
    runs: int = option(5, "fits per encoder, seeds 0..runs-1")
    fractions: list[float] = option([0.8, 0.1, 0.1], "train / val / test shares of the slides (as panda's)")
    split_seed: int = option(0, "seed of the split by slide (panda's: the same test slides)")
    max_tiles: int = option(0, "seeded sample of at most this many tiles (0: all); with panda's max_tiles, split_seed "
                            "and classes covering every tile, both benchmarks share one embedding pass")
    lr: float = option(1e-3, "AdamW learning rate (eva: 1e-3)")
    batch_size: int = option(32, "slides per step (eva: 32)")
    max_epochs: int = option(100, "most epochs (eva: 100)")
    patience: int = option(10, "epochs without a better validation kappa before stopping; the best is kept")

    def __post_init__(self) -> None:
        check_split(self.fractions, self.runs, self.max_tiles, "isup")
        if min(self.batch_size, self.max_epochs, self.patience) < 1 or self.lr <= 0:
            raise ConfigError("isup lr, batch_size, max_epochs and patience must be positive")


class SlideIsup:
    """Gated attention-MIL on each slide's tile embeddings (see the module docstring)."""

    name = "isup"
    title = "PANDA slides ISUP"
    group_unit = "slides"

    def __init__(self, cfg: IsupConfig, selections: Path) -> None:
        self.cfg = cfg
        source = Path(cfg.manifest)
        self.manifest, frame, _ = benchmark_tiles(source, cfg.max_tiles, cfg.split_seed, selections)
        grades = read_slide_table(Path(cfg.data))["isup_grade"]
        tile_parts = slide_parts(frame, grades, cfg.fractions, cfg.split_seed, str(source))
        self.slides, slide_of_tile = np.unique(frame["slide_id"].to_numpy(), return_inverse=True)
        by_slide = np.argsort(slide_of_tile, kind="stable")
        self.bag_rows = np.split(by_slide, np.cumsum(np.bincount(slide_of_tile))[:-1])
        self.parts = tile_parts[[rows[0] for rows in self.bag_rows]]
        self.grades = grades.loc[self.slides].to_numpy().astype(np.int64)
        check_classes(self.grades, self.parts, ISUP_GRADES, f"{source}: slide ISUP grades")
        self.heads = {"abmil": Head("abmil", "cls", tuple(("test", s) for s in range(cfg.runs)))}
        self.columns = [Column("abmil", m, ("test",), f"{self.title} ABMIL {METRIC_NAMES[m]}") for m in SLIDE_METRICS]

    def settings(self, head: str) -> dict[str, Any]:
        return settings_of(self.cfg, self.manifest)

    def classes(self, head: str) -> list[str]:
        return list(ISUP_GRADES)

    def fit(self, head: str, split: str, seed: int, features: Features, device: torch.device) -> RunOutput:
        train_tiles = np.concatenate([rows for rows, part in zip(self.bag_rows, self.parts) if part == "train"])
        bags = Bags(features.standardized(np.sort(train_tiles)), self.bag_rows)  # each slide read when it is batched
        labels = torch.from_numpy(self.grades)

        def part(name: str) -> tuple[Bags, torch.Tensor]:
            index = np.flatnonzero(self.parts == name)
            return bags.subset(index), labels[index]

        model = GatedAttentionMIL(features.shape[1], len(ISUP_GRADES)).to(device)
        fit = fit_abmil(model, part("train"), part("val"), lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                        max_epochs=self.cfg.max_epochs, patience=self.cfg.patience, seed=seed)
        test_bags, truth = part("test")
        predicted = predict_logits(fit.head, test_bags, batch_size=self.cfg.batch_size).argmax(1).numpy()
        truth = truth.numpy()
        test_slides = self.slides[self.parts == "test"]
        info = {"classes": list(ISUP_GRADES), "n_test": int(len(truth)), "n_test_slides": int(len(truth)),
                "n_train": int((self.parts == "train").sum()), "best_step": fit.best_step, "best_val": fit.best_score,
                "curve": curve_of(fit),
                "confusion_matrix": metrics.confusion_matrix(truth, predicted, len(ISUP_GRADES)).tolist()}
        return RunOutput(label_scores(truth, predicted, ISUP_GRADES, SLIDE_METRICS),
                         {"rows": test_slides, "groups": test_slides, "y_true": truth, "y_pred": predicted}, info)
