"""KoLeo: DINOv2's regulariser that spreads the student's image features over the sphere (Sablayrolles et al., 2019;
Oquab et al., 2024).

The Kozachenko-Leonenko estimator of a distribution's differential entropy grows with the mean log distance from
each point to its nearest neighbour; the loss is its negative, ``-1/n sum_i log(d_i + eps)`` with ``d_i`` the
distance from L2-normalised feature ``i`` to its nearest other one. DINOv2 applies it to the student's CLS token
before the head, for each global crop over the batch (not between two crops of one image, which should be close),
summed over the global crops, at weight 0.1.

Computed over the global batch of all processes (:func:`~bonylib.ssl.distributed.gather_rows`; DINOv2 uses each
GPU's batch), so that a run split over processes trains as one process would, and in float32 outside autocast.
Small batches: with fewer than 2 features there is no neighbour and the term is 0; two equal features (a tile seen
twice) give distance 0, where the norm's gradient is undefined: distances are floored at ``eps`` (loss ``-log(2
eps)``, gradient 0 for that pair) rather than giving NaN. Near-equal ones still pull hard (the gradient grows as 1 /
d): that is KoLeo's nature, and the KDE regulariser's reason to exist (:mod:`bonylib.ssl.losses.kde`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bonylib.models.head import CropOutputs
from bonylib.ssl.config import TrainConfig
from bonylib.ssl.data import Batch
from bonylib.ssl.distributed import gather_rows
from bonylib.ssl.losses.base import Objective

EPS = 1e-8


def koleo(features: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``-mean_i log(d_i + eps)`` of ``features`` (n, D), L2-normalised, ``d_i`` the distance from row i to its
    nearest other row; 0 (with a gradient of 0) for fewer than 2 rows."""
    if len(features) < 2:
        return features.sum() * 0.0
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-torch.inf)
        nearest = similarity.argmax(dim=1)
    squared = (x - x[nearest]).pow(2).sum(dim=-1)
    return -torch.log(squared.clamp(min=eps * eps).sqrt() + eps).mean()


class KoLeoLoss(Objective):
    """KoLeo on the student's pre-head CLS of each global crop, summed over the global crops."""

    def __init__(self, global_crops: int, weight: float) -> None:
        super().__init__()
        self.global_crops, self.weight = global_crops, weight

    def forward(self, student: CropOutputs, teacher: CropOutputs, batch: Batch, epoch: int) -> torch.Tensor:
        per_crop = student.cls[: self.global_crops * len(batch.crops[0])].chunk(self.global_crops)
        with torch.autocast(student.cls.device.type, enabled=False):
            return torch.stack([koleo(gather_rows(crop)) for crop in per_crop]).sum()


def build(cfg: TrainConfig) -> KoLeoLoss | None:
    """The KoLeo term of a ``dinov2`` run with ``dinov2.koleo_weight`` > 0 (None otherwise)."""
    if cfg.objective != "dinov2" or cfg.dinov2.koleo_weight == 0:
        return None
    return KoLeoLoss(cfg.crops.global_crops, cfg.dinov2.koleo_weight)
