"""Pieces shared by the synthetic dataset writers."""

from __future__ import annotations

import zlib

import numpy as np


def item_rng(seed: int, dataset: str, index: int) -> np.random.Generator:
    """An independent generator for item ``index`` of ``dataset``.

    Keyed by (seed, dataset, index) rather than drawn in sequence, so slide 3 is the same slide
    whether 4 or 400 slides are written, and writers can run items in any order or in parallel.
    """
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), index])


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Downsample an (H, W, C) uint8 image by averaging ``factor``×``factor`` blocks (area filter)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, -1)
    return np.rint(blocks.mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)


def block_nearest(labels: np.ndarray, factor: int) -> np.ndarray:
    """Downsample a label map by taking each block's centre pixel: labels are never blended."""
    h, w = labels.shape[0] // factor, labels.shape[1] // factor
    return np.ascontiguousarray(labels[factor // 2 :: factor, factor // 2 :: factor][:h, :w])


def split_ids(ids: list[str], rng: np.random.Generator, test_fraction: float) -> tuple[list[str], list[str]]:
    """Shuffle ``ids`` and split off about ``test_fraction`` of them as test.

    A positive fraction always yields at least one test id (when there are two or more ids), so a
    tiny demo dataset still has every split.
    """
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_test = int(round(test_fraction * len(ids)))
    if test_fraction > 0 and len(ids) > 1:
        n_test = min(max(1, n_test), len(ids) - 1)
    return order[n_test:], order[:n_test]
