"""PANDA tiles: the seed's tile classification, split by slide, with the seed's MLP, eva's linear probe and k-NN.

Targets are the tiles' ``label_name`` (the mask's classes under the tiling's label policy). The seed
split 0.8 / 0.1 / 0.1, most likely of the tiles, so tiles of one slide (one stain, one patient) were in
train and test; here the *slides* are split (:func:`slide_parts`), stratified by the slide's ISUP grade
from ``train.csv``, and the slide-level ISUP benchmark uses the same split.

The seed's five classes ("0: background de l'image, 1: Tissu sain, 2: Gleason 3, 3: Gleason 4, 4: Gleason
5", the highest Gleason pattern of the tile's mask) are Radboud's grading: Karolinska's masks mark cancer
without a pattern (Bony's sixth class, ``cancer``). ``classes`` picks the five, and ``providers`` states
what happens to Karolinska's slides: ``[radboud]`` leaves them out whole (``configs/evaluate/seed.yaml``),
since keeping their benign and background tiles while dropping their cancer ones would make "Karolinska
stain" a shortcut to "not cancer".
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
from bonylib.evaluation.benchmarks.common import (METRIC_NAMES, Column, Head, LastFit, RunOutput, check_classes,
                                                  check_parts, check_scored, class_targets, benchmark_tiles,
                                                  check_heads, label_scores, settings_of)
from bonylib.evaluation.benchmarks.heads import CLASSIFIERS, UNUSED_PROBE_KEYS, ProbeConfig, classify
from bonylib.evaluation.features import Features
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
    providers: list[str] = option([], "data providers (train.csv's data_provider) whose slides are kept; empty: all")
    heads: list[str] = option(list(CLASSIFIERS), "heads: mlp (the seed's), linear (eva's probe), knn (weighted k-NN)")
    runs: int = option(5, "fits per head and encoder, seeds 0..runs-1 (k-NN has no seed: one run)")
    fractions: list[float] = option([0.8, 0.1, 0.1], "train / val / test shares of the slides")
    scored_parts: list[str] = option(["test"], "parts scored, each a column of the table: test, val (the first is "
                                     "the results page's summary)")
    split_seed: int = option(0, "seed of the split by slide (fixed over runs: runs differ by the head's seed)")
    max_tiles: int = option(0, "seeded sample of at most this many tiles (0: all), for CPU demos")
    probe: ProbeConfig = section(ProbeConfig, "head training")

    def __post_init__(self) -> None:
        check_heads("panda", self.heads, CLASSIFIERS)
        check_scored("panda", self.scored_parts)
        check_split(self.fractions, self.runs, self.max_tiles, "panda")
        bad = [c for c in self.classes if c not in LABEL_NAMES]
        if bad:
            raise ConfigError(f"panda.classes: {bad[0]!r} is not a tile label ({', '.join(LABEL_NAMES)})")


def check_split(fractions: list[float], runs: int, max_tiles: int, where: str, key: str = "fractions") -> None:
    """Refuse fractions (``<where>.<key>``) that are not three non-negative shares with train and test positive, and
    counts below 1 / 0."""
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or fractions[2] <= 0:
        raise ConfigError(f"{where}.{key}: need three shares train, val, test with train and test > 0, "
                          f"got {fractions}")
    if runs < 1 or max_tiles < 0:
        raise ConfigError(f"{where}.runs must be at least 1 and {where}.max_tiles at least 0")


def read_slide_table(data: Path) -> pd.DataFrame:
    """PANDA's ``train.csv``, indexed by ``image_id``: ``isup_grade`` (0-5) and ``data_provider``, each checked."""
    table = Path(data) / "train.csv"
    try:
        frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise BonyError(f"{table}: not found (panda data must be the PANDA folder with train.csv)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BonyError(f"{table}: not a readable CSV ({exc})") from None
    missing = {"image_id", "isup_grade", "data_provider"} - set(frame.columns)
    if missing:
        raise BonyError(f"{table}: missing columns {sorted(missing)}")
    bad = ~frame["isup_grade"].str.strip().isin(ISUP_GRADES)
    if bad.any():
        line = int(np.argmax(bad.to_numpy())) + 2
        raise BonyError(f"{table} line {line}: isup_grade {frame['isup_grade'].iloc[line - 2]!r} is not 0-5")
    frame = frame.set_index("image_id")
    return frame.assign(isup_grade=frame["isup_grade"].str.strip().astype(int),
                        data_provider=frame["data_provider"].str.strip().str.lower())


def benchmarked(frame: pd.DataFrame, classes: list[str], providers: list[str], provider: pd.Series) -> np.ndarray:
    """Which tiles of a manifest the benchmark reads: those of ``classes``, on slides whose ``provider`` (by
    ``image_id``) is one of ``providers`` (all when empty)."""
    keep = frame["label_name"].isin(classes)
    if providers:
        keep &= frame["slide_id"].map(provider).isin(providers)
    return keep.to_numpy()


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

        slides = read_slide_table(Path(cfg.data))
        unknown = sorted(set(cfg.providers) - set(slides["data_provider"]))
        if unknown:
            raise BonyError(f"{Path(cfg.data) / 'train.csv'}: no slide of data_provider {unknown[0]!r} "
                            f"(panda.providers; it has {', '.join(sorted(set(slides['data_provider'])))})")

        def of_classes(frame: pd.DataFrame) -> np.ndarray:
            self._classes = list(cfg.classes) or [c for c in LABEL_NAMES if c in set(frame["label_name"])]
            return benchmarked(frame, self._classes, cfg.providers, slides["data_provider"])

        self.manifest, self.frame, self.ids = benchmark_tiles(source, cfg.max_tiles, cfg.split_seed, selections,
                                                              of_classes)
        self.targets = class_targets(self.frame["label_name"], self._classes)
        self.parts = slide_parts(self.frame, slides["isup_grade"], cfg.fractions, cfg.split_seed, str(source))
        check_classes(self.targets, self.parts, self._classes, f"{source}: panda tile classes")
        scored = cfg.scored_parts
        self.heads = {h: Head(h, "cls", tuple((part, s) for s in (range(1) if h == "knn" else range(cfg.runs))
                                              for part in scored)) for h in cfg.heads}
        self.columns = [Column(h, m, (part,), f"{self.title} {h} {METRIC_NAMES[m]}") for h in cfg.heads
                        for part in scored for m in TILE_METRICS]
        self._last = LastFit()

    def settings(self, head: str) -> dict[str, Any]:
        return settings_of(self.cfg, self.manifest, [f"probe.{key}" for key in UNUSED_PROBE_KEYS[head]])

    def classes(self, head: str) -> list[str]:
        return self._classes

    def fit(self, head: str, split: str, seed: int, features: Features, device: torch.device) -> RunOutput:
        """Scores on the rows of part ``split`` (val or test) of the head fitted with ``seed`` (fitted once for both)."""
        predictions, fitted = self._last((head, seed), features, lambda: classify(
            head, features, torch.from_numpy(self.targets), self.parts,
            len(self._classes), self.cfg.probe, seed, device, self.cfg.scored_parts))
        scored = self.parts == split
        truth, predicted = self.targets[scored], predictions[split]
        groups = self.frame["slide_id"].to_numpy()[scored]
        info = {**fitted, "classes": self._classes, "n_test": int(scored.sum()),
                "n_test_slides": int(len(set(groups))), "n_train": int((self.parts == "train").sum()),
                "confusion_matrix": metrics.confusion_matrix(truth, predicted, len(self._classes)).tolist()}
        return RunOutput(label_scores(truth, predicted, self._classes, TILE_METRICS),
                         {"rows": self.ids[scored], "groups": groups, "y_true": truth, "y_pred": predicted}, info)
