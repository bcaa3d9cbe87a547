"""The self-supervised objectives, one module per objective behind one interface
(:class:`~bonylib.ssl.losses.base.Objective`), in the manner of dinov2's ``loss/`` package: ``dino`` (image level,
every run), and under ``objective: dinov2`` ``ibot`` (masked patches), ``koleo`` and ``kde`` (spreading the
features), each built when its weight is above 0; ``centering`` holds the two ways to centre the teacher (EMA,
Sinkhorn-Knopp) that DINO and iBOT share.

:data:`OBJECTIVES` maps each objective's name to the function that builds it from a run's config (or returns
None where the config leaves it out). The trainer sums the weighted terms of every objective built, logs each
as ``loss_<name>`` beside the total ``loss``, and checkpoints each one's state: a new objective is a module
here and a line in this table, plus the config keys it reads.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bonylib.ssl.config import TrainConfig
from bonylib.ssl.losses import dino, ibot, kde, koleo
from bonylib.ssl.losses.base import Objective

OBJECTIVES: dict[str, Callable[[TrainConfig], Objective | None]] = {
    "dino": dino.build,
    "ibot": ibot.build,
    "koleo": koleo.build,
    "kde": kde.build,
}
"""Objectives by name, in the order their terms are summed."""


def build_objectives(cfg: TrainConfig) -> nn.ModuleDict:
    """The objectives this config trains with, by name (a ModuleDict: their state moves and saves with them)."""
    built = {name: build(cfg) for name, build in OBJECTIVES.items()}
    return nn.ModuleDict({name: objective for name, objective in built.items() if objective is not None})
