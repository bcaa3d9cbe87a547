"""Centering of the teacher's outputs, the part of the DINO and iBOT losses that stops one prototype from winning.

Two ways, one interface (``targets`` turns the teacher's logits into target distributions, ``update`` learns from
a batch afterwards), so that a loss takes either without knowing which:

- :class:`EMACentering`, DINO's: subtract an exponential moving average of the teacher's batch-mean output before
  the softmax (Caron et al., 2021, eq. 4). Its state (the center) is in its buffers and checkpointed with the loss.
- :class:`SinkhornKnoppCentering`, SwAV's and DINOv2's: make the targets of a batch an equal-partition assignment,
  every prototype given the same total weight over the batch, by a few rounds of Sinkhorn-Knopp normalisation
  (Caron et al., 2020; Oquab et al., 2024 use 3). No state: each batch is centred on itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


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
        """EMA of the teacher's batch mean, the mean taken over the global batch of all processes (a global batch
        without rows, iBOT's when no patch was masked, leaves the center as it is)."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_output)), device=teacher_output.device)
        if _distributed():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        if count > 0:
            self.center.mul_(self.momentum).add_(batch_sum / count, alpha=1 - self.momentum)


class SinkhornKnoppCentering(nn.Module):
    """Teacher targets by ``iterations`` rounds of Sinkhorn-Knopp on ``exp(t / T)``, over the global batch of all
    processes: the matrix ``Q`` (rows: the B samples of every process, columns: the K prototypes) is scaled
    alternately so that every prototype's column sums to B / K and every sample's row to 1. Column sums are
    all-reduced, so two processes with n rows each give the targets of one process with the 2n rows; row sums are
    each sample's own. The rows returned sum to 1 exactly (the last scaling is the rows'); the columns sum to B / K
    up to what the last round leaves.

    Computed in the log domain (each scaling a log-sum-exp, across processes by their maximum and then their sum), so
    no term overflows or vanishes: DINOv2's ``exp(t / T)`` overflows float32 beyond logits of about 3.5 at T = 0.04,
    and shifted by its maximum, a prototype that every sample scores far below it becomes a column of zeros (0 / 0).
    """

    def __init__(self, iterations: int = 3) -> None:
        super().__init__()
        self.iterations = iterations

    @torch.no_grad()
    def targets(self, teacher_output: torch.Tensor, temperature: float) -> torch.Tensor:
        """Sinkhorn-Knopp targets (rows sum to 1) of ``teacher_output`` (B_local, K), float32."""
        log_q = teacher_output.float() / temperature
        count = log_q.new_tensor(float(len(log_q)))
        if _distributed():
            dist.all_reduce(count)
        if count == 0:  # no rows anywhere (iBOT with nothing masked): nothing to assign
            return log_q.softmax(dim=-1)
        log_share = torch.log(count / log_q.shape[1])
        for _ in range(self.iterations):
            log_q = log_q - _log_column_sums(log_q) + log_share  # every prototype: total weight B / K
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # every sample: total weight 1
        return log_q.exp()

    def update(self, teacher_output: torch.Tensor) -> None:
        """Nothing to learn: each batch is centred on itself."""


def _log_column_sums(log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_rows exp(log_q)`` per column (1, K) over the rows of every process: each column's maximum is
    all-reduced first, then the sums of the exponentials below it."""
    peak = log_q.max(dim=0, keepdim=True).values if len(log_q) else log_q.new_full((1, log_q.shape[1]), -torch.inf)
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    sums = torch.exp(log_q - peak).sum(dim=0, keepdim=True)
    if _distributed():
        dist.all_reduce(sums)
    return peak + torch.log(sums)


def build_centering(kind: str, out_dim: int, momentum: float, iterations: int) -> EMACentering | SinkhornKnoppCentering:
    """The centering a run's ``loss.centering`` names (the config checks the name)."""
    return EMACentering(out_dim, momentum) if kind == "ema" else SinkhornKnoppCentering(iterations)
