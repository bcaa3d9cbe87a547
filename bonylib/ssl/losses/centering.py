"""Centering of the teacher's outputs, the part of the DINO loss that stops one prototype from winning.

DINO subtracts an exponential moving average of the teacher's batch-mean output before the softmax
(Caron et al., 2021, eq. 4). It is a module of its own, with its state (the center) in its buffers, so that
another centering (DINOv2's Sinkhorn-Knopp) can take its place without touching the loss around it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class EMACentering(nn.Module):
    """Teacher targets ``softmax((t - c) / T)`` with ``c`` an EMA of the teacher's mean output over the global batch
    of all processes. The center is updated from a batch only after that batch's targets are computed."""

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_output: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher's target distributions (rows sum to 1) under the current center, in float32."""
        return F.softmax((teacher_output.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean, the mean taken over the global batch of all processes."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_output)), device=teacher_output.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.momentum).add_(batch_sum / count, alpha=1 - self.momentum)
