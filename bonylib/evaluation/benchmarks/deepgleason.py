"""DeepGleason masks: the seed's decoder rebuilding each tile's class mask from the tile's embedding.

Three heads on the same tiles and split:

- ``mask`` (the seed's §8 metric): the decoder regresses the mask as a grey image, sigmoid output, MSE. Its
  scale is ``mask_scale``: ``classes`` (ours) is class index / (C - 1) in [0, 1] with classes background,
  benign, G3, G4, G5 (an ordinal scale over the whole range); ``codes`` (the seed's) is the mask file's own
  code / 255, the mask read as an 8-bit image into [0, 1] ("normalisées entre 0 et 1"): codes 0-5 span
  0-0.02, which is why the seed's MSEs are of order 1e-6 and ours of order 1e-2 for the same errors;
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
from bonylib.evaluation.benchmarks.common import (METRIC_NAMES, Column, Head, LastFit, RunOutput, check_classes,
                                                  check_parts, check_scored, ladder_size, benchmark_tiles, check_heads,
                                                  settings_of)
from bonylib.evaluation.benchmarks.heads import DecoderConfig, fit_and_decode
from bonylib.evaluation.features import Features
from bonylib.evaluation.splits import split_by_slide

HEADS = ("mask", "classes", "patch")
CLASSES = tuple(name for name in LABEL_NAMES if name in set(MASK_ENCODINGS["deepgleason"].values()))
"""Mask classes in the manifest vocabulary: background (with artefact, as tiling counts it), benign, G3, G4, G5."""
SPLITS = ("dataset", "slides")
MASK_SCALES = ("classes", "codes")


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
    scored_parts: list[str] = option(["test"], "parts scored, each a column of the table: test, val (the seed "
                                     "reported validation MSE; the first is the results page's summary)")
    mask_scale: str = option("classes", "target of the mask head: classes (class index / 4, ours) or codes (the mask "
                             "file's code / 255, the seed's)")
    max_tiles: int = option(0, "seeded sample of at most this many tiles (0: all), for CPU demos")
    decoder: DecoderConfig = section(DecoderConfig, "decoder training")

    def __post_init__(self) -> None:
        check_heads("deepgleason", self.heads, HEADS)
        check_scored("deepgleason", self.scored_parts)
        if self.mask_scale not in MASK_SCALES:
            raise ConfigError(f"deepgleason.mask_scale must be one of {', '.join(MASK_SCALES)}, got {self.mask_scale!r}")
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


def class_maps(codes: np.ndarray) -> np.ndarray:
    """Class index maps (indices into :data:`CLASSES`) of DeepGleason mask codes, mapped by the dataset's encoding
    to the manifest vocabulary (artefact is background, as in tiling)."""
    lookup = np.zeros(256, np.uint8)
    for code, name in MASK_ENCODINGS["deepgleason"].items():
        lookup[code] = CLASSES.index(name)
    return lookup[codes]


def read_mask_codes(frame: pd.DataFrame, data: Path, where: str) -> np.ndarray:
    """The mask codes (N, size, size) uint8 of the manifest's tiles, read from their mask files and checked to be
    DeepGleason codes (:func:`class_maps` gives the classes).

    The mask of each tile's source image comes from the dataset listing (:func:`list_jobs`), the codes from
    its red channel at the tile's place and level.
    """
    jobs = {job.slide_id: job for job in list_jobs("deepgleason", [Path(data)])}
    sizes = frame["size"].unique()
    if len(sizes) != 1:
        raise BonyError(f"{where}: tiles of several sizes {sorted(sizes)[:3]}; decode one tiling at a time")
    size = int(sizes[0])
    encoding = MASK_ENCODINGS["deepgleason"]
    valid = np.zeros(256, bool)
    valid[list(encoding)] = True
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
                masks[row] = snap_codes(codes, "deepgleason")
        if not valid[masks[rows]].all():
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
        runs = tuple((part, s) for s in range(cfg.runs) for part in cfg.scored_parts)
        self.heads = {h: Head(h, "patch" if h == "patch" else "cls", runs) for h in cfg.heads}
        self.columns = []
        for head in cfg.heads:
            for part in cfg.scored_parts:
                if head == "mask":
                    self.columns.append(Column(head, "mse", (part,), f"{self.title} mask {METRIC_NAMES['mse']}"))
                    continue
                name = "classes" if head == "classes" else "patch-token classes"
                self.columns += [Column(head, m, (part,), f"{self.title} {name} {METRIC_NAMES[m]}")
                                 for m in ("mean_iou", "mean_dice")]
                self.columns += [Column(head, f"dice_{c}", (part,), f"{self.title} {name} Dice {c}", headline=False)
                                 for c in self._classes]
        self._last = LastFit()

    @cached_property
    def codes(self) -> np.ndarray:
        """Every tile's mask codes at tile resolution, read once (only when a run is due); masks whose training tiles
        and test tiles hold one class are refused (a decoder trained on them cannot be wrong)."""
        codes = read_mask_codes(self.frame, Path(self.cfg.data), str(self.source))
        masks = class_maps(codes)
        present = {part: np.unique(masks[self.parts == part]) for part in ("train", "test")}
        check_classes(np.concatenate(list(present.values())),
                      np.repeat(list(present), [len(v) for v in present.values()]), self._classes,
                      f"{self.source}: deepgleason mask classes")
        return codes

    def settings(self, head: str) -> dict[str, Any]:
        return settings_of(self.cfg, self.manifest)

    def classes(self, head: str) -> list[str]:
        return self._classes

    def fit(self, head: str, split: str, seed: int, features: Features, device: torch.device) -> RunOutput:
        """Scores on the rows of part ``split`` (val or test) of the decoder fitted with ``seed`` (fitted once for
        both)."""
        cfg = self.cfg.decoder
        grid = None
        side = cfg.out_size
        if head == "patch":
            grid = math.isqrt(features.shape[1])
            if grid * grid != features.shape[1]:
                raise BonyError(f"{features.shape[1]} patch tokens do not form a square grid")
            side = ladder_size(grid, cfg.out_size)
        codes = resized(self.codes, side)
        count = len(self._classes)
        scored = self.parts == split
        if head == "mask":
            grey, top = (codes, 255) if self.cfg.mask_scale == "codes" else (class_maps(codes), count - 1)
            targets = torch.from_numpy(grey[:, None].astype(np.float32) / top)
            decoded, fitted = self._last((head, seed), features, lambda: fit_and_decode(
                features, targets, self.parts, 1, "regression", cfg, seed, device, side, scored=self.cfg.scored_parts))
            truth, decoded = targets[torch.from_numpy(scored)], decoded[split]
            scores = {"mse": metrics.mse(truth, decoded)}
            values = {"mse": float(scores["mse"].mean())}
        else:
            targets = torch.from_numpy(class_maps(codes).astype(np.int64))
            decoded, fitted = self._last((head, seed), features, lambda: fit_and_decode(
                features, targets, self.parts, count, "classes", cfg, seed, device, side, grid,
                scored=self.cfg.scored_parts))
            truth, decoded = targets[torch.from_numpy(scored)], decoded[split]
            dice = metrics.dice_per_class(truth, decoded, count)
            values = {f"dice_{c}": float(d) for c, d in zip(self._classes, dice)}
            values.update(mean_dice=float(np.nanmean(dice)), mean_iou=metrics.mean_iou(truth, decoded, count))
            scores = {"confusion": np.stack([metrics.confusion_matrix(t, p, count) for t, p in zip(truth, decoded)])}
        shown = slice(0, cfg.examples)
        groups = self.frame["group"].to_numpy()[scored]
        info = {**fitted, "classes": self._classes, "n_test": int(scored.sum()), "n_test_slides": int(len(set(groups))),
                "n_train": int((self.parts == "train").sum())}
        arrays = {"rows": self.ids[scored], "groups": groups, **scores,
                  "example_rows": self.ids[scored][shown], "example_true": truth[shown].numpy(),
                  "example_pred": decoded[shown].numpy()}
        return RunOutput(values, arrays, info)
