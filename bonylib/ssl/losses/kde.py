"""The KDE regulariser: Virchow2's and kaiko Midnight's replacement for KoLeo (Zimmermann et al., 2024; Karasikov
et al., 2025), which spreads the student's image features by a kernel density estimate of their entropy.

With L2-normalised features ``x_i`` and the von Mises-Fisher kernel ``k(x, y) = C(kappa) exp(kappa x.y)``, the
leave-one-out density at ``x_i`` is ``p_i = 1/(n-1) sum_{j != i} k(x_i, x_j)`` and ``-1/n sum_i log p_i`` estimates
the entropy. The loss is its negative up to constants:

    L = 1/n sum_i log( 1/(n-1) sum_{j != i} exp(kappa (x_i.x_j - 1)) ),

computed with ``logsumexp`` on exponents ``kappa (x_i.x_j - 1) <= 0``. Unlike KoLeo's ``-log d`` it is bounded
(between ``-2 kappa`` and 0) and so is its gradient (at most ``kappa`` per feature), also when two features
coincide, which is why it is numerically safe at any batch of 2 or more (fewer: 0, no pair). The self term is left
out (a leave-one-out estimate): kept in, it would add ``exp(0)`` to every density and halve the push between the
two features of a batch of two. Applied as KoLeo is (student's pre-head CLS of each global crop, over the global
batch of all processes, summed over the global crops), kappa 5 as in Virchow2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bonylib.models.head import CropOutputs
from bonylib.ssl.config import TrainConfig
from bonylib.ssl.data import Batch
from bonylib.ssl.distributed import gather_rows
from bonylib.ssl.losses.base import Objective


def kde_log_density(features: torch.Tensor, concentration: float) -> torch.Tensor:
    """The mean leave-one-out log density of ``features`` (n, D), L2-normalised, under a von Mises-Fisher kernel of
    concentration ``concentration``, without its normalising constant and with the kernel scaled to 1 at distance 0
    (the loss above); 0 (with a gradient of 0) for fewer than 2 rows."""
    n = len(features)
    if n < 2:
        return features.sum() * 0.0
    x = F.normalize(features.float(), dim=-1)
    exponents = concentration * (x @ x.T - 1.0)
    exponents = exponents.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), -torch.inf)
    return (torch.logsumexp(exponents, dim=1) - math.log(n - 1)).mean()


class KDELoss(Objective):
    """The KDE regulariser on the student's pre-head CLS of each global crop, summed over the global crops."""

    def __init__(self, global_crops: int, concentration: float, weight: float) -> None:
        super().__init__()
        self.global_crops, self.concentration, self.weight = global_crops, concentration, weight

    def forward(self, student: CropOutputs, teacher: CropOutputs, batch: Batch, epoch: int) -> torch.Tensor:
        per_crop = student.cls[: self.global_crops * len(batch.crops[0])].chunk(self.global_crops)
        with torch.autocast(student.cls.device.type, enabled=False):
            return torch.stack([kde_log_density(gather_rows(crop), self.concentration) for crop in per_crop]).sum()


def build(cfg: TrainConfig) -> KDELoss | None:
    """The KDE term of a ``dinov2`` run with ``dinov2.kde_weight`` > 0 (None otherwise)."""
    if cfg.objective != "dinov2" or cfg.dinov2.kde_weight == 0:
        return None
    return KDELoss(cfg.crops.global_crops, cfg.dinov2.kde_concentration, cfg.dinov2.kde_weight)
