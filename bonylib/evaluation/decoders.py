"""The seed's decoders: images (masks, blurred tiles) or class maps decoded from frozen embeddings.

The seed judged its encoder by how well a small convolutional decoder could rebuild a tile's
DeepGleason mask, or its Gaussian-blurred SICAPv2 tile, from the embedding alone (MSE, §8). Here the
same decoder regresses images (sigmoid, MSE), or outputs a class per pixel (logits, cross-entropy,
scored by Dice and mIoU), and a variant reads the patch tokens laid out on their grid instead of one
vector, which keeps where things are in the tile.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bonylib.evaluation.features import Features
from bonylib.evaluation.probes import FitResult, fit_head

Task = Literal["regression", "classes"]
SEED_START = 7
"""Side of the seed's first feature map (its Linear layer outputs 256 × 7 × 7)."""


class Decoder(nn.Module):
    """Embedding → image by transposed convolutions, each doubling the side: the seed's decoder as its report prints it.

    From a vector (B, D), as the seed: Linear(D → width·7·7), then ConvTranspose2d(kernel_size=3, stride=2,
    padding=1, output_padding=1) stages 7 → 14 → 28 → 56 → 112 → 224, channels halving from ``width`` =
    256 (256 → 128 → 64 → 32 → 16), BatchNorm + ReLU after each but the last, which outputs
    ``out_channels``. From patch tokens (B, N, D) with ``grid`` set (N =
    grid², raster order as timm emits them): a 1×1 convolution to ``width`` channels on the grid, then
    the same stages (14 → 224 is four). ``out_size`` must be the start side times a power of two; a
    smaller one (56) makes tests and demos cheap with the same architecture minus stages.
    ``task="regression"`` ends in a sigmoid (targets in [0, 1], trained with MSE, as the seed);
    ``task="classes"`` returns per-pixel logits for cross-entropy.
    """

    def __init__(self, in_dim: int, out_channels: int = 1, out_size: int = 224, task: Task = "regression",
                 grid: int | None = None, width: int = 256) -> None:
        super().__init__()
        if task not in ("regression", "classes"):
            raise ValueError(f"task must be 'regression' or 'classes', got {task!r}")
        start = SEED_START if grid is None else grid
        stages = math.log2(out_size / start) if out_size >= start else 0.0
        if stages < 1 or not stages.is_integer():
            raise ValueError(f"out_size {out_size} is not {start} px doubled one or more times")
        self.task, self.grid = task, grid
        if grid is None:
            self.stem: nn.Module = nn.Sequential(nn.Linear(in_dim, width * start * start), nn.Unflatten(1, (width, start, start)))
        else:
            self.stem = nn.Conv2d(in_dim, width, kernel_size=1)
        channels = [width // 2**i for i in range(int(stages))] + [out_channels]
        layers: list[nn.Module] = []
        for i, (channels_in, channels_out) in enumerate(zip(channels, channels[1:])):
            layers.append(nn.ConvTranspose2d(channels_in, channels_out, kernel_size=3, stride=2, padding=1,
                                             output_padding=1))
            if i < len(channels) - 2:
                layers += [nn.BatchNorm2d(channels_out), nn.ReLU()]
        self.upsample = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, out_channels, out_size, out_size): images in [0, 1] (regression) or logits (classes)."""
        if self.grid is not None:
            if embeddings.ndim != 3 or embeddings.shape[1] != self.grid**2:
                raise ValueError(f"expected patch tokens (B, {self.grid ** 2}, D), got {tuple(embeddings.shape)}")
            embeddings = embeddings.transpose(1, 2).unflatten(2, (self.grid, self.grid))
        out = self.upsample(self.stem(embeddings))
        return out.sigmoid() if self.task == "regression" else out


def decoder_loss(decoder: Decoder, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE against images (N, C, H, W) for regression, cross-entropy against label maps (N, H, W) for classes."""
    return F.mse_loss(output, target.float()) if decoder.task == "regression" else F.cross_entropy(output, target.long())


@torch.no_grad()
def decode(decoder: Decoder, embeddings: torch.Tensor | Features, batch_size: int = 64) -> torch.Tensor:
    """The decoder's answer for each embedding, on the CPU, in eval mode: images (N, C, H, W) in [0, 1]
    for regression, class maps (N, H, W) for classes."""
    device = next(decoder.parameters()).device
    was_training = decoder.training
    decoder.eval()
    outputs = []
    for start in range(0, len(embeddings), batch_size):
        out = decoder(embeddings[start : start + batch_size].to(device)).float()
        outputs.append((out if decoder.task == "regression" else out.argmax(1)).cpu())
    decoder.train(was_training)
    return torch.cat(outputs)


def fit_decoder(decoder: Decoder, train: tuple[torch.Tensor | Features, torch.Tensor],
                val: tuple[torch.Tensor | Features, torch.Tensor], *,
                lr: float = 1e-3, batch_size: int = 64, max_epochs: int = 50, patience: int = 5, seed: int = 0) -> FitResult:
    """Train ``decoder`` on (embeddings, targets) and keep the epoch with the lowest validation loss.

    Targets are images (N, C, H, W) in [0, 1] for regression or label maps (N, H, W) for classes, at
    the decoder's ``out_size``. AdamW with a cosine decay, validated once an epoch, stopped after
    ``patience`` epochs without a lower validation loss (the seed's protocol is not recorded beyond
    its MSE; these settings are ours).
    """
    (train_x, train_y), (val_x, val_y) = train, val
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("embeddings and targets differ in length")
    if not len(val_y):
        raise ValueError("the validation set is empty")

    def validate(model: nn.Module) -> float:
        """Mean loss per validation item (batch means weighted by batch size)."""
        device = next(model.parameters()).device
        total = 0.0
        for start in range(0, len(val_x), batch_size):
            inputs, targets = val_x[start : start + batch_size].to(device), val_y[start : start + batch_size].to(device)
            total += float(decoder_loss(decoder, model(inputs), targets)) * len(inputs)
        return total / len(val_x)

    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    return fit_head(decoder, lambda output, target: decoder_loss(decoder, output, target),
                    lambda index: ((train_x[index],), train_y[index]), len(train_y), validate, "val_loss",
                    maximize=False, lr=lr, batch_size=batch_size, max_steps=max_epochs * steps_per_epoch,
                    eval_every=steps_per_epoch, patience=patience, seed=seed)
