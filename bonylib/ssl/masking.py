"""Block-wise masks of the student's global-crop patches for the iBOT term (masked-image modelling).

iBOT (Zhou et al., 2022) and DINOv2 (Oquab et al., 2024) hide rectangles of patches, not scattered ones: a scattered
patch can be guessed from its neighbours' pixels, a block only from context. DINOv2's defaults: half of the global
crops are masked, each with a share of its patches drawn uniformly from 0.1-0.5, laid down as blocks of at least 4
patches with an aspect ratio between 0.3 and 1/0.3 until the share is reached (a block that would overshoot it or adds
nothing is drawn again, 10 tries, after which the mask stays below the share).

Two differences from DINOv2's collate function, both for exactness: each crop draws its own share (DINOv2 spreads the
shares of one batch over equal slices of the range and shuffles them), and every draw comes from torch's generator,
which :class:`~bonylib.ssl.data.SeededViews` seeds per (seed, epoch, image). So a crop's mask does not depend on the
batch it lands in, on the DataLoader worker, or on the number of processes: a resumed run and a run split over two
processes mask exactly the patches of an uninterrupted single-process run. The share masked and the share of patches
have the same distribution as DINOv2's (uniform over the range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockMasking:
    """Masks for a ``grid`` (rows, columns) of patches: a crop is masked with probability ``probability``, with
    ``int(ratio * patches)`` patches for a ratio ~ U(``min_ratio``, ``max_ratio``), in blocks of at least
    ``min_block`` patches whose aspect ratio lies in [``min_aspect``, 1 / ``min_aspect``]."""

    grid: tuple[int, int]
    probability: float = 0.5
    min_ratio: float = 0.1
    max_ratio: float = 0.5
    min_block: int = 4
    min_aspect: float = 0.3

    def __call__(self, crops: int) -> torch.Tensor:
        """Masks of ``crops`` crops, ``(crops, rows, columns)`` bool (True: hidden from the student), drawn from
        torch's global generator (the caller seeds it)."""
        rows, columns = self.grid
        masks = torch.zeros(crops, rows, columns, dtype=torch.bool)
        for crop in range(crops):
            masked, ratio = torch.rand(2).tolist()
            if masked < self.probability:
                share = self.min_ratio + (self.max_ratio - self.min_ratio) * ratio
                self._fill(masks[crop], int(share * rows * columns))
        return masks

    def _fill(self, mask: torch.Tensor, target: int) -> None:
        """Lay blocks into ``mask`` (in place) until ``target`` patches are masked or a block cannot be placed."""
        count = 0
        while count < target:
            added = self._block(mask, target - count)
            if added == 0:
                break
            count += added

    def _block(self, mask: torch.Tensor, most: int) -> int:
        """One block of at most ``most`` new patches (10 tries); the number of patches it masked."""
        rows, columns = mask.shape
        log_aspect = math.log(self.min_aspect), -math.log(self.min_aspect)
        for _ in range(10):
            u_area, u_aspect, u_top, u_left = torch.rand(4).tolist()
            area = self.min_block + (most - self.min_block) * u_area  # most < min_block: an area in [most, min_block]
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
            height, width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (0 < height < rows and 0 < width < columns):
                continue
            top, left = int(u_top * (rows - height + 1)), int(u_left * (columns - width + 1))
            block = mask[top:top + height, left:left + width]
            new = height * width - int(block.sum())
            if 0 < new <= most:
                block.fill_(True)
                return new
        return 0
