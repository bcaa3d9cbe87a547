"""SICAPv2: the seed's decoder rebuilding the blurred tile, and patch Gleason grading on the official partition.

- ``reconstruction`` (the seed's §8 metric): the decoder regresses the Gaussian-blurred input tile (RGB in
  [0, 1]) from its embedding; MSE (the seed's), PSNR and SSIM per test tile.
- ``patches`` (what SICAPv2's users report): each patch's Gleason class (NC, G3, G4, G5: the one-hot
  columns of the partition spreadsheets) by eva's linear probe on the patch's embedding, the mean of its
  tiles' embeddings (a 512-px patch at 10x is cut into several tiles by ``bony tile``). Fitted and scored
  on each configured partition: ``Test`` (the held-out patients) and the cross-validation folds
  ``Val1``-``Val4``, whose test patients together cover the training patients once.

Both read the partition spreadsheets SICAPv2 publishes (``partition/Test/{Train,Test}.xlsx``,
``partition/Validation/Val<k>/{Train,Test}.xlsx``); the patients of each partition's Train sheet are
split again by patient for the validation part early stopping needs. The reconstruction uses the
``Test`` partition.
"""

from __future__ import annotations

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
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.benchmarks.common import (IMAGE_METRICS, METRIC_NAMES, Column, Head, RunOutput, check_classes,
                                                  label_scores, benchmark_tiles, check_heads, settings_of,
                                                  with_validation)
from bonylib.evaluation.benchmarks.heads import UNUSED_PROBE_KEYS, DecoderConfig, ProbeConfig, classify, fit_and_decode

HEADS = ("reconstruction", "patches")
PATCH_CLASSES = ("NC", "G3", "G4", "G5")
PATCH_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "quadratic_weighted_kappa")
_PARTITION = re.compile(r"^(Test|Val[1-9])$")
RECONSTRUCTION_PARTITION = "Test"


@dataclass
class Sicapv2Config:
    """SICAPv2 blurred-tile reconstruction (the seed's §8 MSE) and patch grading on the official partition."""

    manifest: str = option("", "SICAPv2 tile manifest.parquet (bony tile --format sicapv2)")
    data: str = option("", "the SICAPv2 folder with partition/Test and partition/Validation/Val<k>")
    heads: list[str] = option(list(HEADS), "heads: reconstruction (blurred tile: MSE, PSNR, SSIM), patches (linear "
                              "probe of the patch's Gleason class)")
    partitions: list[str] = option(["Test", "Val1", "Val2", "Val3", "Val4"], "official partitions of the patch "
                                   "classification: Test and the folds Val1..Val4 (the reconstruction uses Test)")
    runs: int = option(5, "fits per head, partition and encoder, seeds 0..runs-1")
    val_fraction: float = option(0.2, "share of each partition's training patients held out for early stopping")
    split_seed: int = option(0, "seed of that hold-out")
    blur_sigma: float = option(2.0, "standard deviation in pixels (at out_size) of the Gaussian blur of the target")
    max_tiles: int = option(0, "seeded sample of at most this many tiles (0: all), for CPU demos")
    probe: ProbeConfig = section(ProbeConfig, "patch classifier (linear probe) training")
    decoder: DecoderConfig = section(DecoderConfig, "reconstruction decoder training")

    def __post_init__(self) -> None:
        check_heads("sicapv2", self.heads, HEADS)
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
    folder = Path(data) / "partition" / ("Test" if partition == "Test" else f"Validation/{partition}")
    sheets = []
    for part in ("Train", "Test"):
        sheet = folder / f"{part}.xlsx"
        try:
            table = pd.read_excel(sheet)
        except FileNotFoundError:
            raise BonyError(f"{sheet}: not found (sicapv2.data must be the SICAPv2 folder with its partition/)") \
                from None
        except Exception as exc:  # noqa: BLE001 - openpyxl and zipfile raise many kinds for a broken workbook
            raise BonyError(f"{sheet}: not a readable spreadsheet ({type(exc).__name__}: {exc})") from None
        missing = {"image_name", *PATCH_CLASSES} - set(table.columns)
        if missing:
            raise BonyError(f"{sheet}: missing columns {sorted(missing)}")
        onehot = table[list(PATCH_CLASSES)].apply(pd.to_numeric, errors="coerce").fillna(-1).to_numpy()
        bad = np.flatnonzero(((onehot != 0) & (onehot != 1)).any(1) | (onehot.sum(1) != 1))
        if len(bad):
            raise BonyError(f"{sheet} row {bad[0] + 2}: {', '.join(PATCH_CLASSES)} is not one-hot")
        sheets.append(pd.DataFrame({"image_name": table["image_name"].astype(str), "part": part.lower(),
                                    "label": onehot.argmax(1)}))
    return pd.concat(sheets, ignore_index=True)


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
            if "patches" in cfg.heads:
                check_classes(self.labels[used], parts[used], PATCH_CLASSES,
                              f"{Path(cfg.data) / 'partition'}: {partition} patch classes")
        runs = tuple((p, s) for p in cfg.partitions for s in range(cfg.runs))
        self.heads = {h: Head(h, "cls", tuple((RECONSTRUCTION_PARTITION, s) for s in range(cfg.runs))
                              if h == "reconstruction" else runs) for h in cfg.heads}
        self.columns = []
        if "reconstruction" in cfg.heads:
            self.columns += [Column("reconstruction", m, (RECONSTRUCTION_PARTITION,),
                                    f"{self.title} reconstruction {METRIC_NAMES[m]}") for m in IMAGE_METRICS]
        if "patches" in cfg.heads:
            folds = tuple(p for p in cfg.partitions if p != "Test")
            groups = [splits for splits in ((("Test",) if "Test" in cfg.partitions else ()), folds) if splits]
            self.columns += [Column("patches", m, splits, f"{self.title} patches {METRIC_NAMES[m]}",
                                    headline=m in ("balanced_accuracy", "quadratic_weighted_kappa"))
                             for splits in groups for m in PATCH_METRICS]

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
                  ["decoder", "blur_sigma", *(f"probe.{key}" for key in UNUSED_PROBE_KEYS["linear"])])
        return settings_of(self.cfg, self.manifest, unused)

    def classes(self, head: str) -> list[str]:
        return list(PATCH_CLASSES) if head == "patches" else []

    def fit(self, head: str, split: str, seed: int, features: np.ndarray, device: torch.device) -> RunOutput:
        x = torch.from_numpy(np.asarray(features, np.float32))
        if head == "reconstruction":
            return self._reconstruct(x, seed, device)
        patch_parts = self.patch_parts[split]
        used = np.flatnonzero(patch_parts != "")
        sums = torch.zeros(len(self.patches), x.shape[1]).index_add_(0, torch.from_numpy(self.tile_patch), x)
        means = sums / torch.from_numpy(np.bincount(self.tile_patch, minlength=len(self.patches))).unsqueeze(1)
        parts = patch_parts[used]
        predicted, info = classify("linear", means[used], torch.from_numpy(self.labels[used]), parts,
                                   len(PATCH_CLASSES), self.cfg.probe, seed, device)
        test = used[parts == "test"]
        truth = self.labels[test]
        info.update(classes=list(PATCH_CLASSES), n_test=int(len(test)),
                    n_test_slides=int(len(set(self.patients[test]))),
                    n_train=int((parts == "train").sum()),
                    confusion_matrix=metrics.confusion_matrix(truth, predicted, len(PATCH_CLASSES)).tolist())
        return RunOutput(label_scores(truth, predicted, PATCH_CLASSES, PATCH_METRICS),
                         {"rows": self.patches[test], "groups": self.patients[test], "y_true": truth,
                          "y_pred": predicted}, info)

    def _reconstruct(self, x: torch.Tensor, seed: int, device: torch.device) -> RunOutput:
        """Decode the blurred tile from each tile's embedding, on the Test partition's patients."""
        cfg = self.cfg.decoder
        parts = self.patch_parts[RECONSTRUCTION_PARTITION][self.tile_patch]
        decoded, info = fit_and_decode(x, self.blurred, parts, 3, "regression", cfg, seed, device, cfg.out_size)
        test = parts == "test"
        truth = self.blurred[torch.from_numpy(test)]
        scores = {"mse": metrics.mse(truth, decoded), "psnr": metrics.psnr(truth, decoded),
                  "ssim": metrics.ssim(truth, decoded)}
        groups = self.frame["group"].to_numpy()[test]
        shown = slice(0, cfg.examples)
        info.update(n_test=int(test.sum()), n_test_slides=int(len(set(groups))), n_train=int((parts == "train").sum()))
        return RunOutput({name: float(values.mean()) for name, values in scores.items()},
                         {"rows": self.ids[test], "groups": groups, **scores, "example_rows": self.ids[test][shown],
                          "example_true": truth[shown].numpy().astype(np.float16),
                          "example_pred": decoded[shown].numpy().astype(np.float16)}, info)
