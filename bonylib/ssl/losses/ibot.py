"""The iBOT loss: the student, shown global crops with blocks of patches masked, predicts the teacher's output for
each masked patch (Zhou et al., 2022; the patch-level term of DINOv2, Oquab et al., 2024).

For every masked patch ``p`` of a global crop the loss is ``H(P_t(p), P_s(p))``, the cross-entropy between the
teacher's centred, sharpened distribution over the patch head's prototypes (from the crop seen whole) and the
student's (from the masked crop), as DINO does for whole images. A crop's masked patches are averaged, and the crops
averaged over all global crops of the batch, masked or not (an unmasked crop adds 0), as DINOv2 weights them: a crop
counts the same whatever the number of its patches hidden. Teacher targets are centred by their own EMA center or by
Sinkhorn-Knopp (``loss.centering``, shared with the DINO term) at the DINO term's temperatures.

The masks come with the batch (:class:`~bonylib.ssl.data.Batch`, made by :class:`~bonylib.ssl.masking.BlockMasking`
in the data pipeline); the patch head's logits at the masked places come with the networks' outputs
(``CropOutputs.masked``, from :class:`~bonylib.models.head.MultiCropWrapper`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bonylib.models.head import CropOutputs
from bonylib.ssl.config import TrainConfig
from bonylib.ssl.data import Batch
from bonylib.ssl.losses.base import Objective
from bonylib.ssl.losses.centering import build_centering
from bonylib.ssl.losses.dino import entropies
from bonylib.ssl.schedules import teacher_temperature_schedule


def masked_patch_loss(student_logits: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                      student_temp: float) -> torch.Tensor:
    """``student_logits`` (M, K) and teacher ``targets`` (M, K) of the M masked patches, in the order of
    ``masks.nonzero()``; ``masks`` (crops, rows, columns): the mean over crops of each crop's mean cross-entropy over
    its masked patches (0 for a crop without any)."""
    per_patch = -(targets * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    counts = masks.flatten(1).sum(dim=1)
    weights = torch.repeat_interleave(1.0 / counts.clamp(min=1).float(), counts)  # each patch: 1 / its crop's count
    return (per_patch * weights).sum() / len(masks)


class IBOTLoss(Objective):
    """Cross-entropy between teacher and student patch-head outputs at the masked patches of the global crops."""

    def __init__(self, out_dim: int, epochs: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, student_temp: float, center_momentum: float, centering: str,
                 sinkhorn_iterations: int, weight: float) -> None:
        super().__init__()
        self.out_dim, self.student_temp, self.weight = out_dim, student_temp, weight
        self.centering = build_centering(centering, out_dim, center_momentum, sinkhorn_iterations)
        self.teacher_temps = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                                                          epochs)

    def teacher_temperature(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student: CropOutputs, teacher: CropOutputs, batch: Batch, epoch: int) -> torch.Tensor:
        if batch.masks is None or student.masked is None or teacher.masked is None:
            raise ValueError("the iBOT term needs masks in the batch and the networks' masked outputs")
        targets = self.centering.targets(teacher.masked, self.teacher_temperature(epoch)).detach()
        loss = masked_patch_loss(student.masked, targets, batch.masks, self.student_temp)
        self.centering.update(teacher.masked)
        return loss

    @torch.no_grad()
    def metrics(self, teacher: CropOutputs, epoch: int) -> dict[str, float]:
        """The mean entropy of the teacher's patch targets (ln K: uniform, patch-level collapse) and the share of
        prototypes' mass the batch spreads over (the entropy of the mean target), on the masked patches."""
        if teacher.masked is None:
            return {}
        # every process computes the targets, masked patches or not: Sinkhorn-Knopp's sums are collective
        targets = self.centering.targets(teacher.masked, self.teacher_temperature(epoch))
        if not len(targets):
            return {"ibot_masked_patches": 0.0}
        per_patch, of_mean = entropies(targets)
        return {"ibot_masked_patches": float(len(targets)), "ibot_teacher_entropy": float(per_patch),
                "ibot_mean_entropy": float(of_mean)}


def build(cfg: TrainConfig) -> IBOTLoss | None:
    """The iBOT term of a ``dinov2`` run with ``dinov2.ibot_weight`` > 0 (None otherwise): its prototypes are the
    patch head's (the DINO head's when shared), its temperatures and centering the DINO term's."""
    if not cfg.masked_modelling:
        return None
    return IBOTLoss(cfg.model.out_dim, cfg.optim.epochs, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                    cfg.loss.warmup_teacher_temp_epochs, cfg.loss.student_temp, cfg.loss.center_momentum,
                    cfg.loss.centering, cfg.loss.sinkhorn_iterations, cfg.dinov2.ibot_weight)
