"""Intervals of a benchmark score that say so when the test part cannot support one.

The results table's interval is a percentile bootstrap over the test *groups* (slides, or patients): tiles of
one slide share its stain, scanner and patient, so whole groups are resampled, never tiles. That interval
misleads in two cases the demo met, and the table then shows the reason instead of numbers:

- **Too few groups.** With three test slides a resample is one of ten multisets of them; the percentile
  interval of so few distinct values has nothing like 95 % coverage (the demo's PANDA column read
  0.421 [0.421, 0.689]: the estimate on the interval's edge). Below :data:`MIN_GROUPS` there is no bootstrap.
- **A resample that changes the metric.** Balanced accuracy, macro-F1, mean Dice and mIoU average over the
  classes present; a resample that misses a rare class scores a different, usually easier, task, and
  those resamples pile up in one tail. When more than :data:`MAX_DEGENERATE` of the resamples miss a class
  of the test part (or leave the metric undefined), there is no interval, and the reason names the class
  and on how many test groups it is. A class on k of n groups is missed by a resample with probability
  (1 - k/n)^n ≈ e^-k: it needs about four groups whatever n is.

Where groups are too few but the column pools several cross-validation folds (SICAPv2's Val1-Val4, each
testing other patients), :func:`fold_range` gives the spread of the per-fold scores instead: a range over
folds, not a 95 % interval, and labelled so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_GROUPS = 10
"""Fewest test groups for a bootstrap interval. The percentile bootstrap of a mean over n groups is too
narrow by sqrt((n - 1) / n) and by the normal-versus-t quantile: on normal data it covers 0.75 at n = 3,
0.85 at n = 5, 0.90 at n = 10 and 0.93 at n = 20 instead of 0.95 (18 % too narrow at n = 10, 63 % at n = 3)."""
MAX_DEGENERATE = 0.025
"""Largest share of resamples that may miss a class or leave the metric undefined (half the 5 % the two
tails hold: above it, a whole tail can be resamples of another task)."""
MIN_FOLDS = 3
"""Fewest folds for a range over folds (two scores are a pair, not a spread)."""


@dataclass(frozen=True)
class Interval:
    """An interval, or why there is none.

    ``method`` is ``"bootstrap"`` (percentile, 95 %, over the test groups), ``"folds"`` (the range of the
    per-fold scores) or ``""`` (none: ``reason`` says why, in a few words for a table cell).
    """

    low: float
    high: float
    method: str
    reason: str = ""

    @classmethod
    def missing(cls, reason: str) -> Interval:
        """No interval, and why."""
        return cls(math.nan, math.nan, "", reason)

    @property
    def shown(self) -> bool:
        """Whether there are bounds to show."""
        return bool(self.method)


def group_bootstrap(statistic: Callable[[np.ndarray], float], groups: Sequence[object] | np.ndarray, resamples: int,
                    presence: np.ndarray | None = None, class_names: Sequence[str] = (), unit: str = "slides",
                    level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile ``level`` interval of ``statistic(rows)`` over ``resamples`` resamples of whole groups, or why not.

    ``groups``: the group of each row; ``statistic`` gets the row indices of one resample (each drawn group's
    rows, as many groups as there are, with replacement) and returns the score, NaN where undefined.
    ``presence``: (rows, classes) booleans, which classes a row carries (its true class; the classes in its
    mask), for a metric that averages over the classes present: every class present in the test part must be
    present in the resample, or the resample is counted as degenerate. ``class_names`` and ``unit`` word the
    reason. Seeded: the same call gives the same interval.
    """
    codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].ravel()
    count = int(codes.max()) + 1 if codes.size else 0
    if count < MIN_GROUPS:
        return Interval.missing(f"{count} test {unit if count != 1 else unit.removesuffix('s')}, {MIN_GROUPS} needed")
    if resamples < 1:
        return Interval.missing("no bootstrap resamples asked for")
    order = np.argsort(codes, kind="stable")
    rows_of = np.split(order, np.cumsum(np.bincount(codes, minlength=count))[:-1])
    carried = None
    if presence is not None:
        presence = np.asarray(presence, bool)
        if presence.shape[0] != len(codes):
            raise ValueError(f"presence has {presence.shape[0]} rows for {len(codes)} rows of groups")
        carried = np.stack([presence[rows].any(0) for rows in rows_of])  # (groups, classes)
        needed = np.flatnonzero(carried.any(0))
        carried = carried[:, needed]
    rng = np.random.default_rng(seed)
    stats = np.full(resamples, np.nan)
    missed = np.zeros(0 if carried is None else carried.shape[1], np.int64)
    for i in range(resamples):
        drawn = rng.integers(0, count, count)
        if carried is not None:
            absent = ~carried[drawn].any(0)
            if absent.any():
                missed += absent
                continue
        stats[i] = float(statistic(np.concatenate([rows_of[g] for g in drawn])))
    degenerate = float(np.isnan(stats).mean())
    if degenerate > MAX_DEGENERATE:
        if missed.any():
            rarest = int(np.argmax(missed))
            name = str(class_names[needed[rarest]]) if len(class_names) > needed[rarest] else str(needed[rarest])
            name = f"class {name}" if name.isdigit() else name  # ISUP grades are named by their number
            return Interval.missing(f"{name} on {int(carried[:, rarest].sum())} of {count} test {unit} "
                                    f"({missed[rarest] / resamples:.0%} of resamples miss it)")
        return Interval.missing(f"undefined on {degenerate:.0%} of resamples")
    low, high = np.percentile(stats[~np.isnan(stats)], [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(low), float(high), "bootstrap")


def fold_range(scores: Sequence[float]) -> Interval:
    """The lowest and highest of per-fold scores (each fold testing other groups), or why not (too few folds)."""
    values = np.asarray(scores, np.float64)
    values = values[np.isfinite(values)]
    if len(values) < MIN_FOLDS:
        return Interval.missing(f"{len(values)} scored folds, {MIN_FOLDS} needed")
    return Interval(float(values.min()), float(values.max()), "folds")
