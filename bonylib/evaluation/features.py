"""Frozen features of tiles: a backbone run in eval mode over a dataset, resized and normalised as in training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bonylib.runtime import Precision


class EvalTransform:
    """PIL image -> normalised float tensor at ``size`` pixels (no augmentation)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:  # noqa: ANN001 - a PIL image
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size))
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, batch_size: int = 64, workers: int = 0,
                     device: torch.device | None = None, precision: Precision | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, targets (N,)) of ``dataset``'s ``(tensor, target)`` items, in order.

    ``precision`` is the autocast the features are computed in (default fp32): pass the precision
    resolved for the machine (:func:`bonylib.runtime.resolve_precision`), never a fixed bf16.
    """
    device = device or next(backbone.parameters()).device
    precision = precision or Precision("fp32", "fp32", "the default")
    was_training = backbone.training
    backbone.eval()
    features, targets = [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False):
        with precision.autocast(device):
            features.append(backbone(images.to(device)).float().cpu())
        targets.append(torch.as_tensor(labels))
    backbone.train(was_training)
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(targets)
