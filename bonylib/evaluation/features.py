"""What heads read: embeddings as rows gathered on demand, z-scored on the fly, never the whole array in memory.

A :class:`Features` is a view of rows of a source: a store opened for reading
(:class:`~bonylib.evaluation.embeddings.StoredRows`) or an array already in memory (features computed by a
benchmark, such as SICAPv2's patch means, and tests). Indexing it (``features[index]``, with a slice, positions or a
boolean mask) reads those rows and returns them as a float32 tensor; :meth:`Features.subset` gives a lazy view of
some rows (the train rows, the test rows), and :meth:`Features.standardized` a view that z-scores each row as it is
read. So a head trained by mini-batches holds one batch, a pass over many rows one block, whatever the row count:
at PANDA's 2.85 M tiles the 4096-d head output is 46.7 GB in float32, twice a 24 GiB machine.

Statistics are streamed (:func:`moments`): per-block mean and sum of squared deviations in float64, merged by Chan
et al.'s pairwise update, equal to the mean and unbiased standard deviation of all rows at once within rounding,
and without the cancellation of a sum-of-squares formula (channels with a large mean and a small spread).
:class:`Bags` reads a slide's tiles when the slide is asked for (attention-MIL).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

BLOCK_BYTES = 8 * 2**20
"""Bytes of float32 rows a pass over many rows reads at once (statistics): 512 rows of 4096 channels, held as
float64 while they are summed (16 MiB), few enough reads to cost nothing beside the arithmetic."""


class RowSource(Protocol):
    """Rows that can be read by position: a store (:class:`~bonylib.evaluation.embeddings.StoredRows`) or an array."""

    shape: tuple[int, ...]

    def read(self, positions: np.ndarray) -> np.ndarray: ...


class ArrayRows:
    """An array in memory as a :class:`RowSource`."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.shape = tuple(values.shape)

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.values[positions]


def _positions(key: slice | int | np.ndarray | torch.Tensor | Sequence[int], length: int) -> np.ndarray:
    """Row numbers (0 .. length-1) that ``key`` picks: a slice, a number, positions, or a boolean mask."""
    if isinstance(key, slice):
        return np.arange(*key.indices(length))  # not np.arange(length)[key]: a pass in blocks would be quadratic
    if isinstance(key, torch.Tensor):
        key = key.cpu().numpy()
    key = np.asarray(key)
    if key.dtype == bool:
        if key.shape != (length,):
            raise IndexError(f"a mask of {key.shape} for {length} rows")
        return np.flatnonzero(key)
    key = key.astype(np.int64).reshape(-1)
    if len(key) and (key.min() < -length or key.max() >= length):
        raise IndexError(f"row positions must be in -{length}..{length - 1}")
    return np.where(key < 0, key + length, key)


class Features:
    """Rows of a :class:`RowSource` (all, or ``positions``), each read as float32 and, when ``shift`` and ``scale``
    are set, z-scored per channel: ``(x - shift) / scale`` in float32, as a tensor computed from the whole would be."""

    def __init__(self, source: RowSource | np.ndarray | torch.Tensor, positions: np.ndarray | None = None,
                 shift: np.ndarray | None = None, scale: np.ndarray | None = None) -> None:
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        self.source: RowSource = ArrayRows(source) if isinstance(source, np.ndarray) else source
        self.positions = positions
        self.shift, self.scale = shift, scale

    def __len__(self) -> int:
        return self.source.shape[0] if self.positions is None else len(self.positions)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.source.shape[1:])

    def _source_rows(self, key: slice | int | np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
        picked = _positions(key, len(self))
        return picked if self.positions is None else self.positions[picked]

    def __getitem__(self, key: slice | int | np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The rows ``key`` picks, read now: a float32 tensor (n, *row_shape), z-scored if this view is."""
        single = isinstance(key, (int, np.integer))
        rows = np.asarray(self.source.read(self._source_rows([key] if single else key)), dtype=np.float32)
        if self.shift is not None:
            rows = (rows - self.shift) / self.scale
        values = torch.from_numpy(np.ascontiguousarray(rows))
        return values[0] if single else values

    def subset(self, key: slice | np.ndarray | torch.Tensor | Sequence[int]) -> Features:
        """A view of the rows ``key`` picks, read when indexed."""
        return Features(self.source, self._source_rows(key), self.shift, self.scale)

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        """The view's rows in order, ``rows`` at a time."""
        for start in range(0, len(self), rows):
            yield self[start : start + rows]

    def block_rows(self, budget: int = BLOCK_BYTES) -> int:
        """Rows of float32 in ``budget`` bytes (at least one)."""
        return max(1, budget // (4 * int(np.prod(self.shape[1:], dtype=np.int64))))

    def standardized(self, train: np.ndarray | torch.Tensor) -> Features:
        """This view z-scored per channel by the mean and standard deviation of its rows ``train`` (a mask or
        positions); a channel constant on them (std 0) is only centred. For patch tokens (N, T, D) the statistics
        are per channel over every token of the train rows."""
        if self.shift is not None:
            raise ValueError("these features are standardized already")
        mean, std = moments(self.subset(train))
        return Features(self.source, self.positions, mean.astype(np.float32),
                        np.where(std > 0, std, 1.0).astype(np.float32))


def moments(features: Features, block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased standard deviation (float64) of every row of ``features`` (every token of
    patch-token rows), read ``block_rows`` at a time, merged pairwise (Chan, Golub & LeVeque 1979)."""
    width = features.shape[-1]
    count, mean, squares = 0, np.zeros(width), np.zeros(width)
    for block in features.blocks(block_rows or features.block_rows()):
        values = block.numpy().reshape(-1, width).astype(np.float64)
        n = len(values)
        block_mean = values.mean(0)
        values -= block_mean  # in place: one float64 copy of the block at a time
        block_squares = np.einsum("ij,ij->j", values, values)
        delta = block_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        squares = squares + block_squares + delta**2 * (count * n / total)
        count = total
    if count < 2:
        return mean, np.zeros(width)
    return mean, np.sqrt(squares / (count - 1))


def group_means(features: Features, group_of_row: np.ndarray, groups: int) -> torch.Tensor:
    """(groups, *row_shape) float32: the mean of each group's rows (a patch's tiles, an image's tiles), summed block by
    block in row order, as one ``index_add_`` over all rows would; a group without rows is NaN."""
    sums = torch.zeros(groups, *features.shape[1:])
    rows = features.block_rows()
    for start, block in zip(range(0, len(features), rows), features.blocks(rows)):
        sums.index_add_(0, torch.from_numpy(np.asarray(group_of_row[start : start + rows], dtype=np.int64)), block)
    counts = torch.from_numpy(np.bincount(group_of_row, minlength=groups)).to(sums.dtype)
    return sums / counts.reshape(-1, *[1] * (sums.ndim - 1))


class Bags(Sequence[torch.Tensor]):
    """Bags of rows (one slide's tiles each), each read when it is asked for: ``bags[i]`` is a float32 tensor
    (n_i, D) of ``features``' rows ``rows[i]``."""

    def __init__(self, features: Features, rows: Sequence[np.ndarray]) -> None:
        self.features, self.rows = features, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):  # type: ignore[override]  # Sequence's overloads; a slice gives Bags
        if isinstance(index, slice):
            return Bags(self.features, self.rows[index])
        return self.features[self.rows[index]]

    def subset(self, index: np.ndarray | Sequence[int]) -> Bags:
        """The bags ``index`` picks, still unread."""
        return Bags(self.features, [self.rows[i] for i in np.asarray(index, dtype=np.int64).tolist()])
