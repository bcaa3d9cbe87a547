"""PANDA tiles: the seed's tile classification, split by slide, with the seed's MLP, eva's linear probe and k-NN.

Targets are the tiles' ``label_name`` (the mask's classes under the tiling's label policy). The seed
split tiles at random, so tiles of one slide (one stain, one patient) were in train and test; here
0.8 / 0.1 / 0.1 of the *slides* go to train / val / test (:func:`slide_parts`), stratified by the
slide's ISUP grade from ``train.csv``, and the slide-level ISUP benchmark uses the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bonylib.config import option, section
from bonylib.data.labels import LABEL_NAMES
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.benchmarks.common import (METRIC_NAMES, Column, Head, RunOutput, check_parts, class_targets,
                                                  benchmark_tiles, check_heads, label_scores, settings_of)
from bonylib.evaluation.benchmarks.heads import CLASSIFIERS, UNUSED_PROBE_KEYS, ProbeConfig, classify
from bonylib.evaluation.splits import split_by_slide

TILE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
ISUP_GRADES = tuple(str(grade) for grade in range(6))


@dataclass
class PandaConfig:
    """PANDA tile classification (the seed's §8 PANDA accuracy, with eva's protocol beside it)."""

    manifest: str = option("", "PANDA tile manifest.parquet (bony tile --format panda)")
    data: str = option("", "the PANDA folder: its train.csv gives each slide's ISUP grade, the split's strata")
    classes: list[str] = option([], "tile classes (label_name values; other tiles are left out); empty: every label "
                                "in the manifest, in the order background, benign, G3, G4, G5, cancer")
    heads: list[str] = option(list(CLASSIFIERS), "heads: mlp (the seed's), linear (eva's probe), knn (weighted k-NN)")
    runs: int = option(5, "fits per head and encoder, seeds 0..runs-1 (k-NN has no seed: one run)")
    fractions: list[float] = option([0.8, 0.1, 0.1], "train / val / test shares of the slides")
    split_seed: int = option(0, "seed of the split by slide (fixed over runs: runs differ by the head's seed)")
    max_tiles: int = option(0, "seeded sample of at most this many tiles (0: all), for CPU demos")
    probe: ProbeConfig = section(ProbeConfig, "head training")

    def __post_init__(self) -> None:
        check_heads("panda", self.heads, CLASSIFIERS)
        check_split(self.fractions, self.runs, self.max_tiles, "panda")
        bad = [c for c in self.classes if c not in LABEL_NAMES]
        if bad:
            raise ConfigError(f"panda.classes: {bad[0]!r} is not a tile label ({', '.join(LABEL_NAMES)})")


def check_split(fractions: list[float], runs: int, max_tiles: int, where: str) -> None:
    """Refuse fractions that are not three non-negative shares with train and test positive, and counts below 1 / 0."""
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or fractions[2] <= 0:
        raise ConfigError(f"{where}.fractions: need three shares train, val, test with train and test > 0, "
                          f"got {fractions}")
    if runs < 1 or max_tiles < 0:
        raise ConfigError(f"{where}.runs must be at least 1 and {where}.max_tiles at least 0")


def read_isup(data: Path) -> pd.Series:
    """Each slide's ISUP grade (0-5) from PANDA's ``train.csv``, indexed by ``image_id``."""
    table = Path(data) / "train.csv"
    try:
        frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise BonyError(f"{table}: not found (panda data must be the PANDA folder with train.csv)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BonyError(f"{table}: not a readable CSV ({exc})") from None
    missing = {"image_id", "isup_grade"} - set(frame.columns)
    if missing:
        raise BonyError(f"{table}: missing columns {sorted(missing)}")
    bad = ~frame["isup_grade"].str.strip().isin(ISUP_GRADES)
    if bad.any():
        line = int(np.argmax(bad.to_numpy())) + 2
        raise BonyError(f"{table} line {line}: isup_grade {frame['isup_grade'].iloc[line - 2]!r} is not 0-5")
    return frame.set_index("image_id")["isup_grade"].str.strip().astype(int)


def slide_parts(frame: pd.DataFrame, grades: pd.Series, fractions: list[float], seed: int, where: str) -> np.ndarray:
    """train / val / test of each tile of a PANDA manifest: whole slides, stratified by their ISUP grade."""
    missing = sorted(set(frame["slide_id"]) - set(grades.index))
    if missing:
        raise BonyError(f"{where}: slide {missing[0]!r} is not in train.csv ({len(missing)} slides are not)")
    parts = split_by_slide(frame["slide_id"].to_numpy(), fractions, seed=seed,
                           strata=grades.loc[frame["slide_id"]].to_numpy())
    check_parts(parts, frame["slide_id"].to_numpy(), where)
    return parts


class PandaTiles:
    """PANDA tile classification from CLS embeddings (see the module docstring)."""

    name = "panda"
    title = "PANDA tiles"
    group_unit = "slides"

    def __init__(self, cfg: PandaConfig, selections: Path) -> None:
        self.cfg = cfg
        source = Path(cfg.manifest)

        def of_classes(frame: pd.DataFrame) -> np.ndarray:
            self._classes = list(cfg.classes) or [c for c in LABEL_NAMES if c in set(frame["label_name"])]
            return frame["label_name"].isin(self._classes).to_numpy()

        self.manifest, self.frame, self.ids = benchmark_tiles(source, cfg.max_tiles, cfg.split_seed, selections,
                                                              of_classes)
        self.targets = class_targets(self.frame["label_name"], self._classes)
        self.parts = slide_parts(self.frame, read_isup(Path(cfg.data)), cfg.fractions, cfg.split_seed, str(source))
        self.heads = {h: Head(h, "cls", (("test", 0),) if h == "knn" else tuple(("test", s) for s in range(cfg.runs)))
                      for h in cfg.heads}
        self.columns = [Column(h, m, ("test",), f"{self.title} {h} {METRIC_NAMES[m]}") for h in cfg.heads
                        for m in TILE_METRICS]

    def settings(self, head: str) -> dict[str, Any]:
        return settings_of(self.cfg, self.manifest, [f"probe.{key}" for key in UNUSED_PROBE_KEYS[head]])

    def classes(self, head: str) -> list[str]:
        return self._classes

    def fit(self, head: str, split: str, seed: int, features: np.ndarray, device: torch.device) -> RunOutput:
        test = self.parts == "test"
        predicted, info = classify(head, torch.from_numpy(np.asarray(features, np.float32)),
                                   torch.from_numpy(self.targets), self.parts, len(self._classes), self.cfg.probe,
                                   seed, device)
        truth = self.targets[test]
        groups = self.frame["slide_id"].to_numpy()[test]
        info.update(classes=self._classes, n_test=int(test.sum()), n_test_slides=int(len(set(groups))),
                    n_train=int((self.parts == "train").sum()),
                    confusion_matrix=metrics.confusion_matrix(truth, predicted, len(self._classes)).tolist())
        return RunOutput(label_scores(truth, predicted, self._classes, TILE_METRICS),
                         {"rows": self.ids[test], "groups": groups, "y_true": truth, "y_pred": predicted}, info)
