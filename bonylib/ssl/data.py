"""Pretraining data: images from a tile manifest or a folder, multi-crop views seeded per sample, and the batch.

Each sample's crops are drawn from a generator seeded by (seed, epoch, index), not from a
worker's running RNG: the views of a sample do not depend on which DataLoader worker loads it or
on what it loaded before, so a run resumed mid-epoch sees exactly the crops it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from bonylib.data.slides import TILE_IMAGE_SUFFIXES
from bonylib.errors import BonyError


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


class SeededViews(Dataset):
    """``(list of crops, target)`` of a dataset of images, the crops seeded by (seed, epoch, index)."""

    def __init__(self, images: Dataset, transform: Callable[[Image.Image], list[torch.Tensor]], seed: int) -> None:
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        image, target = self.images[index]
        seed = hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF
        state = random.getstate()  # DINO's own pipeline draws its blur and solarisation from Python's random
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG (drop-path, ...) is left untouched
                torch.manual_seed(seed)
                random.seed(seed)
                return self.transform(image), target
        finally:
            random.setstate(state)


class Batch(NamedTuple):
    """One batch of a pretraining step: ``crops[i]`` holds the i-th crop of every image ``(B, 3, H, W)``, as in the
    DINO reference, so the first ``global_crops`` entries are the teacher's views; ``masks`` has room for the
    masked-image objectives (a patch mask per global crop), None when no objective masks."""

    crops: list[torch.Tensor]
    masks: torch.Tensor | None = None


def collate_views(samples: Sequence[tuple[Sequence[torch.Tensor], int]]) -> Batch:
    """DataLoader collate: samples ``(crops, target)`` -> a :class:`Batch` (the targets are not used to pretrain)."""
    if not samples:
        raise ValueError("collate_views: empty batch")
    n = len(samples[0][0])
    if any(len(crops) != n for crops, _ in samples):
        raise ValueError(f"collate_views: samples have different numbers of crops ({sorted({len(c) for c, _ in samples})})")
    return Batch([torch.stack([sample[0][i] for sample in samples]) for i in range(n)])


class EpochSampler(Sampler[int]):
    """This rank's share of a shuffled epoch (like DistributedSampler), resumable at any batch.

    The permutation depends only on (seed, epoch); ranks take interleaved indices, truncated so
    that every rank has the same number of whole batches. ``set_epoch(e, start_batch)`` skips the
    batches a resumed run already trained on.
    """

    def __init__(self, length: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        self.length, self.batch_size, self.rank, self.world, self.seed = length, batch_size, rank, world, seed
        self.batches_per_epoch = length // world // batch_size
        if self.batches_per_epoch == 0:
            raise BonyError(f"{length} images are fewer than one batch of {batch_size} for each of {world} processes")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        mine = order[self.rank :: self.world][: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


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

