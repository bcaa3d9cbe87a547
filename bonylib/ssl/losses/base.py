"""The interface every self-supervised objective implements, so that the trainer runs any sum of them.

An objective reads the student's and the teacher's named outputs of one batch (:class:`CropOutputs`: pooled
feature, patch tokens, head logits) and returns its loss. It owns its state as buffers (DINO's center), so the
checkpoint saves every objective's ``state_dict`` and a stop in the middle of a step puts it back; and it can
report a few numbers about the step (the teacher's entropy) for the logged steps only, where they cost little.
"""

from __future__ import annotations

import torch
from torch import nn

from bonylib.models.head import CropOutputs
from bonylib.ssl.data import Batch


class Objective(nn.Module):
    """One term of the training loss, weighted by ``weight`` in the sum the trainer minimises."""

    weight: float = 1.0

    def forward(self, student: CropOutputs, teacher: CropOutputs, batch: Batch, epoch: int) -> torch.Tensor:
        """The term's (unweighted) loss on one batch; may update the objective's state from it."""
        raise NotImplementedError

    def metrics(self, teacher: CropOutputs, epoch: int) -> dict[str, float]:
        """Numbers worth logging about the last batch (log.jsonl keys); none by default."""
        return {}
