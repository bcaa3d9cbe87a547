"""The student, its EMA teacher and the objectives: what one training step computes, as named losses.

In the manner of dinov2's ``SSLMetaArch``: the student and the teacher are the same backbone + DINO head
(:class:`~bonylib.models.head.MultiCropWrapper`, which gives named outputs: pooled feature, patch tokens, head
logits); the teacher sees the global crops only, without gradients, and follows the student by an exponential
moving average. Each objective (:mod:`bonylib.ssl.losses`) turns the two sides' outputs into one loss; the step
returns them by name, weighted, and the trainer sums them. Under DDP only the student is wrapped.
"""

from __future__ import annotations

import torch
from torch import nn

from bonylib.models.backbones import create_backbone
from bonylib.models.head import CropOutputs, DINOHead, MultiCropWrapper
from bonylib.ssl.config import TrainConfig
from bonylib.ssl.data import Batch
from bonylib.ssl.ema import update_teacher
from bonylib.ssl.losses import build_objectives


def _network(cfg: TrainConfig, drop_path_rate: float) -> MultiCropWrapper:
    """Backbone + DINO head, and for masked-image modelling the mask token and, when asked, a patch head of the DINO
    head's sizes (drawn after the DINO head: a DINO-only network draws exactly what it always drew)."""
    model = cfg.model
    backbone = create_backbone(model.backbone, drop_path_rate=drop_path_rate, stem=model.stem)

    def head() -> DINOHead:
        return DINOHead(backbone.num_features, model.out_dim, model.hidden_dim, model.bottleneck_dim,
                        norm_last_layer=model.norm_last_layer)

    dino_head = head()
    patch_head = head() if cfg.masked_modelling and cfg.dinov2.separate_patch_head else None
    return MultiCropWrapper(backbone, dino_head, cfg.masked_modelling, patch_head)


class SelfDistillation(nn.Module):
    """Student, teacher and objectives of one run, on ``device`` in ``memory_format``; ``distributed`` wraps the
    student in DDP (with SyncBatchNorm on GPUs only: it exists only there, and XCiT's stem and LPI have BatchNorm).

    The checkpoint's layout is kept from before objectives had their own state: ``student`` and ``teacher`` are
    the wrappers' state dicts (``backbone.*``, ``head.*``), and the objectives' state is saved beside them.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, memory_format: torch.memory_format,
                 distributed: bool = False) -> None:
        super().__init__()
        self.global_crops = cfg.crops.global_crops
        student = _network(cfg, cfg.model.drop_path)
        teacher = _network(cfg, 0.0)
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        student = student.to(device, memory_format=memory_format)
        teacher = teacher.to(device, memory_format=memory_format)
        if distributed:
            if device.type == "cuda":
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            student = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None)
        self.student, self.teacher = student, teacher
        self.objectives = build_objectives(cfg).to(device)

    @property
    def student_network(self) -> MultiCropWrapper:
        """The student itself (inside DDP when distributed): what the optimiser, the EMA and checkpoints use."""
        return self.student.module if isinstance(self.student, nn.parallel.DistributedDataParallel) else self.student

    def forward(self, batch: Batch, epoch: int) -> tuple[dict[str, torch.Tensor], CropOutputs]:
        """The weighted loss of each objective on ``batch`` (crops already on the device), and the teacher's outputs
        (for the objectives' metrics). Run it under the precision's autocast; the teacher runs without gradients.
        With masks (iBOT) the student sees its global crops masked and the teacher sees them whole, as in DINOv2."""
        with torch.no_grad():
            teacher = self.teacher(batch.crops[: self.global_crops], batch.masks, hide=False)
        student = self.student(batch.crops, batch.masks)
        losses = {name: objective.weight * objective(student, teacher, batch, epoch)
                  for name, objective in self.objectives.items()}
        return losses, teacher

    def metrics(self, teacher: CropOutputs, epoch: int) -> dict[str, float]:
        """Every objective's metrics of the last batch (for logged steps)."""
        return {key: value for objective in self.objectives.values() for key, value in objective.metrics(teacher, epoch).items()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_teacher(self.student_network, self.teacher, momentum)
