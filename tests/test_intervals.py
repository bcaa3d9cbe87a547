"""The results table's intervals on constructed cases: too few slides, a class most resamples miss, and many slides
against the analytic interval; slides are resampled, not tiles; the range over folds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bonylib.evaluation.intervals import MAX_DEGENERATE, MIN_GROUPS, fold_range, group_bootstrap
from bonylib.evaluation.metrics import accuracy, balanced_accuracy

CLASSES = ["benign", "G3", "G4", "G5"]


def tiles_of(slides: int, tiles: int, seed: int, rare: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth, prediction and slide of each tile. Each slide is easy or hard (its stain), so its tiles are right or wrong
    together; classes benign, G3 and G4 are on every slide, G5 (class 3) only on the first ``rare`` slides, where the
    prediction always misses it (the hard class that a resample without it would hide)."""
    rng = np.random.default_rng(seed)
    slide = np.repeat(np.arange(slides), tiles)
    truth = rng.integers(0, 3, slides * tiles)
    truth[(slide < rare) & (np.arange(slides * tiles) % tiles < tiles // 4)] = 3
    right = rng.random(slides * tiles) < np.where(rng.random(slides) < 0.7, 0.95, 0.4)[slide]
    predicted = np.where(right & (truth != 3), truth, (truth + 1) % 3)
    return truth, predicted, slide


def balanced(truth: np.ndarray, predicted: np.ndarray):
    return lambda rows: balanced_accuracy(truth[rows], predicted[rows])


def test_three_test_slides_give_no_interval_and_say_why() -> None:
    truth, predicted, slide = tiles_of(3, 40, seed=0)
    interval = group_bootstrap(balanced(truth, predicted), slide, 500, np.eye(4, dtype=bool)[truth], CLASSES)
    assert not interval.shown and np.isnan(interval.low) and np.isnan(interval.high)
    assert interval.reason == f"3 test slides, {MIN_GROUPS} needed"
    patients = group_bootstrap(lambda rows: float(np.mean(rows)), ["a", "b", "c"], 100, unit="patients")
    assert patients.reason == f"3 test patients, {MIN_GROUPS} needed"


@pytest.mark.parametrize("rare", [1, 2])
def test_a_class_that_resamples_miss_gives_no_interval_naming_it(rare: int) -> None:
    """G5 on `rare` of 12 slides: a resample of 12 slides misses it with probability (1 - rare/12)^12 (35 % and 12 %),
    and balanced accuracy without G5 (always predicted wrong here) is another, easier, task."""
    slides = 12
    truth, predicted, slide = tiles_of(slides, 40, seed=1, rare=rare)
    presence = np.eye(4, dtype=bool)[truth]
    interval = group_bootstrap(balanced(truth, predicted), slide, 2000, presence, CLASSES)
    missed = (1 - rare / slides) ** slides
    assert not interval.shown
    share = float(interval.reason.split("(")[1].split("%")[0]) / 100
    assert interval.reason.startswith(f"G5 on {rare} of {slides} test slides (")
    assert share == pytest.approx(missed, abs=0.03), "the share of resamples that miss G5: (1 - k/n)^n"
    scored_anyway = group_bootstrap(balanced(truth, predicted), slide, 2000)  # what the table showed before
    assert scored_anyway.high > balanced_accuracy(truth, predicted) + 0.1, "without G5 the resample scores far higher"
    plain = group_bootstrap(lambda rows: accuracy(truth[rows], predicted[rows]), slide, 2000)
    assert plain.shown and plain.low < accuracy(truth, predicted) < plain.high, "accuracy needs no class in particular"


def test_a_class_on_enough_slides_keeps_the_interval() -> None:
    """G5 on 6 of 12 slides: 0.5^12 = 0.02 % of resamples miss it, well under MAX_DEGENERATE."""
    truth, predicted, slide = tiles_of(12, 40, seed=2, rare=6)
    interval = group_bootstrap(balanced(truth, predicted), slide, 1000, np.eye(4, dtype=bool)[truth], CLASSES)
    assert interval.shown and interval.method == "bootstrap" and not interval.reason
    assert interval.low < balanced_accuracy(truth, predicted) < interval.high
    assert (1 - 6 / 12) ** 12 < MAX_DEGENERATE


def test_many_slides_match_the_analytic_interval() -> None:
    """400 slides of 5 tiles whose scores share a slide effect: the mean tile score's interval is the mean of the slide
    means ± t * their standard error (equal slide sizes), which the bootstrap over slides must reproduce; resampling the
    tiles instead would ignore the slide effect and come out far narrower."""
    rng = np.random.default_rng(3)
    slides, tiles = 400, 5
    slide = np.repeat(np.arange(slides), tiles)
    scores = rng.normal(0.7, 0.08, slides)[slide] + rng.normal(0, 0.03, slides * tiles)
    interval = group_bootstrap(lambda rows: float(scores[rows].mean()), slide, 4000)
    means = scores.reshape(slides, tiles).mean(1)
    half = stats.t.ppf(0.975, slides - 1) * means.std(ddof=1) / np.sqrt(slides)
    assert interval.low == pytest.approx(means.mean() - half, abs=0.15 * half)
    assert interval.high == pytest.approx(means.mean() + half, abs=0.15 * half)
    by_tile = group_bootstrap(lambda rows: float(scores[rows].mean()), np.arange(slides * tiles), 1000)
    assert by_tile.high - by_tile.low < 0.6 * (interval.high - interval.low)


def test_accuracy_over_many_single_tile_slides_matches_the_binomial_interval() -> None:
    rng = np.random.default_rng(4)
    n = 1000
    truth = rng.integers(0, 2, n)
    predicted = np.where(rng.random(n) < 0.8, truth, 1 - truth)
    interval = group_bootstrap(lambda rows: accuracy(truth[rows], predicted[rows]), np.arange(n), 4000)
    p = accuracy(truth, predicted)
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # Wald: fine at n = 1000, p near 0.8
    assert (interval.low, interval.high) == pytest.approx((p - half, p + half), abs=0.003)


def test_the_interval_is_seeded_and_an_undefined_metric_is_named() -> None:
    truth, predicted, slide = tiles_of(15, 20, seed=5)
    first = group_bootstrap(balanced(truth, predicted), slide, 300)
    assert group_bootstrap(balanced(truth, predicted), slide, 300) == first
    undefined = group_bootstrap(lambda rows: float("nan") if rows[0] % 2 else 1.0, np.arange(15), 300)
    assert not undefined.shown and undefined.reason.startswith("undefined on ")
    assert not group_bootstrap(balanced(truth, predicted), slide, 0).shown


def test_range_over_folds() -> None:
    folds = fold_range([0.61, 0.55, 0.7, float("nan"), 0.64])
    assert (folds.low, folds.high, folds.method) == (0.55, 0.7, "folds")
    assert fold_range([0.6, 0.7]).reason == "2 scored folds, 3 needed"


def test_a_class_named_by_a_number_is_called_a_class() -> None:
    """ISUP grades are classes "0".."5": the reason says "class 5", not a bare "5"."""
    grades = np.array([0] * 11 + [5])
    interval = group_bootstrap(lambda rows: 1.0, np.arange(12), 500, np.eye(6, dtype=bool)[grades],
                               [str(g) for g in range(6)])
    assert interval.reason.startswith("class 5 on 1 of 12 test slides (")
