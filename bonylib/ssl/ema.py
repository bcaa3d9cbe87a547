"""The teacher: an exponential moving average of the student's weights (momentum encoder)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter.

    Buffers (BatchNorm running statistics of XCiT's stem and LPI blocks) are not averaged: the
    teacher keeps its own, computed on the global crops it sees, as in the reference.
    """
    student_params = dict(student.named_parameters())
    for name, teacher_param in teacher.named_parameters():
        teacher_param.mul_(momentum).add_(student_params[name].detach(), alpha=1.0 - momentum)
