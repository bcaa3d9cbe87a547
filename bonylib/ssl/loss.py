"""The DINO loss: cross-entropy between a sharpened, centred teacher and the student, over crop pairs.

For every pair of a teacher view ``t`` (global crops only) and a student view ``s`` the loss is
``H(P_t, P_s) = -sum_k P_t[k] log P_s[k]`` with ``P_s = softmax(g_s / tau_s)`` and
``P_t = softmax((g_t - c) / tau_t)``, averaged over pairs and images (Caron et al., 2021, eq. 1-3).
Centering ``c`` (an EMA of the teacher's mean output, summed over all processes) stops one
dimension from dominating; the low teacher temperature (sharpening) stops the output from going
uniform. Together they avoid collapse; the notebook on DINO theory shows each alone failing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bonylib.ssl.schedules import teacher_temperature_schedule


def crop_pairs(global_crops: int, total_crops: int) -> list[tuple[int, int]]:
    """(teacher view, student view) pairs that enter the loss.

    As in the reference, a student crop is not compared with the teacher's view of the same
    crop when there are several global crops. With a single global crop (the seed's 1 + 5), that
    rule would leave the global student crop without any target, so its pair with the teacher's
    global view is kept: every student crop is compared with every teacher view it can be.
    """
    pairs = [(t, s) for t in range(global_crops) for s in range(total_crops) if s != t or global_crops == 1]
    return pairs


class DINOLoss(nn.Module):
    """DINO cross-entropy with centering and a teacher-temperature schedule (per epoch)."""

    def __init__(self, out_dim: int, global_crops: int, total_crops: int, epochs: int,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.global_crops, self.total_crops = global_crops, total_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.pairs = crop_pairs(global_crops, total_crops)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)

    def teacher_temperature(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """``student_output``: (total_crops * B, K), crops stacked crop by crop; ``teacher_output``: (global_crops * B, K).

        Also updates the center from this batch's teacher output (after computing the loss).
        """
        student = (student_output.float() / self.student_temp).chunk(self.total_crops)
        temp = self.teacher_temperature(epoch)
        teacher = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach().chunk(self.global_crops)
        total = student_output.new_zeros((), dtype=torch.float32)
        for t, s in self.pairs:
            total = total + torch.sum(-teacher[t] * F.log_softmax(student[s], dim=-1), dim=-1).mean()
        self.update_center(teacher_output)
        return total / len(self.pairs)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean, the mean taken over the global batch of all processes."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_output)), device=teacher_output.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)
