"""SICAPv2: the seed's decoder rebuilding the blurred tile, and patch Gleason grading on the official partition.

- ``reconstruction`` (the seed's §8 metric): the decoder regresses the Gaussian-blurred input tile (RGB in
  [0, 1]) from its embedding; MSE (the seed's), PSNR and SSIM per test tile.
- ``patches`` (what SICAPv2's users report): each patch's Gleason class (NC, G3, G4, G5: the one-hot
  columns of the partition spreadsheets) by eva's linear probe on the patch's embedding, the mean of its
  tiles' embeddings (a 512-px patch at 10x is cut into several tiles by ``bony tile``). Fitted and scored
  on each configured partition: ``Test`` (the held-out patients) and the cross-validation folds
  ``Val1``-``Val4``, whose test patients together cover the training patients once. ``patches_knn``: the
  same by weighted k-NN (DINO's frozen-feature protocol; no training, so no validation patients).
- ``slides``: each test slide's Gleason score from its patches, with no slide-level training: the k-NN of
  ``patches_knn`` classifies every patch of the slide (those in no spreadsheet too), and the patterns' patch
  counts give the score by the grading rules (:func:`bonylib.data.labels.gleason_score`: primary the most
  extensive, the highest always reported), scored as ISUP grade groups against ``wsi_labels.xlsx``. A pattern
  on fewer than 5 % of a slide's cancer patches is dropped first: under "the highest is always reported", one
  stray patch call would otherwise set the score. A partition's test slides are those its Test sheet names
  (the full spreadsheets name every slide, also those of patches a partial copy lacks).

Both read the partition spreadsheets SICAPv2 publishes (``partition/Test/{Train,Test}.xlsx``,
``partition/Validation/Val<k>/{Train,Test}.xlsx``); the patients of each partition's Train sheet are
split again by patient for the validation part early stopping needs. The reconstruction uses the
``Test`` partition, or with ``reconstruction_fractions`` (the seed's 0.8 / 0.1 / 0.1) a split of all the
patients at those shares; its ``scored_parts`` add the validation score the seed reported. The seed does
not state its blur's σ: ``blur_sigma`` is ours (2 px at 224), and the SICAPv2 chapter shows how the score
moves with it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchvision.transforms.v2 import functional as TF

from bonylib.config import option, section
from bonylib.data.datasets import TileDataset
from bonylib.data.labels import MINOR_PATTERN_FRACTION, gleason_score, isup_grade
from bonylib.data.sicapv2_tables import PATCH_CLASSES, partition_folder, read_sheet, read_slide_labels, slide_of
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.benchmarks.common import (IMAGE_METRICS, METRIC_NAMES, Column, Head, LastFit, RunOutput,
                                                  check_classes, check_parts, check_scored, label_scores,
                                                  benchmark_tiles, check_heads, settings_of, with_validation)
from bonylib.evaluation.benchmarks.heads import UNUSED_PROBE_KEYS, DecoderConfig, ProbeConfig, classify, fit_and_decode
from bonylib.evaluation.benchmarks.panda import ISUP_GRADES, check_split
from bonylib.evaluation.features import Features, group_means
from bonylib.evaluation.splits import split_by_slide

log = logging.getLogger(__name__)

HEADS = ("reconstruction", "patches", "patches_knn", "slides")
PATCH_HEADS = {"patches": "linear", "patches_knn": "knn", "slides": "knn"}
"""The patch classifier each classification head fits."""
PATCH_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "quadratic_weighted_kappa")
SLIDE_METRICS = ("quadratic_weighted_kappa", "accuracy")
_PARTITION = re.compile(r"^(Test|Val[1-9])$")
RECONSTRUCTION_PARTITION = "Test"


@dataclass
class Sicapv2Config:
    """SICAPv2 blurred-tile reconstruction (the seed's §8 MSE) and patch grading on the official partition."""

    manifest: str = option("", "SICAPv2 tile manifest.parquet (bony tile --format sicapv2)")
    data: str = option("", "the SICAPv2 folder with partition/Test and partition/Validation/Val<k>")
    heads: list[str] = option(["reconstruction", "patches"], "heads: reconstruction (blurred tile: MSE, PSNR, SSIM), "
                              "patches (linear probe of the patch's Gleason class), patches_knn (the same by k-NN), "
                              "slides (each test slide's Gleason score from its patches' predicted classes)")
    partitions: list[str] = option(["Test", "Val1", "Val2", "Val3", "Val4"], "official partitions of the patch "
                                   "classification: Test and the folds Val1..Val4 (the reconstruction uses Test)")
    runs: int = option(5, "fits per head, partition and encoder, seeds 0..runs-1")
    val_fraction: float = option(0.2, "share of each partition's training patients held out for early stopping")
    split_seed: int = option(0, "seed of that hold-out")
    blur_sigma: float = option(2.0, "standard deviation in pixels (at out_size) of the Gaussian blur of the target "
                               "(the seed does not state it: 2 is ours)")
    reconstruction_fractions: list[float] = option([], "train / val / test shares of the patients for the "
                                                   "reconstruction (the seed's: 0.8, 0.1, 0.1); empty: the Test "
                                                   "partition, val_fraction of its training patients held out")
    scored_parts: list[str] = option(["test"], "parts the reconstruction is scored on, each a column: test, val (the "
                                     "seed reported validation MSE; the first is the results page's summary)")
    max_tiles: int = option(0, "seeded sample of at most this many tiles (0: all), for CPU demos")
    probe: ProbeConfig = section(ProbeConfig, "patch classifier (linear probe) training")
    decoder: DecoderConfig = section(DecoderConfig, "reconstruction decoder training")

    def __post_init__(self) -> None:
        check_heads("sicapv2", self.heads, HEADS)
        check_scored("sicapv2", self.scored_parts)
        if self.reconstruction_fractions:
            check_split(self.reconstruction_fractions, self.runs, self.max_tiles, "sicapv2", "reconstruction_fractions")
        bad = [p for p in self.partitions if not _PARTITION.match(str(p))]
        if bad or len(set(self.partitions)) != len(self.partitions):
            raise ConfigError(f"sicapv2.partitions: {bad[0] if bad else 'a repeated name'!r} is not one of Test, "
                              f"Val1..Val9")
        if "reconstruction" in self.heads and RECONSTRUCTION_PARTITION not in self.partitions:
            raise ConfigError("sicapv2.partitions must include Test for the reconstruction")
        if not 0 < self.val_fraction < 1 or self.blur_sigma <= 0 or self.runs < 1 or self.max_tiles < 0:
            raise ConfigError("sicapv2: val_fraction in (0, 1), blur_sigma > 0, runs >= 1 and max_tiles >= 0 are "
                              "needed")


def read_partition(data: Path, partition: str) -> pd.DataFrame:
    """``image_name``, ``part`` (train/test) and ``label`` (index in :data:`PATCH_CLASSES`) of a partition's patches."""
    sheets = []
    for part in ("Train", "Test"):
        sheet = partition_folder(data, partition) / f"{part}.xlsx"
        if not sheet.is_file():
            raise BonyError(f"{sheet}: not found (sicapv2.data must be the SICAPv2 folder with its partition/)")
        sheets.append(read_sheet(sheet).assign(part=part.lower()))
    return pd.concat(sheets, ignore_index=True)[["image_name", "part", "label"]]


class Sicapv2:
    """SICAPv2 reconstruction and patch classification (see the module docstring)."""

    name = "sicapv2"
    title = "SICAPv2"
    group_unit = "patients"

    def __init__(self, cfg: Sicapv2Config, selections: Path) -> None:
        self.cfg = cfg
        self.manifest, self.frame, self.ids = benchmark_tiles(Path(cfg.manifest), cfg.max_tiles, cfg.split_seed,
                                                              selections)
        self.patches, self.tile_patch = np.unique(self.frame["slide_id"].to_numpy(), return_inverse=True)
        patient = self.frame.groupby("slide_id")["group"].first()
        self.patients = patient.loc[self.patches].to_numpy()
        self.labels = np.full(len(self.patches), -1, np.int64)
        self.patch_parts: dict[str, np.ndarray] = {}
        for partition in cfg.partitions:
            sheet = read_partition(Path(cfg.data), partition)
            stems = sheet["image_name"].str.replace(r"\.jpg$", "", regex=True).to_numpy()
            where = pd.Index(self.patches).get_indexer(stems)
            listed = where >= 0
            parts = np.full(len(self.patches), "", dtype=object)
            parts[where[listed]] = sheet["part"].to_numpy()[listed]
            self.labels[where[listed]] = sheet["label"].to_numpy()[listed]
            used = parts != ""
            parts[used] = with_validation(parts[used].astype(str), self.patients[used], cfg.val_fraction,
                                          cfg.split_seed)
            self.patch_parts[partition] = parts.astype(str)
        if any(head in PATCH_HEADS for head in cfg.heads):  # a patch classifier is fitted
            self._check_classes(cfg)
        if "slides" in cfg.heads:
            self._read_slides(Path(cfg.data))
        runs = tuple((p, s) for p in cfg.partitions for s in range(cfg.runs))
        self.heads = {h: Head(h, "cls", tuple((part, s) for s in range(cfg.runs) for part in cfg.scored_parts)
                              if h == "reconstruction" else tuple((p, 0) for p in cfg.partitions)
                              if PATCH_HEADS[h] == "knn" else runs) for h in cfg.heads}
        self.columns = []
        if "reconstruction" in cfg.heads:
            self.columns += [Column("reconstruction", m, (part,), f"{self.title} reconstruction {METRIC_NAMES[m]}")
                             for part in cfg.scored_parts for m in IMAGE_METRICS]
        self._last = LastFit()
        folds = tuple(p for p in cfg.partitions if p != "Test")
        groups = [splits for splits in ((("Test",) if "Test" in cfg.partitions else ()), folds) if splits]
        for head, what, shown in (("patches", "patches", PATCH_METRICS), ("patches_knn", "patches k-NN", PATCH_METRICS),
                                  ("slides", "slides ISUP from patches", SLIDE_METRICS)):
            if head in cfg.heads:
                self.columns += [Column(head, m, splits, f"{self.title} {what} {METRIC_NAMES[m]}",
                                        headline=m in ("balanced_accuracy", "quadratic_weighted_kappa"))
                                 for splits in groups for m in shown]

    def _check_classes(self, cfg: Sicapv2Config) -> None:
        """Refuse a column of patch scores that cannot be wrong (:func:`check_classes`): the Test partition, or the folds
        it pools (Val1..Val4, whose predictions are scored together), trained on fewer than two classes. A single fold
        of one class in a pool is scored with the others (its patches are predicted as that class) and named in a
        warning: on small copies a fold's few training patients may all be of one class."""
        folds = [p for p in cfg.partitions if p != "Test"]
        where = f"{Path(cfg.data) / 'partition'}"
        for group in ([["Test"]] if "Test" in cfg.partitions else []) + ([folds] if folds else []):
            parts = np.concatenate([self.patch_parts[p] for p in group])
            check_classes(np.tile(self.labels, len(group)), parts, PATCH_CLASSES,
                          f"{where}: {'+'.join(group)} patch classes")
            for fold in group if len(group) > 1 else []:
                trained = np.unique(self.labels[self.patch_parts[fold] == "train"])
                if len(trained) < 2:
                    log.warning("%s: %s trains on one patch class (%s): its test patches are all predicted as it, "
                                "and scored with the other folds'", where, fold, PATCH_CLASSES[int(trained[0])]
                                if len(trained) else "none")

    def _read_slides(self, data: Path) -> None:
        """For the ``slides`` head: each patch's slide, each slide's ISUP grade and patient, and each partition's test
        slides (named by the patches its Test sheet lists)."""
        table = read_slide_labels(data)
        self.patch_slide = np.array([slide_of(patch) for patch in self.patches])
        self.slides = np.unique(self.patch_slide)
        unknown = sorted(set(self.slides) - set(table.index))
        if unknown:
            raise BonyError(f"{data / 'wsi_labels.xlsx'}: no Gleason score for slide {unknown[0]!r} "
                            f"({len(unknown)} slides of the manifest are not listed)")
        rows = table.loc[self.slides]
        self.slide_grades = np.array([isup_grade(None if p == 0 else (p, s))
                                      for p, s in zip(rows["primary"], rows["secondary"])])
        self.slide_patients = rows["patient"].to_numpy()
        self.test_slides: dict[str, np.ndarray] = {}
        for partition in self.cfg.partitions:
            names = read_sheet(partition_folder(data, partition) / "Test.xlsx")["image_name"]
            self.test_slides[partition] = np.isin(self.slides, [slide_of(name) for name in names])

    @cached_property
    def blurred(self) -> torch.Tensor:
        """Every tile at the decoder's side, Gaussian-blurred: (N, 3, S, S) in [0, 1], read once when a run is due."""
        side, sigma = self.cfg.decoder.out_size, self.cfg.blur_sigma
        tiles = TileDataset(self.frame, root=self.manifest.parent, tile_px=side)
        images = torch.from_numpy(np.stack([np.asarray(tiles.read(i)) for i in range(len(tiles))])).permute(0, 3, 1, 2)
        kernel = 2 * math.ceil(3 * sigma) + 1
        return TF.gaussian_blur(images.float() / 255, [kernel, kernel], [sigma, sigma])

    def settings(self, head: str) -> dict[str, Any]:
        unused = (["probe"] if head == "reconstruction" else
                  ["decoder", "blur_sigma", *(f"probe.{key}" for key in UNUSED_PROBE_KEYS[PATCH_HEADS[head]])])
        return settings_of(self.cfg, self.manifest, unused)

    def classes(self, head: str) -> list[str]:
        return list(ISUP_GRADES) if head == "slides" else list(PATCH_CLASSES) if head in PATCH_HEADS else []

    def _patch_means(self, features: Features) -> torch.Tensor:
        """Each patch's embedding: the mean of its tiles'."""
        return group_means(features, self.tile_patch, len(self.patches))

    def fit(self, head: str, split: str, seed: int, features: Features, device: torch.device) -> RunOutput:
        if head == "reconstruction":
            return self._reconstruct(features, split, seed, device)
        if head == "slides":
            return self._grade_slides(self._patch_means(features), split, seed, device)
        patch_parts = self.patch_parts[split]
        if head == "patches_knn":  # k-NN is not trained: the validation patients vote as well
            patch_parts = np.where(patch_parts == "val", "train", patch_parts)
        used = np.flatnonzero(patch_parts != "")
        means = self._patch_means(features)
        parts = patch_parts[used]
        predictions, info = classify(PATCH_HEADS[head], Features(means[used]), torch.from_numpy(self.labels[used]), parts,
                                     len(PATCH_CLASSES), self.cfg.probe, seed, device)
        predicted = predictions["test"]
        test = used[parts == "test"]
        truth = self.labels[test]
        info.update(classes=list(PATCH_CLASSES), n_test=int(len(test)),
                    n_test_slides=int(len(set(self.patients[test]))),
                    n_train=int((parts == "train").sum()),
                    confusion_matrix=metrics.confusion_matrix(truth, predicted, len(PATCH_CLASSES)).tolist())
        return RunOutput(label_scores(truth, predicted, PATCH_CLASSES, PATCH_METRICS),
                         {"rows": self.patches[test], "groups": self.patients[test], "y_true": truth,
                          "y_pred": predicted}, info)

    def _grade_slides(self, means: torch.Tensor, split: str, seed: int, device: torch.device) -> RunOutput:
        """k-NN over the labelled patches of ``split``'s training patients classifies every patch of its test slides;
        each slide's predicted patterns, counted in patches, give its Gleason score and ISUP grade."""
        on_test_slide = self.test_slides[split][np.searchsorted(self.slides, self.patch_slide)]
        training = np.isin(self.patch_parts[split], ("train", "val"))
        parts = np.where(on_test_slide, "test", np.where(training, "train", ""))
        used = np.flatnonzero(parts != "")
        predictions, info = classify(PATCH_HEADS["slides"], Features(means[used]), torch.from_numpy(self.labels[used]),
                                     parts[used], len(PATCH_CLASSES), self.cfg.probe, seed, device)
        predicted = predictions["test"]
        test_patches = used[parts[used] == "test"]
        slide_rows = np.flatnonzero(self.test_slides[split])
        scores, grades = [], []
        for row in slide_rows:
            mine = predicted[self.patch_slide[test_patches] == self.slides[row]]
            areas = {int(PATCH_CLASSES[k][1]): float(np.sum(mine == k)) for k in range(1, len(PATCH_CLASSES))}
            cancer = sum(areas.values())
            score = gleason_score({g: a for g, a in areas.items() if a >= MINOR_PATTERN_FRACTION * cancer})
            scores.append("benign" if score is None else f"{score[0]}+{score[1]}")
            grades.append(isup_grade(score))
        truth, estimate = self.slide_grades[slide_rows], np.array(grades)
        info.update(classes=list(ISUP_GRADES), n_test=int(len(slide_rows)),
                    n_test_slides=int(len(slide_rows)), n_test_patches=int(len(test_patches)),
                    n_train=int((parts == "train").sum()), slides=self.slides[slide_rows].tolist(),
                    predicted_scores=scores,
                    confusion_matrix=metrics.confusion_matrix(truth, estimate, len(ISUP_GRADES)).tolist())
        return RunOutput(label_scores(truth, estimate, ISUP_GRADES, SLIDE_METRICS),
                         {"rows": self.slides[slide_rows], "groups": self.slide_patients[slide_rows], "y_true": truth,
                          "y_pred": estimate}, info)

    @cached_property
    def reconstruction_parts(self) -> np.ndarray:
        """train / val / test of each tile for the reconstruction: the Test partition's (with its held-out
        validation patients), or the patients split at ``reconstruction_fractions``."""
        if not self.cfg.reconstruction_fractions:
            return self.patch_parts[RECONSTRUCTION_PARTITION][self.tile_patch]
        groups = self.frame["group"].to_numpy()
        parts = split_by_slide(groups, self.cfg.reconstruction_fractions, seed=self.cfg.split_seed)
        check_parts(parts, groups, f"{self.cfg.manifest}: sicapv2 reconstruction")
        return parts

    def _reconstruct(self, features: Features, split: str, seed: int, device: torch.device) -> RunOutput:
        """Decode the blurred tile from each tile's embedding; scored on the ``split`` part's tiles."""
        cfg = self.cfg.decoder
        parts = self.reconstruction_parts
        decoded, info = self._last(("reconstruction", seed), features, lambda: fit_and_decode(
            features, self.blurred, parts, 3, "regression", cfg, seed, device, cfg.out_size, scored=self.cfg.scored_parts))
        test = parts == split
        decoded = decoded[split]
        truth = self.blurred[torch.from_numpy(test)]
        scores = {"mse": metrics.mse(truth, decoded), "psnr": metrics.psnr(truth, decoded),
                  "ssim": metrics.ssim(truth, decoded)}
        groups = self.frame["group"].to_numpy()[test]
        shown = slice(0, cfg.examples)
        info = {**info, "n_test": int(test.sum()), "n_test_slides": int(len(set(groups))),
                "n_train": int((parts == "train").sum())}
        return RunOutput({name: float(values.mean()) for name, values in scores.items()},
                         {"rows": self.ids[test], "groups": groups, **scores, "example_rows": self.ids[test][shown],
                          "example_true": truth[shown].numpy().astype(np.float16),
                          "example_pred": decoded[shown].numpy().astype(np.float16)}, info)
