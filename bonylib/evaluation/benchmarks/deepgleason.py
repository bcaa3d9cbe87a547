"""DeepGleason masks: the seed's decoder rebuilding each tile's class mask from the tile's embedding.

Three heads on the same tiles and split:

- ``mask`` (the seed's §8 metric): the decoder regresses the mask as a grey image, class index / (C - 1)
  in [0, 1] with classes background, benign, G3, G4, G5 (an ordinal scale), sigmoid output, MSE;
- ``classes``: the same decoder with a class per pixel (cross-entropy), scored by per-class Dice and mIoU;
- ``patch``: the class decoder reading the patch tokens on their grid instead of one vector, which keeps
  where things are in the tile (encoders without patch tokens have no such run).

Each tile's mask is read from the dataset's mask file at the tile's coordinates, as tiling reads it to
label the tile, and resized (nearest) to the decoder's output side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bonylib.config import option, section
from bonylib.data.labels import LABEL_NAMES, MASK_ENCODINGS, snap_codes
from bonylib.data.slides import open_slide
from bonylib.data.sources import list_jobs
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.benchmarks.common import (METRIC_NAMES, Column, Head, RunOutput, check_classes, check_parts,
                                                  ladder_size, benchmark_tiles, check_heads, settings_of)
from bonylib.evaluation.benchmarks.heads import DecoderConfig, fit_and_decode
from bonylib.evaluation.splits import split_by_slide

HEADS = ("mask", "classes", "patch")
CLASSES = tuple(name for name in LABEL_NAMES if name in set(MASK_ENCODINGS["deepgleason"].values()))
"""Mask classes in the manifest vocabulary: background (with artefact, as tiling counts it), benign, G3, G4, G5."""
SPLITS = ("dataset", "slides")


@dataclass
class DeepGleasonConfig:
    """DeepGleason mask decoding (the seed's §8 mask MSE, with Dice and mIoU beside it)."""

    manifest: str = option("", "DeepGleason tile manifest.parquet (bony tile --format deepgleason)")
    data: str = option("", "the DeepGleason folder: its tiles.csv names each tile's mask file")
    heads: list[str] = option(list(HEADS), "heads: mask (the seed's regression, MSE), classes (Dice, mIoU), "
                              "patch (the class decoder on patch tokens)")
    runs: int = option(5, "fits per head and encoder, seeds 0..runs-1")
    split: str = option("dataset", "dataset: the manifest's own split column (by slide); slides: split_by_slide "
                        "with fractions")
    fractions: list[float] = option([0.8, 0.1, 0.1], "train / val / test shares of the slides (split=slides)")
    split_seed: int = option(0, "seed of the split by slide (split=slides)")
    max_tiles: int = option(0, "seeded sample of at most this many tiles (0: all), for CPU demos")
    decoder: DecoderConfig = section(DecoderConfig, "decoder training")

    def __post_init__(self) -> None:
        check_heads("deepgleason", self.heads, HEADS)
        if self.split not in SPLITS:
            raise ConfigError(f"deepgleason.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.runs < 1 or self.max_tiles < 0:
            raise ConfigError("deepgleason.runs must be at least 1 and deepgleason.max_tiles at least 0")


def tile_parts(frame: pd.DataFrame, split: str, fractions: list[float], seed: int, where: str) -> np.ndarray:
    """train / val / test of each tile, by slide (the manifest's ``group``): the dataset's own split or ours."""
    groups = frame["group"].to_numpy()
    if split == "dataset":
        parts = frame["split"].to_numpy().astype(str)
        odd = sorted(set(parts) - {"train", "val", "test"})
        if odd:
            raise BonyError(f"{where}: split column holds {odd[0]!r}, not train/val/test; use split=slides")
    else:
        parts = split_by_slide(groups, fractions, seed=seed)
    check_parts(parts, groups, where)
    return parts


def read_masks(frame: pd.DataFrame, data: Path, where: str) -> np.ndarray:
    """Class index maps (N, size, size) uint8 (indices into :data:`CLASSES`) of the manifest's tiles, read from their
    mask files.

    The mask of each tile's source image comes from the dataset listing (:func:`list_jobs`), the codes from
    its red channel at the tile's place and level, mapped by the dataset's encoding to the manifest
    vocabulary (artefact is background, as in tiling).
    """
    jobs = {job.slide_id: job for job in list_jobs("deepgleason", [Path(data)])}
    sizes = frame["size"].unique()
    if len(sizes) != 1:
        raise BonyError(f"{where}: tiles of several sizes {sorted(sizes)[:3]}; decode one tiling at a time")
    size = int(sizes[0])
    encoding = MASK_ENCODINGS["deepgleason"]
    lookup = np.full(256, 255, np.uint8)
    for code, name in encoding.items():
        lookup[code] = CLASSES.index(name)
    masks = np.empty((len(frame), size, size), np.uint8)
    for slide_id, rows in frame.groupby("slide_id", sort=False).indices.items():
        job = jobs.get(slide_id)
        if job is None or job.mask is None or job.error:
            raise BonyError(f"{where}: tile image {slide_id!r} has no usable mask in {Path(data) / 'tiles.csv'}"
                            + (f" ({job.error})" if job is not None and job.error else ""))
        with open_slide(job.mask, require_rgb=False) as mask:
            for row in rows:
                tile = frame.iloc[row]
                codes = mask.read_codes((int(tile["x"]), int(tile["y"])), int(tile["level"]), (size, size))
                masks[row] = lookup[snap_codes(codes, "deepgleason")]
        if (masks[rows] == 255).any():
            raise BonyError(f"{job.mask}: values that are not DeepGleason codes {sorted(encoding)}")
    return masks


def resized(masks: np.ndarray, side: int) -> np.ndarray:
    """Class maps (N, side, side), nearest-neighbour resized: a class index is never averaged."""
    if masks.shape[-1] == side:
        return masks
    return np.stack([np.asarray(Image.fromarray(m).resize((side, side), Image.Resampling.NEAREST)) for m in masks])


class DeepGleasonMasks:
    """Decoders of DeepGleason tile masks from embeddings (see the module docstring)."""

    name = "deepgleason"
    title = "DeepGleason"
    group_unit = "slides"

    def __init__(self, cfg: DeepGleasonConfig, selections: Path) -> None:
        self.cfg = cfg
        source = Path(cfg.manifest)
        self.manifest, self.frame, self.ids = benchmark_tiles(source, cfg.max_tiles, cfg.split_seed, selections)
        self.parts = tile_parts(self.frame, cfg.split, cfg.fractions, cfg.split_seed, str(source))
        self.source = source
        self._classes = list(CLASSES)
        runs = tuple(("test", s) for s in range(cfg.runs))
        self.heads = {h: Head(h, "patch" if h == "patch" else "cls", runs) for h in cfg.heads}
        self.columns = []
        for head in cfg.heads:
            if head == "mask":
                self.columns.append(Column(head, "mse", ("test",), f"{self.title} mask {METRIC_NAMES['mse']}"))
                continue
            name = "classes" if head == "classes" else "patch-token classes"
            self.columns += [Column(head, m, ("test",), f"{self.title} {name} {METRIC_NAMES[m]}")
                             for m in ("mean_iou", "mean_dice")]
            self.columns += [Column(head, f"dice_{c}", ("test",), f"{self.title} {name} Dice {c}", headline=False)
                             for c in self._classes]

    @cached_property
    def masks(self) -> np.ndarray:
        """Every tile's class map at tile resolution, read once (only when a run is due); masks whose training tiles
        and test tiles hold one class are refused (a decoder trained on them cannot be wrong)."""
        masks = read_masks(self.frame, Path(self.cfg.data), str(self.source))
        present = {part: np.unique(masks[self.parts == part]) for part in ("train", "test")}
        check_classes(np.concatenate(list(present.values())),
                      np.repeat(list(present), [len(v) for v in present.values()]), self._classes,
                      f"{self.source}: deepgleason mask classes")
        return masks

    def settings(self, head: str) -> dict[str, Any]:
        return settings_of(self.cfg, self.manifest)

    def classes(self, head: str) -> list[str]:
        return self._classes

    def fit(self, head: str, split: str, seed: int, features: np.ndarray, device: torch.device) -> RunOutput:
        cfg = self.cfg.decoder
        x = torch.from_numpy(np.asarray(features, np.float32))
        grid = None
        side = cfg.out_size
        if head == "patch":
            grid = math.isqrt(x.shape[1])
            if grid * grid != x.shape[1]:
                raise BonyError(f"{x.shape[1]} patch tokens do not form a square grid")
            side = ladder_size(grid, cfg.out_size)
        masks = resized(self.masks, side)
        count = len(self._classes)
        test = self.parts == "test"
        if head == "mask":
            targets = torch.from_numpy(masks[:, None].astype(np.float32) / (count - 1))
            decoded, info = fit_and_decode(x, targets, self.parts, 1, "regression", cfg, seed, device, side)
            truth = targets[torch.from_numpy(test)]
            scores = {"mse": metrics.mse(truth, decoded)}
            values = {"mse": float(scores["mse"].mean())}
        else:
            targets = torch.from_numpy(masks.astype(np.int64))
            decoded, info = fit_and_decode(x, targets, self.parts, count, "classes", cfg, seed, device, side, grid)
            truth = targets[torch.from_numpy(test)]
            dice = metrics.dice_per_class(truth, decoded, count)
            values = {f"dice_{c}": float(d) for c, d in zip(self._classes, dice)}
            values.update(mean_dice=float(np.nanmean(dice)), mean_iou=metrics.mean_iou(truth, decoded, count))
            scores = {"confusion": np.stack([metrics.confusion_matrix(t, p, count) for t, p in zip(truth, decoded)])}
        shown = slice(0, cfg.examples)
        groups = self.frame["group"].to_numpy()[test]
        info.update(classes=self._classes, n_test=int(test.sum()), n_test_slides=int(len(set(groups))),
                    n_train=int((self.parts == "train").sum()))
        arrays = {"rows": self.ids[test], "groups": groups, **scores,
                  "example_rows": self.ids[test][shown], "example_true": truth[shown].numpy(),
                  "example_pred": decoded[shown].numpy()}
        return RunOutput(values, arrays, info)
