"""The DINO loss: cross-entropy between a sharpened, centred teacher and the student, over crop pairs.

For every pair of a teacher view ``t`` (global crops only) and a student view ``s`` the loss is
``H(P_t, P_s) = -sum_k P_t[k] log P_s[k]`` with ``P_s = softmax(g_s / tau_s)`` and
``P_t = softmax((g_t - c) / tau_t)``, averaged over pairs and images (Caron et al., 2021, eq. 1-3).
Centering ``c`` (an EMA of the teacher's mean output, summed over all processes:
:class:`~bonylib.ssl.losses.centering.EMACentering`; or DINOv2's Sinkhorn-Knopp in its place,
``loss.centering: sinkhorn_knopp``) stops one dimension from dominating; the low teacher
temperature (sharpening) stops the output from going uniform. Together they avoid collapse; the notebook on
DINO theory shows each alone failing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bonylib.models.head import CropOutputs
from bonylib.ssl.config import TrainConfig
from bonylib.ssl.data import Batch
from bonylib.ssl.losses.base import Objective
from bonylib.ssl.losses.centering import build_centering
from bonylib.ssl.schedules import teacher_temperature_schedule


def entropies(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two collapse signals of a batch of target distributions (rows of ``targets``): the mean per-image
    entropy H(P) (ln K when the targets are uniform) and the entropy of the batch-mean distribution H(mean P)
    (0 when one prototype wins every image). A healthy run has low H(P) and high H(mean P)."""
    per_image = -(targets * torch.log(targets + 1e-12)).sum(dim=-1).mean()
    mean = targets.mean(dim=0)
    return per_image, -(mean * torch.log(mean + 1e-12)).sum()


def crop_pairs(global_crops: int, total_crops: int) -> list[tuple[int, int]]:
    """(teacher view, student view) pairs that enter the loss.

    As in the reference, a student crop is not compared with the teacher's view of the same
    crop when there are several global crops. With a single global crop (the seed's 1 + 5), that
    rule would leave the global student crop without any target, so its pair with the teacher's
    global view is kept: every student crop is compared with every teacher view it can be.
    """
    pairs = [(t, s) for t in range(global_crops) for s in range(total_crops) if s != t or global_crops == 1]
    return pairs


class DINOLoss(Objective):
    """DINO cross-entropy with centering and a teacher-temperature schedule (per epoch), on the head's logits."""

    def __init__(self, out_dim: int, global_crops: int, total_crops: int, epochs: int,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "ema",
                 sinkhorn_iterations: int = 3, weight: float = 1.0) -> None:
        super().__init__()
        self.out_dim, self.global_crops, self.total_crops = out_dim, global_crops, total_crops
        self.student_temp, self.weight = student_temp, weight
        self.pairs = crop_pairs(global_crops, total_crops)
        self.centering = build_centering(centering, out_dim, center_momentum, sinkhorn_iterations)
        self.teacher_temps = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)

    def teacher_temperature(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student: CropOutputs, teacher: CropOutputs, batch: Batch, epoch: int) -> torch.Tensor:
        return self.distill(student.head, teacher.head, epoch)

    def distill(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """The loss of head logits: ``student_output`` (total_crops * B, K), crops stacked crop by crop;
        ``teacher_output`` (global_crops * B, K).

        Also updates the center from this batch's teacher output (after computing the loss).
        """
        student = (student_output.float() / self.student_temp).chunk(self.total_crops)
        teacher = self.centering.targets(teacher_output, self.teacher_temperature(epoch)).detach().chunk(self.global_crops)
        total = student_output.new_zeros((), dtype=torch.float32)
        for t, s in self.pairs:
            total = total + torch.sum(-teacher[t] * F.log_softmax(student[s], dim=-1), dim=-1).mean()
        self.centering.update(teacher_output)
        return total / len(self.pairs)

    @torch.no_grad()
    def metrics(self, teacher: CropOutputs, epoch: int) -> dict[str, float]:
        """The teacher's temperature, the mean entropy of its targets under the current center (ln K, logged as
        ``collapse_entropy``, means uniform targets: collapse) and the spread of its normalised outputs."""
        temperature = self.teacher_temperature(epoch)
        per_image, _ = entropies(self.centering.targets(teacher.head, temperature))
        return {"teacher_temp": temperature, "teacher_entropy": float(per_image),
                "collapse_entropy": math.log(self.out_dim),
                "feature_std": float(F.normalize(teacher.head.float(), dim=-1).std(dim=0).mean())}


def build(cfg: TrainConfig) -> DINOLoss:
    """The DINO term of a run: its prototypes, crops, temperatures and centering from the config, weighted by
    ``dinov2.dino_weight`` under ``objective: dinov2`` (every run has it: its teacher entropy is the run's collapse
    signal)."""
    weight = cfg.dinov2.dino_weight if cfg.objective == "dinov2" else 1.0
    return DINOLoss(cfg.model.out_dim, cfg.crops.global_crops, cfg.crops.n_crops, cfg.optim.epochs,
                    cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs,
                    cfg.loss.student_temp, cfg.loss.center_momentum, cfg.loss.centering, cfg.loss.sinkhorn_iterations,
                    weight)
