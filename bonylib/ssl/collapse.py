"""A small DINO on synthetic clusters, to show what centering and sharpening each prevent.

Two ways for self-distillation to "succeed" without learning anything: every image gets the same
one-hot output (one prototype dominates: stopped by centering), or every image gets the uniform
output (stopped by sharpening, a teacher colder than the student). Both show in two entropies of
the teacher's targets over a batch: the mean per-image entropy H(P) (ln K when uniform) and the
entropy of the batch-mean distribution H(mean P) (0 when one prototype wins). A healthy run has
low H(P) and high H(mean P).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from bonylib.models.head import DINOHead
from bonylib.ssl.ema import update_teacher
from bonylib.ssl.losses.dino import DINOLoss, entropies


def toy_dino(centering: bool = True, sharpening: bool = True, steps: int = 600, prototypes: int = 64,
             clusters: int = 8, dim: int = 32, batch: int = 64, seed: int = 0) -> pd.DataFrame:
    """Train a tiny DINO (linear backbone, library head/loss/EMA) on Gaussian clusters; metrics per step.

    Views are noisy copies of a point (2 global, 4 local, noisier). Without centering the center
    is frozen at 0; without sharpening the teacher is as warm as the student (0.1).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # clusters close enough that a constant output is a tempting shortcut, as for real tissue
    centres = torch.randn(clusters, dim, generator=g) * 0.75

    def model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 64),
                             DINOHead(64, prototypes, hidden_dim=64, bottleneck_dim=16))

    student, teacher = model(), model()
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = DINOLoss(prototypes, 2, 6, epochs=1, warmup_teacher_temp=0.04 if sharpening else 0.1,
                       teacher_temp=0.04 if sharpening else 0.1, center_momentum=0.9 if centering else 1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.04)
    rows = []
    for step in range(steps):
        points = centres[torch.randint(clusters, (batch,), generator=g)]
        views = [points + torch.randn(points.shape, generator=g) * (0.5 if i < 2 else 1.5) for i in range(6)]
        with torch.no_grad():
            teacher_out = teacher(torch.cat(views[:2]))
        loss = loss_fn.distill(student(torch.cat(views)), teacher_out, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_teacher(student, teacher, 0.99)
        per_image, of_mean = entropies(loss_fn.centering.targets(teacher_out, loss_fn.teacher_temperature(0)))
        rows.append({"step": step, "loss": float(loss.detach()), "entropy": float(per_image), "mean_entropy": float(of_mean),
                     "uniform": math.log(prototypes)})
    return pd.DataFrame(rows)
