"""Per-iteration schedules of DINO: learning rate, weight decay, teacher momentum and temperature.

As in the reference implementation, every schedule is an array with one value per optimisation
step, computed once: the trainer indexes it with the global step, so a resumed run continues
exactly where it stopped, whatever the epoch boundaries.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then a half cosine from ``base`` to ``final``.

    Returns ``epochs * steps_per_epoch`` values; the last one equals ``final``.
    """
    total = epochs * steps_per_epoch
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    steps = np.arange(total - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps) - 1, 1)))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Teacher temperature per epoch: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs``, then flat.

    A too-hot teacher early on makes the student's targets near-uniform (the collapse DINO's
    sharpening prevents); warming up from a colder temperature keeps training stable.
    """
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)])
