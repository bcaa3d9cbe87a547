"""Pretraining data: images from a tile manifest or a folder, multi-crop views (and iBOT's masks) seeded per
sample, the batch, and the epoch's order of images (shuffled, or balanced over a manifest column).

Each sample's crops and masks are drawn from a generator seeded by (seed, epoch, index), not from a
worker's running RNG: the views of a sample do not depend on which DataLoader worker loads it or
on what it loaded before, so a run resumed mid-epoch sees exactly the crops it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from bonylib.data.slides import TILE_IMAGE_SUFFIXES
from bonylib.errors import BonyError
from bonylib.ssl.masking import BlockMasking


class ImageFolder(Dataset):
    """Every image file under a folder (recursively, sorted), as ``(PIL RGB image, -1)``."""

    def __init__(self, root: Path) -> None:
        self.paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in TILE_IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise BonyError(f"{root}: no images ({', '.join(sorted(TILE_IMAGE_SUFFIXES))}) found")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), -1


class Views(NamedTuple):
    """One image's pretraining sample: its crops, its target (not used to pretrain) and, when the run masks patches,
    the masks of its global crops ``(global_crops, rows, columns)``."""

    crops: list[torch.Tensor]
    target: int
    masks: torch.Tensor | None = None


class SeededViews(Dataset):
    """:class:`Views` of a dataset of images, the crops (and the masks of ``masking``) seeded by (seed, epoch, index)."""

    def __init__(self, images: Dataset, transform: Callable[[Image.Image], list[torch.Tensor]], seed: int,
                 masking: BlockMasking | None = None, global_crops: int = 1) -> None:
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0
        self.masking, self.global_crops = masking, global_crops

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Views:
        image, target = self.images[index]
        seed = hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF
        state = random.getstate()  # DINO's own pipeline draws its blur and solarisation from Python's random
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG (drop-path, ...) is left untouched
                torch.manual_seed(seed)
                random.seed(seed)
                crops = self.transform(image)
                # drawn after the crops: a run without masks draws the crops it always drew
                masks = None if self.masking is None else self.masking(self.global_crops)
        finally:
            random.setstate(state)
        return Views(crops, target, masks)


class Batch(NamedTuple):
    """One batch of a pretraining step: ``crops[i]`` holds the i-th crop of every image ``(B, 3, H, W)``, as in the
    DINO reference, so the first ``global_crops`` entries are the teacher's views; ``masks`` holds the student's
    patch masks of the global crops in the same order, ``(global_crops * B, rows, columns)`` bool (crop by crop, so
    that they line up with ``torch.cat(crops[:global_crops])``), None when no objective masks."""

    crops: list[torch.Tensor]
    masks: torch.Tensor | None = None


def collate_views(samples: Sequence[Sequence[Any]]) -> Batch:
    """DataLoader collate: samples ``(crops, target)`` or :class:`Views` -> a :class:`Batch`."""
    if not samples:
        raise ValueError("collate_views: empty batch")
    views = [Views(*sample) for sample in samples]
    n = len(views[0].crops)
    if any(len(v.crops) != n for v in views):
        raise ValueError(f"collate_views: samples have different numbers of crops ({sorted({len(v.crops) for v in views})})")
    crops = [torch.stack([v.crops[i] for v in views]) for i in range(n)]
    if views[0].masks is None:
        return Batch(crops)
    masks = torch.cat([torch.stack([v.masks[i] for v in views]) for i in range(len(views[0].masks))])
    return Batch(crops, masks)


class EpochSampler(Sampler[int]):
    """This rank's share of a shuffled epoch (like DistributedSampler), resumable at any batch.

    The permutation depends only on (seed, epoch); ranks take interleaved indices, truncated so
    that every rank has the same number of whole batches. ``set_epoch(e, start_batch)`` skips the
    batches a resumed run already trained on. With ``weights`` (one per image, :func:`balance_weights`) an epoch
    is as many draws with replacement, image ``i`` drawn with probability proportional to ``weights[i]``, from the
    same (seed, epoch) generator: still the same order for any number of processes and after any resume.
    """

    def __init__(self, length: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 weights: torch.Tensor | None = None) -> None:
        self.length, self.batch_size, self.rank, self.world, self.seed = length, batch_size, rank, world, seed
        self.weights = weights
        self.batches_per_epoch = length // world // batch_size
        if self.batches_per_epoch == 0:
            raise BonyError(f"{length} images are fewer than one batch of {batch_size} for each of {world} processes")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.length, replacement=True, generator=generator)
        mine = order[self.rank :: self.world][: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def balance_weights(values: pd.Series) -> torch.Tensor:
    """A drawing weight per row of ``values`` such that every distinct value is drawn equally often:
    ``1 / (distinct values x rows with this value)`` (the weights sum to 1). Curated sampling balances the tiles'
    clusters so (``data.balance_by=cluster``): rare tissue is drawn as often as the stroma that fills most tiles."""
    counts = values.map(values.value_counts())
    return torch.as_tensor(1.0 / (values.nunique() * counts.to_numpy(dtype=np.float64)))


def manifest_column(images: Dataset, column: str, manifest: str) -> pd.Series:
    """The values of ``column`` for every image of ``images`` (a manifest's tiles), a one-line error otherwise."""
    frame = getattr(images, "frame", None)
    if frame is None:
        raise BonyError(f"data.balance_by={column} balances the tiles of a manifest (data.manifest), not a folder of images")
    if column not in frame:
        raise BonyError(f"{manifest}: no column {column!r} to balance by (bony curate writes 'cluster'); columns: "
                        f"{', '.join(frame.columns)}")
    if frame[column].isna().any():
        raise BonyError(f"{manifest}: column {column!r} has {int(frame[column].isna().sum())} empty values")
    return frame[column]


def images_from(manifest: str, folder: str, tile_px: int) -> Dataset:
    """The pretraining images: kept tiles of a manifest (from shards or slides), or a folder of images."""
    if bool(manifest) == bool(folder):
        raise BonyError("set exactly one of data.manifest (a tiling manifest.parquet) and data.images (a folder)")
    if folder:
        return ImageFolder(Path(folder))
    from bonylib.data.datasets import TileDataset

    path = Path(manifest)
    if not path.is_file():
        raise BonyError(f"{path}: manifest not found (run bony tile first)")
    return TileDataset(path, tile_px=tile_px)

